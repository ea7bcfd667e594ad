//! Waypoint routes: HTTPRoutes and GRPCRoutes attached to Services become one
//! `trellis.waypoint.v1.Route` per port of each Service a waypoint fronts, in the Gateway
//! API's precedence order, and the waypoint may read its routes and its backends' endpoints.

use std::path::Path;

use trellis_control_plane::config::load::{Document, parse_file};
use trellis_control_plane::config::model::{MeshConfig, Model};
use trellis_control_plane::config::snapshot::Snapshot;
use trellis_proto::trellis::waypoint::v1 as pb;
use trellis_proto::type_url;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp-raw, port: 9000}, {name: other, port: 7000}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: web, version: v1}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: shop}
spec: {clusterIP: 10.96.0.12, selector: {app: web, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v2-0, namespace: shop, labels: {app: web, version: v2}}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app, image: x}]}
status: {podIP: 10.244.1.12}
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere, namespace: shop}
spec: {clusterIP: 10.96.0.13, selector: {app: elsewhere}, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - backendRefs:
        - {name: web-v1, port: 80, weight: 90}
        - {name: web-v2, port: 80, weight: 10}
    - matches: [{headers: [{name: X-Version, value: v2}]}]
      backendRefs: [{name: web-v2, port: 80}]
    - matches: [{path: {type: Exact, value: /exact}}]
      timeouts: {request: 2s}
      backendRefs: [{name: web-v2, port: 80}, {name: web-v1, namespace: other, port: 80}, {name: missing, port: 80}]
"#;

fn model(texts: &[&str]) -> Model {
    let mut m = Model::default();
    for t in texts {
        for d in parse_file(Path::new("x.yaml"), t) {
            match d {
                Document::Loaded(l) => m.apply(&l.id, l.object),
                other => panic!("fixture does not load: {other:?}"),
            }
        }
    }
    m
}

fn routes(snap: &Snapshot) -> std::collections::BTreeMap<String, pb::Route> {
    snap.of_type(type_url::WAYPOINT_ROUTE)
        .unwrap()
        .iter()
        .map(|(n, r)| (n.clone(), r.body.to_msg::<pb::Route>().unwrap()))
        .collect()
}

#[test]
fn every_port_of_a_waypoint_service_gets_a_route_with_its_protocol() {
    let snap = Snapshot::build(&model(&[CLUSTER]), &MeshConfig::default());
    let routes = routes(&snap);
    let names: Vec<&str> = routes.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "shop/web.shop.svc.cluster.local:7000",
            "shop/web.shop.svc.cluster.local:80",
            "shop/web.shop.svc.cluster.local:9000"
        ],
        "only the Service bound to the waypoint has routes"
    );
    use pb::route::AppProtocol as P;
    assert_eq!(
        routes["shop/web.shop.svc.cluster.local:80"].protocol(),
        P::Http1
    );
    assert_eq!(
        routes["shop/web.shop.svc.cluster.local:9000"].protocol(),
        P::Tcp
    );
    assert_eq!(
        routes["shop/web.shop.svc.cluster.local:7000"].protocol(),
        P::Unspecified
    );
    // The HTTPRoute names port 80 only.
    assert!(
        routes["shop/web.shop.svc.cluster.local:9000"]
            .rules
            .is_empty()
    );
}

#[test]
fn rules_are_sorted_by_precedence_and_backends_resolved() {
    let snap = Snapshot::build(&model(&[CLUSTER]), &MeshConfig::default());
    let route = &routes(&snap)["shop/web.shop.svc.cluster.local:80"];
    let names: Vec<&str> = route.rules.iter().map(|r| r.name.as_str()).collect();
    // Exact path first, then the header match (prefix "/" with a header), then the
    // catch-all split.
    assert_eq!(names, ["shop/split/2", "shop/split/1", "shop/split/0"]);
    let split = &route.rules[2];
    let weights: Vec<(String, u32)> = split
        .backends
        .iter()
        .map(|b| (b.backend.clone().unwrap().hostname, b.weight.unwrap()))
        .collect();
    assert_eq!(
        weights,
        [
            ("web-v1.shop.svc.cluster.local".to_string(), 90),
            ("web-v2.shop.svc.cluster.local".to_string(), 10)
        ]
    );
    let header = &route.rules[1].matches[0].headers[0];
    assert_eq!(
        header.name, "x-version",
        "header names are matched lower-case"
    );
    // A cross-namespace backend (no ReferenceGrant support yet) and a missing Service are
    // kept with no hostname: their share answers 500, never another service.
    let exact = &route.rules[0];
    let hosts: Vec<String> = exact
        .backends
        .iter()
        .map(|b| b.backend.clone().unwrap().hostname)
        .collect();
    assert_eq!(hosts, ["web-v2.shop.svc.cluster.local", "", ""]);
    assert_eq!(
        exact
            .timeouts
            .as_ref()
            .and_then(|t| t.request)
            .map(|d| d.seconds),
        Some(2)
    );
}

