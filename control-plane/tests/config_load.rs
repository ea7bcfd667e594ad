//! Loading manifests: the seed articles' examples as written, and what a user sees for a
//! broken document (file, object, field, reason) while the rest of the file still loads.

use std::path::Path;

use trellis_control_plane::config::istio::{Action, MtlsMode};
use trellis_control_plane::config::load::{Document, Object, parse_file};

const SEED: &str = include_str!("../../examples/seed-policies.yaml");

fn loaded(docs: &[Document]) -> Vec<&trellis_control_plane::config::load::Loaded> {
    docs.iter()
        .filter_map(|d| match d {
            Document::Loaded(l) => Some(l),
            _ => None,
        })
        .collect()
}

fn errors(docs: &[Document]) -> Vec<String> {
    docs.iter()
        .filter_map(|d| match d {
            Document::Invalid(e) => Some(e.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_seed_examples_load_as_written() {
    let docs = parse_file(Path::new("seed-policies.yaml"), SEED);
    assert!(errors(&docs).is_empty(), "{:?}", errors(&docs));
    let objs = loaded(&docs);
    assert_eq!(objs.len(), 3);
    for o in &objs {
        assert!(o.warnings.is_empty(), "{}: {:?}", o.id, o.warnings);
    }

    let Object::PeerAuthentication(pa) = &objs[0].object else {
        panic!("first is {:?}", objs[0].id)
    };
    assert_eq!(objs[0].id.to_string(), "PeerAuthentication foo/default");
    assert_eq!(pa.spec.mtls.unwrap().mode, MtlsMode::Strict);
    assert!(pa.spec.selector.is_none());

    let Object::RequestAuthentication(ra) = &objs[1].object else {
        panic!("second is {:?}", objs[1].id)
    };
    assert_eq!(
        ra.spec.selector.as_ref().unwrap().match_labels["app"],
        "my-app"
    );
    assert_eq!(ra.spec.jwt_rules[0].issuer, "https://issuer.example.com");
    assert_eq!(
        ra.spec.jwt_rules[0].jwks_uri.as_deref(),
        Some("https://issuer.example.com/keys")
    );

    let Object::AuthorizationPolicy(ap) = &objs[2].object else {
        panic!("third is {:?}", objs[2].id)
    };
    assert_eq!(objs[2].id.to_string(), "AuthorizationPolicy foo/httpbin");
    assert_eq!(ap.spec.action, Action::Deny);
    assert_eq!(ap.spec.rules[0].from[0].source.namespaces, ["dev"]);
    assert_eq!(ap.spec.rules[0].to[0].operation.methods, ["POST"]);
}

#[test]
fn a_wrong_type_names_file_object_and_field_and_the_rest_still_loads() {
    let text = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: foo}
spec:
  rules:
  - from:
    - source:
        namespaces: dev
---
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
"#;
    let docs = parse_file(Path::new("/etc/trellis/policies.yaml"), text);
    let errs = errors(&docs);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(
            "/etc/trellis/policies.yaml: AuthorizationPolicy foo/bad: spec.rules[0].from[0].source.namespaces: invalid type"
        ),
        "{}",
        errs[0]
    );
    let ok = loaded(&docs);
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].id.to_string(), "Namespace foo");
}

#[test]
fn unknown_fields_of_other_kinds_warn_and_the_object_loads() {
    let text = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: w, namespace: foo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  colour: blue
"#;
    let docs = parse_file(Path::new("gw.yaml"), text);
    let ok = loaded(&docs);
    assert_eq!(ok.len(), 1, "{docs:?}");
    assert_eq!(
        ok[0].warnings,
        ["gw.yaml: Gateway foo/w: spec.colour: unknown field, ignored"]
    );
}

/// A valid policy using every field of its kind, one key per line (`KEY:` at the start of
/// its line after indentation), so each key can be misspelt in turn.
const EVERY_FIELD: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: every-field
  namespace: foo
