//! Gateway API objects and waypoint binding: which services and workloads are fronted by
//! which waypoint, as the data plane receives it.

use std::collections::BTreeSet;
use std::path::Path;

use trellis_control_plane::config::load::{Document, ObjectRef, parse_file};
use trellis_control_plane::config::model::{MeshConfig, Model};
use trellis_control_plane::config::snapshot::Snapshot;
use trellis_proto::istio::workload::gateway_address::Destination;
use trellis_proto::istio::workload::{GatewayAddress, NamespacedHostname, NetworkAddress};

fn apply(m: &mut Model, yaml: &str) {
    for doc in parse_file(Path::new("w.yaml"), yaml) {
        match doc {
            Document::Loaded(l) => m.apply(&l.id, l.object),
            other => panic!("{other:?}"),
        }
    }
}

fn pod(ns: &str, name: &str, ip: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{nodeName: node1, containers: [{{name: app, image: x}}]}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
    )
}

fn service(ns: &str, name: &str, vip: &str, selector: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{clusterIP: {vip}, selector: {{{selector}}}, ports: [{{port: 80}}]}}\n"
    )
}

fn waypoint(ns: &str, name: &str, waypoint_for: Option<&str>) -> String {
    let labels = waypoint_for
        .map(|f| format!("labels: {{istio.io/waypoint-for: {f}}}"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: {ns}\n  {labels}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
    )
}

fn vip(a: [u8; 4]) -> Option<GatewayAddress> {
    Some(GatewayAddress {
        destination: Some(Destination::Address(NetworkAddress {
            network: String::new(),
            address: a.to_vec(),
        })),
        hbone_mtls_port: 15008,
    })
}

const NS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: shop-wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
"#;

struct View {
    services: Vec<(String, Option<GatewayAddress>)>,
    workloads: Vec<(String, Option<GatewayAddress>)>,
}

fn view(m: &Model) -> View {
    let mesh = MeshConfig::default();
    let mut services: Vec<_> = m
        .services(&mesh)
        .into_iter()
        .map(|s| (format!("{}/{}", s.namespace, s.name), s.waypoint))
        .collect();
    services.sort_by(|a, b| a.0.cmp(&b.0));
    let mut workloads: Vec<_> = m
        .workloads(&mesh)
        .into_iter()
        .map(|w| (format!("{}/{}", w.namespace, w.name), w.waypoint))
        .collect();
    workloads.sort_by(|a, b| a.0.cmp(&b.0));
    View {
        services,
        workloads,
    }
}

fn of(list: &[(String, Option<GatewayAddress>)], name: &str) -> Option<GatewayAddress> {
    list.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} missing from {list:?}"))
        .1
        .clone()
}

#[test]
fn namespace_service_and_pod_labels_bind_services_to_their_waypoint() {
    let mut m = Model::default();
    let yaml = [
        NS.to_string(),
        waypoint("shop", "shop-wp", None),
        // The waypoint's own Service and pod, as a deployment of it labels them.
        service(
            "shop",
            "shop-wp",
            "10.96.9.9",
            "gateway.networking.k8s.io/gateway-name: shop-wp",
            "gateway.networking.k8s.io/gateway-name: shop-wp",
        ),
        pod(
            "shop",
            "shop-wp-0",
            "10.244.1.99",
            "gateway.networking.k8s.io/gateway-name: shop-wp",
        ),
        waypoint("shop", "special-wp", None),
        service("shop", "special-wp", "10.96.9.10", "x: y", ""),
        service("shop", "cart", "10.96.0.1", "app: cart", ""),
        service(
            "shop",
            "legacy",
            "10.96.0.2",
            "app: legacy",
            "istio.io/use-waypoint: none",
        ),
        service(
            "shop",
            "payments",
            "10.96.0.3",
            "app: payments",
            "istio.io/use-waypoint: special-wp",
        ),
        service("other", "search", "10.96.1.1", "app: search", ""),
        pod("shop", "cart-0", "10.244.1.2", "app: cart"),
    ]
    .concat();
    apply(&mut m, &yaml);
    let v = view(&m);
    assert_eq!(
        of(&v.services, "shop/cart"),
        vip([10, 96, 9, 9]),
        "from the namespace label"
    );
    assert_eq!(of(&v.services, "shop/legacy"), None, "`none` opts out");
    assert_eq!(
        of(&v.services, "shop/payments"),
        vip([10, 96, 9, 10]),
        "the service's own label wins over the namespace's"
    );
    assert_eq!(
        of(&v.services, "other/search"),
        None,
        "no label, no waypoint"
    );
    assert_eq!(
        of(&v.services, "shop/shop-wp"),
        None,
        "a waypoint's own service is never sent to a waypoint"
    );
    // A default waypoint is for services: workloads are reached directly.
    assert_eq!(of(&v.workloads, "shop/cart-0"), None);
    assert_eq!(of(&v.workloads, "shop/shop-wp-0"), None);
}

