//! Request tracing: a span per request, W3C Trace Context propagated, exported over
//! OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`) when an
//! endpoint is configured.
//!
//! - **Context**: a valid `traceparent` (`00-<trace>-<parent>-<flags>`) continues its trace
//!   and its sampling decision (bit 0 of the flags), as Envoy honours an upstream
//!   decision; without one, a new trace is sampled with probability `sampling` percent.
//!   A sampled request goes upstream with `traceparent` naming the waypoint's span as the
//!   parent (`tracestate` passed on as is); an unsampled one keeps its headers untouched.
//! - **Span**: kind SERVER, named `<method> <authority>`, with OpenTelemetry's HTTP
//!   attributes and Istio's (`upstream_cluster`, `response_flags`, `istio.canonical_service`,
//!   `guid:x-request-id`); status ERROR for 5xx. Resource `service.name` is the waypoint's
//!   `<name>.<namespace>` (Istio's convention).
//! - **Export**: spans queue in a bounded channel (a full queue drops the span and counts
//!   it: a slow collector never slows requests), leave in batches of up to 512 or every
//!   500 ms, over one plaintext HTTP/2 connection, re-made after a failure.
//! - **Disabled** (no endpoint): no tracer is installed; a request pays one atomic load.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use prost::Message;
use trellis_proto::opentelemetry::proto::collector::trace::v1 as otlp;

/// What the tracer is set up with.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// The OTLP/gRPC collector, `host:port` or `http://host:port`.
    pub endpoint: String,
    /// Share of new traces sampled, percent (0 to 100).
    pub sampling: f64,
    /// `service.name` of the spans.
    pub service_name: String,
}

/// The installed tracer.
struct Tracer {
    sampling: f64,
    queue: tokio::sync::mpsc::Sender<otlp::Span>,
}

static TRACER: OnceLock<Tracer> = OnceLock::new();

/// Spans dropped because the export queue was full.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Spans exported (acknowledged by the collector).
pub static EXPORTED: AtomicU64 = AtomicU64::new(0);

const QUEUE: usize = 4096;
const BATCH: usize = 512;
const FLUSH: Duration = Duration::from_millis(500);

/// The span of one sampled request, open until [`finish`].
#[derive(Debug, Clone)]
pub struct Span {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    flags: u8,
    trace_state: String,
    start: u64,
}

/// A parsed `traceparent`: trace id, parent span id, flags.
pub fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    // version "-" trace-id "-" parent-id "-" flags; version ff is invalid; a later
    // version may append fields after a dash (read the first four).
    if v.len() < 55 || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex::<1>(&v[0..2])?[0];
    if version == 0xff || (version == 0 && v.len() != 55) {
        return None;
    }
    let trace = hex::<16>(&v[3..35])?;
    let parent = hex::<8>(&v[36..52])?;
    let flags = hex::<1>(&v[53..55])?[0];
    if trace == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace, parent, flags))
}

fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    if s.len() != 2 * N {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(s[2 * i])? << 4 | digit(s[2 * i + 1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
}

/// `traceparent` for a span.
pub fn traceparent(trace: &[u8; 16], span: &[u8; 8], flags: u8) -> String {
    let mut s = String::with_capacity(55);
    s.push_str("00-");
    to_hex(trace, &mut s);
    s.push('-');
    to_hex(span, &mut s);
    s.push('-');
    to_hex(&[flags], &mut s);
    s
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn nonzero_random() -> u64 {
    loop {
        let r = trellis_core::routing::random_u64();
        if r != 0 {
            return r;
        }
    }
}

/// Starts the span of a request with `headers` (and rewrites its `traceparent` for the
/// upstream); `None` when tracing is off or the request is not sampled.
pub fn begin(headers: &mut HeaderMap) -> Option<Span> {
    let tracer = TRACER.get()?;
    begin_with(tracer.sampling, headers)
}

fn begin_with(sampling: f64, headers: &mut HeaderMap) -> Option<Span> {
    let incoming = headers
        .get("traceparent")
        .and_then(|v| parse_traceparent(v.as_bytes()));
    let (trace_id, parent, flags) = match incoming {
        Some((t, p, f)) if f & 1 == 1 => (t, Some(p), f),
        Some(_) => return None,
        None => {
            if !crate::local::chance(trellis_core::routing::random_u64(), sampling / 100.0) {
                return None;
            }
            let mut t = [0u8; 16];
            t[..8].copy_from_slice(&nonzero_random().to_be_bytes());
            t[8..].copy_from_slice(&trellis_core::routing::random_u64().to_be_bytes());
            (t, None, 1)
        }
    };
    let span_id = nonzero_random().to_be_bytes();
    if let Ok(v) = HeaderValue::from_str(&traceparent(&trace_id, &span_id, flags)) {
        headers.insert("traceparent", v);
    }
    let trace_state = headers
        .get("tracestate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_default();
    Some(Span {
        trace_id,
        span_id,
        parent,
        flags,
        trace_state,
        start: now_nanos(),
    })
}

/// What a finished request's span says.
pub struct Outcome<'a> {
    /// Method.
    pub method: &'a str,
    /// `:authority`.
    pub authority: &'a str,
    /// Path with query.
    pub path: &'a str,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    /// Response status.
    pub status: u16,
    /// Envoy's response flags.
    pub flags: &'a str,
    /// The service it went to (`namespace/hostname`).
    pub service: Option<&'a str>,
    /// The endpoint.
    pub upstream: Option<SocketAddr>,
    /// The client's identity.
    pub peer: Option<&'a str>,
    /// The rule that routed it.
    pub route: &'a str,
    /// `x-request-id`.
    pub request_id: Option<&'a str>,
    /// Retries after the first attempt.
    pub retries: u32,
}

fn kv(key: &str, value: otlp::any_value::Value) -> otlp::KeyValue {
    otlp::KeyValue {
        key: key.to_string(),
        value: Some(otlp::AnyValue { value: Some(value) }),
    }
}

fn text(key: &str, value: &str) -> otlp::KeyValue {
    kv(key, otlp::any_value::Value::StringValue(value.to_string()))
}

/// Ends `span` with what the request did and queues it for export.
pub fn finish(span: Span, o: &Outcome<'_>) {
    let Some(tracer) = TRACER.get() else { return };
    let end = now_nanos();
    let _ = tracer
        .queue
        .try_send(to_otlp(span, o, end))
        .map_err(|_| DROPPED.fetch_add(1, Ordering::Relaxed));
}

fn to_otlp(span: Span, o: &Outcome<'_>, end: u64) -> otlp::Span {
    use otlp::any_value::Value;
    let mut attributes = vec![
        text("http.request.method", o.method),
        text("server.address", o.authority),
        text("url.path", o.path),
        text(
            "network.protocol.version",
            o.protocol.strip_prefix("HTTP/").unwrap_or(o.protocol),
        ),
        kv(
            "http.response.status_code",
            Value::IntValue(i64::from(o.status)),
        ),
        text("response_flags", o.flags),
        text("component", "proxy"),
        text("route", o.route),
    ];
    if let Some(s) = o.service {
        let host = s.split_once('/').map_or(s, |(_, h)| h);
        attributes.push(text("istio.canonical_service", host));
        attributes.push(text("upstream_cluster", host));
    }
    if let Some(u) = o.upstream {
        attributes.push(text("upstream.address", &u.to_string()));
    }
    if let Some(p) = o.peer {
        attributes.push(text("peer.identity", p));
    }
    if let Some(id) = o.request_id {
        attributes.push(text("guid:x-request-id", id));
    }
    if o.retries > 0 {
        attributes.push(kv(
            "http.request.resend_count",
            Value::IntValue(i64::from(o.retries)),
        ));
    }
    otlp::Span {
        trace_id: span.trace_id.to_vec(),
        span_id: span.span_id.to_vec(),
        trace_state: span.trace_state,
        parent_span_id: span.parent.map(|p| p.to_vec()).unwrap_or_default(),
        name: format!("{} {}", o.method, o.authority),
        kind: otlp::span::SpanKind::Server as i32,
        start_time_unix_nano: span.start,
        end_time_unix_nano: end.max(span.start),
        attributes,
        status: (o.status >= 500).then(|| otlp::Status {
            message: format!("HTTP {}", o.status),
            code: otlp::status::StatusCode::Error as i32,
        }),
        // W3C flags, and "the parent is remote" known and true when there is one.
        flags: u32::from(span.flags) | if span.parent.is_some() { 0x300 } else { 0x100 },
    }
}

/// Installs the tracer and starts its exporter on the current runtime. An endpoint that
/// does not parse is an error naming it.
pub fn install(config: TraceConfig) -> Result<(), crate::BoxError> {
    if !(0.0..=100.0).contains(&config.sampling) {
        return Err(format!(
            "--tracing-sampling {}: not a percentage (0 to 100)",
            config.sampling
        )
        .into());
    }
    let authority = config
        .endpoint
        .strip_prefix("http://")
        .unwrap_or(&config.endpoint)
        .trim_end_matches('/')
        .to_string();
    if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
        return Err(format!(
            "--tracing-endpoint {:?}: expected host:port or http://host:port (OTLP/gRPC)",
            config.endpoint
        )
        .into());
    }
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
    if TRACER
        .set(Tracer {
            sampling: config.sampling,
            queue: tx,
        })
        .is_err()
    {
        return Err("the tracer is already installed".into());
    }
    tokio::spawn(export(authority, config.service_name, rx));
    Ok(())
}

type Sender = hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>;

async fn connect(authority: &str) -> Result<Sender, crate::BoxError> {
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    .map_err(|_| "connect timed out")??;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn send(
    sender: &mut Sender,
    authority: &str,
    request: &otlp::ExportTraceServiceRequest,
) -> Result<(), crate::BoxError> {
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!(
            "http://{authority}/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        ))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(http_body_util::Full::new(crate::grpc::frame(
            &request.encode_to_vec(),
        )))?;
    sender.ready().await?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "the collector did not answer within 10s")??;
    crate::grpc::unary_reply(resp).await?;
    Ok(())
}

