//! HTTP/1.1 + HTTP/2 echo server and a client that measures latency.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

/// Serves every connection with HTTP/1.1 or HTTP/2, whichever the client speaks (HTTP/2 is
/// recognised by its connection preface), over TLS when `tls` is given.
pub(crate) async fn server(
    listener: TcpListener,
    name: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let local = stream.local_addr()?;
        let name = name.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(req, name.clone(), peer, local));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let served = match tls {
                None => builder.serve_connection(TokioIo::new(stream), svc).await,
                Some(tls) => match tls.accept(stream).await {
                    Ok(s) => builder.serve_connection(TokioIo::new(s), svc).await,
                    Err(e) => {
                        println!("tls handshake from {peer}: {e}");
                        return;
                    }
                },
            };
            if let Err(e) = served {
                println!("http connection from {peer}: {e}");
            }
        });
    }
}

/// A TLS acceptor with the PEM certificate chain in `cert` and the PEM key in `key`.
pub(crate) fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("{}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("{}", key.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

type AnyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// The JWKS file `serve --jwks` serves at `/keys`.
pub(crate) static JWKS_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

async fn answer(
    req: Request<Incoming>,
    name: String,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<Response<AnyBody>, Infallible> {
    let is_grpc = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if is_grpc {
        println!("grpc {} from {peer}", req.uri().path());
        return Ok(crate::grpc::answer(req, &name)
            .await
            .map(BodyExt::boxed_unsync));
    }
    if let Some(rest) = req.uri().path().strip_prefix("/forward/") {
        // `/forward/<host:port>/<path>`: calls `http://<host:port>/<path>` with this
        // request's Authorization header (an app passing the end user's token on) and
        // answers with what it got.
        let (target, path) = rest.split_once('/').unwrap_or((rest, ""));
        let auth = req.headers().get(hyper::header::AUTHORIZATION).cloned();
        println!("forward to {target}/{path} from {peer}");
        let (status, body) = match forward(target, path, auth).await {
            Ok(r) => r,
            Err(e) => (
                StatusCode::BAD_GATEWAY,
                Bytes::from(format!("forward failed: {e:#}")),
            ),
        };
        let mut resp = Response::new(Full::new(body).boxed_unsync());
        *resp.status_mut() = status;
        return Ok(resp);
    }
    if req.uri().path() == "/keys"
        && let Some(path) = JWKS_FILE.get()
    {
        println!("jwks {} from {peer}", req.uri().path());
        let body = std::fs::read(path).unwrap_or_default();
        let mut resp = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        return Ok(resp);
    }
    if let Some((_, ms)) = req.uri().path().split_once("/drip/") {
        // The status and a first chunk now, the rest after `ms` milliseconds (a response
        // that starts promptly and ends late).
        println!("request {} {} from {peer}", req.method(), req.uri().path());
        let ms = ms.parse::<u64>().unwrap_or(0).min(60_000);
        let body = Drip {
            stage: 0,
            sleep: Box::pin(tokio::time::sleep(Duration::from_millis(ms))),
        };
        return Ok(Response::new(body.boxed_unsync()));
    }
    Ok(answer_http(req, name, peer, local)
        .await
        .map(BodyExt::boxed_unsync))
}

/// A body of two chunks, the second after a delay.
struct Drip {
    stage: u8,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Drip {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        use std::future::Future;
        use std::task::Poll;
        match self.stage {
            0 => {
                self.stage = 1;
                Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
                    b"first\n",
                )))))
            }
            1 => match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.stage = 2;
                    Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
                        b"rest\n",
                    )))))
                }
                Poll::Pending => Poll::Pending,
            },
            _ => Poll::Ready(None),
        }
    }
}

