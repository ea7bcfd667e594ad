//! What the control plane writes to the Kubernetes API: policy status conditions, waypoint
//! Deployments/Services/ServiceAccounts and Gateway status, and the Lease that elects the
//! writing replica.
//!
//! The pure parts (object in → what is written out) are tested directly; the client paths
//! against a mocked API server: kube's `Client` over a `tower-test` mock service stands in
//! for the API server (the one thing that cannot run here). The mock records each request
//! (method, path, query, content type, body) and answers as the API server would.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::watch;
use trellis_control_plane::config::gateway::Gateway;
use trellis_control_plane::config::load::{Document, ObjectRef, parse_file};
use trellis_control_plane::config::model::{MeshConfig, Model};
use trellis_control_plane::config::snapshot::Snapshot;
use trellis_control_plane::controller::lease::{LeaseConfig, elect};
use trellis_control_plane::controller::waypoint::{
    self, Observed, WaypointTemplate, gateway_status,
};
use trellis_control_plane::controller::{Deployments, Inputs, Reconciler, status};

mod common;
use common::{Seen, api_server, conflict, drain, not_found};

fn model_from(yaml: &str) -> Model {
    let mut model = Model::default();
    for doc in parse_file(Path::new("objects.yaml"), yaml) {
        match doc {
            Document::Loaded(l) => model.apply(&l.id, l.object),
            other => panic!("{other:?}"),
        }
    }
    model
}

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop, generation: 3}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: shop, generation: 1}
spec:
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: both, namespace: shop, generation: 2}
spec:
  selector: {matchLabels: {app: a}}
  targetRef: {kind: Service, group: "", name: a}
  action: ALLOW
"#;

#[test]
fn policy_statuses_say_what_ztunnel_enforces() {
    let model = model_from(POLICIES);
    let snap = Snapshot::build(&model, &MeshConfig::default());
    let status_of = |name: &str| {
        let id = ObjectRef {
            kind: "AuthorizationPolicy".into(),
            namespace: "shop".into(),
            name: name.into(),
        };
        let s = snap
            .statuses
            .get(&id)
            .unwrap_or_else(|| panic!("{name}: no status"));
        let target = status::target(&id).expect("policies have a status");
        assert_eq!(
            (target.api_version, target.plural, target.status),
            ("security.istio.io/v1", "authorizationpolicies", true)
        );
        status::policy_status(&id, s, model.generation(&id), None)
    };

    let ok = status_of("allow-frontend");
    assert_eq!(ok["apiVersion"], "security.istio.io/v1");
    assert_eq!(ok["kind"], "AuthorizationPolicy");
    assert_eq!(
        ok["metadata"],
        json!({"name": "allow-frontend", "namespace": "shop"})
    );
    assert_eq!(
        ok["status"]["conditions"],
        json!([{"type": "ZtunnelAccepted", "status": "True", "reason": "Accepted",
                "message": "attached to ztunnel", "observedGeneration": "3"}])
    );

    // An HTTP attribute: in effect, but not as written — the message says how.
    let l7 = &status_of("get-only")["status"]["conditions"][0];
    assert_eq!(l7["status"], "True");
    assert_eq!(l7["reason"], "UnsupportedValue");
    let message = l7["message"].as_str().unwrap();
    assert!(message.contains("methods"), "{message}");

    let bad = &status_of("both")["status"]["conditions"][0];
    assert_eq!(bad["status"], "False");
    assert_eq!(bad["reason"], "Invalid");
    assert!(!bad["message"].as_str().unwrap().is_empty());
}

fn template() -> WaypointTemplate {
    WaypointTemplate::parse(
        "waypoint.yaml",
        "image: registry.example/trellis:1.2.3\nresources: {requests: {cpu: 100m}}\ncontrolPlane: trellis-control-plane.trellis-system.svc\ntrustDomain: cluster.local\nimagePullSecrets: [{name: pull}]\n",
    )
    .unwrap()
}

fn waypoint_gateway(name: &str) -> Gateway {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop", "uid": "gw-uid-1", "generation": 4},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            "infrastructure": {"labels": {"team": "shop"}},
        },
    }))
    .unwrap()
}

