//! Metrics (Istio's names), the access log, and the small HTTP server on 15020 that serves
//! `/metrics` (readiness is on 15021 and the admin endpoint on 15000: see `admin`).
//!
//! One access-log line per connection, as a `tracing` event on target `access` (JSON when
//! ztunnel logs JSON). The metrics carry Istio's standard TCP labels, filled from xDS (the
//! workloads at both ends, the service the client addressed) and the identities (verified
//! for the peer of inbound HBONE); what is not known is `unknown`, as Istio reports it.

use std::net::SocketAddr;
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
/// of the workload at that address, and its identity.
#[derive(Debug, Clone)]
pub struct End {
    workload: String,
    namespace: String,
    principal: String,
    app: String,
    version: String,
    canonical_service: String,
    canonical_revision: String,
    cluster: String,
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".into()
    } else {
        s.to_string()
    }
}

impl End {
    /// The end at workload `w` (when xDS knows it) with identity `principal` (verified for
    /// the peer of inbound HBONE, expected for outbound, the pod's own for the local end).
    pub fn new(w: Option<&Workload>, principal: Option<&SpiffeId>) -> End {
        // Read in place: this runs for every connection (no copy of the workload).
        let field = |f: fn(&Workload) -> &str| or_unknown(w.map_or("", f));
        End {
            workload: field(|w| {
                if w.workload_name.is_empty() {
                    &w.name
                } else {
                    &w.workload_name
                }
            }),
            namespace: field(|w| &w.namespace),
            principal: principal.map_or_else(|| "unknown".into(), ToString::to_string),
            app: field(|w| &w.canonical_name),
            version: field(|w| &w.canonical_revision),
            canonical_service: field(|w| &w.canonical_name),
            canonical_revision: field(|w| &w.canonical_revision),
            cluster: field(|w| &w.cluster_id),
        }
    }

    /// The local pod when xDS does not (yet) know it: what ZDS said.
    pub fn pod(pod: &PodInfo, principal: Option<&SpiffeId>) -> End {
        let mut e = End::new(None, principal);
        e.workload = pod.name.clone();
        e.namespace = pod.namespace.clone();
        e
    }
}

/// The label set of one connection's metrics: Istio's standard TCP labels.
pub struct ConnLabels {
    labels: Vec<(&'static str, String)>,
}

impl ConnLabels {
    /// Labels for a connection in `direction` between `source` and `destination` (to
    /// `service` when the client addressed one); `mtls` when it is carried by HBONE.
    pub fn new(
        direction: Direction,
        source: &End,
        destination: &End,
        service: Option<&Service>,
        mtls: bool,
    ) -> ConnLabels {
        let reporter = match direction {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        };
        let (svc, svc_name, svc_ns) = service.map_or_else(
            || ("unknown".into(), "unknown".into(), "unknown".into()),
            |s| {
                (
                    or_unknown(&s.hostname),
                    or_unknown(&s.name),
                    or_unknown(&s.namespace),
                )
            },
        );
        let mut labels = vec![("reporter", reporter.to_string())];
        for (prefix, e) in [("source", source), ("destination", destination)] {
            let [w, ns, p, app, v, cs, cr, c] = match prefix {
                "source" => [
                    "source_workload",
                    "source_workload_namespace",
                    "source_principal",
                    "source_app",
                    "source_version",
                    "source_canonical_service",
                    "source_canonical_revision",
                    "source_cluster",
                ],
                _ => [
                    "destination_workload",
                    "destination_workload_namespace",
                    "destination_principal",
                    "destination_app",
                    "destination_version",
                    "destination_canonical_service",
                    "destination_canonical_revision",
                    "destination_cluster",
                ],
            };
            labels.extend([
                (w, e.workload.clone()),
                (ns, e.namespace.clone()),
                (p, e.principal.clone()),
                (app, e.app.clone()),
                (v, e.version.clone()),
                (cs, e.canonical_service.clone()),
                (cr, e.canonical_revision.clone()),
                (c, e.cluster.clone()),
            ]);
        }
        labels.extend([
            ("destination_service", svc),
            ("destination_service_name", svc_name),
            ("destination_service_namespace", svc_ns),
            ("request_protocol", "tcp".to_string()),
            ("response_flags", "-".to_string()),
            (
                "connection_security_policy",
                if mtls { "mutual_tls" } else { "unknown" }.to_string(),
            ),
        ]);
        ConnLabels { labels }
    }

    /// Counts an opened connection.
    pub fn opened(&self) {
        metrics::counter!("istio_tcp_connections_opened_total", &self.labels).increment(1);
    }

    /// Counts a closed connection and its bytes; `flags` is Istio's response flag (`-`,
    /// `DENY` for a policy deny, `CONNECT` when the upstream could not be reached).
    pub fn closed(&mut self, flags: &str, sent: u64, received: u64) {
        if let Some(f) = self.labels.iter_mut().find(|(k, _)| *k == "response_flags") {
            f.1 = flags.to_string();
        }
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
