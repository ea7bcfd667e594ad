//! Istio's request metrics with reporter `waypoint` and Istio's label set
//! (`istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`), and one JSON access-log line per request.
//!
//! Source labels come from the client's verified identity (its principal and namespace);
//! the source workload is named only when the waypoint's view of the mesh has it (it reads
//! the services it fronts and their backends, not every client), else `unknown`, as Istio
//! reports a peer it has no metadata for.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use trellis_core::SpiffeId;
use trellis_proto::istio::workload::{Service, Workload};

/// Istio's duration buckets (milliseconds).
const DURATION_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets (bytes).
const SIZE_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
    1000000000.0,
];

/// Installs the Prometheus recorder with Istio's histogram buckets.
pub fn install_metrics() -> Result<PrometheusHandle, crate::BoxError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("istio_request_duration_milliseconds".into()),
            DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full("istio_request_bytes".into()), SIZE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("istio_response_bytes".into()), SIZE_BUCKETS)?
        .install_recorder()?;
    metrics::describe_counter!("istio_requests_total", "requests handled by the waypoint");
    metrics::describe_histogram!(
        "istio_request_duration_milliseconds",
        "request duration, first byte in to last byte out"
    );
    metrics::describe_histogram!("istio_request_bytes", "request sizes (headers and body)");
    metrics::describe_histogram!("istio_response_bytes", "response sizes (headers and body)");
    Ok(handle)
}

/// What one request did, as logged and counted.
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    /// Client address (the HBONE peer).
    pub src: Option<SocketAddr>,
    /// The client's verified identity.
    pub source: Option<SpiffeId>,
    /// The client's workload (uid), when the waypoint knows it.
    pub source_workload: Option<String>,
    /// The service it went to (`namespace/hostname`).
    pub service: Option<String>,
    /// The endpoint chosen.
    pub upstream: Option<SocketAddr>,
    /// The endpoint's workload (uid).
    pub destination_workload: Option<String>,
    /// The endpoint's identity.
    pub destination: Option<SpiffeId>,
    /// Where the labels' workload and service details are looked up (once per label set).
    pub xds: Option<trellis_core::xds::XdsClient>,
    /// Method.
    pub method: String,
    /// `:authority` / Host.
    pub authority: String,
    /// Path (with query).
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// gRPC (content type `application/grpc`).
    pub grpc: bool,
    /// Response status.
    pub status: u16,
    /// `grpc-status` of the response (header or trailer).
    pub grpc_status: Option<String>,
    /// Envoy's response flags (`-` for none).
    pub flags: &'static str,
    /// The rule that routed it (`namespace/route/index`), or `default`.
    pub rule: String,
    /// Retries sent after the first attempt.
    pub retries: u32,
    /// Request bytes (headers and body).
    pub request_bytes: u64,
    /// Response bytes (headers and body).
    pub response_bytes: u64,
    /// First byte in to last byte out.
    pub duration: Duration,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// The authorization policy that decided it (denied it, or allowed it when ALLOW
    /// policies applied).
    pub policy: Option<String>,
    /// Its span, when traced.
    pub span: Option<crate::trace::Span>,
    /// `x-request-id` (kept only when traced).
    pub request_id: Option<String>,
}

/// The regular expressions whose matches log lines never show (`--mask-regex`).
static MASKS: std::sync::OnceLock<Vec<regex::Regex>> = std::sync::OnceLock::new();