#[test]
fn a_waypoint_gateway_gets_an_owned_deployment_service_and_service_account() {
    let objects = waypoint::objects(&waypoint_gateway("waypoint"), &template()).unwrap();
    let kinds: Vec<&str> = objects.iter().map(|(t, _)| t.kind).collect();
    assert_eq!(kinds, ["ServiceAccount", "Service", "Deployment"]);
    for (t, body) in &objects {
        assert_eq!(
            (t.namespace.as_str(), t.name.as_str()),
            ("shop", "waypoint")
        );
        assert!(!t.status);
        assert_eq!(body["metadata"]["name"], "waypoint");
        assert_eq!(
            body["metadata"]["ownerReferences"],
            json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                    "name": "waypoint", "uid": "gw-uid-1", "controller": true,
                    "blockOwnerDeletion": true}]),
            "{} is deleted with its Gateway",
            t.kind
        );
        let labels = &body["metadata"]["labels"];
        assert_eq!(labels["gateway.networking.k8s.io/gateway-name"], "waypoint");
        assert_eq!(labels["team"], "shop", "spec.infrastructure.labels");
    }
    let service = &objects[1].1;
    assert_eq!(
        service["spec"]["selector"],
        json!({"gateway.networking.k8s.io/gateway-name": "waypoint"})
    );
    let ports: Vec<u64> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [15008, 15021]);

    let deployment = &objects[2].1;
    let pod = &deployment["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none",
        "never captured"
    );
    assert_eq!(pod["spec"]["serviceAccountName"], "waypoint");
    assert_eq!(pod["spec"]["imagePullSecrets"], json!([{"name": "pull"}]));
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example/trellis:1.2.3");
    assert_eq!(c["resources"], json!({"requests": {"cpu": "100m"}}));
    assert_eq!(c["securityContext"]["runAsNonRoot"], true);
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--control-plane=https://trellis-control-plane.trellis-system.svc:15012"),
        "{args:?}"
    );
    assert!(args.contains(&"--gateway=shop/waypoint"), "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--tracing")),
        "no tracing unless the mesh config names a provider: {args:?}"
    );
    // The mesh config's tracing provider reaches the waypoints' flags.
    let mut traced = template();
    traced.tracing = Some(("otel.observability.svc.cluster.local:4317".into(), 10.0));
    let objects = waypoint::objects(&waypoint_gateway("waypoint"), &traced).unwrap();
    let args = objects[2].1["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert!(
        args.as_array().unwrap().contains(&json!(
            "--tracing-endpoint=otel.observability.svc.cluster.local:4317"
        )) && args
            .as_array()
            .unwrap()
            .contains(&json!("--tracing-sampling=10")),
        "{args}"
    );
    let audience =
        &pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"];
    assert_eq!(audience, "trellis-ca");

    // A name a Service cannot have is refused, and the status says why.
    let bad = waypoint_gateway("way.point");
    let problem = waypoint::objects(&bad, &template()).unwrap_err();
    assert!(problem.contains("DNS-1035 label"), "{problem}");
    let (_, s) = gateway_status(&bad, &Observed::default(), Some(&problem));
    assert_eq!(s["status"]["conditions"][0]["status"], "False");
    assert!(s["status"].get("addresses").is_none());
}

#[test]
fn a_waypoint_template_with_a_misspelt_field_is_refused_naming_it() {
    let e = WaypointTemplate::parse(
        "/etc/trellis/waypoint.yaml",
        "image: x\ncontrolPlane: cp\ntrustDomain: td\nresource: {}\n",
    )
    .unwrap_err();
    assert!(
        e.contains("/etc/trellis/waypoint.yaml") && e.contains("resource"),
        "{e}"
    );
    let e = WaypointTemplate::parse("w.yaml", "controlPlane: cp\ntrustDomain: td\n").unwrap_err();
    assert!(e.contains("image"), "{e}");
}

#[test]
fn gateway_status_is_programmed_with_its_address_once_the_deployment_is_ready() {
    let gw = waypoint_gateway("waypoint");
    let (target, pending) = gateway_status(
        &gw,
        &Observed {
            ready_replicas: Some(0),
            service_ip: Some("10.96.0.20".into()),
        },
        None,
    );
    assert_eq!((target.kind, target.status), ("Gateway", true));
    let conditions = &pending["status"]["conditions"];
    assert_eq!(conditions[0]["type"], "Accepted");
    assert_eq!(conditions[0]["status"], "True");
    assert_eq!(conditions[0]["observedGeneration"], 4);
    assert_eq!(conditions[1]["type"], "Programmed");
    assert_eq!(conditions[1]["status"], "False");
    assert_eq!(conditions[1]["reason"], "Pending");

    let (_, ready) = gateway_status(
        &gw,
        &Observed {
            ready_replicas: Some(1),
            service_ip: Some("10.96.0.20".into()),
        },
        None,
    );
    assert_eq!(ready["status"]["conditions"][1]["status"], "True");
    assert_eq!(
        ready["status"]["addresses"],
        json!([{"type": "IPAddress", "value": "10.96.0.20"}])
    );
}

/// An API server that keeps what is applied: server-side apply stores the object (with a
/// uid), GET returns it (404 when absent), DELETE removes it. `seed` is there from the start.
fn store(seed: Vec<(&str, Value)>) -> impl Fn(&str, &str, &Value) -> (u16, Value) + Send + 'static {
    let objects: std::sync::Mutex<BTreeMap<String, Value>> =
        std::sync::Mutex::new(seed.into_iter().map(|(p, v)| (p.to_string(), v)).collect());
    move |method, path, body| {
        let mut objects = objects.lock().unwrap();
        match method {
            "PATCH" if path.ends_with("/status") => (200, body.clone()),
            "PATCH" => {
                let mut o = body.clone();
                o["metadata"]["uid"] = format!("uid-of-{path}").into();
                objects.insert(path.to_string(), o.clone());
                (200, o)
            }
            "GET" => match objects.get(path) {
                Some(o) => (200, o.clone()),
                None => not_found(),
            },
            "DELETE" => match objects.remove(path) {
                Some(_) => (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                ),
                None => not_found(),
            },
            _ => panic!("unexpected {method} {path}"),
        }
    }
}

