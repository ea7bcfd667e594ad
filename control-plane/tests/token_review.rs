//! Proxies on Kubernetes authenticate with projected ServiceAccount tokens, verified by the
//! API server's TokenReview. kube's `Client` over a `tower-test` mock service stands in for
//! the API server (it cannot run here): it answers reviews and pod reads as a cluster with
//! ztunnel pod `trellis-system/ztunnel-abc` on node1 would.

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};
use tonic::metadata::MetadataMap;
use trellis_control_plane::ca::CaError;
use trellis_control_plane::ca::auth::{Authenticator, Caller, LocalCredentials};
use trellis_control_plane::ca::token_review::TokenReviewAuth;

/// What the fake API server knows: token → the review's status.
fn reviews(token: &str) -> Value {
    let sa = |ns: &str, name: &str, pod: &str, uid: &str, node: Option<&str>| {
        let mut extra = json!({
            "authentication.kubernetes.io/pod-name": [pod],
            "authentication.kubernetes.io/pod-uid": [uid],
        });
        if let Some(n) = node {
            extra["authentication.kubernetes.io/node-name"] = json!([n]);
        }
        json!({"authenticated": true, "audiences": ["trellis-ca"],
               "user": {"username": format!("system:serviceaccount:{ns}:{name}"), "extra": extra}})
    };
    match token {
        "h.ztunnel.s" => sa(
            "trellis-system",
            "trellis-ztunnel",
            "ztunnel-abc",
            "uid-1",
            Some("node1"),
        ),
        "h.ztunnel-old-pod.s" => sa(
            "trellis-system",
            "trellis-ztunnel",
            "ztunnel-abc",
            "uid-0",
            None,
        ),
        "h.ztunnel-other-node.s" => sa(
            "trellis-system",
            "trellis-ztunnel",
            "ztunnel-abc",
            "uid-1",
            Some("node2"),
        ),
        "h.waypoint.s" => sa("shop", "waypoint", "waypoint-5d9", "uid-9", None),
        "h.impostor.s" => sa(
            "trellis-system",
            "trellis-ztunnel",
            "impostor-5f7",
            "uid-7",
            None,
        ),
        "h.legacy.s" => json!({"authenticated": true, "audiences": ["trellis-ca"],
                                "user": {"username": "system:serviceaccount:shop:waypoint"}}),
        "h.other-audience.s" => {
            json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
                                "user": {"username": "system:serviceaccount:shop:waypoint"}})
        }
        _ => json!({"authenticated": false, "error": "invalid bearer token"}),
    }
}

struct Api {
    auth: TokenReviewAuth,
    calls: Arc<Mutex<Vec<String>>>,
}

fn api(local: Option<Arc<LocalCredentials>>) -> Api {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "trellis-system");
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = calls.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let body: Value = serde_json::from_slice(&body.collect().await.unwrap().to_bytes())
                .unwrap_or(Value::Null);
            let path = parts.uri.path().to_string();
            log.lock().unwrap().push(format!("{} {path}", parts.method));
            let reply = match (parts.method.as_str(), path.as_str()) {
                ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
                    assert_eq!(
                        body["spec"]["audiences"],
                        json!(["trellis-ca"]),
                        "audience-bound review"
                    );
                    let token = body["spec"]["token"].as_str().unwrap();
                    let mut r = body.clone();
                    r["status"] = reviews(token);
                    r
                }
                ("GET", "/api/v1/namespaces/trellis-system/pods/ztunnel-abc") => json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "ztunnel-abc", "namespace": "trellis-system", "uid": "uid-1",
                                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                     "name": "trellis-ztunnel", "uid": "ds-1", "controller": true}]},
                    "spec": {"nodeName": "node1", "containers": [{"name": "ztunnel"}]}}),
                ("GET", "/api/v1/namespaces/trellis-system/pods/impostor-5f7") => json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "impostor-5f7", "namespace": "trellis-system", "uid": "uid-7",
                                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "impostor", "uid": "rs-1", "controller": true}]},
                    "spec": {"nodeName": "node1", "containers": [{"name": "x"}]}}),
                other => panic!("unexpected {other:?}"),
            };
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&reply).unwrap(),
            )));
        }
    });
    let mut auth = TokenReviewAuth::new(
        client,
        "trellis-ca",
        "cluster.local",
        ("trellis-system".into(), "trellis-ztunnel".into()),
    );
    if let Some(l) = local {
        auth = auth.with_local(l);
    }
    Api { auth, calls }
}

