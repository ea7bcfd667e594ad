//! The model: which pods are enrolled, and the workloads and services ztunnel receives.

use std::path::Path;

use trellis_control_plane::config::load::{Document, parse_file};
use trellis_control_plane::config::model::{MeshConfig, Model};
use trellis_proto::istio::workload::{NetworkMode, TunnelProtocol, WorkloadStatus};

fn model(yaml: &str) -> Model {
    let mut m = Model::default();
    for doc in parse_file(Path::new("m.yaml"), yaml) {
        match doc {
            Document::Loaded(l) => m.apply(&l.id, l.object),
            other => panic!("{other:?}"),
        }
    }
    m
}

fn pod(ns: &str, name: &str, ip: &str, labels: &str, extra_spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec:\n  nodeName: node1\n  serviceAccountName: sa-{name}\n  containers: [{{name: app, image: x, ports: [{{name: http, containerPort: 8080}}]}}]\n{extra_spec}status: {{podIP: {ip}, phase: Running}}\n"
    )
}

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
"#;

#[test]
fn enrollment_follows_namespace_and_pod_labels() {
    let yaml = [
        NAMESPACES.to_string(),
        pod("mesh", "in-ns", "10.244.1.2", "app: a", ""),
        pod(
            "mesh",
            "opted-out",
            "10.244.1.3",
            "istio.io/dataplane-mode: none",
            "",
        ),
        pod(
            "plain",
            "opted-in",
            "10.244.1.4",
            "istio.io/dataplane-mode: ambient",
            "",
        ),
        pod("plain", "not-in", "10.244.1.5", "app: b", ""),
        pod(
            "mesh",
            "host-net",
            "172.18.0.2",
            "",
            "  hostNetwork: true\n",
        ),
    ]
    .concat();
    let m = model(&yaml);
    let workloads = m.workloads(&MeshConfig::default());
    let proto = |name: &str| {
        workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
            .tunnel_protocol
    };
    let hbone = TunnelProtocol::Hbone as i32;
    let tcp = TunnelProtocol::None as i32;
    assert_eq!(proto("in-ns"), hbone, "namespace label enrolls");
    assert_eq!(proto("opted-out"), tcp, "pod label none opts out");
    assert_eq!(
        proto("opted-in"),
        hbone,
        "pod label enrolls in a plain namespace"
    );
    assert_eq!(proto("not-in"), tcp);
    assert_eq!(
        proto("host-net"),
        tcp,
        "host-network pods are never enrolled"
    );
    let host = workloads.iter().find(|w| w.name == "host-net").unwrap();
    assert_eq!(host.network_mode, NetworkMode::HostNetwork as i32);
}

#[test]
fn workloads_and_services_carry_what_ztunnel_needs() {
    let yaml = [
        NAMESPACES.to_string(),
        pod("mesh", "cart-0", "10.244.1.7", "app: cart, version: v2", ""),
        r#"---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: mesh}
spec:
  clusterIP: 10.96.0.10
  selector: {app: cart}
  ports:
  - {name: web, port: 80, targetPort: http}
  - {name: admin, port: 9090, targetPort: 9091}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: mesh}
spec:
  clusterIP: None
  selector: {app: nothing-matches}
  ports: [{port: 5432}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart-only, namespace: mesh}
spec:
  selector: {matchLabels: {app: cart}}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: mesh}
spec:
  rules: [{}]
"#
        .to_string(),
    ]
    .concat();
    let mesh = MeshConfig::default();
    let m = model(&yaml);
    let workloads = m.workloads(&mesh);
    assert_eq!(workloads.len(), 1);
    let w = &workloads[0];
    assert_eq!(w.uid, "Kubernetes//Pod/mesh/cart-0");
    assert_eq!(w.addresses, vec![vec![10, 244, 1, 7]]);
    assert_eq!(w.node, "node1");
    assert_eq!(w.service_account, "sa-cart-0");
    assert_eq!(w.trust_domain, "cluster.local");
    assert_eq!(w.canonical_name, "cart");
    assert_eq!(w.canonical_revision, "v2");
    assert_eq!(w.status, WorkloadStatus::Healthy as i32);
    // Only selector policies are attached to workloads; namespace-wide ones apply by scope.
    assert_eq!(w.authorization_policies, ["mesh/cart-only"]);
    let ports = &w.services["mesh/cart.mesh.svc.cluster.local"].ports;
    assert_eq!(
        (ports[0].service_port, ports[0].target_port),
        (80, 8080),
        "named port resolved"
    );
    assert_eq!((ports[1].service_port, ports[1].target_port), (9090, 9091));

    let services = m.services(&mesh);
    let cart = services.iter().find(|s| s.name == "cart").unwrap();
    assert_eq!(cart.hostname, "cart.mesh.svc.cluster.local");
    assert_eq!(cart.addresses[0].address, vec![10, 96, 0, 10]);
    assert_eq!(cart.ports.len(), 2);
    let headless = services.iter().find(|s| s.name == "headless").unwrap();
    assert!(
        headless.addresses.is_empty(),
        "headless services have no VIP"
    );
}