/// What was written (applied or deleted), in order.
fn writes(seen: &[Seen]) -> Vec<(&str, &str)> {
    seen.iter()
        .filter(|s| s.method != "GET")
        .map(|s| (s.method.as_str(), s.path.as_str()))
        .collect()
}

#[tokio::test]
async fn the_reconciler_applies_waypoints_and_statuses_and_only_what_changed() {
    let (client, mut rx) = api_server(store(vec![]));
    let mut reconciler = Reconciler::new(client, Some(template()));
    let policy = ObjectRef {
        kind: "AuthorizationPolicy".into(),
        namespace: "shop".into(),
        name: "allow-frontend".into(),
    };
    let model = model_from(POLICIES);
    let snap = Snapshot::build(&model, &MeshConfig::default());
    let mut inputs = Inputs {
        synced: true,
        statuses: BTreeMap::from([(
            status::target(&policy).unwrap(),
            status::policy_status(&policy, &snap.statuses[&policy], Some(3), None),
        )]),
        waypoints: BTreeMap::from([(
            ("shop".to_string(), "waypoint".to_string()),
            (waypoint_gateway("waypoint"), None),
        )]),
        trust_bundle: None,
    };

    // First round: everything is applied, with server-side apply as trellis-control-plane.
    assert_eq!(
        reconciler
            .reconcile(&inputs, Some(&Deployments::new()), &|| true)
            .await,
        0
    );
    let all = drain(&mut rx);
    let checked: Vec<&str> = all
        .iter()
        .filter(|s| s.method == "GET")
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(
        checked.len(),
        3,
        "the waypoint's objects are checked before they are applied: {checked:?}"
    );
    let seen: Vec<Seen> = all.into_iter().filter(|s| s.method != "GET").collect();
    assert_eq!(
        writes(&seen),
        [
            (
                "PATCH",
                "/apis/apps/v1/namespaces/shop/deployments/waypoint"
            ),
            (
                "PATCH",
                "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint/status"
            ),
            (
                "PATCH",
                "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/allow-frontend/status"
            ),
            ("PATCH", "/api/v1/namespaces/shop/services/waypoint"),
            ("PATCH", "/api/v1/namespaces/shop/serviceaccounts/waypoint"),
        ]
    );
    for s in &seen {
        assert_eq!(s.content_type, "application/apply-patch+yaml", "{}", s.path);
        assert!(
            s.query.contains("fieldManager=trellis-control-plane"),
            "{}",
            s.query
        );
        assert!(s.query.contains("force=true"), "{}", s.query);
    }
    assert_eq!(seen[0].body["kind"], "Deployment");
    assert_eq!(
        seen[0].body["metadata"]["ownerReferences"][0]["uid"],
        "gw-uid-1"
    );
    assert_eq!(
        seen[1].body["metadata"]["uid"], "gw-uid-1",
        "a status names the object it is for (a precondition on a re-created Gateway)"
    );
    let gw_status = &seen[1].body["status"];
    assert_eq!(
        gw_status["conditions"][1]["status"], "False",
        "no ready pod yet"
    );
    assert!(
        gw_status["conditions"][0]["lastTransitionTime"].is_string(),
        "conditions carry their transition time"
    );
    let cond = &seen[2].body["status"]["conditions"][0];
    assert_eq!(
        (cond["type"].as_str(), cond["status"].as_str()),
        (Some("ZtunnelAccepted"), Some("True"))
    );

    // Nothing changed: no API call.
    assert_eq!(
        reconciler
            .reconcile(&inputs, Some(&Deployments::new()), &|| true)
            .await,
        0
    );
    assert!(
        drain(&mut rx).is_empty(),
        "unchanged objects are not written again"
    );

    // The Deployment has a ready pod and the Service an address: only the Gateway's
    // status is written, with its address; Accepted keeps its transition time.
    inputs
        .waypoints
        .get_mut(&("shop".into(), "waypoint".into()))
        .unwrap()
        .1 = Some("10.96.0.20".into());
    let ready = Deployments::from([(("shop".to_string(), "waypoint".to_string()), 1)]);
    assert_eq!(
        reconciler.reconcile(&inputs, Some(&ready), &|| true).await,
        0
    );
    let seen = drain(&mut rx);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].path,
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint/status"
    );
    let status = &seen[0].body["status"];
    assert_eq!(
        status["addresses"],
        json!([{"type": "IPAddress", "value": "10.96.0.20"}])
    );
    assert_eq!(status["conditions"][1]["status"], "True");
    assert_eq!(
        status["conditions"][0]["lastTransitionTime"],
        gw_status["conditions"][0]["lastTransitionTime"],
        "Accepted did not change"
    );

    // The Gateway is no longer a waypoint: its objects are deleted (Deployment first).
    inputs.waypoints.clear();
    assert_eq!(
        reconciler.reconcile(&inputs, Some(&ready), &|| true).await,
        0
    );
    let deletes: Vec<String> = drain(&mut rx)
        .into_iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| s.path)
        .collect();
    assert_eq!(
        deletes,
        [
            "/apis/apps/v1/namespaces/shop/deployments/waypoint",
            "/api/v1/namespaces/shop/services/waypoint",
            "/api/v1/namespaces/shop/serviceaccounts/waypoint",
        ]
    );

    // Before every kind was read, a Deployment without a Gateway is not deleted.
    inputs.synced = false;
    reconciler.reconcile(&inputs, Some(&ready), &|| true).await;
    assert!(drain(&mut rx).iter().all(|s| s.method != "DELETE"));
}