fn bearer(token: &str) -> MetadataMap {
    let mut m = MetadataMap::new();
    m.insert("authorization", format!("Bearer {token}").parse().unwrap());
    m
}

fn refused(r: Result<Caller, CaError>) -> String {
    match r {
        Err(CaError::Unauthenticated(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn ztunnels_token_makes_it_the_ztunnel_of_its_pods_node_and_is_reviewed_once() {
    let a = api(None);
    assert_eq!(
        a.auth.authenticate(&bearer("h.ztunnel.s")).await.unwrap(),
        Caller::Node("node1".into())
    );
    assert_eq!(
        *a.calls.lock().unwrap(),
        [
            "POST /apis/authentication.k8s.io/v1/tokenreviews",
            "GET /api/v1/namespaces/trellis-system/pods/ztunnel-abc"
        ]
    );
    // The same token again (another stream, a renewal): no API call.
    assert_eq!(
        a.auth.authenticate(&bearer("h.ztunnel.s")).await.unwrap(),
        Caller::Node("node1".into())
    );
    assert_eq!(a.calls.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_token_of_another_pod_or_node_is_refused() {
    let a = api(None);
    let why = refused(a.auth.authenticate(&bearer("h.ztunnel-old-pod.s")).await);
    assert!(why.contains("earlier pod"), "{why}");
    let why = refused(a.auth.authenticate(&bearer("h.ztunnel-other-node.s")).await);
    assert!(why.contains("node2") && why.contains("node1"), "{why}");
    // ztunnel's ServiceAccount in a pod that is not the DaemonSet's.
    let why = refused(a.auth.authenticate(&bearer("h.impostor.s")).await);
    assert!(why.contains("not run by a DaemonSet"), "{why}");
}

#[tokio::test]
async fn any_other_service_account_runs_as_its_own_identity() {
    let a = api(None);
    let caller = a.auth.authenticate(&bearer("h.waypoint.s")).await.unwrap();
    assert_eq!(
        caller,
        Caller::Waypoint(
            "spiffe://cluster.local/ns/shop/sa/waypoint"
                .parse()
                .unwrap()
        )
    );
}

#[tokio::test]
async fn unbound_wrong_audience_and_invalid_tokens_are_refused_and_the_refusal_is_cached() {
    let a = api(None);
    let why = refused(a.auth.authenticate(&bearer("h.legacy.s")).await);
    assert!(why.contains("not bound to a pod"), "{why}");
    let why = refused(a.auth.authenticate(&bearer("h.other-audience.s")).await);
    assert!(why.contains("audience trellis-ca"), "{why}");
    let why = refused(a.auth.authenticate(&bearer("h.forged.s")).await);
    assert!(why.contains("invalid bearer token"), "{why}");
    let reviews = a.calls.lock().unwrap().len();
    assert_eq!(reviews, 3);
    refused(a.auth.authenticate(&bearer("h.forged.s")).await);
    assert_eq!(
        a.calls.lock().unwrap().len(),
        3,
        "a refused token is not reviewed again at once"
    );
    // Not a JWT at all, no header: refused without asking the API server.
    refused(a.auth.authenticate(&bearer("not-a-token")).await);
    refused(a.auth.authenticate(&MetadataMap::new()).await);
    assert_eq!(a.calls.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn issued_credentials_still_work_beside_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let local = Arc::new(LocalCredentials::open(dir.path()).unwrap());
    let token = local.issue_node("laptop").unwrap();
    let a = api(Some(local));
    assert_eq!(
        a.auth.authenticate(&bearer(&token)).await.unwrap(),
        Caller::Node("laptop".into())
    );
    assert!(a.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_expired_token_is_refused_without_asking_the_api_server() {
    use base64::Engine;
    let a = api(None);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1700000000}"#);
    let why = refused(
        a.auth
            .authenticate(&bearer(&format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln")))
            .await,
    );
    assert!(why.contains("expired"), "{why}");
    assert!(a.calls.lock().unwrap().is_empty());
}
