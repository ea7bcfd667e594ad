//! The delta xDS server over real gRPC on loopback, driven by a raw client: subscribe, ACK,
//! updates and deletions, NACK, subscription by name, resume on reconnect, ACK tracking.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use trellis_control_plane::config::load::{Document, parse_file};
use trellis_control_plane::config::model::{MeshConfig, Model};
use trellis_control_plane::config::snapshot::Snapshot;
use trellis_control_plane::xds::{AckTracker, Publisher, XdsServer};
use trellis_proto::envoy::config::core::v3::Node;
use trellis_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use trellis_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use trellis_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use trellis_proto::google::rpc::Status as RpcStatus;
use trellis_proto::type_url::{ADDRESS, AUTHORIZATION};

fn cluster(pod_ip: &str, with_service: bool) -> Snapshot {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: foo, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: foo, labels: {{app: web}}}}\nspec: {{nodeName: node1, containers: [{{name: a, image: b}}]}}\nstatus: {{podIP: {pod_ip}}}\n"
    );
    if with_service {
        yaml.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: foo}\nspec: {clusterIP: 10.96.0.5, selector: {app: web}, ports: [{port: 80}]}\n");
    }
    let mut m = Model::default();
    for d in parse_file(Path::new("c.yaml"), &yaml) {
        if let Document::Loaded(l) = d {
            m.apply(&l.id, l.object);
        }
    }
    Snapshot::build(&m, &MeshConfig::default())
}

const WORKLOAD: &str = "Kubernetes//Pod/foo/web";
const SERVICE: &str = "foo/web.foo.svc.cluster.local";

struct Proxy {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Proxy {
    async fn connect(channel: Channel, first: DeltaDiscoveryRequest) -> Proxy {
        let (tx, reqs) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let rx = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(ReceiverStream::new(reqs))
            .await
            .unwrap()
            .into_inner();
        Proxy { tx, rx }
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response within 5 s")
            .unwrap()
            .expect("stream open")
    }

    async fn nothing_for(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.rx.message()).await {
            panic!("unexpected message: {m:?}");
        }
    }