#[tokio::test]
async fn a_failed_write_is_retried_and_a_missing_object_is_not_a_failure() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let stored = store(vec![]);
    let (client, mut rx) = api_server(move |method, path, body| {
        let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if path.contains("/gone/") {
            return not_found();
        }
        if n == 0 {
            return (
                500,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "etcd timeout", "code": 500}),
            );
        }
        stored(method, path, body)
    });
    let mut reconciler = Reconciler::new(client, None);
    let ids: Vec<ObjectRef> = ["allow", "gone"]
        .iter()
        .map(|n| ObjectRef {
            kind: "PeerAuthentication".into(),
            namespace: "shop".into(),
            name: n.to_string(),
        })
        .collect();
    let model = model_from(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: allow, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
    );
    let snap = Snapshot::build(&model, &MeshConfig::default());
    let st = &snap.statuses[&ids[0]];
    let inputs = Inputs {
        synced: true,
        statuses: ids
            .iter()
            .map(|id| {
                (
                    status::target(id).unwrap(),
                    status::policy_status(id, st, None, None),
                )
            })
            .collect(),
        waypoints: BTreeMap::new(),
        trust_bundle: None,
    };
    assert_eq!(
        reconciler.reconcile(&inputs, None, &|| true).await,
        1,
        "the 500 is a failure"
    );
    assert_eq!(drain(&mut rx).len(), 2);
    assert_eq!(reconciler.reconcile(&inputs, None, &|| true).await, 0);
    let seen = drain(&mut rx);
    assert_eq!(
        seen.len(),
        2,
        "the failed write is retried; the 404 is asked again too (it may come back): {seen:?}"
    );
    assert_eq!(
        seen[0].path,
        "/apis/security.istio.io/v1/namespaces/shop/peerauthentications/allow/status"
    );
}

fn lease(holder: &str, renew: &str, rv: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "trellis-control-plane", "namespace": "trellis-system", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 1, "renewTime": renew,
                 "acquireTime": renew, "leaseTransitions": 4},
    })
}

fn fast(identity: &str) -> LeaseConfig {
    LeaseConfig {
        duration: Duration::from_millis(600),
        renew_deadline: Duration::from_millis(400),
        retry: Duration::from_millis(50),
        ..LeaseConfig::new("trellis-system", "trellis-control-plane", identity)
    }
}

#[tokio::test]
async fn the_first_replica_creates_the_lease_and_leads() {
    let (client, mut rx) = api_server(|method, _, body| match method {
        "GET" => not_found(),
        "POST" => (201, body.clone()),
        _ => (200, body.clone()),
    });
    let (tx, mut leader) = watch::channel(false);
    let election = tokio::spawn(elect(client, fast("cp-0"), tx));
    tokio::time::timeout(Duration::from_secs(10), leader.wait_for(|l| *l))
        .await
        .expect("leads")
        .unwrap();
    election.abort();
    let seen = drain(&mut rx);
    let create = seen.iter().find(|s| s.method == "POST").expect("created");
    assert_eq!(
        create.path,
        "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases"
    );
    assert_eq!(create.body["spec"]["holderIdentity"], "cp-0");
}

#[tokio::test]
async fn a_held_lease_is_taken_over_only_after_it_stopped_being_renewed() {
    // The Lease is held by cp-0, which renews it for a while and then stops.
    let renewals = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = renewals.clone();
    let (client, mut rx) = api_server(move |method, _, body| match method {
        "GET" => {
            let n = r.fetch_add(1, std::sync::atomic::Ordering::SeqCst).min(10);
            // cp-0 renews on each of the first 10 reads, then never again.
            (
                200,
                lease(
                    "cp-0",
                    &format!("2026-12-01T00:00:{n:02}.000000Z"),
                    &format!("{n}"),
                ),
            )
        }
        "PUT" => (200, body.clone()),
        _ => conflict(),
    });
    let (tx, mut leader) = watch::channel(false);
    let election = tokio::spawn(elect(client, fast("cp-1"), tx));
    tokio::time::timeout(Duration::from_secs(10), leader.wait_for(|l| *l))
        .await
        .expect("takes over")
        .unwrap();
    election.abort();
    let seen = drain(&mut rx);
    let put_at = seen
        .iter()
        .position(|s| s.method == "PUT")
        .expect("replaced");
    assert!(
        put_at > 10,
        "not taken over while cp-0 renewed (first write after read {put_at})"
    );
    let put = &seen[put_at].body;
    assert_eq!(put["spec"]["holderIdentity"], "cp-1");
    assert_eq!(put["spec"]["leaseTransitions"], 5);
    assert_eq!(
        put["metadata"]["resourceVersion"], "10",
        "the write is conditional on what was read"
    );
}

