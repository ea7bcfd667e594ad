//! Metrics (Istio's names), the access log, and the small HTTP server on 15020 that serves
//! `/metrics` (readiness is on 15021 and the admin endpoint on 15000: see `admin`).
//!
//! One access-log line per connection, as a `tracing` event on target `access` (JSON when
//! ztunnel logs JSON). The metrics carry Istio's standard TCP labels, filled from xDS (the
//! workloads at both ends, the service the client addressed) and the identities (verified
//! for the peer of inbound HBONE); what is not known is `unknown`, as Istio reports it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use trellis_core::SpiffeId;
use trellis_proto::istio::workload::{Service, Workload};

use crate::inpod::PodInfo;

/// Which way a connection goes, seen from the pod ztunnel serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the pod (captured on 15001).
    Outbound,
    /// To the pod (captured on 15006).
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Installs the process-wide Prometheus recorder.
pub fn install_metrics() -> Result<PrometheusHandle, Box<dyn std::error::Error + Send + Sync>> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    metrics::describe_counter!(
        "istio_tcp_connections_opened_total",
        "TCP connections opened"
    );
    metrics::describe_counter!(
        "istio_tcp_connections_closed_total",
        "TCP connections closed"
    );
    metrics::describe_counter!("istio_tcp_sent_bytes_total", "bytes sent to the upstream");
    metrics::describe_counter!(
        "istio_tcp_received_bytes_total",
        "bytes received from the upstream"
    );
    metrics::describe_gauge!(
        "trellis_hbone_pool_connections",
        "HBONE connections open in the outbound pools"
    );
    metrics::describe_counter!(
        "trellis_hbone_handshakes_total",
        "mutual-TLS handshakes of HBONE connections, by direction and result"
    );
    metrics::describe_counter!(
        "trellis_authz_denials_total",
        "connections denied by L4 policy, by the policy that decided"
    );
    metrics::describe_gauge!(
        "trellis_xds_connected",
        "1 while the xDS stream to the control plane is up"
    );
    metrics::describe_gauge!(
        "trellis_xds_synced",
        "1 once every subscribed type has had its first response"
    );
    metrics::describe_gauge!("trellis_xds_resources", "resources held, by kind");
    metrics::describe_counter!(
        "trellis_xds_responses_total",
        "xDS responses, by type and whether they were accepted (ack) or rejected (nack)"
    );
    Ok(handle)
}

/// One end of a connection as the metrics name it (Istio's label values): what xDS says
/// of the workload at that address, and its identity. Borrowed from the xDS store: the
/// labels of a connection are looked up, not built, once their set has been seen.
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    workload: &'a str,
    namespace: &'a str,
    principal: Option<&'a SpiffeId>,
    canonical_service: &'a str,
    canonical_revision: &'a str,
    cluster: &'a str,
}

impl<'a> End<'a> {
    /// The end at workload `w` (when xDS knows it) with identity `principal` (verified for
    /// the peer of inbound HBONE, expected for outbound, the pod's own for the local end).
    pub fn new(w: Option<&'a Workload>, principal: Option<&'a SpiffeId>) -> End<'a> {
        let field = |f: fn(&Workload) -> &str| w.map_or("", f);
        End {
            workload: field(|w| {
                if w.workload_name.is_empty() {
                    &w.name
                } else {
                    &w.workload_name
                }
            }),
            namespace: field(|w| &w.namespace),
            principal,
            canonical_service: field(|w| &w.canonical_name),
            canonical_revision: field(|w| &w.canonical_revision),
            cluster: field(|w| &w.cluster_id),
        }
    }

    /// The values of the eight labels of one end, in [`LABEL_NAMES`]' order (`app` and
    /// `version` are the canonical service and revision, as Istio fills them).
    fn values(&self) -> [Value<'a>; 8] {
        [
            Value::Text(self.workload),
            Value::Text(self.namespace),
            self.principal.map_or(Value::Text(""), Value::Identity),
            Value::Text(self.canonical_service),
            Value::Text(self.canonical_revision),
            Value::Text(self.canonical_service),
            Value::Text(self.canonical_revision),
            Value::Text(self.cluster),
        ]
    }

    /// The local pod when xDS does not (yet) know it: what ZDS said.
    pub fn pod(pod: &'a PodInfo, principal: Option<&'a SpiffeId>) -> End<'a> {
        End {
            workload: &pod.name,
            namespace: &pod.namespace,
            ..End::new(None, principal)
        }
    }
}

/// Label names in the order [`ConnLabels`] keeps the values (Istio's standard TCP labels;
/// `response_flags` is set when the connection closes).
const LABEL_NAMES: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "connection_security_policy",
    "response_flags",
];