/// Sets the masks (once, at start); an invalid expression is an error naming it.
pub fn set_masks(regexes: &[String]) -> Result<(), crate::BoxError> {
    let compiled = regexes
        .iter()
        .map(|r| regex::Regex::new(r).map_err(|e| format!("--mask-regex {r:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let _ = MASKS.set(compiled);
    Ok(())
}

/// `text` with every match of the masks replaced by `****` (borrowed when none matches).
pub fn mask(text: &str) -> std::borrow::Cow<'_, str> {
    let mut out = std::borrow::Cow::Borrowed(text);
    for re in MASKS.get().map(Vec::as_slice).unwrap_or(&[]) {
        if re.is_match(&out) {
            out = std::borrow::Cow::Owned(re.replace_all(&out, "****").into_owned());
        }
    }
    out
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".into()
    } else {
        s.to_string()
    }
}

/// The four series of one label set, registered once.
struct Handles {
    requests: metrics::Counter,
    duration: metrics::Histogram,
    request_bytes: metrics::Histogram,
    response_bytes: metrics::Histogram,
}

/// Label sets seen, by the values that make them (registering a series copies and sorts its
/// 25 labels and walks the registry: per request that cost more than the proxying). Bounded:
/// past [`CACHE_MAX`] entries it starts over (the recorder keeps the series).
static CACHE: std::sync::LazyLock<
    std::sync::RwLock<std::collections::HashMap<String, std::sync::Arc<Handles>>>,
> = std::sync::LazyLock::new(Default::default);
const CACHE_MAX: usize = 8192;

impl RequestRecord {
    /// What makes the label set: every value the labels are computed from.
    fn key(&self) -> String {
        use std::fmt::Write;
        let mut k = String::with_capacity(200);
        if let Some(s) = &self.source {
            let _ = write!(k, "{s}");
        }
        let _ = write!(
            k,
            "|{}|{}|{}|",
            self.source_workload.as_deref().unwrap_or(""),
            self.service.as_deref().unwrap_or(""),
            self.destination_workload.as_deref().unwrap_or(""),
        );
        if let Some(d) = &self.destination {
            let _ = write!(k, "{d}");
        }
        let _ = write!(
            k,
            "|{}|{}|{}|{}",
            self.status,
            self.grpc_status.as_deref().unwrap_or(""),
            self.flags,
            self.grpc,
        );
        k
    }

    fn labels(&self) -> Vec<metrics::Label> {
        let store = self.xds.as_ref().map(|x| x.store());
        let workload = |uid: &Option<String>| -> Option<Workload> {
            store.as_ref()?.workload(uid.as_deref()?).cloned()
        };
        let service: Option<Service> = self
            .service
            .as_deref()
            .and_then(|key| store.as_ref()?.service(key).cloned());
        let (sw, dw) = (
            workload(&self.source_workload),
            workload(&self.destination_workload),
        );
        let (sw, dw) = (sw.as_ref(), dw.as_ref());
        let name = |w: Option<&Workload>| {
            w.map(|w| {
                if w.workload_name.is_empty() {
                    w.name.clone()
                } else {
                    w.workload_name.clone()
                }
            })
            .unwrap_or_default()
        };
        let field =
            |w: Option<&Workload>, f: fn(&Workload) -> &str| w.map(f).unwrap_or("").to_string();
        let src_ns = sw
            .map(|w| w.namespace.clone())
            .or_else(|| self.source.as_ref().map(|s| s.namespace().to_string()))
            .unwrap_or_default();
        let svc = |f: fn(&Service) -> &str| service.as_ref().map(f).unwrap_or("").to_string();
        let pairs: [(&'static str, String); 25] = [
            ("reporter", "waypoint".into()),
            ("source_workload", name(sw)),
            ("source_canonical_service", field(sw, |w| &w.canonical_name)),
            (
                "source_canonical_revision",
                field(sw, |w| &w.canonical_revision),
            ),
            ("source_workload_namespace", src_ns),
            (
                "source_principal",
                self.source
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            ),
            ("source_app", field(sw, |w| &w.canonical_name)),
            ("source_version", field(sw, |w| &w.canonical_revision)),
            ("source_cluster", field(sw, |w| &w.cluster_id)),
            ("destination_workload", name(dw)),
            (
                "destination_workload_namespace",
                field(dw, |w| &w.namespace),
            ),
            (
                "destination_principal",
                self.destination
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            ),
            ("destination_app", field(dw, |w| &w.canonical_name)),
            ("destination_version", field(dw, |w| &w.canonical_revision)),
            ("destination_service", svc(|s| &s.hostname)),
            ("destination_service_name", svc(|s| &s.name)),
            ("destination_service_namespace", svc(|s| &s.namespace)),
            (
                "destination_canonical_service",
                field(dw, |w| &w.canonical_name),
            ),
            (
                "destination_canonical_revision",
                field(dw, |w| &w.canonical_revision),
            ),
            ("destination_cluster", field(dw, |w| &w.cluster_id)),
            (
                "request_protocol",
                if self.grpc { "grpc" } else { "http" }.into(),
            ),
            ("response_code", self.status.to_string()),
            (
                "grpc_response_status",
                // gRPC's codes are 0–16; anything else a backend sends is not a label value
                // (it would make a series per value).
                match self.grpc_status.as_deref().map(str::parse::<u8>) {
                    Some(Ok(code)) if code <= 16 => code.to_string(),
                    Some(_) => "unknown".to_string(),
                    None => String::new(),
                },
            ),
            ("response_flags", self.flags.to_string()),
            ("connection_security_policy", "mutual_tls".into()),
        ];
        pairs
            .into_iter()
            .map(|(k, v)| {
                let v = if k == "grpc_response_status" || k == "response_flags" {
                    if v.is_empty() { "-".to_string() } else { v }
                } else {
                    or_unknown(&v)
                };
                metrics::Label::new(k, v)
            })
            .collect()
    }

    fn handles(&self) -> std::sync::Arc<Handles> {
        let key = self.key();
        if let Some(h) = CACHE.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return h.clone();
        }
        let labels = self.labels();
        let h = std::sync::Arc::new(Handles {
            requests: metrics::counter!("istio_requests_total", labels.clone()),
            duration: metrics::histogram!("istio_request_duration_milliseconds", labels.clone()),
            request_bytes: metrics::histogram!("istio_request_bytes", labels.clone()),
            response_bytes: metrics::histogram!("istio_response_bytes", labels),
        });
        let mut cache = CACHE.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, h.clone());
        h
    }

    /// Counts the request, writes its access-log line and ends its span.
    pub fn finish(&self) {
        if let Some(span) = &self.span {
            let peer = self.source.as_ref().map(ToString::to_string);
            crate::trace::finish(
                span.clone(),
                &crate::trace::Outcome {
                    method: &self.method,
                    authority: &self.authority,
                    path: &mask(&self.path),
                    protocol: self.protocol,
                    status: self.status,
                    flags: self.flags,
                    service: self.service.as_deref(),
                    upstream: self.upstream,
                    peer: peer.as_deref(),
                    route: &self.rule,
                    request_id: self.request_id.as_deref(),
                    retries: self.retries,
                },
            );
        }
        let h = self.handles();
        h.requests.increment(1);
        h.duration.record(self.duration.as_secs_f64() * 1000.0);
        h.request_bytes.record(self.request_bytes as f64);
        h.response_bytes.record(self.response_bytes as f64);
        let service = self
            .service
            .as_deref()
            .and_then(|k| k.split_once('/'))
            .map_or("-", |(_, host)| host);
        tracing::info!(
            target: "access",
            src = %self.src.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            peer_identity = %self.source.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into()),
            method = %self.method,
            authority = %mask(&self.authority),
            path = %mask(&self.path),
            protocol = self.protocol,
            status = self.status,
            grpc_status = %self.grpc_status.as_deref().unwrap_or("-"),
            response_flags = self.flags,
            route = %self.rule,
            service = %service,
            upstream = %self.upstream.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            upstream_identity = %self.destination.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into()),
            bytes_received = self.request_bytes,
            bytes_sent = self.response_bytes,
            duration_ms = self.duration.as_millis() as u64,
            error = %mask(self.error.as_deref().unwrap_or("-")),
            policy = %self.policy.as_deref().unwrap_or("-"),
            retries = self.retries,
            "request complete"
        );
    }
}