#[tokio::test]
async fn a_lost_race_for_the_lease_does_not_lead() {
    let (client, mut rx) = api_server(|method, _, _| match method {
        "GET" => (200, lease("", "2026-12-01T00:00:00.000000Z", "7")),
        _ => conflict(),
    });
    let (tx, mut leader) = watch::channel(false);
    let election = tokio::spawn(elect(client, fast("cp-1"), tx));
    tokio::time::sleep(Duration::from_millis(500)).await;
    election.abort();
    assert!(
        !*leader.borrow_and_update(),
        "a 409 on the write is a lost race"
    );
    let seen = drain(&mut rx);
    assert!(
        seen.iter().any(|s| s.method == "PUT"),
        "it tried: the Lease was free"
    );
}

#[tokio::test]
async fn the_trust_bundle_is_published_in_each_namespace_given() {
    let (client, mut rx) = api_server(store(vec![]));
    let mut reconciler = Reconciler::new(client, None);
    let roots = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let mut inputs = Inputs {
        synced: true,
        trust_bundle: Some((
            roots.into(),
            ["shop".to_string(), "trellis-system".to_string()].into(),
        )),
        ..Inputs::default()
    };
    assert_eq!(reconciler.reconcile(&inputs, None, &|| true).await, 0);
    let seen = drain(&mut rx);
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/shop/configmaps/trellis-ca-root-cert",
            "/api/v1/namespaces/trellis-system/configmaps/trellis-ca-root-cert",
        ]
    );
    assert_eq!(seen[0].body["data"], json!({"root-cert.pem": roots}));
    assert_eq!(seen[0].content_type, "application/apply-patch+yaml");
    // A namespace joins: only its ConfigMap is written.
    inputs.trust_bundle.as_mut().unwrap().1.insert("dev".into());
    reconciler.reconcile(&inputs, None, &|| true).await;
    let seen = drain(&mut rx);
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].path,
        "/api/v1/namespaces/dev/configmaps/trellis-ca-root-cert"
    );
}

const ROUTES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  gatewayClassName: other-vendor
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cart, namespace: shop, generation: 7}
spec:
  parentRefs:
    - {group: "", kind: Service, name: cart, port: 80}
    - {name: waypoint}
    - {name: ingress}
    - {group: "", kind: Service, name: gone}
  rules:
    - backendRefs: [{name: cart, port: 80}, {name: cart-v2, port: 80}]
status:
  parents:
    - parentRef: {name: ingress}
      controllerName: example.com/other-vendor
      conditions: [{type: Accepted, status: "True", reason: Accepted, message: theirs}]
"#;

#[test]
fn route_status_covers_trellis_parents_and_keeps_other_controllers_entries() {
    use trellis_control_plane::controller::routes::{CONTROLLER_NAME, route_statuses};
    let model = model_from(ROUTES);
    let statuses = route_statuses(&model, &MeshConfig::default());
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    let (target, body) = statuses.iter().next().unwrap();
    assert_eq!(
        (target.kind, target.plural, target.status),
        ("HTTPRoute", "httproutes", true)
    );
    let parents = body["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 4, "{parents:#?}");
    assert_eq!(
        parents[0]["controllerName"], "example.com/other-vendor",
        "kept as written"
    );
    assert_eq!(parents[0]["conditions"][0]["message"], "theirs");
    let ours: Vec<&Value> = parents[1..].iter().collect();
    for p in &ours {
        assert_eq!(p["controllerName"], CONTROLLER_NAME);
        let resolved = &p["conditions"][1];
        assert_eq!(resolved["type"], "ResolvedRefs");
        assert_eq!(resolved["status"], "False");
        assert_eq!(resolved["reason"], "BackendNotFound");
        assert!(
            resolved["message"]
                .as_str()
                .unwrap()
                .contains("shop/cart-v2")
        );
        assert_eq!(p["conditions"][0]["observedGeneration"], 7);
    }
    // The Service bound to the waypoint, the waypoint itself, a Service that does not exist.
    assert_eq!(
        ours[0]["parentRef"],
        json!({"group": "", "kind": "Service", "name": "cart", "port": 80})
    );
    assert_eq!(ours[0]["conditions"][0]["status"], "True");
    assert_eq!(ours[1]["parentRef"], json!({"name": "waypoint"}));
    assert_eq!(ours[1]["conditions"][0]["status"], "True");
    assert_eq!(ours[2]["parentRef"]["name"], "gone");
    assert_eq!(ours[2]["conditions"][0]["status"], "False");
    assert_eq!(ours[2]["conditions"][0]["reason"], "NoMatchingParent");
}

#[test]
fn a_cross_namespace_backend_needs_a_reference_grant() {
    use trellis_control_plane::controller::routes::route_statuses;
    let other = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: cart-v2, namespace: other}\nspec: {clusterIP: 10.96.1.10, ports: [{port: 80}]}\n";
    let yaml = format!(
        "{}{other}",
        ROUTES.replace(
            "{name: cart-v2, port: 80}",
            "{name: cart-v2, namespace: other, port: 80}"
        )
    );
    let resolved = |yaml: &str| {
        let statuses = route_statuses(&model_from(yaml), &MeshConfig::default());
        statuses.values().next().unwrap()["status"]["parents"][1]["conditions"][1].clone()
    };
    let refused = resolved(&yaml);
    assert_eq!(refused["status"], "False");
    assert_eq!(refused["reason"], "RefNotPermitted", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("other/cart-v2")
    );
    let grant = "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: shop-routes, namespace: other}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]\n  to: [{group: \"\", kind: Service, name: cart-v2}]\n";
    let allowed = resolved(&format!("{yaml}{grant}"));
    assert_eq!(allowed["status"], "True", "{allowed}");
}

#[test]
fn a_mesh_route_of_a_service_without_a_waypoint_is_not_accepted() {
    use trellis_control_plane::controller::routes::route_statuses;
    let yaml = ROUTES.replace(", istio.io/use-waypoint: waypoint", "");
    let statuses = route_statuses(&model_from(&yaml), &MeshConfig::default());
    let body = statuses.values().next().unwrap();
    let service_parent = &body["status"]["parents"][1];
    assert_eq!(service_parent["parentRef"]["name"], "cart");
    let accepted = &service_parent["conditions"][0];
    assert_eq!(accepted["status"], "False");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .contains("no waypoint"),
        "{accepted}"
    );
}

