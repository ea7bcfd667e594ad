//! Snapshots: the resources the data plane receives for the seed examples, and deltas that
//! carry only what changed.

use std::collections::BTreeMap;
use std::path::Path;

use trellis_control_plane::config::authz::PolicyState;
use trellis_control_plane::config::load::{Document, ObjectRef, parse_file};
use trellis_control_plane::config::model::{MeshConfig, Model};
use trellis_control_plane::config::snapshot::Snapshot;
use trellis_proto::istio::security::Authorization;
use trellis_proto::istio::workload::{Address, address};
use trellis_proto::type_url;

const SEED: &str = include_str!("../../examples/seed-policies.yaml");
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin-0, namespace: foo, labels: {app: httpbin}}
spec: {nodeName: node1, serviceAccountName: httpbin, containers: [{name: app, image: x}]}
status: {podIP: 10.244.1.9}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec: {clusterIP: 10.96.0.20, selector: {app: httpbin}, ports: [{port: 8000}]}
"#;

fn model(texts: &[&str]) -> Model {
    let mut m = Model::default();
    for t in texts {
        for d in parse_file(Path::new("x.yaml"), t) {
            if let Document::Loaded(l) = d {
                m.apply(&l.id, l.object);
            }
        }
    }
    m
}

#[test]
fn the_seed_examples_become_named_resources_with_statuses() {
    let snap = Snapshot::build(&model(&[SEED, CLUSTER]), &MeshConfig::default());
    let addresses = snap.of_type(type_url::ADDRESS).unwrap();
    let names: Vec<&str> = addresses.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "Kubernetes//Pod/foo/httpbin-0",
            "foo/httpbin.foo.svc.cluster.local"
        ]
    );
    let workload = addresses["Kubernetes//Pod/foo/httpbin-0"]
        .body
        .to_msg::<Address>()
        .unwrap();
    let Some(address::Type::Workload(w)) = workload.r#type else {
        panic!()
    };
    assert_eq!(
        w.authorization_policies,
        ["istio-system/istio_converted_static_strict"]
    );

    let authz = snap.of_type(type_url::AUTHORIZATION).unwrap();
    let names: Vec<&str> = authz.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["foo/httpbin", "istio-system/istio_converted_static_strict"]
    );
    let deny = authz["foo/httpbin"].body.to_msg::<Authorization>().unwrap();
    assert_eq!(deny.rules.len(), 1);
    let status_of = |kind: &str, name: &str| {
        let id = ObjectRef {
            kind: kind.into(),
            namespace: "foo".into(),
            name: name.into(),
        };
        snap.statuses
            .get(&id)
            .unwrap_or_else(|| panic!("no status for {id}"))
            .clone()
    };
    let deny = status_of("AuthorizationPolicy", "httpbin");
    assert_eq!(deny.state, PolicyState::AcceptedWithWarnings);
    assert!(deny.reasons[0].contains("methods"), "{:?}", deny.reasons);
    assert_eq!(
        status_of("PeerAuthentication", "default").state,
        PolicyState::Accepted
    );
    let jwt = status_of("RequestAuthentication", "jwt-example");
    assert_eq!(jwt.state, PolicyState::AcceptedWithWarnings);
    assert!(jwt.reasons[0].contains("waypoint"), "{:?}", jwt.reasons);
    assert_eq!(snap.statuses.len(), 3, "every policy has a status");
}

#[test]
fn deltas_carry_only_what_changed() {
    let mesh = MeshConfig::default();
    let before = Snapshot::build(&model(&[CLUSTER]), &mesh);
    let rebuilt = Snapshot::build(&model(&[CLUSTER]), &mesh);
    assert_eq!(before, rebuilt, "versions are stable across rebuilds");

    let known: BTreeMap<String, String> = before
        .of_type(type_url::ADDRESS)
        .unwrap()
        .iter()
        .map(|(n, r)| (n.clone(), r.version.clone()))
        .collect();
    let moved = CLUSTER.replace("10.244.1.9", "10.244.1.10");
    let after = Snapshot::build(&model(&[&moved]), &mesh);
    let delta = after.delta_from(type_url::ADDRESS, &known, |_| true);
    assert_eq!(delta.updated.len(), 1, "only the workload changed");
    assert_eq!(delta.updated[0].0, "Kubernetes//Pod/foo/httpbin-0");
    assert!(delta.removed.is_empty());

    let no_pod: Vec<&str> = CLUSTER
        .split("---\n")
        .filter(|d| !d.contains("kind: Pod"))
        .collect();
    let without_pod = Snapshot::build(&model(&[&no_pod.join("---\n")]), &mesh);
    let delta = without_pod.delta_from(type_url::ADDRESS, &known, |_| true);
    assert_eq!(delta.removed, ["Kubernetes//Pod/foo/httpbin-0"]);
    // A subscriber to services only never hears of workloads.
    let delta = after.delta_from(type_url::ADDRESS, &BTreeMap::new(), |n| {
        n.starts_with("foo/")
    });
    assert_eq!(delta.updated.len(), 1);
}

fn apply(m: &mut Model, yaml: &str) {
    for d in parse_file(Path::new("x.yaml"), yaml) {
        match d {
            Document::Loaded(l) => m.apply(&l.id, l.object),
            other => panic!("{other:?}"),
        }
    }
}

fn delete(m: &mut Model, kind: &str, ns: &str, name: &str) {
    m.delete(&trellis_control_plane::config::load::ObjectRef {
        kind: kind.into(),
        namespace: ns.into(),
        name: name.into(),
    });
}

fn ns_fixture(ns: &str, ip: u8) -> String {
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: {ns}, labels: {{app: a}}}}\nspec: {{nodeName: n1, containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: 10.244.0.{ip}}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: {ns}}}\nspec: {{clusterIP: 10.96.0.{ip}, selector: {{app: a}}, ports: [{{port: 80}}]}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow, namespace: {ns}}}\nspec: {{selector: {{matchLabels: {{app: a}}}}, rules: [{{}}]}}\n"
    )
}

#[test]
fn an_incremental_rebuild_equals_a_full_build() {
    let mesh = MeshConfig::default();
    let mut m = Model::default();
    apply(
        &mut m,
        &[ns_fixture("a", 1), ns_fixture("b", 2), ns_fixture("c", 3)].concat(),
    );
    m.take_dirty();
    let mut snap = Snapshot::build(&m, &mesh);
    type Step = Box<dyn Fn(&mut Model)>;
    let steps: Vec<Step> = vec![
        Box::new(|m| apply(m, &ns_fixture("a", 9))),
        Box::new(|m| delete(m, "Service", "b", "s")),
        Box::new(|m| {
            apply(
                m,
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: c}\nspec: {mtls: {mode: STRICT}}\n",
            )
        }),
        Box::new(|m| apply(m, "apiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n")),
        Box::new(|m| {
            apply(
                m,
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: mesh, namespace: istio-system}\nspec: {selector: {matchLabels: {app: a}}, action: DENY, rules: [{}]}\n",
            )
        }),
        Box::new(|m| delete(m, "Pod", "a", "p")),
    ];
    for (i, step) in steps.iter().enumerate() {
        step(&mut m);
        let dirty = m.take_dirty();
        let incremental = Snapshot::rebuild(&snap, &m, &mesh, &dirty);
        let full = Snapshot::build(&m, &mesh);
        assert_eq!(
            incremental.resources, full.resources,
            "step {i}: resources differ"
        );
        assert_eq!(
            incremental.statuses, full.statuses,
            "step {i}: statuses differ"
        );
        snap = incremental;
    }
}
