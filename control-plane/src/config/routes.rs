//! Waypoint routes: the `HTTPRoute`s and `GRPCRoute`s attached to Services (GAMMA), and
//! each Service port's protocol, translated into `trellis.waypoint.v1.Route` resources —
//! one per port of every Service a waypoint fronts, named `namespace/hostname:port`.
//!
//! - **Protocol** as Istio decides it: the port's `appProtocol`, else the prefix of its
//!   name before `-` (`http`, `http2`, `grpc`, `tcp`, ...); neither → detected by the
//!   waypoint (HTTP/1.1 request line or the HTTP/2 preface).
//! - **Rules** of every route whose `parentRefs` name the Service (and the port, when the
//!   parentRef has one), one rule per match, sorted by the Gateway API's precedence: exact
//!   path before regular expression before prefix, longer paths first, then a method
//!   match, more header matches, more query matches; ties by the route's age, then
//!   `namespace/name`, then rule and match order. The waypoint takes the first that
//!   matches; a request no rule matches goes to the Service it was addressed to.
//! - Routes attached to the Service's **waypoint Gateway** apply too when the Gateway's
//!   listeners allow them and their `hostnames` name the Service (or they have none);
//!   they rank by how exactly they name it (see [`gateway_attachment`]).
//! - **Backends**: a Service of the route's namespace, or of another namespace whose
//!   `ReferenceGrant` allows the route's kind from the route's namespace; any other
//!   cross-namespace backend is not used (its share answers 500; route status
//!   `RefNotPermitted`), nor is a Service that does not exist (`BackendNotFound`).
//!   Hostnames of mesh routes are ignored (GAMMA).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ServicePort;
use trellis_proto::trellis::waypoint::v1 as pb;

use super::gateway::{
    FilterType, FromNamespaces, GrpcMethodMatch, HttpBackendRef, HttpHeaderMatch, HttpRouteFilter,
    HttpRouteMatch, ParentReference, PathMatchType, PathModifier, PathModifierType, ValueMatchType,
};
use super::model::{MeshConfig, Model};

type Key = (String, String);

/// The protocol of a Service port, as Istio decides it.
pub fn port_protocol(port: &ServicePort) -> pb::route::AppProtocol {
    use pb::route::AppProtocol as P;
    let parse = |s: &str| match s.to_ascii_lowercase().as_str() {
        "http" | "http1" | "http/1.1" => Some(P::Http1),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(P::Http2),
        "grpc" | "grpc-web" => Some(P::Grpc),
        // WebSocket ports are forwarded as TCP: the waypoint does not proxy upgrades yet.
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "udp" | "kubernetes.io/ws"
        | "kubernetes.io/wss" => Some(P::Tcp),
        _ => None,
    };
    if let Some(p) = port.app_protocol.as_deref().and_then(parse) {
        return p;
    }
    if let Some(name) = port.name.as_deref() {
        let prefix = name.split('-').next().unwrap_or(name);
        if let Some(p) = parse(prefix) {
            return p;
        }
    }
    P::Unspecified
}

/// A Service's key in the workload API: `namespace/hostname`.
fn service_ref(ns: &str, name: &str, port: u32, mesh: &MeshConfig) -> pb::ServiceRef {
    pb::ServiceRef {
        namespace: ns.to_string(),
        hostname: format!("{name}.{ns}.svc.{}", mesh.domain_suffix),
        port,
    }
}

/// One (route, rule, match) with what orders it.
struct Candidate {
    order: (
        u8,
        u8,
        std::cmp::Reverse<usize>,
        bool,
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
    ),
    age: Option<k8s_openapi::jiff::Timestamp>,
    route: String,
    index: (usize, usize),
    rule: pb::RouteRule,
}

/// What a route rule looks like to the translation (HTTP and gRPC alike).
struct RuleIn<'a> {
    matches: Vec<pb::RouteMatch>,
    filters: &'a [HttpRouteFilter],
    backends: &'a [HttpBackendRef],
    request_timeout: Option<&'a str>,
    backend_timeout: Option<&'a str>,
    retry: Option<&'a super::gateway::HttpRouteRetry>,
    /// The rule's `name` (what a policy's `sectionName` names).
    section: Option<&'a str>,
}