/// One label value before it is owned: text, or an identity (written `spiffe://…`).
#[derive(Clone, Copy)]
enum Value<'a> {
    Text(&'a str),
    Identity(&'a SpiffeId),
}

impl Value<'_> {
    /// The value as Istio reports it: empty is `unknown`.
    fn render(self) -> String {
        match self {
            Value::Text("") => "unknown".into(),
            Value::Text(t) => t.to_string(),
            Value::Identity(id) => id.to_string(),
        }
    }

    fn hash_into(self, h: &mut impl std::hash::Hasher) {
        match self {
            Value::Text("") => h.write(b"unknown"),
            Value::Text(t) => h.write(t.as_bytes()),
            Value::Identity(id) => {
                for part in [id.trust_domain(), id.namespace(), id.service_account()] {
                    h.write(part.as_bytes());
                    h.write_u8(0xff);
                }
            }
        }
        h.write_u8(0xfe);
    }

    /// Whether `rendered` is what [`Value::render`] gives, without rendering.
    fn same_as(self, rendered: &str) -> bool {
        match self {
            Value::Text("") => rendered == "unknown",
            Value::Text(t) => rendered == t,
            Value::Identity(id) => {
                let mut rest = rendered;
                for (prefix, part) in [
                    ("spiffe://", id.trust_domain()),
                    ("/ns/", id.namespace()),
                    ("/sa/", id.service_account()),
                ] {
                    match rest.strip_prefix(prefix).and_then(|r| r.strip_prefix(part)) {
                        Some(r) => rest = r,
                        None => return false,
                    }
                }
                rest.is_empty()
            }
        }
    }
}

/// The counters of one label set, registered once and kept (registering walks the
/// recorder's map and copies every label: per connection it cost more than the rest of
/// the bookkeeping).
struct Counters {
    /// The label values, `response_flags` last (as `-`).
    values: Vec<String>,
    opened: metrics::Counter,
    /// closed, sent bytes, received bytes — per response flag seen so far.
    closed: std::sync::Mutex<Vec<(&'static str, [metrics::Counter; 3])>>,
}

impl Counters {
    fn labels(&self, flags: &str) -> Vec<metrics::Label> {
        LABEL_NAMES
            .iter()
            .zip(&self.values)
            .map(|(k, v)| {
                let v = if *k == "response_flags" { flags } else { v };
                metrics::Label::new(*k, v.to_string())
            })
            .collect()
    }
}

/// The label sets seen, by a hash of their values (each entry checked value by value).
/// Bounded: past [`CACHE_MAX`] sets it starts over (the recorder keeps the series; only
/// the shortcut to them is dropped).
static CACHE: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<u64, Vec<std::sync::Arc<Counters>>>>,
> = std::sync::LazyLock::new(Default::default);
const CACHE_MAX: usize = 8192;

/// The metric labels of one connection: Istio's standard TCP labels.
pub struct ConnLabels {
    counters: std::sync::Arc<Counters>,
}

impl ConnLabels {
    /// Labels for a connection in `direction` between `source` and `destination` (to
    /// `service` when the client addressed one); `mtls` when it is carried by HBONE.
    pub fn new<'a>(
        direction: Direction,
        source: &End<'a>,
        destination: &End<'a>,
        service: Option<&'a Service>,
        mtls: bool,
    ) -> ConnLabels {
        use std::hash::Hasher;
        let reporter = match direction {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        };
        let [s0, s1, s2, s3, s4, s5, s6, s7] = source.values();
        let [d0, d1, d2, d3, d4, d5, d6, d7] = destination.values();
        let svc = |f: fn(&Service) -> &str| Value::Text(service.map_or("", f));
        let values: [Value<'a>; 23] = [
            Value::Text(reporter),
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            s6,
            s7,
            d0,
            d1,
            d2,
            d3,
            d4,
            d5,
            d6,
            d7,
            svc(|s| &s.hostname),
            svc(|s| &s.name),
            svc(|s| &s.namespace),
            Value::Text("tcp"),
            Value::Text(if mtls { "mutual_tls" } else { "unknown" }),
            Value::Text("-"),
        ];
        let mut h = std::hash::DefaultHasher::new();
        for v in values {
            v.hash_into(&mut h);
        }
        let key = h.finish();
        let mut cache = CACHE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = cache.get(&key).and_then(|entries| {
            entries
                .iter()
                .find(|c| values.iter().zip(&c.values).all(|(v, s)| v.same_as(s)))
                .cloned()
        });
        let counters = match found {
            Some(c) => c,
            None => {
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                let values: Vec<String> = values.iter().map(|v| v.render()).collect();
                let mut c = Counters {
                    values,
                    opened: metrics::Counter::noop(),
                    closed: std::sync::Mutex::new(Vec::new()),
                };
                c.opened = metrics::counter!("istio_tcp_connections_opened_total", c.labels("-"));
                let c = std::sync::Arc::new(c);
                cache.entry(key).or_default().push(c.clone());
                c
            }
        };
        ConnLabels { counters }
    }