async fn export(
    authority: String,
    service_name: String,
    mut rx: tokio::sync::mpsc::Receiver<otlp::Span>,
) {
    let resource = otlp::Resource {
        attributes: vec![text("service.name", &service_name)],
    };
    let scope = otlp::InstrumentationScope {
        name: "trellis-waypoint".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let mut sender: Option<Sender> = None;
    let mut batch = Vec::with_capacity(BATCH);
    let mut failures = 0u64;
    loop {
        // The first span of a batch, then whatever comes within the flush interval.
        match rx.recv().await {
            Some(s) => batch.push(s),
            None => return,
        }
        let deadline = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let request = otlp::ExportTraceServiceRequest {
            resource_spans: vec![otlp::ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![otlp::ScopeSpans {
                    scope: Some(scope.clone()),
                    spans: std::mem::take(&mut batch),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let result = async {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                sender = Some(connect(&authority).await?);
            }
            match sender.as_mut() {
                Some(s) => send(s, &authority, &request).await,
                None => Err("no connection".into()),
            }
        }
        .await;
        match result {
            Ok(()) => {
                EXPORTED.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                sender = None;
                failures += 1;
                DROPPED.fetch_add(n, Ordering::Relaxed);
                // The first failure, then one in a hundred: a collector that is down
                // must not flood the log.
                if failures == 1 || failures.is_multiple_of(100) {
                    tracing::warn!(collector = %authority, error = %e, spans = n, failures, "spans not exported");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_refused() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, p, f) = parse_traceparent(tp).unwrap();
        assert_eq!(f, 1);
        assert_eq!(traceparent(&t, &p, f).as_bytes(), tp);
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"",
        ] {
            assert!(
                parse_traceparent(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A later version may add fields.
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more")
                .is_some()
        );
    }

    #[test]
    fn a_sampled_parent_is_continued_and_the_waypoint_becomes_the_parent() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        h.insert("tracestate", HeaderValue::from_static("vendor=x"));
        let span = begin_with(0.0, &mut h).expect("the parent's decision is kept");
        let (t, p, _) = parse_traceparent(h["traceparent"].as_bytes()).unwrap();
        assert_eq!(t, span.trace_id);
        assert_eq!(
            p, span.span_id,
            "the upstream's parent is the waypoint's span"
        );
        assert_eq!(
            span.parent,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert_eq!(span.trace_state, "vendor=x");
        // An unsampled parent: no span, headers untouched.
        let mut h = HeaderMap::new();
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        h.insert("traceparent", HeaderValue::from_static(unsampled));
        assert!(begin_with(100.0, &mut h).is_none());
        assert_eq!(h["traceparent"], unsampled);
    }

    #[test]
    fn new_traces_are_sampled_at_the_configured_rate() {
        let sampled = (0..10_000)
            .filter(|_| begin_with(10.0, &mut HeaderMap::new()).is_some())
            .count();
        assert!((800..=1200).contains(&sampled), "{sampled} of 10000 at 10%");
        assert!(begin_with(0.0, &mut HeaderMap::new()).is_none());
        let mut h = HeaderMap::new();
        let span = begin_with(100.0, &mut h).unwrap();
        assert!(span.parent.is_none());
        assert!(parse_traceparent(h["traceparent"].as_bytes()).is_some());
    }

    #[test]
    fn a_finished_span_carries_the_request() {
        let mut h = HeaderMap::new();
        let span = begin_with(100.0, &mut h).unwrap();
        let o = Outcome {
            method: "GET",
            authority: "web.shop:80",
            path: "/x",
            protocol: "HTTP/1.1",
            status: 503,
            flags: "URX",
            service: Some("shop/web.shop.svc.cluster.local"),
            upstream: None,
            peer: None,
            route: "default",
            request_id: Some("abc"),
            retries: 2,
        };
        let s = to_otlp(span, &o, u64::MAX);
        assert_eq!(s.name, "GET web.shop:80");
        assert_eq!(s.parent_span_id.len(), 0);
        assert_eq!(
            s.status.as_ref().unwrap().code,
            otlp::status::StatusCode::Error as i32
        );
        let keys: Vec<&str> = s.attributes.iter().map(|a| a.key.as_str()).collect();
        for k in [
            "http.response.status_code",
            "upstream_cluster",
            "guid:x-request-id",
            "http.request.resend_count",
        ] {
            assert!(keys.contains(&k), "{k} missing: {keys:?}");
        }
        // It encodes as OTLP.
        assert!(!s.encode_to_vec().is_empty());
    }
}
