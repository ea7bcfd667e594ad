//! The control plane as a whole, in-process: a config directory served over TLS to several
//! xDS clients (the data plane's own client), edited while they are connected; the CA
//! following the pods' placement; statuses on the admin endpoint.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use trellis_control_plane::server::{ControlPlane, Options};
use trellis_core::SpiffeId;
use trellis_core::cert::{CertConfig, CertError, CertManager, GrpcCaClient, GrpcCaConfig};
use trellis_core::xds::{XdsClient, XdsConfig};
use trellis_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use trellis_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use trellis_proto::type_url::{ADDRESS, AUTHORIZATION};

fn pod(ns: &str, name: &str, ip: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\nspec: {{nodeName: {node}, serviceAccountName: {name}, containers: [{{name: app, image: x}}]}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
    )
}

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
"#;

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-dev, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [dev]}}]}]
"#;

fn write(dir: &Path, name: &str, text: &str) {
    // Written aside and renamed, as editors and ConfigMap updates do: the watcher never
    // sees half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

struct Mesh {
    cp: ControlPlane,
    config: tempfile::TempDir,
    _state: tempfile::TempDir,
}

async fn start(files: &[(&str, String)]) -> Mesh {
    let config = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    for (name, text) in files {
        write(config.path(), name, text);
    }
    let mut opts = Options::new(config.path());
    opts.state_dir = state.path().to_path_buf();
    opts.grpc = "127.0.0.1:0".parse().unwrap();
    opts.admin = "127.0.0.1:0".parse().unwrap();
    opts.readiness = Some("127.0.0.1:0".parse().unwrap());
    opts.poll_interval = Duration::from_millis(50);
    opts.debounce = Duration::from_millis(50);
    let cp = ControlPlane::start(opts).await.unwrap();
    Mesh {
        cp,
        config,
        _state: state,
    }
}

fn channel(m: &Mesh) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(m.cp.roots_pem()))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{}", m.cp.grpc_addr()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}

fn client(m: &Mesh, node: &str) -> XdsClient {
    let credential = m.cp.credentials().issue_node(node).unwrap();
    XdsClient::start(
        channel(m),
        XdsConfig {
            node_id: format!("ztunnel~{node}"),
            types: vec![ADDRESS.into(), AUTHORIZATION.into()],
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            credential: Some(credential.into()),
        },
    )
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (code, body)
}

