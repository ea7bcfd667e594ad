//! `DestinationRule` (`networking.istio.io`): the traffic policy of requests a waypoint
//! sends to a Service — connection-pool limits (circuit breaking) and outlier detection.
//!
//! Which rule applies to a Service, as Istio looks it up for a waypoint: a rule in the
//! Service's namespace, else one in the root namespace, whose `host` names the Service —
//! a short name (`reviews`) is read in the rule's namespace, `reviews.ns` and the full
//! name `reviews.ns.svc.<suffix>` as they are, `*.ns.svc.<suffix>` (or `*`) as a
//! wildcard. An exact host beats a wildcard, then the older rule wins, then the name.
//! `portLevelSettings` for the port replace the top-level sections they set.
//!
//! What the waypoint does not enforce (yet) is named in the rule's status, never silently
//! dropped.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_proto::trellis::waypoint::v1 as pb;

use super::model::{MeshConfig, Model};

/// A `DestinationRule`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationRule {
    /// Object metadata.
    pub metadata: ObjectMeta,
    /// The rule.
    pub spec: DestinationRuleSpec,
}

/// `spec:` of a `DestinationRule`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The Service it is for.
    pub host: String,
    /// The policy.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets of the Service's endpoints.
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// Namespaces that see the rule.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Sidecar-only: which workloads' sidecars apply it.
    #[serde(default)]
    pub workload_selector: Option<Value>,
}

/// `trafficPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Connection-pool limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Outlier detection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// TLS to the endpoints.
    #[serde(default)]
    pub tls: Option<Value>,
    /// Per-port overrides.
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// Tunnelling.
    #[serde(default)]
    pub tunnel: Option<Value>,
    /// PROXY protocol to the endpoints.
    #[serde(default)]
    pub proxy_protocol: Option<Value>,
}

/// A `portLevelSettings` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    /// The port (`{number: 80}`).
    #[serde(default)]
    pub port: Option<PortSelector>,
    /// Connection-pool limits for the port.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Outlier detection for the port.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Load balancing for the port.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// TLS for the port.
    #[serde(default)]
    pub tls: Option<Value>,
}

/// `loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    /// `ROUND_ROBIN`, `LEAST_REQUEST` (`LEAST_CONN`), `RANDOM`, `PASSTHROUGH`.
    #[serde(default)]
    pub simple: Option<String>,
    /// Session affinity by a request attribute.
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHashSettings>,
    /// Locality-weighted load balancing.
    #[serde(default)]
    pub locality_lb_setting: Option<Value>,
    /// Slow start.
    #[serde(default)]
    pub warmup_duration_secs: Option<Value>,
    /// Slow start (newer form).
    #[serde(default)]
    pub warmup: Option<Value>,
}

/// `loadBalancer.consistentHash`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHashSettings {
    /// Hash a request header.
    #[serde(default)]
    pub http_header_name: Option<String>,
    /// Hash a cookie.
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    /// Hash the client's address.
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    /// Hash a query parameter.
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    /// Ring hash parameters.
    #[serde(default)]
    pub ring_hash: Option<Value>,
    /// Maglev parameters.
    #[serde(default)]
    pub maglev: Option<Value>,
    /// Deprecated ring size.
    #[serde(default)]
    pub minimum_ring_size: Option<Value>,
}

/// `consistentHash.httpCookie`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpCookie {
    /// The cookie's name.
    pub name: String,
    /// Its path (when generated).
    #[serde(default)]
    pub path: Option<String>,
    /// Generate it with this lifetime when absent.
    #[serde(default)]
    pub ttl: Option<String>,
    /// Its attributes (when generated).
    #[serde(default)]
    pub attributes: Option<Value>,
}

/// The waypoint's load balancer for `lb`, or what of it cannot be applied.
fn load_balancer(lb: &LoadBalancerSettings) -> Option<pb::LoadBalancer> {
    use pb::load_balancer::{ConsistentHash, Simple, consistent_hash::Key};
    let simple = match lb.simple.as_deref() {
        Some("ROUND_ROBIN") => Simple::RoundRobin,
        Some("RANDOM") => Simple::Random,
        _ => Simple::LeastRequest,
    };
    let key = lb.consistent_hash.as_ref().and_then(|c| {
        if let Some(h) = &c.http_header_name {
            Some(Key::Header(h.to_ascii_lowercase()))
        } else if let Some(k) = &c.http_cookie {
            Some(Key::Cookie(k.name.clone()))
        } else if c.use_source_ip == Some(true) {
            Some(Key::SourceIp(true))
        } else {
            c.http_query_parameter_name.clone().map(Key::QueryParameter)
        }
    });
    Some(pb::LoadBalancer {
        simple: simple as i32,
        consistent_hash: key.map(|k| ConsistentHash { key: Some(k) }),
    })
}