#[test]
fn the_waypoint_may_read_its_routes_and_its_backends() {
    let snap = Snapshot::build(&model(&[CLUSTER]), &MeshConfig::default());
    let view = &snap.waypoint_views[&("shop".to_string(), "waypoint".to_string())];
    for name in [
        "shop/web.shop.svc.cluster.local:80",
        "shop/web.shop.svc.cluster.local",
        "shop/web-v1.shop.svc.cluster.local",
        "shop/web-v2.shop.svc.cluster.local",
        "Kubernetes//Pod/shop/web-v2-0",
    ] {
        assert!(
            view.contains(name),
            "{name} is not in the waypoint's view: {view:?}"
        );
    }
    assert!(
        !view.contains("shop/elsewhere.shop.svc.cluster.local"),
        "a Service no route sends to is not in the view"
    );
}

#[test]
fn a_mesh_without_waypoints_has_no_routes() {
    let plain = CLUSTER.replace(
        "gatewayClassName: istio-waypoint",
        "gatewayClassName: other",
    );
    let snap = Snapshot::build(&model(&[&plain]), &MeshConfig::default());
    assert!(routes(&snap).is_empty());
}

#[test]
fn a_reference_grant_lets_a_route_use_a_backend_in_another_namespace() {
    let other = r#"
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: other}
spec: {clusterIP: 10.96.1.11, selector: {app: web}, ports: [{port: 80}]}
"#;
    let grant = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-shop, namespace: other}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service}]
"#;
    let hosts = |texts: &[&str]| -> Vec<String> {
        let snap = Snapshot::build(&model(texts), &MeshConfig::default());
        let route = &routes(&snap)["shop/web.shop.svc.cluster.local:80"];
        route.rules[0]
            .backends
            .iter()
            .map(|b| b.backend.clone().unwrap().hostname)
            .collect()
    };
    // Without the grant the other namespace's Service is not used.
    assert_eq!(hosts(&[CLUSTER, other])[1], "");
    // With it, it is.
    assert_eq!(
        hosts(&[CLUSTER, other, grant])[1],
        "web-v1.other.svc.cluster.local"
    );
    // A grant for GRPCRoutes only does not let an HTTPRoute in.
    let grpc_only = grant.replace("kind: HTTPRoute", "kind: GRPCRoute");
    assert_eq!(hosts(&[CLUSTER, other, &grpc_only])[1], "");
}

fn l7_policies(snap: &Snapshot) -> std::collections::BTreeMap<String, pb::L7Policy> {
    snap.of_type(type_url::WAYPOINT_L7_POLICY)
        .unwrap()
        .iter()
        .map(|(n, r)| (n.clone(), r.body.to_msg::<pb::L7Policy>().unwrap()))
        .collect()
}