spec:
  selector:
    matchLabels:
      app: cart
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/web"]
        notPrincipals: ["cluster.local/ns/shop/sa/admin"]
        requestPrincipals: ["iss/sub"]
        notRequestPrincipals: ["iss/other"]
        namespaces: [shop]
        notNamespaces: [dev]
        serviceAccounts: [shop/web]
        notServiceAccounts: [shop/admin]
        ipBlocks: [10.0.0.0/8]
        notIpBlocks: [10.1.0.0/16]
        remoteIpBlocks: [192.168.0.0/16]
        notRemoteIpBlocks: [192.168.1.0/24]
    to:
    - operation:
        hosts: [cart.foo]
        notHosts: [admin.foo]
        ports: ["8080"]
        notPorts: ["9090"]
        methods: [GET]
        notMethods: [DELETE]
        paths: ["/api/*"]
        notPaths: ["/api/admin"]
    when:
    - key: request.headers[x-user]
      values: [alice]
      notValues: [mallory]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: targeted
  namespace: foo
spec:
  targetRefs:
  - group: gateway.networking.k8s.io
    kind: Gateway
    name: waypoint
    namespace: foo
  targetRef:
    group: ""
    kind: Service
    name: cart
  action: CUSTOM
  provider:
    name: ext-authz
  rules:
  - to:
    - operation:
        paths: ["/admin"]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: every-field
  namespace: foo
spec:
  selector:
    matchLabels:
      app: cart
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: PERMISSIVE
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: every-field
  namespace: foo
spec:
  selector:
    matchLabels:
      app: cart
  jwtRules:
  - issuer: https://issuer.example.com
    audiences: [cart]
    jwksUri: https://issuer.example.com/keys
    fromHeaders:
    - name: x-jwt
      prefix: "Bearer "
    fromParams: [token]
    outputPayloadToHeader: x-jwt-payload
    forwardOriginalToken: true
"#;

#[test]
fn a_misspelt_field_rejects_a_security_policy_whichever_field_it_is() {
    // The policies load as written (the targeted one gets its status from translation).
    let docs = parse_file(Path::new("p.yaml"), EVERY_FIELD);
    assert!(errors(&docs).is_empty(), "{:?}", errors(&docs));
    assert_eq!(loaded(&docs).len(), 4);
    let lines: Vec<&str> = EVERY_FIELD.lines().collect();
    let mut checked = 0;
    for (n, line) in lines.iter().enumerate() {
        let body = line.trim_start().trim_start_matches("- ");
        let Some((key, _)) = body.split_once(':') else {
            continue;
        };
        // Keys of maps the user names (labels, ports) and the outer envelope are not fields.
        let indent = line.len() - line.trim_start().len();
        if indent == 0
            || key.starts_with('"')
            || key.parse::<u32>().is_ok()
            || ["app", "name", "namespace"].contains(&key)
                && lines[n - 1].trim_start().starts_with("matchLabels")
        {
            continue;
        }
        if ["name", "namespace"].contains(&key) && indent == 2 {
            continue;
        }
        let mut typo = lines.clone();
        let wrong = line.replacen(key, &format!("{key}x"), 1);
        typo[n] = &wrong;
        let text = typo.join("\n");
        let docs = parse_file(Path::new("p.yaml"), &text);
        let errs = errors(&docs);
        assert_eq!(errs.len(), 1, "misspelt {key:?} (line {n}): {errs:?}");
        assert!(
            errs[0].contains(&format!("{key}x: unknown field"))
                || errs[0].contains(&format!("missing field `{key}`")),
            "misspelt {key:?}: the error names the field: {errs:?}"
        );
        assert_eq!(
            loaded(&docs).len(),
            3,
            "misspelt {key:?}: only that object is refused"
        );
        checked += 1;
    }
    assert!(checked >= 50, "{checked} keys checked");
}