/// What of `lb` (at `at`) the waypoint does not apply.
fn load_balancer_notes(at: &str, lb: &LoadBalancerSettings, out: &mut Vec<String>) {
    match lb.simple.as_deref() {
        None | Some("ROUND_ROBIN" | "RANDOM" | "LEAST_REQUEST" | "LEAST_CONN" | "UNSPECIFIED") => {}
        Some("PASSTHROUGH") => out.push(format!(
            "{at}.loadBalancer.simple: PASSTHROUGH is not applied: the waypoint picks a ready endpoint (LEAST_REQUEST)"
        )),
        Some(other) => out.push(format!(
            "{at}.loadBalancer.simple: {other:?} is not a load balancer (ROUND_ROBIN, LEAST_REQUEST, RANDOM); LEAST_REQUEST applies"
        )),
    }
    for (f, v) in [
        ("localityLbSetting", lb.locality_lb_setting.is_some()),
        ("warmupDurationSecs", lb.warmup_duration_secs.is_some()),
        ("warmup", lb.warmup.is_some()),
    ] {
        if v {
            out.push(format!(
                "{at}.loadBalancer.{f}: not applied by waypoints yet"
            ));
        }
    }
    if let Some(c) = &lb.consistent_hash {
        let keys = [
            c.http_header_name.is_some(),
            c.http_cookie.is_some(),
            c.use_source_ip == Some(true),
            c.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() != 1 {
            out.push(format!(
                "{at}.loadBalancer.consistentHash: set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName (the first set applies)"
            ));
        }
        for (f, v) in [
            ("ringHash", c.ring_hash.is_some()),
            ("maglev", c.maglev.is_some()),
            ("minimumRingSize", c.minimum_ring_size.is_some()),
        ] {
            if v {
                out.push(format!(
                    "{at}.loadBalancer.consistentHash.{f}: not applied: the waypoint uses rendezvous hashing (same affinity, no ring to size)"
                ));
            }
        }
        if let Some(k) = &c.http_cookie
            && k.ttl.is_some()
        {
            out.push(format!(
                "{at}.loadBalancer.consistentHash.httpCookie.ttl: not applied: the waypoint hashes the cookie when the client sends it, and does not set it"
            ));
        }
    }
}

/// `port: {number: N}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PortSelector {
    /// The Service port.
    #[serde(default)]
    pub number: u32,
}

/// `connectionPool`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// TCP settings.
    #[serde(default)]
    pub tcp: Option<TcpSettings>,
    /// HTTP settings.
    #[serde(default)]
    pub http: Option<HttpSettings>,
}

/// `connectionPool.tcp`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    /// Connections to the Service at most.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Connect timeout.
    #[serde(default)]
    pub connect_timeout: Option<String>,
    /// Keep-alive probes.
    #[serde(default)]
    pub tcp_keepalive: Option<Value>,
    /// Longest life of a connection.
    #[serde(default)]
    pub max_connection_duration: Option<String>,
    /// Idle timeout of a TCP connection.
    #[serde(default)]
    pub idle_timeout: Option<String>,
}

/// `connectionPool.http`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    /// Requests waiting for a connection at most.
    #[serde(default)]
    pub http1_max_pending_requests: Option<u32>,
    /// Requests in flight at most.
    #[serde(default)]
    pub http2_max_requests: Option<u32>,
    /// Requests per connection at most.
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    /// Retries in flight at most.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Idle timeout of an upstream connection.
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// HTTP/2 upgrade.
    #[serde(default)]
    pub h2_upgrade_policy: Option<String>,
    /// Use the client's protocol.
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    /// Streams per HTTP/2 connection.
    #[serde(default)]
    pub max_concurrent_streams: Option<u32>,
}

/// `outlierDetection`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 5xx in a row that eject an endpoint (Istio's default 5).
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    /// 502/503/504 in a row that eject an endpoint.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// Sweep period (Istio's default 10 s).
    #[serde(default)]
    pub interval: Option<String>,
    /// Ejection time, times the ejections (Istio's default 30 s).
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    /// Endpoints ejected at once at most, percent (Istio's default 10).
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    /// Below this share of healthy endpoints, no ejection.
    #[serde(default)]
    pub min_health_percent: Option<i32>,
    /// Separate local-origin failures.
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    /// Local-origin failures in a row.
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<u32>,
    /// Deprecated alias.
    #[serde(default)]
    pub consecutive_errors: Option<u32>,
}

/// A `subsets` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Its name.
    pub name: String,
    /// The endpoints' labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its policy.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// The full hostname `host` of a rule in namespace `ns` stands for.