#[test]
fn policies_attached_to_the_waypoint_or_its_services_become_its_l7_policies() {
    use trellis_control_plane::config::load::ObjectRef;
    let policy = |name: &str, target: &str, extra: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop{extra}}}\nspec:\n  {target}\n  action: DENY\n  rules: [{{from: [{{source: {{namespaces: [dev]}}}}], to: [{{operation: {{methods: [POST], paths: [\"/api/{{*}}/items\"]}}}}]}}]\n"
        )
    };
    let gw = policy(
        "on-gateway",
        "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]",
        "",
    );
    let svc = policy(
        "on-service",
        "targetRefs: [{group: \"\", kind: Service, name: web}]",
        "",
    );
    let ns_wide = policy(
        "namespace-wide",
        "{}",
        ", annotations: {istio.io/dry-run: \"true\"}",
    )
    .replace("  {}\n", "");
    let selector = policy("selected", "selector: {matchLabels: {app: web}}", "");
    let nothing = policy(
        "on-nothing",
        "targetRefs: [{group: \"\", kind: Service, name: web-v1}]",
        "",
    );
    let m = model(&[CLUSTER, &gw, &svc, &ns_wide, &selector, &nothing]);
    let snap = Snapshot::build(&m, &MeshConfig::default());
    let all = l7_policies(&snap);
    let names: Vec<&str> = all.keys().map(String::as_str).collect();
    // One resource per policy and waypoint; selector policies are ztunnel's; a policy on a
    // Service without waypoint has nothing to enforce it.
    assert_eq!(
        names,
        [
            "shop/namespace-wide@shop/waypoint",
            "shop/on-gateway@shop/waypoint",
            "shop/on-service@shop/waypoint"
        ]
    );
    use pb::policy_target::Scope;
    let on_gw = &all["shop/on-gateway@shop/waypoint"];
    assert_eq!(on_gw.name, "shop/on-gateway");
    assert_eq!(on_gw.target.as_ref().unwrap().scope(), Scope::Waypoint);
    assert_eq!(on_gw.action(), pb::l7_policy::Action::Deny);
    let on_svc = &all["shop/on-service@shop/waypoint"];
    let t = on_svc.target.as_ref().unwrap();
    assert_eq!(t.scope(), Scope::Services);
    assert_eq!(t.services[0].hostname, "web.shop.svc.cluster.local");
    let ns = &all["shop/namespace-wide@shop/waypoint"];
    assert!(ns.dry_run);
    assert_eq!(
        ns.target.as_ref().unwrap().services.len(),
        1,
        "the namespace-wide policy covers the Services the waypoint fronts in shop"
    );
    // The rule as written: source namespaces, method, the path template as a regex.
    let rule = &on_gw.rules[0];
    use pb::string_match::Kind;
    assert_eq!(
        rule.from[0].namespaces[0].kind,
        Some(Kind::Exact("dev".into()))
    );
    assert_eq!(rule.to[0].methods[0].kind, Some(Kind::Exact("POST".into())));
    assert_eq!(
        rule.to[0].paths[0].kind,
        Some(Kind::Regex("/api/[^/]+/items".into()))
    );
    // Only the waypoint that enforces them reads them.
    let view = &snap.waypoint_views[&("shop".to_string(), "waypoint".to_string())];
    assert!(view.contains("shop/on-gateway@shop/waypoint"));
    // Statuses say where each is enforced, or that nothing enforces it.
    let status = |name: &str| {
        snap.statuses[&ObjectRef {
            kind: "AuthorizationPolicy".into(),
            namespace: "shop".into(),
            name: name.into(),
        }]
            .reasons
            .join("; ")
    };
    assert!(
        status("on-gateway").contains("enforced with its L7 rules by the waypoint shop/waypoint"),
        "{}",
        status("on-gateway")
    );
    assert!(
        status("on-nothing").contains("has no waypoint"),
        "{}",
        status("on-nothing")
    );
    // In Kubernetes: Istio's WaypointAccepted condition (`kubectl wait
    // --for=condition=WaypointAccepted`), not ZtunnelAccepted, for targetRefs policies.
    use trellis_control_plane::controller::status::policy_status;
    let condition = |name: &str| {
        let id = ObjectRef {
            kind: "AuthorizationPolicy".into(),
            namespace: "shop".into(),
            name: name.into(),
        };
        let body = policy_status(&id, &snap.statuses[&id], None, None);
        let c = &body["status"]["conditions"];
        assert_eq!(c.as_array().map(Vec::len), Some(1), "{body}");
        (
            c[0]["type"].as_str().unwrap().to_string(),
            c[0]["status"].as_str().unwrap().to_string(),
            c[0]["reason"].as_str().unwrap().to_string(),
            c[0]["message"].as_str().unwrap().to_string(),
        )
    };
    let (kind, state, reason, message) = condition("on-gateway");
    assert_eq!(
        (
            kind.as_str(),
            state.as_str(),
            reason.as_str(),
            message.as_str()
        ),
        (
            "WaypointAccepted",
            "True",
            "Accepted",
            "bound to shop/waypoint"
        )
    );
    let (kind, state, reason, message) = condition("on-nothing");
    assert_eq!(
        (kind.as_str(), state.as_str(), reason.as_str()),
        ("WaypointAccepted", "False", "TargetNotFound"),
        "{message}"
    );
    assert!(message.contains("web-v1 has no waypoint"), "{message}");
    assert_eq!(
        condition("selected").0,
        "ZtunnelAccepted",
        "a selector policy is ztunnel's"
    );
    // A value that does not parse rejects the policy for the waypoint too.
    let bad = policy(
        "bad",
        "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]",
        "",
    )
    .replace("namespaces: [dev]", "ipBlocks: [\"10.0.0.0/99\"]");
    let snap = Snapshot::build(&model(&[CLUSTER, &bad]), &MeshConfig::default());
    assert!(l7_policies(&snap).is_empty());
    assert!(
        snap.statuses[&ObjectRef {
            kind: "AuthorizationPolicy".into(),
            namespace: "shop".into(),
            name: "bad".into(),
        }]
            .state
            == trellis_control_plane::config::authz::PolicyState::Rejected
    );
}

#[test]
fn a_route_from_another_namespace_is_not_applied() {
    let consumer = r#"
apiVersion: v1
kind: Namespace
metadata: {name: evil}
---
apiVersion: v1
kind: Service
metadata: {name: sink, namespace: evil}
spec: {clusterIP: 10.96.9.9, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: takeover, namespace: evil}
spec:
  parentRefs: [{group: "", kind: Service, name: web, namespace: shop, port: 80}]
  rules:
    - backendRefs: [{name: sink, port: 80}]
"#;
    let base = CLUSTER
        .split("---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute")
        .next()
        .unwrap();
    let snap = Snapshot::build(&model(&[base, consumer]), &MeshConfig::default());
    let route = &routes(&snap)["shop/web.shop.svc.cluster.local:80"];
    assert!(
        route.rules.is_empty(),
        "a consumer route was applied: {:?}",
        route.rules
    );
    use trellis_control_plane::controller::routes::route_statuses;
    let statuses = route_statuses(&model(&[base, consumer]), &MeshConfig::default());
    let body = statuses.values().next().unwrap();
    let accepted = &body["status"]["parents"][0]["conditions"][0];
    assert_eq!(accepted["status"], "False", "{accepted}");
    assert_eq!(accepted["reason"], "UnsupportedValue");
}

#[test]
fn a_route_attached_to_the_waypoint_gateway_applies_to_the_services_it_names() {
    let extra = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.20, selector: {app: api}, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: everyone, namespace: shop}
spec:
  parentRefs: [{name: waypoint}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /all}}]
      backendRefs: [{name: web-v2, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: only-api, namespace: shop}
spec:
  parentRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint, sectionName: mesh}]
  hostnames: [api.shop.svc.cluster.local]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs: [{name: web-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: wrong-listener, namespace: shop}
spec:
  parentRefs: [{name: waypoint, sectionName: nope}]
  rules:
    - backendRefs: [{name: web-v1, port: 80}]
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: from-elsewhere, namespace: other}
spec:
  parentRefs: [{name: waypoint, namespace: shop}]
  rules:
    - backendRefs: [{name: web-v1, namespace: shop, port: 80}]
"#;
    let m = model(&[CLUSTER, extra]);
    let snap = Snapshot::build(&m, &MeshConfig::default());
    let all = routes(&snap);
    let rule_names =
        |r: &pb::Route| -> Vec<String> { r.rules.iter().map(|r| r.name.clone()).collect() };
    let web = rule_names(&all["shop/web.shop.svc.cluster.local:80"]);
    let api = rule_names(&all["shop/api.shop.svc.cluster.local:80"]);
    // The Service's own routes come before the Gateway's; a route without hostnames
    // applies to every Service of the waypoint, one with hostnames only to those named.
    assert_eq!(
        web.last().map(String::as_str),
        Some("shop/everyone/0"),
        "{web:?}"
    );
    assert!(
        web.iter().all(|n| !n.starts_with("shop/only-api")),
        "{web:?}"
    );
    assert_eq!(api, ["shop/only-api/0", "shop/everyone/0"], "{api:?}");
    // A listener that does not exist, and a namespace the listener does not allow
    // (allowedRoutes defaults to Same): not applied anywhere, and the status says why.
    assert!(
        all.values()
            .flat_map(|r| &r.rules)
            .all(|r| !r.name.contains("wrong-listener") && !r.name.contains("from-elsewhere"))
    );
    use trellis_control_plane::controller::routes::route_statuses;
    let statuses = route_statuses(&m, &MeshConfig::default());
    let accepted = |name: &str| {
        let body = statuses
            .iter()
            .find(|(t, _)| t.name == name)
            .map(|(_, b)| b)
            .unwrap_or_else(|| panic!("no status for {name}"));
        let c = &body["status"]["parents"][0]["conditions"][0];
        (
            c["status"].as_str().unwrap().to_string(),
            c["reason"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(accepted("only-api").1, "Accepted");
    assert_eq!(
        accepted("wrong-listener"),
        ("False".into(), "NoMatchingParent".into())
    );
    assert_eq!(
        accepted("from-elsewhere"),
        ("False".into(), "NotAllowedByListeners".into())
    );

    // A listener allowing routes from namespaces by label takes the other namespace's.
    let all_ns = CLUSTER.replace(
        "listeners: [{name: mesh, port: 15008, protocol: HBONE}]",
        "listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: Selector, selector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [other]}]}}}}]",
    );
    let extra = extra.replace(
        "metadata: {name: other}",
        "metadata: {name: other, labels: {kubernetes.io/metadata.name: other}}",
    );
    let m = model(&[&all_ns, &extra]);
    let snap = Snapshot::build(&m, &MeshConfig::default());
    let web = rule_names(&routes(&snap)["shop/web.shop.svc.cluster.local:80"]);
    assert!(web.iter().any(|n| n == "other/from-elsewhere/0"), "{web:?}");
}

#[test]
fn request_authentications_reach_the_waypoint_of_the_services_they_select() {
    use trellis_control_plane::config::load::ObjectRef;
    // The seed articles' RequestAuthentication (selector app: my-app), in shop.
    let seed = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-v1-0, namespace: shop, labels: {app: web, version: v1}}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app, image: x}]}
status: {podIP: 10.244.1.11}
---
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata: {name: jwt-example, namespace: shop}
spec:
  selector:
    matchLabels: {version: v2}
  jwtRules:
  - issuer: "https://issuer.example.com"
    jwksUri: "https://issuer.example.com/keys"
    fromHeaders: [{name: x-token, prefix: "Bearer "}]
    outputClaimToHeaders: [{header: x-sub, claim: sub}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: nowhere, namespace: shop}
spec:
  selector:
    matchLabels: {app: nothing}
  jwtRules: [{issuer: "https://other.example.com", jwks: "{\"keys\": []}"}]
"#;
    let m = model(&[CLUSTER, seed]);
    let snap = Snapshot::build(&m, &MeshConfig::default());
    let all: std::collections::BTreeMap<String, pb::RequestAuthentication> = snap
        .of_type(type_url::WAYPOINT_REQUEST_AUTHENTICATION)
        .unwrap()
        .iter()
        .map(|(n, r)| (n.clone(), r.body.to_msg().unwrap()))
        .collect();
    let names: Vec<&str> = all.keys().map(String::as_str).collect();
    // web (fronted by the waypoint) selects web-v2-0, which carries version: v2.
    assert_eq!(names, ["shop/jwt-example@shop/waypoint"]);
    let ra = &all["shop/jwt-example@shop/waypoint"];
    let t = ra.target.as_ref().unwrap();
    assert_eq!(t.services[0].hostname, "web.shop.svc.cluster.local");
    let p = &ra.providers[0];
    assert_eq!(p.issuer, "https://issuer.example.com");
    assert_eq!(
        p.jwks_source,
        Some(pb::jwt_provider::JwksSource::JwksUri(
            "https://issuer.example.com/keys".into()
        ))
    );
    assert_eq!(p.from_headers[0].name, "x-token");
    assert_eq!(p.from_headers[0].prefix, "Bearer ");
    assert_eq!(p.output_claim_to_headers[0].claim, "sub");
    let view = &snap.waypoint_views[&("shop".to_string(), "waypoint".to_string())];
    assert!(view.contains("shop/jwt-example@shop/waypoint"));
    let status = |name: &str| {
        snap.statuses[&ObjectRef {
            kind: "RequestAuthentication".into(),
            namespace: "shop".into(),
            name: name.into(),
        }]
            .reasons
            .join("; ")
    };
    assert!(
        status("jwt-example").contains("tokens checked by the waypoint shop/waypoint"),
        "{}",
        status("jwt-example")
    );
    assert!(
        status("nowhere").contains("nothing checks this policy's tokens"),
        "{}",
        status("nowhere")
    );
}

#[test]
fn the_secure_default_allows_only_the_namespace_and_its_waypoints() {
    let mesh = MeshConfig {
        secure_default: true,
        ..MeshConfig::default()
    };
    let ra = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: shop}\nspec:\n  jwtRules: [{issuer: \"https://issuer.example.com\", jwks: \"{\\\"keys\\\": []}\"}]\n";
    let m = model(&[CLUSTER, ra]);
    let snap = Snapshot::build(&m, &mesh);
    // ztunnel: an implicit ALLOW per enrolled namespace, from itself and the waypoints.
    use trellis_proto::istio::security::{Authorization, string_match::MatchType};
    let authz: std::collections::BTreeMap<String, Authorization> = snap
        .of_type(type_url::AUTHORIZATION)
        .unwrap()
        .iter()
        .map(|(n, r)| (n.clone(), r.body.to_msg().unwrap()))
        .collect();
    let a = authz
        .get("shop/trellis-secure-default")
        .expect("an implicit ALLOW for shop");
    let exact = |m: &trellis_proto::istio::security::StringMatch| match &m.match_type {
        Some(MatchType::Exact(v)) => v.clone(),
        _ => String::new(),
    };
    let matches = &a.rules[0].clauses[0].matches;
    assert_eq!(exact(&matches[0].namespaces[0]), "shop");
    assert_eq!(
        exact(&matches[1].principals[0]),
        "cluster.local/ns/shop/sa/waypoint"
    );
    // The waypoint: the same for the Services it fronts; tokens required.
    assert!(
        l7_policies(&snap).contains_key("shop/trellis-secure-default@shop/waypoint"),
        "{:?}",
        l7_policies(&snap).keys().collect::<Vec<_>>()
    );
    let ras: Vec<pb::RequestAuthentication> = snap
        .of_type(type_url::WAYPOINT_REQUEST_AUTHENTICATION)
        .unwrap()
        .values()
        .map(|r| r.body.to_msg().unwrap())
        .collect();
    assert!(ras.iter().all(|r| r.require_token) && !ras.is_empty());
    // Off by default.
    let snap = Snapshot::build(&m, &MeshConfig::default());
    assert!(
        !snap
            .of_type(type_url::AUTHORIZATION)
            .unwrap()
            .contains_key("shop/trellis-secure-default")
    );
}

#[test]
fn an_http_route_rules_retry_reaches_the_waypoint_as_istio_reads_it() {
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: retrying, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /a}}]
      retry: {codes: [500, 502], attempts: 4, backoff: 100ms}
      backendRefs: [{name: web-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /b}}]
      retry: {}
      backendRefs: [{name: web-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /c}}]
      retry: {attempts: 0}
      backendRefs: [{name: web-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /d}}]
      backendRefs: [{name: web-v1, port: 80}]
