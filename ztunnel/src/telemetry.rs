//! Metrics (Istio's names), the access log, and the small HTTP server on 15020 that serves
//! `/metrics` (readiness is on 15021 and the admin endpoint on 15000: see `admin`).
//!
//! One access-log line per connection, as a `tracing` event on target `access` (JSON when
//! ztunnel logs JSON). The metrics carry Istio's standard labels; what ztunnel does not
//! know yet (the peer's workload, before xDS is wired in issue 6) is `unknown`, as Istio
//! reports it.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

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
    Ok(handle)
}

/// The label set of one connection's metrics.
pub struct ConnLabels {
    labels: Vec<(&'static str, String)>,
}

impl ConnLabels {
    /// Labels for a connection of `pod` in `direction`; `mtls` when it is carried by HBONE.
    pub fn new(direction: Direction, pod: &PodInfo, mtls: bool) -> ConnLabels {
        let unknown = || "unknown".to_string();
        let (reporter, src_wl, src_ns, dst_wl, dst_ns) = match direction {
            Direction::Outbound => (
                "source",
                pod.name.clone(),
                pod.namespace.clone(),
                unknown(),
                unknown(),
            ),
            Direction::Inbound => (
                "destination",
                unknown(),
                unknown(),
                pod.name.clone(),
                pod.namespace.clone(),
            ),
        };
        ConnLabels {
            labels: vec![
                ("reporter", reporter.to_string()),
                ("source_workload", src_wl),
                ("source_workload_namespace", src_ns),
                ("destination_workload", dst_wl),
                ("destination_workload_namespace", dst_ns),
                (
                    "connection_security_policy",
                    if mtls { "mutual_tls" } else { "none" }.to_string(),
                ),
                ("response_flags", "-".to_string()),
            ],
        }
    }

    /// Counts an opened connection.
    pub fn opened(&self) {
        metrics::counter!("istio_tcp_connections_opened_total", &self.labels).increment(1);
    }

    /// Counts a closed connection and its bytes.
    pub fn closed(&self, sent: u64, received: u64) {
        metrics::counter!("istio_tcp_connections_closed_total", &self.labels).increment(1);
        metrics::counter!("istio_tcp_sent_bytes_total", &self.labels).increment(sent);
        metrics::counter!("istio_tcp_received_bytes_total", &self.labels).increment(received);
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

/// Writes the connection's access-log line.
pub fn access_log(l: &AccessLog<'_>) {
    tracing::info!(
        target: "access",
        direction = l.direction.as_str(),
        pod = %format!("{}/{}", l.pod.namespace, l.pod.name),
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

/// Serves `/metrics` on `addr`; returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: PrometheusHandle) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let body = respond(&req, &metrics);
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

fn respond<B>(req: &hyper::Request<B>, metrics: &PrometheusHandle) -> hyper::Response<Full<Bytes>> {
    let (code, body) = match req.uri().path() {
        "/metrics" => (200, metrics.render()),
        _ => (404, "try /metrics\n".to_string()),
    };
    hyper::Response::builder()
        .status(code)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}
