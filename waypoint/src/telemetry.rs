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
    /// The client's workload, when the waypoint knows it.
    pub source_workload: Option<Workload>,
    /// The service it was addressed to.
    pub service: Option<Service>,
    /// The endpoint chosen.
    pub upstream: Option<SocketAddr>,
    /// The endpoint's workload.
    pub destination_workload: Option<Workload>,
    /// The endpoint's identity.
    pub destination: Option<SpiffeId>,
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
    /// Request bytes (headers and body).
    pub request_bytes: u64,
    /// Response bytes (headers and body).
    pub response_bytes: u64,
    /// First byte in to last byte out.
    pub duration: Duration,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".into()
    } else {
        s.to_string()
    }
}

impl RequestRecord {
    fn labels(&self) -> Vec<metrics::Label> {
        let sw = self.source_workload.as_ref();
        let dw = self.destination_workload.as_ref();
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
        let svc = |f: fn(&Service) -> &str| self.service.as_ref().map(f).unwrap_or("").to_string();
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
                self.grpc_status.clone().unwrap_or_default(),
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

    /// Counts the request and writes its access-log line.
    pub fn finish(&self) {
        let labels = self.labels();
        metrics::counter!("istio_requests_total", labels.clone()).increment(1);
        metrics::histogram!("istio_request_duration_milliseconds", labels.clone())
            .record(self.duration.as_secs_f64() * 1000.0);
        metrics::histogram!("istio_request_bytes", labels.clone())
            .record(self.request_bytes as f64);
        metrics::histogram!("istio_response_bytes", labels).record(self.response_bytes as f64);
        tracing::info!(
            target: "access",
            src = %self.src.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            peer_identity = %self.source.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into()),
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            protocol = self.protocol,
            status = self.status,
            grpc_status = %self.grpc_status.as_deref().unwrap_or("-"),
            response_flags = self.flags,
            route = %self.rule,
            service = %self.service.as_ref().map_or("-", |s| s.hostname.as_str()),
            upstream = %self.upstream.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            upstream_identity = %self.destination.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into()),
            bytes_received = self.request_bytes,
            bytes_sent = self.response_bytes,
            duration_ms = self.duration.as_millis() as u64,
            error = %self.error.as_deref().unwrap_or("-"),
            "request complete"
        );
    }
}