#[tokio::test]
async fn route_condition_times_are_kept_per_parent_while_unchanged() {
    use trellis_control_plane::controller::routes::route_statuses;
    let (client, mut rx) = api_server(store(vec![]));
    let mut reconciler = Reconciler::new(client, None);
    let model = model_from(ROUTES);
    let inputs = Inputs {
        synced: true,
        statuses: route_statuses(&model, &MeshConfig::default()),
        ..Inputs::default()
    };
    reconciler.reconcile(&inputs, None, &|| true).await;
    let first = drain(&mut rx);
    assert_eq!(first.len(), 1);
    assert_eq!(
        first[0].path,
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/cart/status"
    );
    let t = &first[0].body["status"]["parents"][1]["conditions"][0]["lastTransitionTime"];
    assert!(t.is_string(), "{}", first[0].body);
    // The backend appears: ResolvedRefs turns True; Accepted keeps its time.
    let yaml = format!(
        "{ROUTES}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: cart-v2, namespace: shop}}\nspec: {{clusterIP: 10.96.0.11, ports: [{{port: 80}}]}}\n"
    );
    let model = model_from(&yaml);
    let inputs = Inputs {
        synced: true,
        statuses: route_statuses(&model, &MeshConfig::default()),
        ..Inputs::default()
    };
    reconciler.reconcile(&inputs, None, &|| true).await;
    let second = drain(&mut rx);
    assert_eq!(second.len(), 1);
    let p = &second[0].body["status"]["parents"][1];
    assert_eq!(p["conditions"][1]["status"], "True");
    assert_eq!(&p["conditions"][0]["lastTransitionTime"], t);
}

/// A leader whose API requests stop being answered steps down at its renew deadline, on its
/// own timer (a hanging request cannot stretch its leadership).
#[tokio::test]
async fn a_leader_whose_renewals_hang_steps_down_at_the_deadline() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "trellis-system");
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut created = false;
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().clone();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            if created {
                held.push(send); // the API server stops answering
                continue;
            }
            let (code, reply) = if method == "GET" {
                not_found()
            } else {
                created = true;
                (201, serde_json::from_slice(&body).unwrap())
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    let config = fast("cp-0");
    let deadline = config.renew_deadline;
    let (tx, mut leader) = watch::channel(false);
    let election = tokio::spawn(elect(client, config, tx));
    tokio::time::timeout(Duration::from_secs(10), leader.wait_for(|l| *l))
        .await
        .expect("leads")
        .unwrap();
    let led_at = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), leader.wait_for(|l| !*l))
        .await
        .expect("steps down")
        .unwrap();
    let led_for = led_at.elapsed();
    election.abort();
    assert!(
        led_for <= deadline + Duration::from_millis(150),
        "led {led_for:?} past the renew deadline {deadline:?}"
    );
}