/// Every waypoint Route resource, by name: one per port of each Service some waypoint
/// fronts.
pub fn waypoint_routes(model: &Model, mesh: &MeshConfig) -> BTreeMap<String, pb::Route> {
    let mut out = BTreeMap::new();
    for ((ns, name), svc) in model.service_objects() {
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        if model.waypoint_key_of(ns, &labels, "service").is_none() {
            continue;
        }
        let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
        for port in ports.into_iter().flatten() {
            let Ok(number) = u32::try_from(port.port) else {
                continue;
            };
            let service = service_ref(ns, name, number, mesh);
            let rules = rules_for(model, mesh, ns, name, number);
            let local = super::local_traffic::for_service(model, ns, name, port.name.as_deref());
            let route = pb::Route {
                name: format!("{}/{}:{number}", service.namespace, service.hostname),
                traffic_policy: traffic_policy_of(model, mesh, &service),
                service: Some(service),
                protocol: port_protocol(port) as i32,
                rules,
                refused: String::new(),
                fault: local.fault,
                rate_limit: local.rate_limit,
            };
            out.insert(route.name.clone(), route);
        }
    }
    out
}

/// The Services (namespace, name) each waypoint's routes send to, beyond those it fronts:
/// the waypoint must know their endpoints.
pub fn route_backends(model: &Model, mesh: &MeshConfig) -> BTreeMap<Key, BTreeSet<Key>> {
    let mut out: BTreeMap<Key, BTreeSet<Key>> = BTreeMap::new();
    let suffix = format!(".svc.{}", mesh.domain_suffix);
    for ((ns, name), svc) in model.service_objects() {
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        let Some(gw) = model.waypoint_key_of(ns, &labels, "service") else {
            continue;
        };
        let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
        for port in ports.into_iter().flatten() {
            let Ok(number) = u32::try_from(port.port) else {
                continue;
            };
            for rule in rules_for(model, mesh, ns, name, number) {
                let mirrors = rule.filters.iter().filter_map(|f| match &f.kind {
                    Some(pb::filter::Kind::RequestMirror(m)) => m.backend.as_ref(),
                    _ => None,
                });
                let backends = rule.backends.iter().filter_map(|b| b.backend.as_ref());
                for b in backends.chain(mirrors) {
                    if let Some(short) = b.hostname.strip_suffix(&suffix)
                        && let Some((bname, bns)) = short.split_once('.')
                    {
                        out.entry(gw.clone())
                            .or_default()
                            .insert((bns.to_string(), bname.to_string()));
                    }
                }
            }
        }
    }
    out
}