    async fn ack(&self, type_url: &str, nonce: &str) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: type_url.into(),
                response_nonce: nonce.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn nack(&self, type_url: &str, nonce: &str, why: &str) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: type_url.into(),
                response_nonce: nonce.into(),
                error_detail: Some(RpcStatus {
                    code: 3,
                    message: why.into(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn subscribe(
    type_url: &str,
    names: &[&str],
    initial: BTreeMap<String, String>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~node1".into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
        initial_resource_versions: initial.into_iter().collect(),
        ..Default::default()
    }
}

async fn start(snapshot: Snapshot) -> (Channel, Publisher, Arc<AckTracker>) {
    let (pub_tx, pub_rx) = Publisher::new(snapshot);
    let acks = Arc::new(AckTracker::default());
    let server = XdsServer::new(pub_rx, acks.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, pub_tx, acks)
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn subscribe_ack_update_delete() {
    let (channel, publish, acks) = start(cluster("10.244.1.2", true)).await;
    let mut proxy = Proxy::connect(channel, subscribe(ADDRESS, &[], BTreeMap::new())).await;
    let first = proxy.recv().await;
    assert_eq!(first.type_url, ADDRESS);
    assert_eq!(names(&first), [WORKLOAD, SERVICE], "wildcard: everything");
    proxy.ack(ADDRESS, &first.nonce).await;

    // The pod moves: only the workload is sent again.
    publish.publish(cluster("10.244.1.3", true));
    let update = proxy.recv().await;
    assert_eq!(names(&update), [WORKLOAD]);
    assert!(update.removed_resources.is_empty());
    proxy.ack(ADDRESS, &update.nonce).await;

    // The service is deleted.
    publish.publish(cluster("10.244.1.3", false));
    let removal = proxy.recv().await;
    assert_eq!(removal.removed_resources, [SERVICE]);
    // The workload no longer lists the service: it changed too.
    assert_eq!(names(&removal), [WORKLOAD]);
    proxy.ack(ADDRESS, &removal.nonce).await;

    tokio::time::sleep(Duration::from_millis(100)).await;
    let acked = acks.acked("ztunnel~node1", ADDRESS).unwrap();
    assert_eq!(acked.keys().collect::<Vec<_>>(), [WORKLOAD]);
    let latest = cluster("10.244.1.3", false);
    let v = &latest.of_type(ADDRESS).unwrap()[WORKLOAD].version;
    assert_eq!(
        &acked[WORKLOAD], v,
        "the tracker knows the proxy has the latest version"
    );
    assert!(acks.lagging(ADDRESS, WORKLOAD, v).is_empty());
}

#[tokio::test]
async fn a_nack_keeps_the_previous_version_and_nothing_is_sent_until_it_is_answered() {
    let (channel, publish, acks) = start(cluster("10.244.1.2", true)).await;
    let mut proxy = Proxy::connect(channel, subscribe(ADDRESS, &["*"], BTreeMap::new())).await;
    let first = proxy.recv().await;
    // One response in flight: a new snapshot waits for the answer.
    publish.publish(cluster("10.244.1.3", true));
    proxy.nothing_for(Duration::from_millis(200)).await;
    proxy.ack(ADDRESS, &first.nonce).await;
    let update = proxy.recv().await;
    assert_eq!(names(&update), [WORKLOAD]);
    let old_version = cluster("10.244.1.2", true).of_type(ADDRESS).unwrap()[WORKLOAD]
        .version
        .clone();
    let new_version = update.resources[0].version.clone();
    proxy.nack(ADDRESS, &update.nonce, "cannot decode").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let acked = acks.acked("ztunnel~node1", ADDRESS).unwrap();
    assert_eq!(
        acked[WORKLOAD], old_version,
        "after a NACK the proxy keeps the previous version"
    );
    assert_eq!(
        acks.lagging(ADDRESS, WORKLOAD, &new_version),
        ["ztunnel~node1"]
    );
    // The rejected response is not sent again (a proxy that rejects it deterministically
    // would loop hot)...
    proxy.nothing_for(Duration::from_millis(300)).await;
    // ...until the configuration changes.
    publish.publish(cluster("10.244.1.4", true));
    let next = proxy.recv().await;
    assert_eq!(names(&next), [WORKLOAD]);
    assert_ne!(next.resources[0].version, new_version);
}

#[tokio::test]
async fn subscription_by_name_and_resume_after_reconnect() {
    let (channel, publish, _acks) = start(cluster("10.244.1.2", true)).await;
    let mut proxy = Proxy::connect(
        channel.clone(),
        subscribe(ADDRESS, &[SERVICE], BTreeMap::new()),
    )
    .await;
    let first = proxy.recv().await;
    assert_eq!(names(&first), [SERVICE], "only what was asked for");
    let known: BTreeMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    drop(proxy);

    // Reconnect with what it has: nothing changed, so an empty response (in sync).
    let mut proxy = Proxy::connect(
        channel.clone(),
        subscribe(ADDRESS, &[SERVICE], known.clone()),
    )
    .await;
    let resumed = proxy.recv().await;
    assert!(
        resumed.resources.is_empty() && resumed.removed_resources.is_empty(),
        "{resumed:?}"
    );
    drop(proxy);

    // Something changed while it was away: only that is sent on resume.
    publish.publish(cluster("10.244.1.2", false));
    let mut proxy = Proxy::connect(channel, subscribe(ADDRESS, &[SERVICE], known)).await;
    let resumed = proxy.recv().await;
    assert!(resumed.resources.is_empty());
    assert_eq!(resumed.removed_resources, [SERVICE]);
}

#[tokio::test]
async fn types_are_independent_and_state_of_the_world_is_refused() {
    let (channel, _publish, _acks) = start(cluster("10.244.1.2", true)).await;
    let mut proxy = Proxy::connect(
        channel.clone(),
        subscribe(AUTHORIZATION, &[], BTreeMap::new()),
    )
    .await;
    let authz = proxy.recv().await;
    assert_eq!(authz.type_url, AUTHORIZATION);
    assert!(
        authz.resources.is_empty(),
        "no policies: an empty first response says 'in sync'"
    );
    proxy
        .tx
        .send(subscribe(ADDRESS, &[], BTreeMap::new()))
        .await
        .unwrap();
    let addresses = proxy.recv().await;
    assert_eq!(addresses.type_url, ADDRESS);
    assert_eq!(addresses.resources.len(), 2);

    let (_tx, reqs) = mpsc::channel(1);
    let err = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(reqs))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}

fn big_cluster(pods: usize) -> Snapshot {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    for i in 0..pods {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: foo}}\nspec: {{nodeName: node1, containers: [{{name: a, image: b}}]}}\nstatus: {{podIP: 10.244.{}.{}}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    let mut m = Model::default();
    for d in parse_file(Path::new("c.yaml"), &yaml) {
        if let Document::Loaded(l) = d {
            m.apply(&l.id, l.object);
        }
    }
    Snapshot::build(&m, &MeshConfig::default())
}

#[tokio::test]
async fn a_large_first_sync_comes_in_parts_and_only_the_last_is_complete() {
    use trellis_control_plane::xds::MAX_RESOURCES_PER_RESPONSE;
    let pods = 2 * MAX_RESOURCES_PER_RESPONSE + 10;
    let (channel, _publish, acks) = start(big_cluster(pods)).await;
    let mut proxy = Proxy::connect(channel, subscribe(ADDRESS, &[], BTreeMap::new())).await;
    let mut seen = std::collections::BTreeSet::new();
    let mut parts = Vec::new();
    loop {
        let r = proxy.recv().await;
        parts.push((r.resources.len(), r.system_version_info.clone()));
        seen.extend(r.resources.iter().map(|x| x.name.clone()));
        proxy.ack(ADDRESS, &r.nonce).await;
        if r.system_version_info != trellis_proto::delta::MORE_FOLLOWS {
            break;
        }
    }
    assert_eq!(
        parts,
        [
            (MAX_RESOURCES_PER_RESPONSE, "more-follows".to_string()),
            (MAX_RESOURCES_PER_RESPONSE, "more-follows".to_string()),
            (10, "0".to_string()),
        ]
    );
    assert_eq!(seen.len(), pods, "every resource exactly once");
    proxy.nothing_for(Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(acks.acked("ztunnel~node1", ADDRESS).unwrap().len(), pods);
}