async fn answer_http(
    req: Request<Incoming>,
    name: String,
    peer: SocketAddr,
    local: SocketAddr,
) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let version = format!("{:?}", req.version());
    // One line per request: tests see which server got what (mirrors, retries).
    println!("request {method} {path} from {peer}");
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        headers
            .entry(k.as_str().to_string())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    if let Some(auth) = req.uri().authority() {
        headers
            .entry(":authority".into())
            .or_insert(auth.to_string());
    }
    let body_bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let mut status = StatusCode::OK;
    let route: Vec<&str> = path.split('?').next().unwrap_or("").split('/').collect();
    match route.as_slice() {
        ["", "status", code] => {
            if let Some(s) = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
                status = s;
            }
        }
        // 503 from the named pod only (one endpoint of a service failing).
        ["", "fail-on", pod] if *pod == name => {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
        ["", "flaky", percent] => {
            // 503 for `percent`% of the requests, at random (a backend failing a share).
            use std::hash::{BuildHasher, Hasher};
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            if h.finish() % 100 < percent.parse::<u64>().unwrap_or(0) {
                status = StatusCode::SERVICE_UNAVAILABLE;
            }
        }
        ["", "delay", ms] => {
            if let Ok(ms) = ms.parse::<u64>() {
                tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
            }
        }
        _ => {}
    }
    let body = json!({
        "pod": name,
        "method": method,
        "path": path,
        "version": version,
        "headers": headers,
        "peer": peer.to_string(),
        "local": local.to_string(),
        "body_bytes": body_bytes,
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) struct ClientOptions {
    pub(crate) url: Uri,
    pub(crate) requests: usize,
    pub(crate) http2: bool,
    pub(crate) method: Method,
    pub(crate) headers: Vec<String>,
    pub(crate) expect_status: Option<u16>,
    /// Responses that took at least this long are counted (`slow`).
    pub(crate) slow: Option<Duration>,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// Sends the requests one after the other on one connection and prints a JSON summary.
pub(crate) async fn client(opts: ClientOptions) -> Result<()> {
    let authority = opts
        .url
        .authority()
        .ok_or_else(|| anyhow!("URL {} has no host:port", opts.url))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host(), port))
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let local = stream.local_addr()?;
    let io = TokioIo::new(stream);
    let mut sender = if opts.http2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Sender::H1(s)
    };
    let mut extra = Vec::new();
    for h in &opts.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow!("header {h:?} is not `name: value`"))?;
        extra.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut latencies = Vec::with_capacity(opts.requests);
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    // Which server pod answered, per response (the body's `pod`, when it has one).
    let mut pods: BTreeMap<String, usize> = BTreeMap::new();
    let mut last_body = Value::Null;
    let mut last_headers = serde_json::Map::new();
    for _ in 0..opts.requests {
        let mut builder = Request::builder().method(opts.method.clone());
        builder = match sender {
            // HTTP/2 carries scheme and authority as pseudo-headers; HTTP/1.1 uses the
            // origin form plus Host.
            Sender::H2(_) => builder.uri(opts.url.clone()),
            Sender::H1(_) => builder
                .uri(opts.url.path_and_query().map_or("/", |p| p.as_str()))
                .header(hyper::header::HOST, authority.as_str()),
        };
        for (k, v) in &extra {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let req = builder.body(Full::new(Bytes::new()))?;
        let start = Instant::now();
        // A connection takes the next request only once it has finished the previous
        // exchange; `ready` waits for that (or reports the connection's death).
        let resp = match &mut sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let status = resp.status().as_u16();
        last_headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    json!(String::from_utf8_lossy(v.as_bytes())),
                )
            })
            .collect();
        let body = resp.into_body().collect().await?.to_bytes();
        latencies.push(start.elapsed());
        *statuses.entry(status).or_default() += 1;
        last_body = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        if let Some(pod) = last_body.get("pod").and_then(Value::as_str) {
            *pods.entry(pod.to_string()).or_default() += 1;
        }
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| {
        let idx = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1;
        ms(latencies[idx])
    };
    let mean = latencies.iter().map(|d| ms(*d)).sum::<f64>() / latencies.len().max(1) as f64;
    let summary = if latencies.is_empty() {
        json!({"requests": 0})
    } else {
        json!({
            "requests": latencies.len(),
            "local": local.to_string(),
            "statuses": statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "pods": pods.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "latency_ms": {"min": ms(latencies[0]), "p50": pct(0.5), "p90": pct(0.9),
                           "p99": pct(0.99), "max": ms(latencies[latencies.len() - 1]), "mean": mean},
            "slow": opts.slow.map(|t| latencies.iter().filter(|l| **l >= t).count()),
            "last_body": last_body,
            "last_headers": last_headers,
        })
    };
    println!("{summary}");
    if let Some(want) = opts.expect_status {
        let wrong: usize = statuses
            .iter()
            .filter(|(s, _)| **s != want)
            .map(|(_, n)| n)
            .sum();
        if wrong > 0 {
            bail!(
                "{wrong} of {} responses did not have status {want}: {statuses:?}",
                opts.requests
            );
        }
    }
    Ok(())
}