fn full_host(host: &str, ns: &str, suffix: &str) -> String {
    match host.matches('.').count() {
        0 if host != "*" => format!("{host}.{ns}.svc.{suffix}"),
        1 if !host.starts_with("*.") => format!("{host}.svc.{suffix}"),
        _ => host.to_string(),
    }
}

/// How well `host` (full) names `hostname`: 2 exactly, 1 by wildcard, none not at all.
fn host_match(host: &str, hostname: &str) -> Option<u8> {
    if host == hostname {
        Some(2)
    } else if host == "*" {
        Some(1)
    } else if let Some(rest) = host.strip_prefix('*') {
        hostname.ends_with(rest).then_some(1)
    } else {
        None
    }
}

/// The rule that applies to Service `hostname` of namespace `ns` (see the module doc).
pub fn rule_for<'m>(
    model: &'m Model,
    mesh: &MeshConfig,
    ns: &str,
    hostname: &str,
) -> Option<((&'m String, &'m String), &'m DestinationRule)> {
    for scope in [ns, mesh.root_namespace.as_str()] {
        let best = model
            .destination_rules()
            .filter(|((rns, _), _)| rns == scope)
            .filter_map(|((rns, rname), dr)| {
                let host = full_host(&dr.spec.host, rns, &mesh.domain_suffix);
                let rank = host_match(&host, hostname)?;
                let age = dr.metadata.creation_timestamp.as_ref().map(|t| t.0);
                Some((
                    (std::cmp::Reverse(rank), age, rname.clone()),
                    (rns, rname),
                    dr,
                ))
            })
            .min_by(|a, b| a.0.cmp(&b.0));
        if let Some((_, key, dr)) = best {
            return Some((key, dr));
        }
    }
    None
}

/// The waypoint's traffic policy of `dr` for Service port `port`.
pub fn traffic_policy(dr: &DestinationRule, port: u32) -> Option<pb::TrafficPolicy> {
    let top = dr.spec.traffic_policy.as_ref()?;
    let at_port = top
        .port_level_settings
        .iter()
        .find(|p| p.port.as_ref().is_some_and(|s| s.number == port));
    let pool = at_port
        .and_then(|p| p.connection_pool.as_ref())
        .or(top.connection_pool.as_ref());
    let outlier = at_port
        .and_then(|p| p.outlier_detection.as_ref())
        .or(top.outlier_detection.as_ref());
    let lb = at_port
        .and_then(|p| p.load_balancer.as_ref())
        .or(top.load_balancer.as_ref())
        .and_then(load_balancer);
    let circuit_breaker = pool.map(|p| {
        let tcp = p.tcp.clone().unwrap_or_default();
        let http = p.http.clone().unwrap_or_default();
        pb::CircuitBreaker {
            max_connections: tcp.max_connections,
            max_pending_requests: http.http1_max_pending_requests,
            max_requests: http.http2_max_requests,
            max_retries: None,
            max_requests_per_connection: http.max_requests_per_connection,
        }
    });
    let duration = |d: Option<&String>| {
        d.and_then(|d| super::routes::parse_duration(d))
            .map(super::routes::proto_duration)
    };
    let connect_timeout = duration(pool.and_then(|p| p.tcp.as_ref()?.connect_timeout.as_ref()));
    let idle_timeout = duration(pool.and_then(|p| p.http.as_ref()?.idle_timeout.as_ref()));
    let outlier_detection = outlier.map(|o| pb::OutlierDetection {
        consecutive_5xx: o
            .consecutive_5xx_errors
            .or(o.consecutive_errors)
            .or(Some(5)),
        consecutive_gateway_errors: o.consecutive_gateway_errors,
        consecutive_connect_failures: None,
        interval: o
            .interval
            .as_deref()
            .and_then(super::routes::parse_duration)
            .map(super::routes::proto_duration),
        base_ejection_time: Some(super::routes::proto_duration(
            o.base_ejection_time
                .as_deref()
                .and_then(super::routes::parse_duration)
                .unwrap_or(std::time::Duration::from_secs(30)),
        )),
        max_ejection_percent: Some(o.max_ejection_percent.unwrap_or(10)),
    });
    if circuit_breaker.is_none() && outlier_detection.is_none() && lb.is_none() {
        return None;
    }
    Some(pb::TrafficPolicy {
        circuit_breaker,
        outlier_detection,
        connect_timeout,
        load_balancer: lb,
        idle_timeout,
    })
}

