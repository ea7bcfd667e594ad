//! The Kubernetes source against a mocked API server: kube's `Client` over a `tower-test`
//! mock service stands in for the API server (the one thing that cannot run here). The
//! watcher lists, watches, gets a 410 Gone, lists again; the model ends up with what the
//! API holds, and gives the same xDS snapshot as the directory source for the same objects.

use std::path::Path;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use trellis_control_plane::config::kube::{Event, KINDS, Kind, KubeState, watch};
use trellis_control_plane::config::load::{Document, parse_file};
use trellis_control_plane::config::model::{MeshConfig, Model};
use trellis_control_plane::config::snapshot::Snapshot;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

static PODS: [Kind; 1] = [KINDS[1]];

/// The watched kind named `name`.
fn kind(name: &str) -> &'static Kind {
    KINDS.iter().find(|k| k.kind == name).unwrap()
}

fn pod(name: &str, ip: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "resourceVersion": "1", "labels": {"app": name},
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"nodeName": "node1", "serviceAccountName": name,
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"podIP": ip, "phase": "Running"}
    })
}

fn list(rv: &str, items: Vec<Value>) -> Response<Body> {
    let body = json!({"apiVersion": "v1", "kind": "PodList",
                      "metadata": {"resourceVersion": rv}, "items": items});
    Response::builder()
        .status(200)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn watch_events(events: Vec<Value>) -> Response<Body> {
    let mut body = Vec::new();
    for e in events {
        body.extend(serde_json::to_vec(&e).unwrap());
        body.push(b'\n');
    }
    Response::builder()
        .status(200)
        .body(Body::from(body))
        .unwrap()
}

/// The next request the watcher sends, and whether it is a watch (else a list).
async fn next(handle: &mut Handle) -> (bool, tower_test::mock::SendResponse<Response<Body>>) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(30), handle.next_request())
        .await
        .expect("the watcher sent no request")
        .expect("the client went away");
    assert_eq!(req.uri().path(), "/api/v1/pods", "{}", req.uri());
    let watching = req.uri().query().unwrap_or("").contains("watch=true");
    (watching, send)
}

#[tokio::test]
async fn list_watch_and_relist_after_410_keep_the_model_in_step() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (tx, mut rx) = mpsc::channel(64);
    let watcher = tokio::spawn(watch(client, &PODS, tx));

    // List: a and b.
    let (watching, send) = next(&mut handle).await;
    assert!(!watching, "the watcher lists first");
    send.send_response(list("10", vec![pod("a", "10.0.0.1"), pod("b", "10.0.0.2")]));
    // Watch: c is added, then the watch has expired (410 Gone).
    let (watching, send) = next(&mut handle).await;
    assert!(watching);
    let mut c = pod("c", "10.0.0.3");
    c["apiVersion"] = "v1".into();
    c["kind"] = "Pod".into();
    send.send_response(watch_events(vec![
        json!({"type": "ADDED", "object": c}),
        json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status",
            "metadata": {}, "status": "Failure", "reason": "Expired",
            "message": "too old resource version: 10 (15)", "code": 410}}),
    ]));
    // Re-list: b was deleted while the watch was down.
    let (watching, send) = next(&mut handle).await;
    assert!(!watching, "after 410 Gone the watcher lists again");
    send.send_response(list("20", vec![pod("a", "10.0.0.1"), pod("c", "10.0.0.3")]));
    // The next watch is left open.
    let (watching, _open) = next(&mut handle).await;
    assert!(watching);

    // Apply what the watcher reported, in order.
    let mut state = KubeState::default();
    let mut model = Model::default();
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        seen.push(match &e {
            Event::ListStart(_) => "list".to_string(),
            Event::Listed(_, o) => format!("listed {}", o["metadata"]["name"].as_str().unwrap()),
            Event::ListDone(_) => "done".to_string(),
            Event::Apply(_, o) => format!("apply {}", o["metadata"]["name"].as_str().unwrap()),
            Event::Delete(_, o) => format!("delete {}", o["metadata"]["name"].as_str().unwrap()),
            Event::Error(_, _) => "error".to_string(),
            Event::Absent(_, _) => "absent".to_string(),
        });
        state.apply(e, &mut model);
    }
    watcher.abort();
    assert_eq!(
        seen,
        [
            "list", "listed a", "listed b", "done", "apply c", "error", "list", "listed a",
            "listed c", "done"
        ]
    );
    let names: Vec<String> = state.objects().iter().map(|o| o.name.clone()).collect();
    assert_eq!(names, ["a", "c"], "b is gone after the re-list");
    assert!(state.errors().is_empty(), "{:?}", state.errors());

    // With their namespace in the mesh, the same objects from a directory give the same xDS.
    let ns = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}});
    assert!(state.apply(Event::Apply(&KINDS[0], ns), &mut model));
    let mut from_files = Model::default();
    let yaml: String = ["a", "c"]
        .iter()
        .map(|n| {
            let ip = if *n == "a" { "10.0.0.1" } else { "10.0.0.3" };
            format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {n}, namespace: shop, uid: uid-{n}, resourceVersion: \"1\", labels: {{app: {n}}}}}\nspec: {{nodeName: node1, serviceAccountName: {n}, containers: [{{name: app, image: app}}]}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
            )
        })
        .collect();
    for doc in parse_file(Path::new("pods.yaml"), &yaml) {
        match doc {
            Document::Loaded(l) => from_files.apply(&l.id, l.object),
            other => panic!("{other:?}"),
        }
    }
    let mesh = MeshConfig::default();
    let (k, d) = (
        Snapshot::build(&model, &mesh),
        Snapshot::build(&from_files, &mesh),
    );
    let addresses = k
        .of_type("type.googleapis.com/istio.workload.Address")
        .map_or(0, |r| r.len());
    assert_eq!(addresses, 2, "both pods are workloads");
    assert_eq!(
        k, d,
        "the Kubernetes and directory sources give the same xDS"
    );
}