"#;
    let snap = Snapshot::build(&model(&[CLUSTER, route]), &MeshConfig::default());
    let r = &routes(&snap)["shop/web.shop.svc.cluster.local:80"];
    let retry = |prefix: &str| {
        r.rules
            .iter()
            .find(|rule| {
                rule.matches[0].path.as_ref().and_then(|p| p.kind.clone())
                    == Some(pb::route_match::path::Kind::Prefix(prefix.into()))
            })
            .unwrap()
            .retry
            .clone()
    };
    use pb::retry_policy::RetryOn;
    let a = retry("/a").unwrap();
    assert_eq!(a.attempts, 4);
    assert_eq!(a.retry_on_status_codes, [500, 502]);
    assert_eq!(
        a.retry_on,
        [
            RetryOn::ConnectFailure as i32,
            RetryOn::RefusedStream as i32
        ]
    );
    assert_eq!(a.backoff_base_interval.unwrap().nanos, 100_000_000);
    let b = retry("/b").unwrap();
    assert_eq!(
        (b.attempts, b.retry_on_status_codes),
        (2, vec![503]),
        "Istio's defaults"
    );
    assert_eq!(retry("/c").unwrap().attempts, 0, "attempts 0: no retries");
    assert!(
        retry("/d").is_none(),
        "no retry: the waypoint's default applies"
    );
}

