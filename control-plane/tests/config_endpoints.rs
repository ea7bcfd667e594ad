//! Nodes and EndpointSlices in the model: workloads carry their node's locality, and the
//! endpoints of a Service that are not pods become (plain TCP) workloads of that Service.
//! The Kubernetes source and the directory source give the same xDS for them.

use std::path::Path;

use trellis_control_plane::config::kube::{Event, KINDS, KubeState};
use trellis_control_plane::config::load::{Document, parse_file};
use trellis_control_plane::config::model::{MeshConfig, Model};
use trellis_control_plane::config::snapshot::Snapshot;
use trellis_proto::istio::workload as wl;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Node
metadata:
  name: node1
  labels: {topology.kubernetes.io/region: eu-west, topology.kubernetes.io/zone: eu-west-1a, kubernetes.io/hostname: node1}
spec: {podCIDR: 10.244.1.0/24}
status: {nodeInfo: {kubeletVersion: v1.30.0, architecture: amd64, bootID: b, containerRuntimeVersion: c, kernelVersion: k, kubeProxyVersion: p, machineID: m, operatingSystem: linux, osImage: o, systemUUID: s}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-0, namespace: shop, labels: {app: cart}}
spec: {nodeName: node1, serviceAccountName: cart, containers: [{name: app, image: app}]}
status: {podIP: 10.244.1.5, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: legacy-db, namespace: shop}
spec:
  clusterIP: 10.96.0.50
  ports: [{name: sql, port: 5432, targetPort: 15432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: legacy-db-1
  namespace: shop
  labels: {kubernetes.io/service-name: legacy-db}
addressType: IPv4
ports: [{name: sql, port: 15432, protocol: TCP}]
endpoints:
  - addresses: [192.168.10.5]
    conditions: {ready: true}
    nodeName: node1
  - addresses: [192.168.10.6]
    conditions: {ready: false}
    zone: eu-west-1b
  - addresses: [10.244.1.5]
    targetRef: {kind: Pod, name: cart-0, namespace: shop}
"#;

fn model_from(yaml: &str) -> Model {
    let mut model = Model::default();
    for doc in parse_file(Path::new("objects.yaml"), yaml) {
        match doc {
            Document::Loaded(l) => {
                assert!(l.warnings.is_empty(), "{:?}", l.warnings);
                model.apply(&l.id, l.object)
            }
            other => panic!("{other:?}"),
        }
    }
    model
}

fn workload<'a>(ws: &'a [wl::Workload], uid: &str) -> &'a wl::Workload {
    ws.iter().find(|w| w.uid == uid).unwrap_or_else(|| {
        panic!(
            "no workload {uid} in {:?}",
            ws.iter().map(|w| &w.uid).collect::<Vec<_>>()
        )
    })
}

#[test]
fn pods_carry_their_nodes_locality_and_non_pod_endpoints_are_workloads_of_their_service() {
    let mesh = MeshConfig::default();
    let model = model_from(OBJECTS);
    let ws = model.workloads_in("shop", &mesh);
    assert_eq!(
        ws.len(),
        3,
        "the pod and two non-pod endpoints (the pod's endpoint is the pod)"
    );

    let cart = workload(&ws, "Kubernetes//Pod/shop/cart-0");
    assert_eq!(
        cart.locality,
        Some(wl::Locality {
            region: "eu-west".into(),
            zone: "eu-west-1a".into(),
            subzone: String::new()
        })
    );

    let db = workload(
        &ws,
        "Kubernetes/discovery.k8s.io/EndpointSlice/shop/legacy-db-1/192.168.10.5",
    );
    assert_eq!(db.addresses, vec![vec![192, 168, 10, 5]]);
    assert_eq!(
        db.tunnel_protocol,
        wl::TunnelProtocol::None as i32,
        "not in the mesh"
    );
    assert_eq!(db.status, wl::WorkloadStatus::Healthy as i32);
    assert_eq!(
        db.services.get("shop/legacy-db.shop.svc.cluster.local"),
        Some(&wl::PortList {
            ports: vec![wl::Port {
                service_port: 5432,
                target_port: 15432
            }]
        }),
        "the service port maps to the slice's port of the same name"
    );
    assert_eq!(
        db.locality.as_ref().map(|l| l.zone.as_str()),
        Some("eu-west-1a")
    );

    let down = workload(
        &ws,
        "Kubernetes/discovery.k8s.io/EndpointSlice/shop/legacy-db-1/192.168.10.6",
    );
    assert_eq!(down.status, wl::WorkloadStatus::Unhealthy as i32);
    assert_eq!(
        down.locality.as_ref().map(|l| l.zone.as_str()),
        Some("eu-west-1b"),
        "the endpoint's own zone"
    );
}

#[test]
fn a_node_change_reaches_its_pods_only_when_its_locality_changes() {
    let mesh = MeshConfig::default();
    let mut model = model_from(OBJECTS);
    model.take_dirty();
    let node = |zone: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  labels: {{topology.kubernetes.io/region: eu-west, topology.kubernetes.io/zone: {zone}, {extra}}}\n"
        )
    };
    for doc in parse_file(Path::new("n.yaml"), &node("eu-west-1a", "other: label")) {
        if let Document::Loaded(l) = doc {
            model.apply(&l.id, l.object);
        }
    }
    assert!(
        model.take_dirty().is_empty(),
        "a label other than topology changes nothing"
    );
    for doc in parse_file(Path::new("n.yaml"), &node("eu-west-1c", "other: label")) {
        if let Document::Loaded(l) = doc {
            model.apply(&l.id, l.object);
        }
    }
    assert_eq!(model.take_dirty(), ["shop".to_string()].into());
    let ws = model.workloads_in("shop", &mesh);
    assert_eq!(
        workload(&ws, "Kubernetes//Pod/shop/cart-0")
            .locality
            .as_ref()
            .map(|l| l.zone.as_str()),
        Some("eu-west-1c")
    );
}

#[test]
fn the_kubernetes_source_gives_the_same_xds_for_nodes_and_endpoint_slices() {
    let mesh = MeshConfig::default();
    let from_files = model_from(OBJECTS);
    let mut state = KubeState::default();
    let mut from_api = Model::default();
    for doc in serde_yaml_ng::Deserializer::from_str(OBJECTS) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        let kind = KINDS
            .iter()
            .find(|k| k.kind == v["kind"] && k.api_version() == v["apiVersion"])
            .unwrap_or_else(|| panic!("not watched: {}", v["kind"]));
        assert!(state.apply(Event::Apply(kind, v), &mut from_api));
    }
    assert!(state.errors().is_empty(), "{:?}", state.errors());
    assert_eq!(
        Snapshot::build(&from_api, &mesh),
        Snapshot::build(&from_files, &mesh)
    );
}