#[test]
fn deleting_objects_updates_the_result() {
    let yaml = [
        NAMESPACES.to_string(),
        pod("mesh", "a", "10.244.1.2", "", ""),
    ]
    .concat();
    let mut m = model(&yaml);
    let mesh = MeshConfig::default();
    assert_eq!(
        m.workloads(&mesh)[0].tunnel_protocol,
        TunnelProtocol::Hbone as i32
    );
    // The namespace loses its label: the pod leaves the mesh.
    for doc in parse_file(
        Path::new("m.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh}\n",
    ) {
        if let Document::Loaded(l) = doc {
            m.apply(&l.id, l.object);
        }
    }
    assert_eq!(
        m.workloads(&mesh)[0].tunnel_protocol,
        TunnelProtocol::None as i32
    );
    m.delete(&trellis_control_plane::config::load::ObjectRef {
        kind: "Pod".into(),
        namespace: "mesh".into(),
        name: "a".into(),
    });
    assert!(m.workloads(&mesh).is_empty());
}

const SEED: &str = include_str!("../../examples/seed-policies.yaml");

fn pa(ns: &str, name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"
    )
}

fn policies_of(m: &Model, name: &str) -> Vec<String> {
    m.workloads(&MeshConfig::default())
        .into_iter()
        .find(|w| w.name == name)
        .unwrap_or_else(|| panic!("no workload {name}"))
        .authorization_policies
}

#[test]
fn the_seed_strict_peer_authentication_denies_plaintext_in_foo() {
    use trellis_proto::istio::security::{Action, Scope, string_match::MatchType};
    let yaml = [
        SEED.to_string(),
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}\n".into(),
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: bar, labels: {istio.io/dataplane-mode: ambient}}\n".into(),
        pod("foo", "httpbin", "10.244.1.9", "app: httpbin", ""),
        pod("bar", "other", "10.244.1.10", "app: other", ""),
    ]
    .concat();
    let m = model(&yaml);
    assert_eq!(
        policies_of(&m, "httpbin"),
        ["istio-system/istio_converted_static_strict"]
    );
    assert!(
        policies_of(&m, "other").is_empty(),
        "bar has no PeerAuthentication"
    );
    let policies = m.peer_authentication_policies(&MeshConfig::default());
    assert_eq!(policies.len(), 1);
    let p = &policies[0];
    assert_eq!(
        (p.namespace.as_str(), p.name.as_str()),
        ("istio-system", "istio_converted_static_strict")
    );
    assert_eq!(p.action, Action::Deny as i32);
    assert_eq!(p.scope, Scope::WorkloadSelector as i32);
    let m0 = &p.rules[0].clauses[0].matches[0];
    assert_eq!(
        m0.not_principals[0].match_type,
        Some(MatchType::Presence(())),
        "no peer identity"
    );
}

#[test]
fn peer_authentication_precedence_mesh_namespace_workload_port() {
    let base = [
        NAMESPACES.to_string(),
        pod("mesh", "a", "10.244.1.2", "app: a", ""),
        pod("mesh", "b", "10.244.1.3", "app: b", ""),
        pod("plain", "outside", "10.244.1.4", "app: c", ""),
    ]
    .concat();
    let strict_key = "istio-system/istio_converted_static_strict";
    // Mesh-wide STRICT reaches enrolled pods only.
    let m = model(
        &[
            base.clone(),
            pa("istio-system", "default", "  mtls: {mode: STRICT}"),
        ]
        .concat(),
    );
    assert_eq!(policies_of(&m, "a"), [strict_key]);
    assert!(
        policies_of(&m, "outside").is_empty(),
        "not enrolled: ztunnel never sees it"
    );
    // The namespace relaxes it.
    let m = model(
        &[
            base.clone(),
            pa("istio-system", "default", "  mtls: {mode: STRICT}"),
            pa("mesh", "relaxed", "  mtls: {mode: PERMISSIVE}"),
        ]
        .concat(),
    );
    assert!(policies_of(&m, "a").is_empty());
    // A workload tightens it again, except on one port.
    let m = model(
        &[
            base,
            pa("mesh", "relaxed", "  mtls: {mode: PERMISSIVE}"),
            pa(
                "mesh",
                "a-strict",
                "  selector: {matchLabels: {app: a}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}",
            ),
        ]
        .concat(),
    );
    assert_eq!(
        policies_of(&m, "a"),
        ["mesh/converted_peer_authentication_a-strict"]
    );
    assert!(policies_of(&m, "b").is_empty());
    let converted = m.peer_authentication_policies(&MeshConfig::default());
    assert_eq!(converted.len(), 1);
    let m0 = &converted[0].rules[0].clauses[0].matches[0];
    assert_eq!(
        m0.not_destination_ports,
        vec![8080],
        "plaintext still accepted on 8080"
    );
}