#[test]
fn a_destination_rule_becomes_the_traffic_policy_of_its_service_at_the_waypoint() {
    use trellis_control_plane::config::authz::PolicyState;
    use trellis_control_plane::config::load::ObjectRef;
    let rules = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 4, connectTimeout: 250ms, tcpKeepalive: {time: 10s}}
      http: {http1MaxPendingRequests: 2, http2MaxRequests: 8, maxRequestsPerConnection: 10, idleTimeout: 5s}
    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 5s, maxEjectionPercent: 50}
    loadBalancer: {simple: ROUND_ROBIN, localityLbSetting: {enabled: true}}
    portLevelSettings:
      - port: {number: 9000}
        connectionPool: {http: {http2MaxRequests: 1}}
        loadBalancer:
          consistentHash: {httpHeaderName: X-User, ringHash: {minimumRingSize: 1024}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: everything, namespace: istio-system}
spec:
  host: "*.shop.svc.cluster.local"
  trafficPolicy:
    outlierDetection: {consecutiveGatewayErrors: 2}
"#;
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-v1, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - backendRefs: [{name: web-v1, port: 80}]
"#;
    let snap = Snapshot::build(&model(&[CLUSTER, rules, route]), &MeshConfig::default());
    let all = routes(&snap);
    // The Service's own rule (its namespace beats the root namespace's wildcard).
    let tp = all["shop/web.shop.svc.cluster.local:80"]
        .traffic_policy
        .clone()
        .unwrap();
    let cb = tp.circuit_breaker.unwrap();
    assert_eq!(
        (cb.max_connections, cb.max_pending_requests, cb.max_requests),
        (Some(4), Some(2), Some(8))
    );
    assert_eq!(cb.max_requests_per_connection, Some(10));
    assert_eq!(tp.connect_timeout.unwrap().nanos, 250_000_000);
    assert_eq!(tp.idle_timeout.unwrap().seconds, 5);
    let od = tp.outlier_detection.unwrap();
    assert_eq!(od.consecutive_5xx, Some(3));
    assert_eq!(od.base_ejection_time.unwrap().seconds, 5);
    assert_eq!(od.max_ejection_percent, Some(50));
    // portLevelSettings replace the section for their port.
    let at_9000 = all["shop/web.shop.svc.cluster.local:9000"]
        .traffic_policy
        .clone()
        .unwrap();
    assert_eq!(at_9000.circuit_breaker.unwrap().max_requests, Some(1));
    // Load balancing: ROUND_ROBIN for the Service; the port's consistent hash on a header.
    assert_eq!(
        tp.load_balancer.as_ref().unwrap().simple(),
        pb::load_balancer::Simple::RoundRobin
    );
    assert_eq!(
        at_9000
            .load_balancer
            .as_ref()
            .and_then(|l| l.consistent_hash.as_ref())
            .and_then(|c| c.key.clone()),
        Some(pb::load_balancer::consistent_hash::Key::Header(
            "x-user".into()
        ))
    );
    // A route's backend gets its own Service's rule: web-v1 only matches the wildcard.
    let backend = &all["shop/web.shop.svc.cluster.local:80"].rules[0].backends[0];
    let od = backend
        .traffic_policy
        .as_ref()
        .and_then(|t| t.outlier_detection)
        .unwrap();
    assert_eq!(
        (od.consecutive_gateway_errors, od.consecutive_5xx),
        (Some(2), Some(5)),
        "Istio's default of 5 consecutive 5xx"
    );
    // What waypoints do not apply is named in the status.
    let status = &snap.statuses[&ObjectRef {
        kind: "DestinationRule".into(),
        namespace: "shop".into(),
        name: "web".into(),
    }];
    assert_eq!(status.state, PolicyState::AcceptedWithWarnings);
    let text = status.reasons.join("; ");
    for field in [
        "spec.trafficPolicy.loadBalancer.localityLbSetting",
        "spec.trafficPolicy.portLevelSettings[0].loadBalancer.consistentHash.ringHash",
        "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
    ] {
        assert!(text.contains(field), "{field} not named: {text}");
    }
    let clean = &snap.statuses[&ObjectRef {
        kind: "DestinationRule".into(),
        namespace: "istio-system".into(),
        name: "everything".into(),
    }];
    assert_eq!(clean.state, PolicyState::Accepted, "{:?}", clean.reasons);
}