/// Closed-loop load: `concurrency` requests in flight at all times for `duration` (HTTP/1.1:
/// one connection per request in flight; HTTP/2: one connection carrying them all), small
/// GET requests; prints requests, errors, requests per second and latency percentiles (µs).
pub(crate) async fn load(
    url: Uri,
    concurrency: usize,
    duration: Duration,
    http2: bool,
) -> Result<()> {
    let authority = url
        .authority()
        .ok_or_else(|| anyhow!("URL {url} has no host:port"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let path = url.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let connect = || async {
        let s = TcpStream::connect((authority.host(), port))
            .await
            .with_context(|| format!("cannot connect to {authority}"))?;
        s.set_nodelay(true)?;
        Ok::<_, anyhow::Error>(TokioIo::new(s))
    };
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    let h2 = if http2 {
        let (s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), connect().await?).await?;
        tokio::spawn(conn);
        Some(s)
    } else {
        None
    };
    let start = Instant::now();
    for _ in 0..concurrency.max(1) {
        let (h2, authority, path) = (h2.clone(), authority.clone(), path.clone());
        let io = if h2.is_none() {
            Some(connect().await?)
        } else {
            None
        };
        tasks.spawn(async move {
            let mut lat: Vec<u32> = Vec::new();
            let mut errors = 0u64;
            let mut h1 = match io {
                Some(io) => {
                    let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
                    tokio::spawn(conn);
                    Some(s)
                }
                None => None,
            };
            let mut h2 = h2;
            while Instant::now() < deadline {
                let t = Instant::now();
                let result = if let Some(s) = h1.as_mut() {
                    let req = Request::get(path.as_str())
                        .header(hyper::header::HOST, authority.as_str())
                        .body(Full::new(Bytes::new()))?;
                    s.ready().await?;
                    s.send_request(req).await
                } else if let Some(s) = h2.as_mut() {
                    let req = Request::get(format!("http://{authority}{path}"))
                        .body(Full::new(Bytes::new()))?;
                    s.ready().await?;
                    s.send_request(req).await
                } else {
                    bail!("no connection");
                };
                match result {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.into_body().collect().await?;
                        lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    _ => errors += 1,
                }
            }
            Ok::<_, anyhow::Error>((lat, errors))
        });
    }
    let mut all: Vec<u32> = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (lat, e) = r??;
        all.extend(lat);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            return 0;
        }
        all[((p * all.len() as f64).ceil() as usize).clamp(1, all.len()) - 1]
    };
    println!(
        "{}",
        json!({
            "requests": all.len(),
            "errors": errors,
            "rps": all.len() as f64 / elapsed,
            "p50_us": pct(0.5),
            "p99_us": pct(0.99),
        })
    );
    Ok(())
}

/// The external authorizer (`ext-authz`): one line per check it answers.
pub(crate) async fn ext_authz_server(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| async move {
                let allow = req
                    .headers()
                    .get("x-ext-authz")
                    .is_some_and(|v| v.as_bytes() == b"allow");
                println!(
                    "check {} {} from {peer}: {}",
                    req.method(),
                    req.uri(),
                    if allow { "allowed" } else { "denied" }
                );
                let mut resp = Response::new(Full::new(Bytes::from(if allow {
                    ""
                } else {
                    "denied by ext_authz: no `x-ext-authz: allow` header"
                })));
                if !allow {
                    *resp.status_mut() = StatusCode::FORBIDDEN;
                }
                resp.headers_mut().insert(
                    "x-ext-authz-check-result",
                    hyper::header::HeaderValue::from_static(if allow {
                        "allowed"
                    } else {
                        "denied"
                    }),
                );
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// One HTTP/1.1 GET to `http://<target>/<path>`, with `auth` as its Authorization header.
async fn forward(
    target: &str,
    path: &str,
    auth: Option<hyper::header::HeaderValue>,
) -> Result<(StatusCode, Bytes)> {
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {target}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .uri(format!("/{path}"))
        .header(hyper::header::HOST, target);
    if let Some(a) = auth {
        builder = builder.header(hyper::header::AUTHORIZATION, a);
    }
    let resp = sender
        .send_request(builder.body(Full::new(Bytes::new()))?)
        .await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}