#[test]
fn port_level_mtls_reads_json_string_keys_as_the_kubernetes_api_returns_them() {
    use trellis_control_plane::config::load::parse_object;
    let pa = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "p", "namespace": "foo"},
        "spec": {
            "selector": {"matchLabels": {"app": "cart"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}},
        },
    });
    let Document::Loaded(l) = parse_object("kubernetes", pa.clone()) else {
        panic!("{:?}", parse_object("kubernetes", pa))
    };
    let Object::PeerAuthentication(p) = &l.object else {
        panic!()
    };
    assert_eq!(p.spec.port_level_mtls[&8080].mode, MtlsMode::Permissive);
    let mut bad = pa;
    bad["spec"]["portLevelMtls"] = serde_json::json!({"http": {"mode": "PERMISSIVE"}});
    let Document::Invalid(e) = parse_object("kubernetes", bad) else {
        panic!("a non-numeric port key was accepted")
    };
    assert!(e.to_string().contains("is not a port number"), "{e}");
}

#[test]
fn an_empty_source_operation_or_condition_rejects_the_policy() {
    let policy = |rule: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n  rules:\n  - {rule}\n"
        )
    };
    let cases = [
        (
            "from: [{source: {}}]",
            "spec.rules[0].from[0].source: must not be empty",
        ),
        (
            "from: [{}]",
            "spec.rules[0].from[0].source: must not be empty",
        ),
        (
            "to: [{operation: {}}]",
            "spec.rules[0].to[0].operation: must not be empty",
        ),
        (
            "when: [{key: source.ip}]",
            "spec.rules[0].when[0]: one of values or notValues is required",
        ),
        (
            "when: [{key: source.namespaces, values: [a]}]",
            "spec.rules[0].when[0].key: unknown attribute \"source.namespaces\"",
        ),
        (
            "when: [{key: \"request.headers[]\", values: [a]}]",
            "spec.rules[0].when[0].key: unknown attribute",
        ),
    ];
    for (rule, want) in cases {
        let docs = parse_file(Path::new("p.yaml"), &policy(rule));
        let errs = errors(&docs);
        assert_eq!(errs.len(), 1, "{rule}: {docs:?}");
        assert!(errs[0].contains(want), "{rule}: {errs:?}");
    }
    // What Istio accepts stays accepted: an empty rule matches everything, known keys.
    for rule in [
        "{}",
        "when: [{key: \"request.auth.claims[groups]\", values: [admin]}]",
        "when: [{key: \"experimental.envoy.filters.network.mysql_proxy[db.table]\", values: [x]}]",
        "from: [{source: {notNamespaces: [dev]}}]",
    ] {
        let docs = parse_file(Path::new("p.yaml"), &policy(rule));
        assert!(errors(&docs).is_empty(), "{rule}: {:?}", errors(&docs));
    }
}

#[test]
fn pods_and_services_use_the_kubernetes_types() {
    let text = r#"
apiVersion: v1
kind: Pod
metadata:
  name: cart-0
  namespace: shop
  labels: {app: cart}
spec:
  nodeName: node1
  serviceAccountName: cart
  containers: [{name: app, image: cart:1}]
  colour: blue
status:
  podIP: 10.244.1.5
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: cart}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: shop}
spec:
  containers: "not a list"
"#;
    let docs = parse_file(Path::new("shop.yaml"), text);
    let ok = loaded(&docs);
    assert_eq!(ok.len(), 2);
    let Object::Pod(pod) = &ok[0].object else {
        panic!()
    };
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some("node1")
    );
    assert_eq!(
        pod.status.as_ref().unwrap().pod_ip.as_deref(),
        Some("10.244.1.5")
    );
    assert_eq!(
        ok[0].warnings,
        ["shop.yaml: Pod shop/cart-0: spec.colour: unknown field, ignored"]
    );
    let Object::Service(svc) = &ok[1].object else {
        panic!()
    };
    assert_eq!(
        svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.0.10")
    );
    let errs = errors(&docs);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("shop.yaml: Pod shop/broken: spec.containers: invalid type"),
        "{}",
        errs[0]
    );
}