async fn status(m: &Mesh) -> serde_json::Value {
    let (code, body) = admin_get(m.cp.admin_addr(), "/debug/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

const CART: &str = "Kubernetes//Pod/shop/cart-0";
const ORDERS: &str = "Kubernetes//Pod/shop/orders-0";

#[tokio::test]
async fn clients_follow_a_directory_edited_while_they_are_connected() {
    let m = start(&[
        ("00-base.yaml", BASE.into()),
        ("cart.yaml", pod("shop", "cart-0", "10.244.1.2", "node1")),
        ("policy.yaml", POLICY.into()),
    ])
    .await;
    let clients: Vec<XdsClient> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| client(&m, n))
        .collect();
    for c in &clients {
        tokio::time::timeout(Duration::from_secs(10), c.wait_synced())
            .await
            .expect("synced");
        assert!(c.store().workload(CART).is_some());
        assert_eq!(c.store().len().2, 1, "one policy");
    }

    // A pod is added: every client gets it.
    write(
        m.config.path(),
        "orders.yaml",
        &pod("shop", "orders-0", "10.244.2.2", "node2"),
    );
    for c in &clients {
        eventually("the new pod on every client", || {
            c.store().workload(ORDERS).is_some()
        })
        .await;
    }

    // The policy is broken by an edit: rejected with file, object, field and reason; the
    // clients keep the last good version; the status says so.
    write(
        m.config.path(),
        "policy.yaml",
        &POLICY.replace("action: DENY", "action: [DENY]"),
    );
    let mut report = serde_json::Value::Null;
    eventually("the error in the status", || {
        report =
            m.cp.status()
                .errors
                .first()
                .map_or(serde_json::Value::Null, |e| {
                    serde_json::json!(e.to_string())
                });
        !report.is_null()
    })
    .await;
    let s = status(&m).await;
    // Each proxy is listed under its own id and who authenticated it.
    let proxies = s["proxies"].to_string();
    assert!(
        proxies.contains("ztunnel~node1 [ztunnel of node node1]"),
        "{proxies}"
    );
    let err = &s["errors"][0];
    assert!(
        err["file"].as_str().unwrap().ends_with("policy.yaml"),
        "{s}"
    );
    assert_eq!(err["object"], "AuthorizationPolicy shop/deny-dev");
    assert_eq!(err["field"], "spec.action");
    let policy = s["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "deny-dev")
        .unwrap();
    assert_eq!(
        policy["state"], "AcceptedWithWarnings",
        "the last good version is in effect, and the rejected edit is a warning (never plainly Accepted)"
    );
    assert!(
        policy["reasons"][0]
            .as_str()
            .unwrap()
            .contains("the latest version was rejected"),
        "{policy}"
    );
    for c in &clients {
        assert_eq!(c.store().len().2, 1, "the policy is still held");
    }
    // Every connected client has the policy in effect.
    eventually("all proxies ACKed the policy", || {
        let st = m.cp.status();
        st.proxies.len() == 3
            && st
                .policies
                .iter()
                .find(|p| p.id.name == "deny-dev")
                .is_some_and(|p| p.pending_at.is_empty())
    })
    .await;

    // Fixed, and turned into a namespace-wide ALLOW: clients get the new version.
    write(
        m.config.path(),
        "policy.yaml",
        &POLICY.replace("action: DENY", "action: ALLOW"),
    );
    eventually("the error gone", || m.cp.status().errors.is_empty()).await;
    for c in &clients {
        eventually("the new version on every client", || {
            c.store()
                .policy("shop/deny-dev")
                .is_some_and(|p| p.action == trellis_proto::istio::security::Action::Allow as i32)
        })
        .await;
    }

    // A file is removed: its pod is gone everywhere.
    std::fs::remove_file(m.config.path().join("cart.yaml")).unwrap();
    for c in &clients {
        eventually("the removed pod gone", || {
            c.store().workload(CART).is_none()
        })
        .await;
        assert!(c.store().workload(ORDERS).is_some());
    }
    m.cp.shutdown().await;
}

#[tokio::test]
async fn streams_without_a_known_credential_are_refused() {
    let m = start(&[("00-base.yaml", BASE.into())]).await;
    let mut raw = AggregatedDiscoveryServiceClient::new(channel(&m));
    let first = DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        ..Default::default()
    };
    let err = raw
        .delta_aggregated_resources(tokio_stream::iter(vec![first.clone()]))
        .await
        .expect_err("no credential");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let mut req = tonic::Request::new(tokio_stream::iter(vec![first]));
    req.metadata_mut()
        .insert("authorization", "Bearer not-issued".parse().unwrap());
    let err = raw
        .delta_aggregated_resources(req)
        .await
        .expect_err("bad credential");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(err.message().contains("unknown credential"), "{err}");
    m.cp.shutdown().await;
}

/// Opens a raw xDS stream with `req` and returns the server's first answer (or its refusal).
async fn first_answer(
    raw: &mut AggregatedDiscoveryServiceClient<Channel>,
    req: tonic::Request<tokio_stream::Iter<std::vec::IntoIter<DeltaDiscoveryRequest>>>,
) -> Result<
    Option<trellis_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse>,
    tonic::Status,
> {
    raw.delta_aggregated_resources(req)
        .await?
        .into_inner()
        .message()
        .await
}

#[tokio::test]
async fn a_node_cannot_claim_another_nodes_proxy_id_and_subscriptions_are_bounded() {
    let m = start(&[("00-base.yaml", BASE.into())]).await;
    let mut raw = AggregatedDiscoveryServiceClient::new(channel(&m));
    let credential = m.cp.credentials().issue_node("node1").unwrap();
    let open = |first: DeltaDiscoveryRequest| {
        let mut req = tonic::Request::new(tokio_stream::iter(vec![first]));
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {credential}").parse().unwrap(),
        );
        req
    };
    let claiming = |id: &str| DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        node: Some(trellis_proto::envoy::config::core::v3::Node {
            id: id.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    // node1's credential speaking as node2's ztunnel: refused.
    let err = first_answer(&mut raw, open(claiming("ztunnel~node2")))
        .await
        .expect_err("node1 stood in for node2");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("node2"), "{err}");
    // Its own id is served.
    let ok = first_answer(&mut raw, open(claiming("ztunnel~node1"))).await;
    assert!(matches!(ok, Ok(Some(_))), "{ok:?}");
    // A subscription past the bound ends the stream instead of growing its state.
    let mut huge = claiming("ztunnel~node1");
    huge.resource_names_subscribe = (0..=trellis_control_plane::xds::MAX_NAMES_PER_TYPE)
        .map(|i| format!("shop/w{i}"))
        .collect();
    let err = first_answer(&mut raw, open(huge))
        .await
        .expect_err("an unbounded subscription was taken");
    assert!(
        matches!(
            err.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        ),
        "{err}"
    );
    m.cp.shutdown().await;
}

#[tokio::test]
async fn only_a_waypoints_identity_reads_xds_as_a_waypoint_and_never_l4_authorization() {
    let gateway = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: shop-wp, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n";
    let m = start(&[("00-base.yaml", BASE.into())]).await;
    let mut raw = AggregatedDiscoveryServiceClient::new(channel(&m));
    let as_identity = |sa: &str, type_url: &str| {
        let id = SpiffeId::new("cluster.local", "shop", sa).unwrap();
        let credential = m.cp.credentials().issue_waypoint(&id).unwrap();
        let first = DeltaDiscoveryRequest {
            type_url: type_url.into(),
            node: Some(trellis_proto::envoy::config::core::v3::Node {
                id: format!("waypoint~{sa}"),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut req = tonic::Request::new(tokio_stream::iter(vec![first]));
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {credential}").parse().unwrap(),
        );
        req
    };
    // No waypoint Gateway shop/shop-wp yet: that ServiceAccount's token reads nothing.
    let err = first_answer(&mut raw, as_identity("shop-wp", ADDRESS))
        .await
        .expect_err("a plain ServiceAccount read the mesh");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(
        err.message().contains("is not the identity of a waypoint"),
        "{err}"
    );

    write(m.config.path(), "wp.yaml", gateway);
    let mut served = None;
    for _ in 0..100 {
        match first_answer(&mut raw, as_identity("shop-wp", ADDRESS)).await {
            Ok(r) => {
                served = r;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(served.is_some(), "the waypoint's identity is not served");
    // What it reads is what it fronts: Service reviews (bound to it) and its pod, not
    // Service cart or cart's pod.
    write(
        m.config.path(),
        "apps.yaml",
        &[
            pod("shop", "reviews", "10.244.1.7", "node1"),
            pod("shop", "cart", "10.244.1.8", "node1"),
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop, labels: {istio.io/use-waypoint: shop-wp}}\nspec: {clusterIP: 10.96.0.7, selector: {app: reviews}, ports: [{port: 9080}]}\n".to_string(),
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {clusterIP: 10.96.0.8, selector: {app: cart}, ports: [{port: 80}]}\n".to_string(),
        ]
        .concat(),
    );
    let mut names = Vec::new();
    for _ in 0..100 {
        if let Ok(Some(r)) = first_answer(&mut raw, as_identity("shop-wp", ADDRESS)).await {
            names = r
                .resources
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>();
            if names.len() >= 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    names.sort();
    assert_eq!(
        names,
        [
            "Kubernetes//Pod/shop/reviews",
            "shop/reviews.shop.svc.cluster.local"
        ],
        "the waypoint reads exactly what it fronts"
    );
    // Another ServiceAccount of the namespace still reads nothing; the waypoint never gets
    // ztunnel's L4 policies.
    let err = first_answer(&mut raw, as_identity("cart", ADDRESS))
        .await
        .expect_err("a non-waypoint ServiceAccount read the mesh");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = first_answer(&mut raw, as_identity("shop-wp", AUTHORIZATION))
        .await
        .expect_err("a waypoint read L4 authorization");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    m.cp.shutdown().await;
}

#[tokio::test]
async fn the_ca_follows_pods_as_they_are_scheduled() {
    let m = start(&[("00-base.yaml", BASE.into())]).await;
    let ca = |node: &str| {
        let client = GrpcCaClient::new(&GrpcCaConfig {
            endpoint: format!("https://{}", m.cp.grpc_addr()),
            roots: trellis_core::channel::ControlPlaneRoots::Pem(m.cp.roots_pem().to_string()),
            server_name: "localhost".into(),
            credential: m.cp.credentials().issue_node(node).unwrap().into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        })
        .unwrap();
        let bundle = Arc::new(
            trellis_core::tls::TrustBundle::from_pem("cluster.local", &m.cp.roots_pem()).unwrap(),
        );
        CertManager::new(client, bundle, CertConfig::default())
    };
    let node1 = ca("node1");
    let node2 = ca("node2");
    let cart = SpiffeId::new("cluster.local", "shop", "cart-0").unwrap();
    let refused = |r: Result<_, CertError>| matches!(r, Err(CertError::Refused { ref reason, .. }) if reason.contains("PermissionDenied"));
    assert!(refused(node1.fetch(&cart).await), "no such pod yet");

    write(
        m.config.path(),
        "cart.yaml",
        &pod("shop", "cart-0", "10.244.1.2", "node1"),
    );
    let mut got = None;
    for _ in 0..200 {
        match node1.fetch(&cart).await {
            Ok(c) => {
                got = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
    assert_eq!(
        got.expect("node1 gets its pod's certificate").identity(),
        &cart
    );
    assert!(refused(node2.fetch(&cart).await), "not node2's pod");
    m.cp.shutdown().await;
}

#[tokio::test]
async fn the_admin_endpoint_answers_ready_and_refuses_the_rest() {
    let misspelt = POLICY
        .replace("deny-dev", "misspelt")
        .replace("rules:", "rulez:");
    let m = start(&[
        ("00-base.yaml", BASE.into()),
        ("p.yaml", POLICY.into()),
        ("q.yaml", misspelt),
    ])
    .await;
    assert_eq!(admin_get(m.cp.admin_addr(), "/ready").await.0, 200);
    assert_eq!(admin_get(m.cp.admin_addr(), "/nope").await.0, 404);
    // The readiness port (the one a kubelet probes on the pod's address) answers /ready and
    // nothing else: the debug status stays on the admin port, on localhost.
    let ready = m.cp.readiness_addr().unwrap();
    assert_eq!(admin_get(ready, "/ready").await.0, 200);
    assert_eq!(admin_get(ready, "/debug/status").await.0, 404);
    let s = status(&m).await;
    assert_eq!(s["policies"][0]["name"], "deny-dev");
    assert_eq!(s["policies"][0]["state"], "Accepted");
    // A DENY whose rules are misspelt would deny nothing: it is rejected, naming the field.
    assert_eq!(s["policies"][1]["name"], "misspelt");
    assert_eq!(s["policies"][1]["state"], "Rejected");
    let reasons = s["policies"][1]["reasons"].to_string();
    assert!(reasons.contains("spec.rulez: unknown field"), "{reasons}");
    m.cp.shutdown().await;
}

/// Options for a control plane on a mocked Kubernetes API (`service`, a `tower-test` mock
/// standing in for the API server) whose client's namespace is `namespace`; ephemeral
/// ports; the state and config directories are returned to keep them alive.
fn kube_options(
    service: tower_test::mock::Mock<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >,
    namespace: &str,
) -> (Options, tempfile::TempDir, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let mut opts = Options::new(config.path());
    opts.state_dir = state.path().to_path_buf();
    opts.grpc = "127.0.0.1:0".parse().unwrap();
    opts.admin = "127.0.0.1:0".parse().unwrap();
    opts.kubernetes = Some(trellis_control_plane::server::KubeClient(
        kube::Client::new(service, namespace),
    ));
    (opts, state, config)
}

/// The control plane on the Kubernetes API (kube's `Client` over a `tower-test` mock
/// service stands in for the API server): not ready until every kind has been listed (kinds
/// whose CRD is not installed count as empty), then it serves what the API holds.
#[tokio::test]
async fn on_the_kubernetes_api_it_is_ready_after_listing_and_serves_the_objects() {
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (opts, state, config) = kube_options(service, "default");
    // The API server: lists per resource; watches are held open; no CA Secret yet (the
    // control plane creates one).
    let (hold_lists, mut lists_held) = tokio::sync::watch::channel(true);
    let api = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_string();
            if path.contains("/secrets") {
                let (code, body) = if req.method() == "POST" {
                    use http_body_util::BodyExt;
                    let b = req.into_body().collect().await.unwrap().to_bytes();
                    (201, serde_json::from_slice(&b).unwrap())
                } else {
                    (
                        404,
                        json!({"apiVersion": "v1", "kind": "Status", "metadata": {},
                        "status": "Failure", "reason": "NotFound", "message": "not found", "code": 404}),
                    )
                };
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap(),
                );
                continue;
            }
            if req.uri().query().unwrap_or("").contains("watch=true") {
                open.push(send);
                continue;
            }
            // Lists are answered once the test has seen the control plane not ready.
            let _ = lists_held.wait_for(|held| !held).await;
            let resource = path.rsplit('/').next().unwrap_or("").to_string();
            if ["gateways", "httproutes", "grpcroutes"].contains(&resource.as_str()) {
                // The Gateway API CRDs are not installed here.
                let status = json!({"apiVersion": "v1", "kind": "Status", "metadata": {},
                    "status": "Failure", "reason": "NotFound",
                    "message": "the server could not find the requested resource", "code": 404});
                send.send_response(
                    Response::builder()
                        .status(404)
                        .body(Body::from(serde_json::to_vec(&status).unwrap()))
                        .unwrap(),
                );
                continue;
            }
            let items = match resource.as_str() {
                "namespaces" => vec![json!({"metadata": {"name": "shop",
                    "labels": {"istio.io/dataplane-mode": "ambient"}}})],
                "pods" => vec![json!({
                    "metadata": {"name": "cart-0", "namespace": "shop", "uid": "u1"},
                    "spec": {"nodeName": "node1", "serviceAccountName": "cart",
                             "containers": [{"name": "app", "image": "app"}]},
                    "status": {"podIP": "10.244.1.2", "phase": "Running"}})],
                _ => vec![],
            };
            let body = json!({"metadata": {"resourceVersion": "1"}, "items": items});
            send.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    let cp = ControlPlane::start(opts).await.unwrap();
    let (code, _) = admin_get(cp.admin_addr(), "/ready").await;
    assert_eq!(code, 503, "not ready before the API has been listed");
    hold_lists.send(false).unwrap();
    let m = Mesh {
        cp,
        config,
        _state: state,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = admin_get(m.cp.admin_addr(), "/ready").await;
        if code == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = client(&m, "node1");
    eventually("the pod from the API reaches ztunnel", || {
        c.store().workload(CART).is_some()
    })
    .await;
    // The status page says which kinds cannot be read.
    let s = status(&m).await;
    let errors = s["errors"].as_array().cloned().unwrap_or_default();
    assert!(
        errors.iter().any(|e| e["object"] == "every Gateway"
            && e["reason"].as_str().unwrap_or("").contains("CRD installed")),
        "{s}"
    );
    api.abort();
}

/// The whole Kubernetes path with the writer on (the API server mocked as above): the
/// replica takes the Lease, publishes the trust bundle in the enrolled namespace and its own,
/// and writes the policy's status — all by server-side apply.
#[tokio::test]
async fn on_the_kubernetes_api_the_leader_writes_trust_bundles_and_policy_statuses() {
    use http::{Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;
    use serde_json::json;
    use trellis_control_plane::controller::ControllerConfig;
    use trellis_control_plane::controller::lease::LeaseConfig;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (mut opts, _state, _config) = kube_options(service, "trellis-system");
    opts.controller = Some(ControllerConfig {
        lease: LeaseConfig {
            retry: Duration::from_millis(100),
            ..LeaseConfig::new("trellis-system", "trellis-control-plane", "cp-0")
        },
        template: None,
    });
    let (patches_tx, mut patches) =
        tokio::sync::mpsc::unbounded_channel::<(String, serde_json::Value)>();
    let api = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            let watching = req.uri().query().unwrap_or("").contains("watch=true");
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if watching {
                open.push(send);
                continue;
            }
            let not_found = json!({"apiVersion": "v1", "kind": "Status", "metadata": {},
                "status": "Failure", "reason": "NotFound", "message": "not found", "code": 404});
            let (code, reply) = match method.as_str() {
                // The CA Secret and the Lease do not exist yet; both are created.
                "GET" if path.contains("/secrets/") || path.contains("/leases/") => {
                    (404, not_found)
                }
                "POST" => (201, body),
                "PATCH" => {
                    let _ = patches_tx.send((path.clone(), body.clone()));
                    (200, body)
                }
                _ => {
                    let resource = path.rsplit('/').next().unwrap_or("").to_string();
                    let items = match resource.as_str() {
                        "namespaces" => vec![json!({"metadata": {"name": "shop",
                            "labels": {"istio.io/dataplane-mode": "ambient"}}})],
                        "authorizationpolicies" => vec![json!({
                            "metadata": {"name": "deny-dev", "namespace": "shop", "uid": "ap-1", "generation": 2},
                            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["dev"]}}]}]}})],
                        _ => vec![],
                    };
                    (
                        200,
                        json!({"metadata": {"resourceVersion": "1"}, "items": items}),
                    )
                }
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    let cp = ControlPlane::start(opts).await.unwrap();
    let mut seen = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while seen.len() < 3 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (path, body) = tokio::time::timeout(left, patches.recv())
            .await
            .unwrap_or_else(|_| panic!("only these were written: {:?}", seen.keys()))
            .unwrap();
        seen.insert(path, body);
    }
    let bundle = &seen["/api/v1/namespaces/shop/configmaps/trellis-ca-root-cert"];
    assert_eq!(bundle["data"]["root-cert.pem"], cp.roots_pem());
    assert!(seen.contains_key("/api/v1/namespaces/trellis-system/configmaps/trellis-ca-root-cert"));
    let status =
        &seen["/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/deny-dev/status"];
    assert_eq!(status["metadata"]["uid"], "ap-1");
    assert_eq!(status["status"]["conditions"][0]["type"], "ZtunnelAccepted");
    assert_eq!(status["status"]["conditions"][0]["observedGeneration"], "2");
    cp.shutdown().await;
    api.abort();
}

/// On Kubernetes the CA follows its Secret: an operator who replaces `cacerts` (here a new
/// root) gets it signed with and handed out without restarting the control plane. The API
/// server is mocked (kube's `Client` over `tower-test`).
#[tokio::test]
async fn on_kubernetes_a_replaced_cacerts_secret_becomes_the_root_of_trust() {
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;
    use trellis_control_plane::ca::secret::secret_from_files;
    use trellis_control_plane::ca::store::generate_root;
    let first = generate_root("cluster.local").unwrap();
    let second = generate_root("cluster.local").unwrap();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (mut opts, _state, _config) = kube_options(service, "trellis-system");
    opts.ca_poll_interval = Duration::from_millis(50);
    let (plugged_tx, plugged) = tokio::sync::watch::channel(first.clone());
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_string();
            let reply = |code: u16, body: serde_json::Value| {
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap()
            };
            let not_found = json!({"apiVersion": "v1", "kind": "Status", "metadata": {},
                "status": "Failure", "reason": "NotFound", "message": "not found", "code": 404});
            if path == "/api/v1/namespaces/trellis-system/secrets/cacerts" {
                let files = plugged.borrow().clone();
                let body =
                    serde_json::to_value(secret_from_files("trellis-system", "cacerts", &files))
                        .unwrap();
                send.send_response(reply(200, body));
            } else if path.contains("/secrets") {
                send.send_response(reply(404, not_found));
            } else if req.uri().query().unwrap_or("").contains("watch=true") {
                open.push(send);
            } else if ["gateways", "httproutes", "grpcroutes"]
                .iter()
                .any(|r| path.ends_with(r))
            {
                send.send_response(reply(404, not_found));
            } else {
                send.send_response(reply(
                    200,
                    json!({"metadata": {"resourceVersion": "1"}, "items": []}),
                ));
            }
        }
    });
    let cp = ControlPlane::start(opts).await.unwrap();
    assert_eq!(
        cp.roots_pem(),
        first.root_cert,
        "signing with the plugged-in root at start"
    );
    plugged_tx.send(second.clone()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cp.roots_pem() != second.root_cert {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replaced cacerts Secret was not taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cp.shutdown().await;
}