/// What of `dr` the waypoints do not enforce, each naming the field; empty when all of it
/// is enforced. A duration that does not parse is named too.
pub fn notes(dr: &DestinationRule) -> Vec<String> {
    let mut out = Vec::new();
    let mut lb_notes = Vec::new();
    let mut unsupported = |field: String, why: &str| out.push(format!("{field}: {why}"));
    if !dr.spec.subsets.is_empty() {
        unsupported(
            "spec.subsets".into(),
            "not applied by waypoints yet; route to a Service per version instead",
        );
    }
    if dr.spec.workload_selector.is_some() {
        unsupported(
            "spec.workloadSelector".into(),
            "sidecar-only: waypoints apply rules by host",
        );
    }
    let Some(tp) = &dr.spec.traffic_policy else {
        return out;
    };
    let mut sections: Vec<(String, Option<&ConnectionPool>, Option<&OutlierDetection>)> = vec![(
        "spec.trafficPolicy".into(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
    )];
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        sections.push((
            format!("spec.trafficPolicy.portLevelSettings[{i}]"),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
        ));
        if let Some(lb) = &p.load_balancer {
            load_balancer_notes(
                &format!("spec.trafficPolicy.portLevelSettings[{i}]"),
                lb,
                &mut lb_notes,
            );
        }
        if p.tls.is_some() {
            unsupported(
                format!("spec.trafficPolicy.portLevelSettings[{i}].tls"),
                "not applied: the waypoint reaches mesh endpoints over HBONE (mutual TLS)",
            );
        }
    }
    if let Some(lb) = &tp.load_balancer {
        load_balancer_notes("spec.trafficPolicy", lb, &mut lb_notes);
    }
    if tp.tls.is_some() {
        unsupported(
            "spec.trafficPolicy.tls".into(),
            "not applied: the waypoint reaches mesh endpoints over HBONE (mutual TLS)",
        );
    }
    for (f, v) in [
        ("tunnel", tp.tunnel.is_some()),
        ("proxyProtocol", tp.proxy_protocol.is_some()),
    ] {
        if v {
            unsupported(
                format!("spec.trafficPolicy.{f}"),
                "not applied by waypoints",
            );
        }
    }
    for (at, pool, outlier) in sections {
        if let Some(p) = pool {
            if let Some(t) = &p.tcp {
                for (f, d) in [("connectTimeout", &t.connect_timeout)] {
                    if let Some(d) = d
                        && super::routes::parse_duration(d).is_none()
                    {
                        unsupported(
                            format!("{at}.connectionPool.tcp.{f}"),
                            &format!(
                                "{d:?} is not a duration (e.g. 30s, 500ms); the default applies"
                            ),
                        );
                    }
                }
                for (f, v) in [
                    ("tcpKeepalive", t.tcp_keepalive.is_some()),
                    ("maxConnectionDuration", t.max_connection_duration.is_some()),
                    ("idleTimeout", t.idle_timeout.is_some()),
                ] {
                    if v {
                        unsupported(
                            format!("{at}.connectionPool.tcp.{f}"),
                            "not applied by waypoints yet",
                        );
                    }
                }
            }
            if let Some(h) = &p.http {
                if let Some(d) = &h.idle_timeout
                    && super::routes::parse_duration(d).is_none()
                {
                    unsupported(
                        format!("{at}.connectionPool.http.idleTimeout"),
                        &format!("{d:?} is not a duration (e.g. 30s, 500ms); the default applies"),
                    );
                }
                for (f, v) in [
                    ("maxRetries", h.max_retries.is_some()),
                    ("h2UpgradePolicy", h.h2_upgrade_policy.is_some()),
                    ("useClientProtocol", h.use_client_protocol.is_some()),
                    ("maxConcurrentStreams", h.max_concurrent_streams.is_some()),
                ] {
                    if v {
                        unsupported(
                            format!("{at}.connectionPool.http.{f}"),
                            if f == "maxRetries" {
                                "not applied: retries are bounded by the waypoint's retry budget"
                            } else {
                                "not applied by waypoints yet"
                            },
                        );
                    }
                }
            }
        }
        if let Some(o) = outlier {
            for (f, v) in [
                ("minHealthPercent", o.min_health_percent.is_some()),
                (
                    "splitExternalLocalOriginErrors",
                    o.split_external_local_origin_errors.is_some(),
                ),
                (
                    "consecutiveLocalOriginFailures",
                    o.consecutive_local_origin_failures.is_some(),
                ),
            ] {
                if v {
                    unsupported(
                        format!("{at}.outlierDetection.{f}"),
                        "not applied by waypoints yet",
                    );
                }
            }
            for (f, d) in [
                ("interval", &o.interval),
                ("baseEjectionTime", &o.base_ejection_time),
            ] {
                if let Some(d) = d
                    && super::routes::parse_duration(d).is_none()
                {
                    unsupported(
                        format!("{at}.outlierDetection.{f}"),
                        &format!("{d:?} is not a duration (e.g. 30s, 500ms); the default applies"),
                    );
                }
            }
        }
    }
    out.extend(lb_notes);
    out
}