#[test]
fn documents_that_cannot_be_named_or_parsed_say_where_they_are() {
    let docs = parse_file(
        Path::new("x.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {}\n---\n- a list\n",
    );
    let errs = errors(&docs);
    assert_eq!(
        errs,
        [
            "x.yaml: Namespace (document 1): metadata.name: is required",
            "x.yaml: document 2: -: a manifest must be a mapping with apiVersion, kind and metadata",
        ]
    );
    let docs = parse_file(Path::new("y.yaml"), "apiVersion: v1\nkind: [unclosed\n");
    let errs = errors(&docs);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("y.yaml: document 1: -: not valid YAML"),
        "{}",
        errs[0]
    );
    assert!(
        errs[0].contains("line"),
        "the position is given: {}",
        errs[0]
    );
}

#[test]
fn kinds_trellis_does_not_read_are_skipped_with_a_note() {
    let docs = parse_file(
        Path::new("d.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n",
    );
    assert_eq!(
        docs,
        [Document::Skipped(
            "d.yaml: Deployment shop/web: apiVersion apps/v1 kind Deployment is not read by Trellis; skipped".into()
        )]
    );
}

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-canary, value: "yes"}]
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: canary}]}
    backendRefs:
    - {name: reviews-v2, port: 9080, weight: 90}
    - {name: reviews-v1, port: 9080, weight: 10}
    timeouts: {request: 5s}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{method: {service: echo.Echo, method: Say}}]
    backendRefs: [{name: echo, port: 50051}]
"#;

#[test]
fn gateway_api_routes_load_typed() {
    let docs = parse_file(Path::new("r.yaml"), ROUTES);
    assert!(errors(&docs).is_empty(), "{:?}", errors(&docs));
    let l = loaded(&docs);
    assert_eq!(l.len(), 2);
    let Object::HttpRoute(r) = &l[0].object else {
        panic!("{:?}", l[0].object)
    };
    assert!(r.spec.parent_refs[0].is_service());
    let rule = &r.spec.rules[0];
    assert_eq!(rule.backend_refs[0].weight, Some(90));
    assert_eq!(rule.backend_refs[1].name, "reviews-v1");
    assert_eq!(
        rule.filters[0]
            .request_header_modifier
            .as_ref()
            .map(|h| h.set[0].value.as_str()),
        Some("canary")
    );
    assert_eq!(
        rule.timeouts.as_ref().and_then(|t| t.request.as_deref()),
        Some("5s")
    );
    let Object::GrpcRoute(g) = &l[1].object else {
        panic!("{:?}", l[1].object)
    };
    let m = g.spec.rules[0].matches[0].method.as_ref().unwrap();
    assert_eq!(m.service.as_deref(), Some("echo.Echo"));
}

#[test]
fn broken_routes_and_gateways_name_the_field() {
    let cases = [
        (
            ROUTES.replace("method: GET", "method: FETCH"),
            "r.yaml: HTTPRoute shop/reviews: spec.rules[0].matches[0].method: unknown variant `FETCH`",
        ),
        (
            ROUTES.replace("value: /api", "value: api"),
            "r.yaml: HTTPRoute shop/reviews: spec.rules[0].matches[0].path.value: \"api\" must start with /",
        ),
        (
            ROUTES.replace("      requestHeaderModifier: {set: [{name: x-route, value: canary}]}\n", ""),
            "r.yaml: HTTPRoute shop/reviews: spec.rules[0].filters[0].requestHeaderModifier: is required for a filter of type RequestHeaderModifier",
        ),
        (
            ROUTES.replace("{name: reviews-v1, port: 9080, weight: 10}", "{name: reviews-v1, weight: 10}"),
            "r.yaml: HTTPRoute shop/reviews: spec.rules[0].backendRefs[1].port: is required when the backend is a Service",
        ),
        (
            ROUTES.replace("{service: echo.Echo, method: Say}", "{type: Exact}"),
            "r.yaml: GRPCRoute shop/echo: spec.rules[0].matches[0].method: needs a service, a method, or both",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}, {name: mesh, port: 15009, protocol: HBONE}]\n".to_string(),
            "r.yaml: Gateway shop/wp: spec.listeners[1].name: \"mesh\" is used by an earlier listener",
        ),
    ];
    for (yaml, want) in cases {
        let errs = errors(&parse_file(Path::new("r.yaml"), &yaml));
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "want {want}\ngot {errs:?}"
        );
    }
}

