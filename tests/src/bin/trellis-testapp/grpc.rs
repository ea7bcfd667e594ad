//! A minimal gRPC service and client over HTTP/2 (length-prefixed messages, status in the
//! trailers), enough to check that a proxy keeps trailers and `grpc-status` intact:
//! `/test.Echo/Unary` answers `<pod>:<message>`; `/test.Echo/Stream` with message `N`
//! answers N messages `<pod>:<i>`; `/test.Echo/Fail` answers no message and status 13.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use anyhow::{Context as _, Result, anyhow};
use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpStream;

/// A body of frames known in advance (messages, then trailers).
pub(crate) struct Frames(pub(crate) VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

fn framed(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(msg.len()).unwrap_or(u32::MAX));
    b.put_slice(msg);
    b.freeze()
}

/// The messages of a length-prefixed body.
fn messages(mut body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        if body.len() < 5 + len {
            break;
        }
        out.push(String::from_utf8_lossy(&body[5..5 + len]).into_owned());
        body = &body[5 + len..];
    }
    out
}

/// Answers one gRPC call.
pub(crate) async fn answer(req: Request<Incoming>, pod: &str) -> Response<Frames> {
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let input = messages(&body).into_iter().next().unwrap_or_default();
    let mut frames = VecDeque::new();
    let status = match path.as_str() {
        "/test.Echo/Unary" => {
            frames.push_back(Frame::data(framed(format!("{pod}:{input}").as_bytes())));
            "0"
        }
        "/test.Echo/Stream" => {
            for i in 0..input.parse::<usize>().unwrap_or(1).min(10_000) {
                frames.push_back(Frame::data(framed(format!("{pod}:{i}").as_bytes())));
            }
            "0"
        }
        "/test.Echo/Fail" => "13",
        _ => "12",
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", status.parse().expect("status"));
    trailers.insert("grpc-message", "from-testapp".parse().expect("message"));
    frames.push_back(Frame::trailers(trailers));
    let mut resp = Response::new(Frames(frames));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/grpc".parse().expect("ct"),
    );
    resp
}

/// Calls `method` at `url` with `message` over HTTP/2 and prints the messages and the
/// status from the trailers.
pub(crate) async fn call(url: Uri, method: &str, message: &str) -> Result<()> {
    let authority = url
        .authority()
        .ok_or_else(|| anyhow!("URL {url} has no host:port"))?
        .clone();
    let stream = TcpStream::connect((authority.host(), authority.port_u16().unwrap_or(80)))
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(framed(message.as_bytes())))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(d) = frame.data_ref() {
            data.extend_from_slice(d);
        } else if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    let get = |k: &str| {
        trailers
            .as_ref()
            .and_then(|t| t.get(k))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    println!(
        "{}",
        json!({
            "status": status,
            "messages": messages(&data),
            "grpc_status": get("grpc-status"),
            "grpc_message": get("grpc-message"),
        })
    );
    Ok(())
}