    /// Counts an opened connection.
    pub fn opened(&self) {
        self.counters.opened.increment(1);
    }

    /// Counts a closed connection and its bytes; `flags` is Istio's response flag (`-`,
    /// `DENY` for a policy deny, `CONNECT` when the upstream could not be reached).
    pub fn closed(&self, flags: &'static str, sent: u64, received: u64) {
        let c = &self.counters;
        let mut closed = c
            .closed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = match closed.iter().position(|(f, _)| *f == flags) {
            Some(i) => i,
            None => {
                let labels = c.labels(flags);
                closed.push((
                    flags,
                    [
                        metrics::counter!("istio_tcp_connections_closed_total", labels.clone()),
                        metrics::counter!("istio_tcp_sent_bytes_total", labels.clone()),
                        metrics::counter!("istio_tcp_received_bytes_total", labels),
                    ],
                ));
                closed.len() - 1
            }
        };
        let [n, s, r] = &closed[i].1;
        n.increment(1);
        s.increment(sent);
        r.increment(received);
    }
}

/// What one access-log line says.
pub struct AccessLog<'a> {
    /// Which way.
    pub direction: Direction,
    /// The pod served.
    pub pod: &'a PodInfo,
    /// The client's address.
    pub src: SocketAddr,
    /// The original destination.
    pub dst: SocketAddr,
    /// `hbone`, `passthrough`, `plaintext` (inbound without mTLS) or `refused`.
    pub route: &'a str,
    /// The peer's identity (verified for inbound HBONE, expected for outbound).
    pub peer_identity: Option<&'a str>,
    /// The policy that allowed the connection, when one did.
    pub policy: Option<&'a str>,
    /// Bytes client → destination.
    pub sent: u64,
    /// Bytes destination → client.
    pub received: u64,
    /// How long the connection lasted.
    pub duration: Duration,
    /// `ok`, or what went wrong.
    pub result: &'a str,
}

/// `namespace/name`, written straight into the log line.
struct PodName<'a>(&'a PodInfo);

impl std::fmt::Display for PodName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0.namespace, self.0.name)
    }
}

/// Writes the connection's access-log line.
pub fn access_log(l: &AccessLog<'_>) {
    tracing::info!(
        target: "access",
        direction = l.direction.as_str(),
        pod = %PodName(l.pod),
        src = %l.src,
        dst = %l.dst,
        route = l.route,
        peer_identity = l.peer_identity.unwrap_or("-"),
        policy = l.policy.unwrap_or("-"),
        bytes_sent = l.sent,
        bytes_received = l.received,
        duration_ms = l.duration.as_millis() as u64,
        result = l.result,
        "connection complete"
    );
}

/// The identities whose certificates are held now (the expiry series of any other
/// identity is not exported: the `metrics` crate cannot unregister a series).
pub type HeldIdentities = Arc<dyn Fn() -> std::collections::HashSet<String> + Send + Sync>;

/// Serves `/metrics` on `addr`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    held: HeldIdentities,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let metrics = metrics.clone();
            let held = held.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let body = respond(&req, &metrics, &held);
                    async move { Ok::<_, std::convert::Infallible>(body) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .serve_connection(hyper_util::rt::TokioIo::new(conn), service);
                let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            });
        }
    });
    Ok(bound)
}