/// Why a route's parentRef to a waypoint Gateway does not attach: the `Accepted=False`
/// reason and message of its status.
pub type NotAttached = (&'static str, String);

/// How a route of `kind` in `route_ns` attaches through parentRef `p`: `None` when `p` is
/// not a Trellis waypoint Gateway (not ours to judge); `Some(Ok(gateway))` when it attaches
/// to the waypoint; `Some(Err(why))` when it names one but the waypoint's listeners do not
/// take it. The parentRef's `sectionName` and `port` pick listeners (a Gateway with none
/// has the implicit HBONE listener `mesh` on 15008); a listener's `allowedRoutes` decides
/// the namespaces (`Same`, the default; `All`; `Selector` by the namespace's labels) and
/// the kinds.
pub fn gateway_attachment(
    model: &Model,
    kind: &str,
    route_ns: &str,
    p: &ParentReference,
) -> Option<Result<Key, NotAttached>> {
    let is_gateway = p.group.as_deref().unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP
        && p.kind.as_deref().unwrap_or("Gateway") == "Gateway";
    if !is_gateway {
        return None;
    }
    let gns = p.namespace.as_deref().unwrap_or(route_ns);
    let gw = model.gateway(gns, &p.name).filter(|g| g.is_waypoint())?;
    let implicit = [super::gateway::Listener {
        name: "mesh".into(),
        port: 15008,
        protocol: "HBONE".into(),
        ..Default::default()
    }];
    let listeners = if gw.spec.listeners.is_empty() {
        &implicit[..]
    } else {
        &gw.spec.listeners[..]
    };
    let picked: Vec<_> = listeners
        .iter()
        .filter(|l| p.section_name.as_ref().is_none_or(|s| *s == l.name))
        .filter(|l| p.port.is_none_or(|port| port == l.port))
        .collect();
    if picked.is_empty() {
        return Some(Err((
            "NoMatchingParent",
            format!(
                "waypoint {gns}/{} has no listener{}{}",
                p.name,
                p.section_name
                    .as_ref()
                    .map(|s| format!(" named {s:?}"))
                    .unwrap_or_default(),
                p.port.map(|n| format!(" on port {n}")).unwrap_or_default()
            ),
        )));
    }
    let ns_labels = model.namespace_labels(route_ns);
    let allows = |l: &super::gateway::Listener| {
        let allowed = l.allowed_routes.as_ref();
        let namespaces = allowed.and_then(|a| a.namespaces.as_ref());
        let from_ok = match namespaces.and_then(|n| n.from) {
            None | Some(FromNamespaces::Same) => route_ns == gns,
            Some(FromNamespaces::All) => true,
            Some(FromNamespaces::Selector) => namespaces
                .and_then(|n| n.selector.as_ref())
                .is_some_and(|sel| selector_matches(sel, &ns_labels)),
        };
        let kinds = allowed.map(|a| &a.kinds[..]).unwrap_or(&[]);
        let kind_ok = kinds.is_empty()
            || kinds.iter().any(|k| {
                k.kind == kind && k.group.as_deref().unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP
            });
        from_ok && kind_ok
    };
    if !picked.iter().any(|l| allows(l)) {
        return Some(Err((
            "NotAllowedByListeners",
            format!(
                "the listeners of waypoint {gns}/{} do not allow {kind}s from namespace {route_ns} (allowedRoutes)",
                p.name
            ),
        )));
    }
    Some(Ok((gns.to_string(), p.name.clone())))
}

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Whether a Kubernetes label selector (`matchLabels`, `matchExpressions` with `In`,
/// `NotIn`, `Exists`, `DoesNotExist`) matches `labels`. A selector it cannot read matches
/// nothing (a route is never attached by a selector misread).
fn selector_matches(sel: &serde_json::Value, labels: &BTreeMap<String, String>) -> bool {
    use serde_json::Value;
    let Some(obj) = sel.as_object() else {
        return false;
    };
    if let Some(ml) = obj.get("matchLabels") {
        let Some(ml) = ml.as_object() else {
            return false;
        };
        for (k, v) in ml {
            if labels.get(k).map(String::as_str) != v.as_str() {
                return false;
            }
        }
    }
    if let Some(exprs) = obj.get("matchExpressions") {
        let Some(exprs) = exprs.as_array() else {
            return false;
        };
        for e in exprs {
            let key = e.get("key").and_then(Value::as_str);
            let op = e.get("operator").and_then(Value::as_str);
            let values: Option<Vec<&str>> = match e.get("values") {
                None => Some(Vec::new()),
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(Value::as_str).collect()),
            };
            let (Some(key), Some(op), Some(values)) = (key, op, values) else {
                return false;
            };
            let have = labels.get(key).map(String::as_str);
            let ok = match op {
                "In" => have.is_some_and(|h| values.contains(&h)),
                "NotIn" => have.is_none_or(|h| !values.contains(&h)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

/// How well a Gateway-attached route's `hostnames` name Service `ns/name`: `Some(0)` for
/// an exact name (`name.ns.svc.<suffix>`, `name.ns.svc`, `name.ns`), `Some(1)` for a
/// wildcard (`*.ns.svc.<suffix>`, ...), `Some(2)` when the route has no hostnames (it
/// applies to every Service of the waypoint), `None` when none names this Service.
fn hostname_rank(hostnames: &[String], ns: &str, name: &str, mesh: &MeshConfig) -> Option<u8> {
    if hostnames.is_empty() {
        return Some(2);
    }
    let fqdn = format!("{name}.{ns}.svc.{}", mesh.domain_suffix);
    let exact = [
        fqdn.clone(),
        format!("{name}.{ns}.svc"),
        format!("{name}.{ns}"),
    ];
    let mut best = None;
    for h in hostnames {
        let h = h.to_ascii_lowercase();
        if exact.contains(&h) {
            return Some(0);
        }
        if let Some(suffix) = h.strip_prefix('*')
            && suffix.starts_with('.')
            && exact.iter().any(|e| e.ends_with(suffix))
        {
            best = Some(1);
        }
    }
    best
}

/// The rules of Service `ns/name` port `port`, in precedence order.
fn rules_for(
    model: &Model,
    mesh: &MeshConfig,
    ns: &str,
    name: &str,
    port: u32,
) -> Vec<pb::RouteRule> {
    // Only producer routes (in the Service's own namespace): a consumer route (from
    // another namespace) applies only to its namespace's clients in GAMMA, which the
    // waypoint cannot tell apart yet; applying it to everyone would let any namespace
    // take over another's Service. Its status says it is not applied.
    //
    // Routes attached to the Service's waypoint Gateway apply too, when their hostnames
    // name the Service (or they have none). Precedence puts first the routes that name the
    // Service most exactly (a Service parent or an exact hostname, then a wildcard, then no
    // hostnames), as the Gateway API orders hostnames before paths.
    let labels = model.service_labels(ns, name).unwrap_or_default();
    let gw = model.waypoint_key_of(ns, &labels, "service");
    let attached = |kind: &str, route_ns: &str, parents: &[ParentReference], hosts: &[String]| {
        let on_service = route_ns == ns
            && parents.iter().any(|p| {
                p.is_service()
                    && p.namespace.as_deref().unwrap_or(route_ns) == ns
                    && p.name == name
                    && p.port.is_none_or(|pp| u32::from(pp) == port)
            });
        if on_service {
            return Some(0);
        }
        let gw = gw.as_ref()?;
        let on_gateway = parents.iter().any(|p| {
            !p.is_service()
                && gateway_attachment(model, kind, route_ns, p)
                    .is_some_and(|a| a.as_ref().is_ok_and(|k| k == gw))
        });
        if on_gateway {
            hostname_rank(hosts, ns, name, mesh)
        } else {
            None
        }
    };
    let mut candidates = Vec::new();
    for ((rns, rname), route) in model.http_routes() {
        let Some(host_rank) = attached(
            "HTTPRoute",
            rns,
            &route.spec.parent_refs,
            &route.spec.hostnames,
        ) else {
            continue;
        };
        let rules = route.spec.rules.iter().map(|rule| RuleIn {
            matches: if rule.matches.is_empty() {
                vec![http_match(&HttpRouteMatch::default())]
            } else {
                rule.matches.iter().map(http_match).collect()
            },
            filters: &rule.filters,
            backends: &rule.backend_refs,
            request_timeout: rule.timeouts.as_ref().and_then(|t| t.request.as_deref()),
            backend_timeout: rule
                .timeouts
                .as_ref()
                .and_then(|t| t.backend_request.as_deref()),
            retry: rule.retry.as_ref(),
            section: rule.name.as_deref(),
        });
        let age = route.metadata.creation_timestamp.as_ref().map(|t| t.0);
        collect(
            &mut candidates,
            model,
            mesh,
            ("HTTPRoute", rns, rname),
            (host_rank, age),
            rules,
        );
    }
    for ((rns, rname), route) in model.grpc_routes() {
        let Some(host_rank) = attached(
            "GRPCRoute",
            rns,
            &route.spec.parent_refs,
            &route.spec.hostnames,
        ) else {
            continue;
        };
        let rules = route.spec.rules.iter().map(|rule| RuleIn {
            matches: if rule.matches.is_empty() {
                vec![pb::RouteMatch::default()]
            } else {
                rule.matches
                    .iter()
                    .map(|m| pb::RouteMatch {
                        grpc: m.method.as_ref().map(grpc_method),
                        headers: m.headers.iter().map(header_match).collect(),
                        ..Default::default()
                    })
                    .collect()
            },
            filters: &rule.filters,
            backends: &rule.backend_refs,
            request_timeout: None,
            backend_timeout: None,
            retry: None,
            section: rule.name.as_deref(),
        });
        let age = route.metadata.creation_timestamp.as_ref().map(|t| t.0);
        collect(
            &mut candidates,
            model,
            mesh,
            ("GRPCRoute", rns, rname),
            (host_rank, age),
            rules,
        );
    }
    candidates.sort_by(|a, b| {
        (a.order, a.age.is_none(), a.age, &a.route, a.index).cmp(&(
            b.order,
            b.age.is_none(),
            b.age,
            &b.route,
            b.index,
        ))
    });
    candidates.into_iter().map(|c| c.rule).collect()
}

#[allow(clippy::too_many_arguments)]
fn collect<'a>(
    out: &mut Vec<Candidate>,
    model: &Model,
    mesh: &MeshConfig,
    (kind, rns, rname): (&str, &str, &str),
    (host_rank, age): (u8, Option<k8s_openapi::jiff::Timestamp>),
    rules: impl Iterator<Item = RuleIn<'a>>,
) {
    for (r, rule) in rules.enumerate() {
        let filters: Vec<pb::Filter> = rule
            .filters
            .iter()
            .filter_map(|f| filter(f, kind, rns, model, mesh))
            .collect();
        let backends: Vec<pb::WeightedBackend> = rule
            .backends
            .iter()
            .map(|b| pb::WeightedBackend {
                traffic_policy: None,
                backend: Some(backend(
                    b.namespace.as_deref(),
                    &b.name,
                    b.group.as_deref(),
                    b.kind.as_deref(),
                    b.port,
                    kind,
                    rns,
                    model,
                    mesh,
                )),
                weight: Some(b.weight.unwrap_or(1)),
                filters: b
                    .filters
                    .iter()
                    .filter_map(|f| filter(f, kind, rns, model, mesh))
                    .collect(),
            })
            .map(|mut b| {
                // The DestinationRule of the backend's Service.
                b.traffic_policy = b
                    .backend
                    .as_ref()
                    .and_then(|s| traffic_policy_of(model, mesh, s));
                b
            })
            .collect();
        let timeouts = match (
            rule.request_timeout.and_then(parse_duration),
            rule.backend_timeout.and_then(parse_duration),
        ) {
            (None, None) => None,
            (request, backend) => Some(pb::Timeouts {
                request: request.map(proto_duration),
                backend_request: backend.map(proto_duration),
                idle: None,
            }),
        };
        let retry = rule.retry.map(retry_policy);
        let local = super::local_traffic::for_rule(model, kind, rns, rname, rule.section);
        for (m, matched) in rule.matches.into_iter().enumerate() {
            let path_rank = match matched.path.as_ref().and_then(|p| p.kind.as_ref()) {
                Some(pb::route_match::path::Kind::Exact(p)) => (0, p.len()),
                Some(pb::route_match::path::Kind::Regex(_)) => (1, 0),
                Some(pb::route_match::path::Kind::Prefix(p)) => (2, p.len()),
                None => (2, 1),
            };
            let order = (
                host_rank,
                path_rank.0,
                std::cmp::Reverse(path_rank.1),
                matched.method.is_empty(),
                std::cmp::Reverse(matched.headers.len()),
                std::cmp::Reverse(matched.query_params.len()),
            );
            out.push(Candidate {
                order,
                age,
                route: format!("{rns}/{rname}"),
                index: (r, m),
                rule: pb::RouteRule {
                    name: format!("{rns}/{rname}/{r}"),
                    matches: vec![matched],
                    filters: filters.clone(),
                    backends: backends.clone(),
                    timeouts,
                    retry: retry.clone(),
                    fault: local.fault,
                    rate_limit: local.rate_limit.clone(),
                },
            });
        }
    }
}

/// The waypoint's traffic policy for Service port `s` from its DestinationRule, if any.
fn traffic_policy_of(
    model: &Model,
    mesh: &MeshConfig,
    s: &pb::ServiceRef,
) -> Option<pb::TrafficPolicy> {
    if s.hostname.is_empty() {
        return None;
    }
    let (_, dr) = super::destination::rule_for(model, mesh, &s.namespace, &s.hostname)?;
    super::destination::traffic_policy(dr, s.port)
}

/// An HTTPRoute rule's `retry` (Gateway API, experimental channel) as Istio reads it:
/// `attempts` retries after the first try (unset: 2, Istio's default; 0: none), on the
/// `codes` given (none: 503), and always on connect failures and refused streams;
/// `backoff` the base of the jittered exponential pause.
fn retry_policy(r: &super::gateway::HttpRouteRetry) -> pb::RetryPolicy {
    use pb::retry_policy::RetryOn;
    pb::RetryPolicy {
        attempts: r.attempts.unwrap_or(2),
        per_try_timeout: None,
        retry_on: vec![
            RetryOn::ConnectFailure as i32,
            RetryOn::RefusedStream as i32,
        ],
        retry_on_status_codes: if r.codes.is_empty() {
            vec![503]
        } else {
            r.codes.iter().map(|c| u32::from(*c)).collect()
        },
        retry_on_grpc_codes: Vec::new(),
        backoff_base_interval: r
            .backoff
            .as_deref()
            .and_then(parse_duration)
            .map(proto_duration),
        backoff_max_interval: None,
    }
}

/// A backend as a ServiceRef; one that cannot be used has an empty hostname (the waypoint
/// answers 500 for its share).
#[allow(clippy::too_many_arguments)]
fn backend(
    ns: Option<&str>,
    name: &str,
    group: Option<&str>,
    kind: Option<&str>,
    port: Option<u16>,
    route_kind: &str,
    route_ns: &str,
    model: &Model,
    mesh: &MeshConfig,
) -> pb::ServiceRef {
    let bns = ns.unwrap_or(route_ns);
    let is_service = group.unwrap_or("").is_empty() && kind.unwrap_or("Service") == "Service";
    let usable = is_service
        && model.backend_allowed(route_kind, route_ns, bns, name)
        && model.service_labels(bns, name).is_some();
    if !usable {
        return pb::ServiceRef {
            namespace: bns.to_string(),
            hostname: String::new(),
            port: port.map_or(0, u32::from),
        };
    }
    service_ref(bns, name, port.map_or(0, u32::from), mesh)
}

fn filter(
    f: &HttpRouteFilter,
    route_kind: &str,
    route_ns: &str,
    model: &Model,
    mesh: &MeshConfig,
) -> Option<pb::Filter> {
    use pb::filter::Kind;
    let headers = |h: &super::gateway::HeaderModifier| pb::filter::HeaderModifier {
        set: h
            .set
            .iter()
            .map(|v| pb::Header {
                name: v.name.clone(),
                value: v.value.clone(),
            })
            .collect(),
        add: h
            .add
            .iter()
            .map(|v| pb::Header {
                name: v.name.clone(),
                value: v.value.clone(),
            })
            .collect(),
        remove: h.remove.clone(),
    };
    let kind = match f.type_ {
        FilterType::RequestHeaderModifier => {
            Kind::RequestHeaderModifier(headers(f.request_header_modifier.as_ref()?))
        }
        FilterType::ResponseHeaderModifier => {
            Kind::ResponseHeaderModifier(headers(f.response_header_modifier.as_ref()?))
        }
        FilterType::RequestRedirect => {
            let r = f.request_redirect.as_ref()?;
            Kind::RequestRedirect(pb::filter::RequestRedirect {
                scheme: r.scheme.clone().unwrap_or_default(),
                hostname: r.hostname.clone().unwrap_or_default(),
                port: r.port.map_or(0, u32::from),
                path: r.path.as_ref().map(path_modifier),
                status_code: r.status_code.map_or(0, u32::from),
            })
        }
        FilterType::UrlRewrite => {
            let r = f.url_rewrite.as_ref()?;
            Kind::UrlRewrite(pb::filter::UrlRewrite {
                hostname: r.hostname.clone().unwrap_or_default(),
                path: r.path.as_ref().map(path_modifier),
            })
        }
        FilterType::RequestMirror => {
            let m = f.request_mirror.as_ref()?;
            let b = &m.backend_ref;
            Kind::RequestMirror(pb::filter::RequestMirror {
                backend: Some(backend(
                    b.namespace.as_deref(),
                    &b.name,
                    b.group.as_deref(),
                    b.kind.as_deref(),
                    b.port,
                    route_kind,
                    route_ns,
                    model,
                    mesh,
                )),
                percent: m.percent.map(f64::from),
            })
        }
        // Implementation-specific filters Trellis does not have: the route status says so.
        FilterType::ExtensionRef => return None,
    };
    Some(pb::Filter { kind: Some(kind) })
}

fn path_modifier(p: &PathModifier) -> pb::filter::PathModifier {
    use pb::filter::path_modifier::Kind;
    pb::filter::PathModifier {
        kind: Some(match p.type_ {
            PathModifierType::ReplaceFullPath => {
                Kind::ReplaceFullPath(p.replace_full_path.clone().unwrap_or_default())
            }
            PathModifierType::ReplacePrefixMatch => {
                Kind::ReplacePrefixMatch(p.replace_prefix_match.clone().unwrap_or_default())
            }
        }),
    }
}

fn http_match(m: &HttpRouteMatch) -> pb::RouteMatch {
    use pb::route_match::path::Kind;
    let path = m.path.as_ref().map_or_else(
        || Kind::Prefix("/".into()),
        |p| {
            let v = p.value.clone().unwrap_or_else(|| "/".into());
            match p.type_.unwrap_or(PathMatchType::PathPrefix) {
                PathMatchType::Exact => Kind::Exact(v),
                PathMatchType::PathPrefix => Kind::Prefix(v),
                PathMatchType::RegularExpression => Kind::Regex(v),
            }
        },
    );
    pb::RouteMatch {
        path: Some(pb::route_match::Path { kind: Some(path) }),
        headers: m.headers.iter().map(header_match).collect(),
        query_params: m
            .query_params
            .iter()
            .map(|q| pb::route_match::QueryParam {
                name: q.name.clone(),
                value: Some(value_match(q)),
            })
            .collect(),
        method: m
            .method
            .map(|m| format!("{m:?}").to_ascii_uppercase())
            .unwrap_or_default(),
        grpc: None,
    }
}

fn value_match(h: &HttpHeaderMatch) -> pb::StringMatch {
    use pb::string_match::Kind;
    pb::StringMatch {
        kind: Some(match h.type_.unwrap_or(ValueMatchType::Exact) {
            ValueMatchType::Exact => Kind::Exact(h.value.clone()),
            ValueMatchType::RegularExpression => Kind::Regex(h.value.clone()),
        }),
        ignore_case: false,
    }
}

fn header_match(h: &HttpHeaderMatch) -> pb::route_match::HeaderMatch {
    pb::route_match::HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        value: Some(value_match(h)),
        invert: false,
    }
}

fn grpc_method(m: &GrpcMethodMatch) -> pb::route_match::GrpcMethod {
    pb::route_match::GrpcMethod {
        service: m.service.clone().unwrap_or_default(),
        method: m.method.clone().unwrap_or_default(),
        regex: m.type_ == Some(ValueMatchType::RegularExpression),
    }
}

/// A Gateway API duration (`1h`, `10s`, `500ms`, `1m30s`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return None;
        };
        total += unit * u32::try_from(n).ok()?;
        rest = &rest[len..];
    }
    Some(total)
}

pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_the_gateway_api_writes_them() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("x"), None);
    }

    #[test]
    fn port_protocols_follow_app_protocol_then_the_name() {
        use pb::route::AppProtocol as P;
        let port = |name: Option<&str>, app: Option<&str>| ServicePort {
            name: name.map(String::from),
            app_protocol: app.map(String::from),
            port: 80,
            ..Default::default()
        };
        assert_eq!(port_protocol(&port(Some("http-web"), None)), P::Http1);
        assert_eq!(port_protocol(&port(Some("grpc"), None)), P::Grpc);
        assert_eq!(port_protocol(&port(Some("tcp-db"), None)), P::Tcp);
        assert_eq!(
            port_protocol(&port(Some("http"), Some("kubernetes.io/h2c"))),
            P::Http2
        );
        assert_eq!(port_protocol(&port(Some("web"), None)), P::Unspecified);
        assert_eq!(port_protocol(&port(None, None)), P::Unspecified);
    }
}