/// The gRPC external authorizer (`envoy.service.auth.v3.Authorization/Check`): allows a
/// request whose headers carry `x-ext-authz: allow` (adding `x-ext-authz-check-result:
/// allowed` upstream), denies the rest (403, `x-ext-authz-check-result: denied`, a body).
pub(crate) async fn ext_authz_server(listener: tokio::net::TcpListener) -> Result<()> {
    use prost::Message;
    use trellis_proto::envoy::config::core::v3 as core;
    use trellis_proto::envoy::service::auth::v3 as authz;
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                let path = req.uri().path().to_string();
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let check = (body.len() >= 5)
                    .then(|| authz::CheckRequest::decode(&body[5..]).ok())
                    .flatten()
                    .unwrap_or_default();
                let http = check
                    .attributes
                    .and_then(|a| a.request)
                    .and_then(|r| r.http)
                    .unwrap_or_default();
                let allow = http.headers.get("x-ext-authz").map(String::as_str) == Some("allow");
                println!(
                    "grpc check {path} {} {} from {peer}: {}",
                    http.method,
                    http.path,
                    if allow { "allowed" } else { "denied" }
                );
                let header = |v: &str| core::HeaderValueOption {
                    header: Some(core::HeaderValue {
                        key: "x-ext-authz-check-result".into(),
                        value: v.into(),
                        raw_value: Vec::new(),
                    }),
                    ..Default::default()
                };
                let answer = if allow {
                    authz::CheckResponse {
                        status: Some(trellis_proto::google::rpc::Status::default()),
                        http_response: Some(authz::check_response::HttpResponse::OkResponse(
                            authz::OkHttpResponse {
                                headers: vec![header("allowed")],
                                ..Default::default()
                            },
                        )),
                    }
                } else {
                    authz::CheckResponse {
                        status: Some(trellis_proto::google::rpc::Status {
                            code: 7,
                            ..Default::default()
                        }),
                        http_response: Some(authz::check_response::HttpResponse::DeniedResponse(
                            authz::DeniedHttpResponse {
                                status: Some(trellis_proto::envoy::r#type::v3::HttpStatus {
                                    code: 403,
                                }),
                                headers: vec![header("denied")],
                                body: "denied by ext_authz (gRPC): no `x-ext-authz: allow` header"
                                    .into(),
                            },
                        )),
                    }
                };
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                let frames = Frames(VecDeque::from([
                    Frame::data(framed(&answer.encode_to_vec())),
                    Frame::trailers(trailers),
                ]));
                let mut resp = Response::new(frames);
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/grpc"),
                );
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// An OTLP/gRPC trace receiver (`opentelemetry.proto.collector.trace.v1.TraceService/
/// Export`, as an OpenTelemetry Collector serves it on 4317): prints one line
/// `span {json}` per span received (ids in hex, the resource's `service.name`, the
/// attributes) and acknowledges the batch.
pub(crate) async fn otlp_collector(listener: tokio::net::TcpListener) -> Result<()> {
    use prost::Message;
    use trellis_proto::opentelemetry::proto::collector::trace::v1 as otlp;
    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
    fn value(v: &Option<otlp::AnyValue>) -> serde_json::Value {
        use otlp::any_value::Value as V;
        match v.as_ref().and_then(|v| v.value.as_ref()) {
            Some(V::StringValue(s)) => json!(s),
            Some(V::BoolValue(b)) => json!(b),
            Some(V::IntValue(i)) => json!(i),
            Some(V::DoubleValue(d)) => json!(d),
            None => serde_json::Value::Null,
        }
    }
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                let path = req.uri().path().to_string();
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let status =
                    if path != "/opentelemetry.proto.collector.trace.v1.TraceService/Export" {
                        "12"
                    } else if let Some(export) = (body.len() >= 5)
                        .then(|| otlp::ExportTraceServiceRequest::decode(&body[5..]).ok())
                        .flatten()
                    {
                        for rs in &export.resource_spans {
                            let service = rs
                                .resource
                                .as_ref()
                                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                                .map(|a| value(&a.value))
                                .unwrap_or_default();
                            for ss in &rs.scope_spans {
                                for s in &ss.spans {
                                    let attributes: serde_json::Map<String, serde_json::Value> = s
                                        .attributes
                                        .iter()
                                        .map(|a| (a.key.clone(), value(&a.value)))
                                        .collect();
                                    println!(
                                        "span {}",
                                        json!({
                                            "service": service,
                                            "scope": ss.scope.as_ref().map(|s| s.name.clone()),
                                            "trace_id": hex(&s.trace_id),
                                            "span_id": hex(&s.span_id),
                                            "parent_span_id": hex(&s.parent_span_id),
                                            "name": s.name,
                                            "kind": s.kind,
                                            "start": s.start_time_unix_nano,
                                            "end": s.end_time_unix_nano,
                                            "status": s.status.as_ref().map(|st| st.code),
                                            "attributes": attributes,
                                        })
                                    );
                                }
                            }
                        }
                        "0"
                    } else {
                        "3"
                    };
                let mut frames = VecDeque::new();
                if status == "0" {
                    let ack = otlp::ExportTraceServiceResponse::default().encode_to_vec();
                    frames.push_back(Frame::data(framed(&ack)));
                }
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", status.parse().expect("status"));
                frames.push_back(Frame::trailers(trailers));
                let mut resp = Response::new(Frames(frames));
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    "application/grpc".parse().expect("ct"),
                );
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