fn respond<B>(
    req: &hyper::Request<B>,
    metrics: &PrometheusHandle,
    held: &HeldIdentities,
) -> hyper::Response<Full<Bytes>> {
    let (code, body) = match req.uri().path() {
        "/metrics" => (200, without_forgotten_certs(&metrics.render(), &held())),
        _ => (404, "try /metrics\n".to_string()),
    };
    hyper::Response::builder()
        .status(code)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// `text` without the certificate-expiry series of identities not in `held`.
fn without_forgotten_certs(text: &str, held: &std::collections::HashSet<String>) -> String {
    const SERIES: &str = "trellis_cert_expiry_seconds{";
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if let Some(labels) = line.strip_prefix(SERIES) {
            let identity = labels
                .split_once("identity=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(id, _)| id);
            if identity.is_some_and(|id| !held.contains(id)) {
                continue;
            }
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_series_of_a_forgotten_identity_is_not_exported() {
        let text = "# TYPE trellis_cert_expiry_seconds gauge\n\
trellis_cert_expiry_seconds{identity=\"spiffe://td/ns/a/sa/a\"} 100\n\
trellis_cert_expiry_seconds{identity=\"spiffe://td/ns/b/sa/b\"} 0\n\
istio_tcp_connections_opened_total{x=\"y\"} 3\n";
        let held = ["spiffe://td/ns/a/sa/a".to_string()].into_iter().collect();
        let out = without_forgotten_certs(text, &held);
        assert!(out.contains("ns/a/sa/a\"} 100"), "{out}");
        assert!(!out.contains("ns/b/sa/b"), "{out}");
        assert!(out.contains("istio_tcp_connections_opened_total"), "{out}");
        assert!(out.starts_with("# TYPE"), "{out}");
    }

    fn workload(name: &str, ns: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: ns.into(),
            canonical_name: "app".into(),
            cluster_id: "Kubernetes".into(),
            ..Default::default()
        }
    }

    /// The value of the series of `metric` whose labels include all of `labels`.
    fn series(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .find(|l| labels.iter().all(|want| l.contains(want)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn connections_with_the_same_labels_share_series_and_flags_split_them() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let (src_w, dst_w) = (workload("lbl-src", "a"), workload("lbl-dst", "b"));
        let src_id = SpiffeId::new("cluster.local", "a", "sa-a").unwrap();
        let dst_id = SpiffeId::new("cluster.local", "b", "sa-b").unwrap();
        let other_id = SpiffeId::new("cluster.local", "b", "sa-other").unwrap();
        metrics::with_local_recorder(&recorder, || {
            let src = End::new(Some(&src_w), Some(&src_id));
            let dst = End::new(Some(&dst_w), Some(&dst_id));
            for flags in ["-", "-", "DENY"] {
                let l = ConnLabels::new(Direction::Outbound, &src, &dst, None, true);
                l.opened();
                l.closed(flags, 10, 20);
            }
            // The same labels find the same counters (a hit, not a new registration).
            let a = ConnLabels::new(Direction::Outbound, &src, &dst, None, true);
            let b = ConnLabels::new(Direction::Outbound, &src, &dst, None, true);
            assert!(std::sync::Arc::ptr_eq(&a.counters, &b.counters));
            // Another peer identity is another label set, not a hit of the first.
            let dst2 = End::new(Some(&dst_w), Some(&other_id));
            let l = ConnLabels::new(Direction::Outbound, &src, &dst2, None, true);
            l.opened();
            // An unknown end reads `unknown`.
            let l = ConnLabels::new(Direction::Inbound, &End::new(None, None), &dst, None, false);
            l.opened();
        });
        let text = handle.render();
        let base = [
            "reporter=\"source\"",
            "source_workload=\"lbl-src\"",
            "source_principal=\"spiffe://cluster.local/ns/a/sa/sa-a\"",
            "destination_workload=\"lbl-dst\"",
            "destination_app=\"app\"",
            "destination_cluster=\"Kubernetes\"",
            "destination_service=\"unknown\"",
            "request_protocol=\"tcp\"",
            "connection_security_policy=\"mutual_tls\"",
        ];
        let with = |extra: &[&'static str]| -> Vec<&str> {
            base.iter().copied().chain(extra.iter().copied()).collect()
        };
        let b = "destination_principal=\"spiffe://cluster.local/ns/b/sa/sa-b\"";
        let other = "destination_principal=\"spiffe://cluster.local/ns/b/sa/sa-other\"";
        let opened = "istio_tcp_connections_opened_total";
        assert_eq!(series(&text, opened, &with(&[b])), Some(3.0), "{text}");
        assert_eq!(series(&text, opened, &with(&[other])), Some(1.0), "{text}");
        let closed = "istio_tcp_connections_closed_total";
        let ok = with(&[b, "response_flags=\"-\""]);
        assert_eq!(series(&text, closed, &ok), Some(2.0), "{text}");
        assert_eq!(series(&text, "istio_tcp_sent_bytes_total", &ok), Some(20.0));
        assert_eq!(
            series(&text, "istio_tcp_received_bytes_total", &ok),
            Some(40.0)
        );
        let deny = with(&[b, "response_flags=\"DENY\""]);
        assert_eq!(series(&text, closed, &deny), Some(1.0), "{text}");
        let unknown = [
            "reporter=\"destination\"",
            "source_workload=\"unknown\"",
            "source_principal=\"unknown\"",
            "connection_security_policy=\"unknown\"",
            b,
        ];
        assert_eq!(series(&text, opened, &unknown), Some(1.0), "{text}");
    }

    #[test]
    fn an_identity_value_matches_only_its_own_rendering() {
        let id = SpiffeId::new("td", "ns", "sa").unwrap();
        let v = Value::Identity(&id);
        assert!(v.same_as("spiffe://td/ns/ns/sa/sa"));
        for other in [
            "spiffe://td/ns/ns/sa/sa2",
            "spiffe://td/ns/ns/sa/s",
            "spiffe://td2/ns/ns/sa/sa",
            "spiffe://td/ns/nsx/sa/sa",
            "unknown",
            "",
        ] {
            assert!(!v.same_as(other), "{other}");
        }
        assert!(Value::Text("").same_as("unknown"));
        assert!(!Value::Text("x").same_as("unknown"));
    }
}
