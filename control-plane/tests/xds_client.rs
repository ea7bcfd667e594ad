//! ztunnel's xDS client (trellis-core) against the control plane's server: sync, updates,
//! the last good config while the control plane is away, resume after it returns.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::Channel;
use trellis_control_plane::config::load::{Document, parse_file};
use trellis_control_plane::config::model::{MeshConfig, Model};
use trellis_control_plane::config::snapshot::Snapshot;
use trellis_control_plane::xds::{AckTracker, Publisher, XdsServer};
use trellis_core::xds::{XdsClient, XdsConfig};
use trellis_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use trellis_proto::type_url::{ADDRESS, AUTHORIZATION};

const SEED: &str = include_str!("../../examples/seed-policies.yaml");

fn snapshot(pod_ip: &str) -> Snapshot {
    let yaml = format!(
        "{SEED}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: foo, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: httpbin, namespace: foo, labels: {{app: httpbin}}}}\nspec: {{nodeName: node1, containers: [{{name: a, image: b}}]}}\nstatus: {{podIP: {pod_ip}}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: httpbin, namespace: foo}}\nspec: {{clusterIP: 10.96.0.7, selector: {{app: httpbin}}, ports: [{{port: 8000}}]}}\n"
    );
    let mut m = Model::default();
    for d in parse_file(Path::new("c.yaml"), &yaml) {
        if let Document::Loaded(l) = d {
            m.apply(&l.id, l.object);
        }
    }
    Snapshot::build(&m, &MeshConfig::default())
}

fn serve(
    listener: tokio::net::TcpListener,
    snaps: watch::Receiver<Arc<Snapshot>>,
) -> tokio::task::JoinHandle<()> {
    let server = XdsServer::new(snaps, Arc::new(AckTracker::default()));
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    })
}

fn client(addr: SocketAddr) -> XdsClient {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    XdsClient::start(
        channel,
        XdsConfig {
            node_id: "ztunnel~node1".into(),
            types: vec![ADDRESS.into(), AUTHORIZATION.into()],
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            credential: None,
        },
    )
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("not within 5 s: {what}");
}

#[tokio::test]
async fn syncs_follows_updates_and_survives_a_control_plane_restart() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (publish, snaps) = Publisher::new(snapshot("10.244.1.9"));
    let server = serve(listener, snaps.clone());
    let xds = client(addr);
    assert!(!xds.is_synced(), "not synced before the first responses");
    tokio::time::timeout(Duration::from_secs(5), xds.wait_synced())
        .await
        .unwrap();
    {
        let store = xds.store();
        let w = store
            .workload_by_ip(IpAddr::from([10, 244, 1, 9]))
            .expect("workload by IP");
        assert_eq!(w.uid, "Kubernetes//Pod/foo/httpbin");
        assert!(
            store.service_by_vip(IpAddr::from([10, 96, 0, 7])).is_some(),
            "service by VIP"
        );
        let names: Vec<String> = store
            .policies_for(w)
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(
            names,
            ["httpbin", "istio_converted_static_strict"],
            "seed policies apply to httpbin"
        );
    }

    publish.publish(snapshot("10.244.1.10"));
    eventually("the pod's new IP reaches the store", || {
        xds.store()
            .workload_by_ip(IpAddr::from([10, 244, 1, 10]))
            .is_some()
    })
    .await;

    // The control plane goes away: the last good config keeps serving.
    server.abort();
    let _ = server.await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(xds.is_synced());
    assert!(
        xds.store()
            .workload_by_ip(IpAddr::from([10, 244, 1, 10]))
            .is_some()
    );

    // It comes back (same address) with a change made meanwhile: the client resumes.
    publish.publish(snapshot("10.244.1.11"));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _server = serve(listener, snaps);
    eventually(
        "the change made while away arrives after reconnecting",
        || {
            xds.store()
                .workload_by_ip(IpAddr::from([10, 244, 1, 11]))
                .is_some()
        },
    )
    .await;
    assert!(
        xds.store()
            .workload_by_ip(IpAddr::from([10, 244, 1, 10]))
            .is_none()
    );
}