/// A renewal of its own Lease that meets a conflict (409) is retried; the leader does not
/// step down for it.
#[tokio::test]
async fn a_renewal_conflict_does_not_end_leadership() {
    let puts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p = puts.clone();
    let (client, _rx) = api_server(move |method, _, body| match method {
        "GET" => (200, lease("cp-0", "2026-12-01T00:00:00.000000Z", "3")),
        "PUT" => {
            // The second renewal conflicts; the others go through.
            if p.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                conflict()
            } else {
                (200, body.clone())
            }
        }
        _ => conflict(),
    });
    let (tx, mut leader) = watch::channel(false);
    let changes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let election = tokio::spawn(elect(client, fast("cp-0"), tx));
    tokio::time::timeout(Duration::from_secs(10), leader.wait_for(|l| *l))
        .await
        .expect("leads")
        .unwrap();
    let c = changes.clone();
    let mut watcher = leader.clone();
    let counting = tokio::spawn(async move {
        while watcher.changed().await.is_ok() {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    while puts.load(std::sync::atomic::Ordering::SeqCst) < 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    election.abort();
    counting.abort();
    assert_eq!(
        changes.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "leadership never flipped"
    );
}

/// A Gateway named like something that exists (a user's Service, the namespace's `default`
/// ServiceAccount) does not take it over: nothing is applied, its status says why.
#[tokio::test]
async fn a_waypoint_never_takes_over_objects_it_did_not_create() {
    let users_service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "cart", "namespace": "shop", "uid": "svc-uid"},
        "spec": {"selector": {"app": "cart"}}});
    let (client, mut rx) = api_server(store(vec![(
        "/api/v1/namespaces/shop/services/cart",
        users_service,
    )]));
    let mut reconciler = Reconciler::new(client, Some(template()));
    let inputs = Inputs {
        synced: true,
        waypoints: BTreeMap::from([(
            ("shop".to_string(), "cart".to_string()),
            (waypoint_gateway("cart"), None),
        )]),
        ..Inputs::default()
    };
    reconciler
        .reconcile(&inputs, Some(&Deployments::new()), &|| true)
        .await;
    let seen = drain(&mut rx);
    let written = writes(&seen);
    assert_eq!(
        written,
        [(
            "PATCH",
            "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/cart/status"
        )],
        "only the Gateway's status"
    );
    let status = &seen.iter().find(|s| s.method == "PATCH").unwrap().body["status"];
    assert_eq!(status["conditions"][0]["status"], "False");
    let message = status["conditions"][0]["message"].as_str().unwrap();
    assert!(message.contains("Service shop/cart exists"), "{message}");

    // Nor does cleaning up delete what a user labelled like a waypoint's Deployment.
    let users_deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "mine", "namespace": "shop", "uid": "d-uid",
                     "labels": {"gateway.istio.io/managed": "trellis.dev-waypoint-controller"}}});
    let (client, mut rx) = api_server(store(vec![(
        "/apis/apps/v1/namespaces/shop/deployments/mine",
        users_deployment,
    )]));
    let mut reconciler = Reconciler::new(client, Some(template()));
    let managed = Deployments::from([(("shop".to_string(), "mine".to_string()), 1)]);
    reconciler
        .reconcile(
            &Inputs {
                synced: true,
                ..Inputs::default()
            },
            Some(&managed),
            &|| true,
        )
        .await;
    assert!(
        drain(&mut rx).iter().all(|s| s.method != "DELETE"),
        "not created for a Gateway: left alone"
    );
}