#[test]
fn an_object_that_stops_loading_keeps_its_last_good_version() {
    let mut state = KubeState::default();
    let mut model = Model::default();
    let kind = kind("AuthorizationPolicy");
    let good = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-dev", "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["dev"]}}]}]},
        "status": {"conditions": [{"type": "Accepted", "status": "True"}]}});
    assert!(state.apply(Event::Apply(kind, good.clone()), &mut model));
    assert!(
        state.errors().is_empty(),
        "status is ours, not configuration"
    );
    let before = Snapshot::build(&model, &MeshConfig::default());
    let mut bad = good.clone();
    bad["spec"]["action"] = "REJECT".into();
    assert!(!state.apply(Event::Apply(kind, bad), &mut model));
    let errors = state.errors();
    assert_eq!(errors.len(), 1);
    let e = errors[0].to_string();
    assert!(
        e.contains("AuthorizationPolicy shop/deny-dev") && e.contains("action"),
        "{e}"
    );
    assert_eq!(
        Snapshot::build(&model, &MeshConfig::default()),
        before,
        "the last good version stays"
    );
    // A re-list that still has it (broken) keeps it; deleting it removes it.
    state.apply(Event::ListStart(kind), &mut model);
    let mut bad = good.clone();
    bad["spec"]["action"] = "REJECT".into();
    state.apply(Event::Listed(kind, bad), &mut model);
    state.apply(Event::ListDone(kind), &mut model);
    assert_eq!(state.objects().len(), 1);
    assert!(state.apply(Event::Delete(kind, good), &mut model));
    assert!(state.objects().is_empty());
    assert!(state.errors().is_empty());
}

#[test]
fn a_status_only_update_changes_nothing_in_the_model() {
    let mut state = KubeState::default();
    let mut model = Model::default();
    let kind = kind("AuthorizationPolicy");
    let policy = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-dev", "namespace": "shop", "resourceVersion": "7", "generation": 1},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["dev"]}}]}]}});
    assert!(state.apply(Event::Apply(kind, policy.clone()), &mut model));
    model.take_dirty();
    // The control plane wrote the status: a new resourceVersion, same spec and generation.
    let mut with_status = policy.clone();
    with_status["metadata"]["resourceVersion"] = "8".into();
    with_status["status"] = json!({"conditions": [{"type": "ZtunnelAccepted", "status": "True"}]});
    assert!(!state.apply(Event::Apply(kind, with_status), &mut model));
    assert!(model.take_dirty().is_empty(), "nothing to re-translate");
    // A spec change is a change.
    let mut edited = policy;
    edited["spec"]["action"] = "ALLOW".into();
    assert!(state.apply(Event::Apply(kind, edited), &mut model));
}

static NODES: [Kind; 1] = [KINDS[4]];

/// Nodes are watched with metadata-only requests (their spec and status, images included,
/// never cross the wire); their labels still give workloads their locality.
#[tokio::test]
async fn nodes_are_read_as_metadata_only() {
    assert_eq!(NODES[0].kind, "Node");
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (tx, mut rx) = mpsc::channel(64);
    let watcher = tokio::spawn(watch(client, &NODES, tx));
    let (req, send) = tokio::time::timeout(Duration::from_secs(30), handle.next_request())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req.uri().path(), "/api/v1/nodes");
    let accept = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(accept.contains("as=PartialObjectMetadataList"), "{accept}");
    let body = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
        "metadata": {"resourceVersion": "3"},
        "items": [{"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                   "metadata": {"name": "node1", "resourceVersion": "3",
                                "labels": {"topology.kubernetes.io/zone": "z1"}}}]});
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
    let mut state = KubeState::default();
    let mut model = Model::default();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        let done = matches!(e, Event::ListDone(_));
        if let Event::Listed(_, o) = &e {
            assert_eq!(o["kind"], "Node");
            assert_eq!(o["metadata"]["labels"]["topology.kubernetes.io/zone"], "z1");
        }
        state.apply(e, &mut model);
        if done {
            break;
        }
    }
    watcher.abort();
    assert!(state.errors().is_empty(), "{:?}", state.errors());
    assert_eq!(state.objects().len(), 1);
}