#[test]
fn waypoint_for_decides_which_traffic_is_taken_and_pods_can_opt_in() {
    let mut m = Model::default();
    let yaml = [
        NS.to_string(),
        waypoint("shop", "shop-wp", Some("workload")),
        waypoint("shop", "all-wp", Some("all")),
        waypoint("shop", "none-wp", Some("none")),
        service("shop", "cart", "10.96.0.1", "app: cart", ""),
        service(
            "shop",
            "orders",
            "10.96.0.4",
            "app: orders",
            "istio.io/use-waypoint: all-wp",
        ),
        pod("shop", "cart-0", "10.244.1.2", "app: cart"),
        pod(
            "shop",
            "orders-0",
            "10.244.1.3",
            "app: orders, istio.io/use-waypoint: all-wp",
        ),
        pod(
            "shop",
            "quiet-0",
            "10.244.1.4",
            "app: quiet, istio.io/use-waypoint: none-wp",
        ),
        pod(
            "other",
            "search-0",
            "10.244.2.2",
            "app: search, istio.io/use-waypoint: all-wp, istio.io/use-waypoint-namespace: shop",
        ),
        // Not enrolled: no waypoint even when labelled (its traffic is not captured).
        pod(
            "shop",
            "outside-0",
            "10.244.1.5",
            "istio.io/dataplane-mode: none, istio.io/use-waypoint: all-wp",
        ),
    ]
    .concat();
    apply(&mut m, &yaml);
    let v = view(&m);
    let by_hostname = |ns: &str, name: &str| {
        Some(GatewayAddress {
            destination: Some(Destination::Hostname(NamespacedHostname {
                namespace: ns.into(),
                hostname: format!("{name}.{ns}.svc.cluster.local"),
            })),
            hbone_mtls_port: 15008,
        })
    };
    // No Service for these waypoints: reached by hostname, resolved by the data plane.
    assert_eq!(
        of(&v.services, "shop/cart"),
        None,
        "the namespace's waypoint takes workload traffic only"
    );
    assert_eq!(
        of(&v.workloads, "shop/cart-0"),
        by_hostname("shop", "shop-wp")
    );
    assert_eq!(
        of(&v.services, "shop/orders"),
        by_hostname("shop", "all-wp")
    );
    assert_eq!(
        of(&v.workloads, "shop/orders-0"),
        by_hostname("shop", "all-wp")
    );
    assert_eq!(of(&v.workloads, "shop/quiet-0"), None, "waypoint-for: none");
    assert_eq!(
        of(&v.workloads, "other/search-0"),
        by_hostname("shop", "all-wp"),
        "a waypoint in another namespace"
    );
    assert_eq!(of(&v.workloads, "shop/outside-0"), None);
}

#[test]
fn a_missing_or_foreign_gateway_binds_nothing_and_status_addresses_win() {
    let mut m = Model::default();
    let yaml = [
        NS.to_string(),
        service("shop", "cart", "10.96.0.1", "app: cart", ""),
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  gatewayClassName: some-ingress
  listeners: [{name: http, port: 80, protocol: HTTP}]
"#
        .to_string(),
        service(
            "shop",
            "api",
            "10.96.0.5",
            "app: api",
            "istio.io/use-waypoint: ingress",
        ),
    ]
    .concat();
    apply(&mut m, &yaml);
    let v = view(&m);
    assert_eq!(of(&v.services, "shop/cart"), None, "shop-wp does not exist");
    assert_eq!(
        of(&v.services, "shop/api"),
        None,
        "not an istio-waypoint Gateway"
    );

    // The waypoint appears, deployed with an address in its status: bound, cross-namespace
    // resources are recomputed too.
    let mesh = MeshConfig::default();
    let before = Snapshot::build(&m, &mesh);
    m.take_dirty();
    apply(
        &mut m,
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: shop-wp, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status:
  addresses: [{type: IPAddress, value: 10.96.7.7}]
  conditions: [{type: Programmed, status: "True"}]
"#,
    );
    let dirty = m.take_dirty();
    assert!(
        dirty.is_superset(&BTreeSet::from(["shop".to_string()])),
        "{dirty:?}"
    );
    let after = Snapshot::rebuild(&before, &m, &mesh, &dirty);
    assert_eq!(after, Snapshot::build(&m, &mesh), "incremental = full");
    assert_eq!(of(&view(&m).services, "shop/cart"), vip([10, 96, 7, 7]));

    // Deleted: unbound again.
    m.delete(&ObjectRef {
        kind: "Gateway".into(),
        namespace: "shop".into(),
        name: "shop-wp".into(),
    });
    assert_eq!(of(&view(&m).services, "shop/cart"), None);
}