#[test]
fn local_traffic_policies_reach_the_service_and_the_route_rules_they_target() {
    use trellis_control_plane::config::authz::PolicyState;
    use trellis_control_plane::config::load::ObjectRef;
    let policies = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: named, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - name: slow
      matches: [{path: {type: PathPrefix, value: /slow}}]
      backendRefs: [{name: web-v1, port: 80}]
    - name: other
      matches: [{path: {type: PathPrefix, value: /other}}]
      backendRefs: [{name: web-v1, port: 80}]
---
apiVersion: trellis.dev/v1alpha1
kind: LocalTrafficPolicy
metadata: {name: service-wide, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  targetRefs: [{group: "", kind: Service, name: web, sectionName: http}]
  rateLimit: {tokens: 100, tokensPerFill: 10, fillInterval: 1s}
---
apiVersion: trellis.dev/v1alpha1
kind: LocalTrafficPolicy
metadata: {name: slow-rule, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: named, sectionName: slow}]
  fault: {delay: {fixedDelay: 20ms, percentage: 50}, abort: {httpStatus: 503, percentage: 10}}
---
apiVersion: trellis.dev/v1alpha1
kind: LocalTrafficPolicy
metadata: {name: younger, namespace: shop, creationTimestamp: "2026-01-03T00:00:00Z"}
spec:
  targetRefs:
    - {group: "", kind: Service, name: web, sectionName: http}
    - {group: "", kind: Service, name: nowhere}
  rateLimit: {tokens: 1, fillInterval: 1m}
---
apiVersion: trellis.dev/v1alpha1
kind: LocalTrafficPolicy
metadata: {name: lost, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: named, sectionName: nope}]
  rateLimit: {tokens: 1, fillInterval: 1s}