/// Statuses as observed on the API: other conditions are written back (Istio's CRDs make
/// the list one value), and an unchanged condition keeps its time across restarts.
#[test]
fn a_policy_status_keeps_other_conditions_and_an_unchanged_conditions_time() {
    let model = model_from(POLICIES);
    let snap = Snapshot::build(&model, &MeshConfig::default());
    let id = ObjectRef {
        kind: "AuthorizationPolicy".into(),
        namespace: "shop".into(),
        name: "allow-frontend".into(),
    };
    let observed = json!({"conditions": [
        {"type": "example.com/Reviewed", "status": "True", "reason": "Reviewed",
         "lastTransitionTime": "2026-11-01T00:00:00Z"},
        // Ours from when the policy was attached to a waypoint: replaced.
        {"type": "WaypointAccepted", "status": "True", "reason": "Accepted",
         "lastTransitionTime": "2026-11-01T00:00:00Z"},
        {"type": "ZtunnelAccepted", "status": "True", "reason": "Accepted",
         "lastTransitionTime": "2026-11-02T00:00:00Z"},
    ]});
    let body = status::policy_status(&id, &snap.statuses[&id], Some(3), Some(&observed));
    let conditions = body["status"]["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 2, "{conditions:?}");
    assert_eq!(
        conditions[0]["type"], "example.com/Reviewed",
        "another controller's, kept"
    );
    assert_eq!(conditions[1]["type"], "ZtunnelAccepted");
    assert_eq!(
        conditions[1]["lastTransitionTime"], "2026-11-02T00:00:00Z",
        "unchanged: same time"
    );
    // Rejected now: the status changed, so the time is not carried.
    let rejected = &snap.statuses[&ObjectRef {
        name: "both".into(),
        ..id.clone()
    }];
    let body = status::policy_status(&id, rejected, Some(4), Some(&observed));
    assert!(
        body["status"]["conditions"][1]
            .get("lastTransitionTime")
            .is_none()
    );
}

#[test]
fn route_entries_of_ours_for_parents_gone_are_removed() {
    use trellis_control_plane::controller::routes::{CONTROLLER_NAME, route_statuses};
    // The route's only parent is now another vendor's Gateway; our entry from before stays
    // in its observed status.
    let yaml = ROUTES
        .replace(
            "    - {group: \"\", kind: Service, name: cart, port: 80}\n    - {name: waypoint}\n",
            "",
        )
        .replace("    - {group: \"\", kind: Service, name: gone}\n", "")
        .replace(
            "      conditions: [{type: Accepted, status: \"True\", reason: Accepted, message: theirs}]\n",
            &format!("      conditions: [{{type: Accepted, status: \"True\", reason: Accepted, message: theirs}}]\n    - parentRef: {{name: waypoint}}\n      controllerName: {CONTROLLER_NAME}\n      conditions: [{{type: Accepted, status: \"True\", reason: Accepted, message: old}}]\n"),
        );
    let statuses = route_statuses(&model_from(&yaml), &MeshConfig::default());
    let body = statuses
        .values()
        .next()
        .expect("written, to drop our old entry");
    let parents = body["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 1, "{parents:?}");
    assert_eq!(parents[0]["controllerName"], "example.com/other-vendor");
}

#[test]
fn a_gateway_conditions_time_survives_a_restart() {
    let mut gw = waypoint_gateway("waypoint");
    gw.status = serde_json::from_value(json!({"conditions": [
        {"type": "Accepted", "status": "True", "lastTransitionTime": "2026-11-03T00:00:00Z"},
        {"type": "Programmed", "status": "True", "lastTransitionTime": "2026-11-04T00:00:00Z"},
    ]}))
    .unwrap();
    let (_, pending) = gateway_status(&gw, &Observed::default(), None);
    let c = &pending["status"]["conditions"];
    assert_eq!(c[0]["lastTransitionTime"], "2026-11-03T00:00:00Z");
    assert!(
        c[1].get("lastTransitionTime").is_none(),
        "Programmed turned False: a new time"
    );
}

#[tokio::test]
async fn a_body_the_api_server_refuses_as_invalid_is_not_resent_until_it_changes() {
    let (client, mut rx) = api_server(|method, path, body| {
        if method == "PATCH" && path.contains("/dev/") {
            (
                422,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "reason": "Invalid", "message": "data: Too long", "code": 422}),
            )
        } else {
            (200, body.clone())
        }
    });
    let mut reconciler = Reconciler::new(client, None);
    let mut inputs = Inputs {
        synced: true,
        trust_bundle: Some(("pem-1".into(), ["dev".to_string()].into())),
        ..Inputs::default()
    };
    assert_eq!(reconciler.reconcile(&inputs, None, &|| true).await, 1);
    assert_eq!(drain(&mut rx).len(), 1);
    assert_eq!(reconciler.reconcile(&inputs, None, &|| true).await, 0);
    assert!(drain(&mut rx).is_empty(), "not sent again unchanged");
    inputs.trust_bundle = Some(("pem-2".into(), ["dev".to_string()].into()));
    reconciler.reconcile(&inputs, None, &|| true).await;
    assert_eq!(drain(&mut rx).len(), 1, "a changed body is sent");
}

#[test]
fn waypoint_service_ports_get_valid_names_and_names_must_start_with_a_letter() {
    let mut gw = waypoint_gateway("waypoint");
    gw.spec.listeners.push(
        serde_json::from_value(
            json!({"name": "a.very-long.listener-name", "port": 8080, "protocol": "HTTP"}),
        )
        .unwrap(),
    );
    let objects = waypoint::objects(&gw, &template()).unwrap();
    let names: Vec<&str> = objects[1].1["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mesh", "port-8080", "status-port"]);
    assert!(names.iter().all(|n| n.len() <= 15 && !n.contains('.')));
    assert!(waypoint::objects(&waypoint_gateway("1waypoint"), &template()).is_err());
}

#[test]
fn a_route_whose_waypoint_is_not_ready_is_pending() {
    use trellis_control_plane::controller::routes::route_statuses;
    // The controller wrote Programmed=False on the waypoint Gateway (no ready pod).
    let gateway_status = "\nstatus:\n  conditions:\n    - {type: Programmed, status: \"False\", reason: Pending, message: waiting for the waypoint's Deployment to have a ready pod}\n";
    let marker = "gatewayClassName: istio-waypoint";
    let i = ROUTES.find(marker).expect("fixture has a waypoint Gateway");
    let end = ROUTES[i..].find("\n---").map_or(ROUTES.len(), |e| i + e);
    let yaml = format!("{}{}{}", &ROUTES[..end], gateway_status, &ROUTES[end..]);
    let statuses = route_statuses(&model_from(&yaml), &MeshConfig::default());
    let body = statuses.values().next().unwrap();
    let service_parent = &body["status"]["parents"][1];
    assert_eq!(service_parent["parentRef"]["name"], "cart");
    let accepted = &service_parent["conditions"][0];
    assert_eq!(accepted["status"], "False", "{accepted}");
    assert_eq!(accepted["reason"], "Pending");
    assert!(
        accepted["message"].as_str().unwrap().contains("ready pod"),
        "{accepted}"
    );
    // Ready again: accepted.
    let ready = yaml.replace(
        "{type: Programmed, status: \"False\"",
        "{type: Programmed, status: \"True\"",
    );
    let statuses = route_statuses(&model_from(&ready), &MeshConfig::default());
    let body = statuses.values().next().unwrap();
    assert_eq!(
        body["status"]["parents"][1]["conditions"][0]["status"],
        "True"
    );
}