#[test]
fn the_mesh_config_file_sets_trust_domain_and_root_namespace() {
    use trellis_control_plane::config::load::parse_mesh_config;
    let (mesh, warnings) = parse_mesh_config(
        Path::new("mesh.yaml"),
        "trustDomain: example.org\nrootNamespace: trellis-system\noutboundTrafficPolicy: {}\n",
    )
    .unwrap();
    assert_eq!(mesh.trust_domain, "example.org");
    assert_eq!(mesh.root_namespace, "trellis-system");
    assert_eq!(mesh.cluster_id, "Kubernetes", "default kept");
    assert_eq!(
        warnings,
        ["mesh.yaml: mesh config: outboundTrafficPolicy: unknown field, ignored"]
    );
    assert_eq!(
        empty_tracing(&mesh),
        None,
        "no tracing unless a provider is named"
    );
    let (empty, _) = parse_mesh_config(Path::new("mesh.yaml"), "").unwrap();
    assert_eq!(empty.trust_domain, "cluster.local");

    for (text, want) in [
        (
            "trustDomain: Example.ORG\n",
            "mesh.yaml: mesh config: trustDomain: \"Example.ORG\" is not a trust domain",
        ),
        (
            "rootNamespace: a.b\n",
            "mesh.yaml: mesh config: rootNamespace: \"a.b\" is not a namespace name",
        ),
        (
            "trustDomain: [x]\n",
            "mesh.yaml: mesh config: trustDomain: invalid type",
        ),
        (
            "defaultProviders: {tracing: [otel]}\n",
            "mesh.yaml: mesh config: defaultProviders.tracing: \"otel\" is not one of extensionProviders",
        ),
        (
            "extensionProviders: [{name: x, envoyExtAuthzHttp: {service: a, port: 1}}]\ndefaultProviders: {tracing: [x]}\n",
            "mesh.yaml: mesh config: defaultProviders.tracing: \"x\" is not an opentelemetry provider",
        ),
        (
            "extensionProviders: [{name: otel, opentelemetry: {service: c, port: 4317}}]\ndefaultProviders: {tracing: [otel]}\ndefaultConfig: {tracing: {sampling: 101}}\n",
            "mesh.yaml: mesh config: defaultConfig.tracing.sampling: 101 is not a percentage",
        ),
    ] {
        let e = parse_mesh_config(Path::new("mesh.yaml"), text)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "want {want}\ngot {e}");
    }
}

fn empty_tracing(mesh: &trellis_control_plane::config::model::MeshConfig) -> Option<(String, f64)> {
    mesh.tracing().unwrap()
}

#[test]
fn the_mesh_config_names_the_waypoints_trace_collector_as_istio_does() {
    use trellis_control_plane::config::load::parse_mesh_config;
    let (mesh, warnings) = parse_mesh_config(
        Path::new("mesh.yaml"),
        "extensionProviders:\n- name: otel\n  opentelemetry: {service: opentelemetry-collector.observability.svc.cluster.local, port: 4317}\ndefaultProviders: {tracing: [otel]}\ndefaultConfig: {tracing: {sampling: 12.5}}\n",
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        empty_tracing(&mesh),
        Some((
            "opentelemetry-collector.observability.svc.cluster.local:4317".to_string(),
            12.5
        ))
    );
    // Istio's default sampling is 1%.
    let (mesh, _) = parse_mesh_config(
        Path::new("mesh.yaml"),
        "extensionProviders: [{name: otel, opentelemetry: {service: c.o.svc.cluster.local, port: 4317}}]\ndefaultProviders: {tracing: [otel]}\n",
    )
    .unwrap();
    assert_eq!(empty_tracing(&mesh).unwrap().1, 1.0);
}