---
apiVersion: trellis.dev/v1alpha1
kind: LocalTrafficPolicy
metadata: {name: broken, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: web}]
  fault: {abort: {percentage: 10}}
"#;
    let snap = Snapshot::build(&model(&[CLUSTER, policies]), &MeshConfig::default());
    let all = routes(&snap);
    let http = &all["shop/web.shop.svc.cluster.local:80"];
    // The Service's port named `http`: the older policy's bucket, not the younger's.
    let rl = http.rate_limit.clone().expect("the Service's rate limit");
    assert_eq!((rl.max_tokens, rl.tokens_per_fill), (100, 10));
    assert!(http.fault.is_none(), "the invalid policy is not applied");
    // Another port of the Service is not targeted.
    assert!(
        all["shop/web.shop.svc.cluster.local:9000"]
            .rate_limit
            .is_none()
    );
    // The rule named `slow` has the fault; the rule named `other` nothing of its own.
    let rule = |name: &str| {
        http.rules
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no rule {name}"))
    };
    let fault = rule("shop/named/0").fault.expect("the rule's fault");
    assert_eq!(fault.delay.unwrap().percent, 50.0);
    assert_eq!(
        fault.abort.unwrap().error,
        Some(pb::fault_injection::abort::Error::HttpStatus(503))
    );
    assert!(rule("shop/named/1").fault.is_none());
    assert!(rule("shop/named/1").rate_limit.is_none());

    let status = |name: &str| {
        snap.statuses[&ObjectRef {
            kind: "LocalTrafficPolicy".into(),
            namespace: "shop".into(),
            name: name.into(),
        }]
            .clone()
    };
    assert_eq!(status("service-wide").state, PolicyState::Accepted);
    assert_eq!(status("slow-rule").state, PolicyState::Accepted);
    let younger = status("younger");
    assert_eq!(younger.state, PolicyState::Rejected, "{younger:?}");
    let text = younger.reasons.join("; ");
    assert!(
        text.contains("held by the older policy service-wide") && text.contains("nowhere"),
        "{text}"
    );
    let lost = status("lost");
    assert_eq!(lost.state, PolicyState::Rejected);
    assert!(lost.reasons[0].starts_with("target not found"), "{lost:?}");
    let broken = status("broken");
    assert_eq!(broken.state, PolicyState::Rejected);
    assert!(
        broken.reasons[0].contains("spec.fault.abort: set exactly one"),
        "{broken:?}"
    );
}
