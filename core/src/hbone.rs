//! HBONE: TCP connections tunnelled as HTTP/2 `CONNECT` streams over mutual TLS 1.3.
//!
//! One TLS connection (identities on both ends, see [`crate::tls`]) carries many streams;
//! each stream is one tunnelled TCP connection whose target is the `:authority` of its
//! `CONNECT` (`ip:port`). The server answers 200 and the stream's DATA frames are the
//! connection's bytes; end of stream is the TCP half-close; a reset is an abort.
//!
//! This module is the protocol: a client connection that opens streams, a server that
//! accepts them, and [`H2Stream`], which makes a stream an `AsyncRead + AsyncWrite` to copy
//! to and from a socket. Pooling and the decisions (which peer, which identity, policy) live
//! in ztunnel.

pub mod pool;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Flow-control windows. Why these sizes: a stream window is what one tunnelled connection
/// may have in flight before the peer reads; at 4 MiB a single stream fills a 1 Gbit/s
/// path with up to ~30 ms RTT (bandwidth × delay) — enough for node-to-node and cross-zone
/// traffic. The connection window is four streams' worth, so one bulk transfer cannot starve
/// the other streams sharing the TLS connection. h2's defaults (64 KiB) would cap a stream
/// at ~50 Mbit/s at 10 ms RTT.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// See [`STREAM_WINDOW`].
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest DATA frame we send: larger frames mean fewer headers and syscalls per byte;
/// 256 KiB keeps one stream from holding the connection for long.
pub const MAX_FRAME: u32 = 256 << 10;
/// Most concurrent streams (tunnelled connections) per TLS connection; the pool opens
/// another connection beyond this.
pub const MAX_STREAMS: u32 = 100;

/// What can go wrong on an HBONE connection or stream.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// HTTP/2 failed (handshake, reset, GOAWAY).
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    /// The peer refused the CONNECT with this status.
    #[error("the peer answered {0} to CONNECT")]
    Refused(StatusCode),
    /// A request that is not a valid HBONE CONNECT.
    #[error("invalid HBONE request: {0}")]
    BadRequest(String),
    /// The client could not open the connection: no certificate, TCP connect, or the TLS
    /// handshake (the peer's identity is not the expected one, an unknown CA, ...). The
    /// text says which, with the peer.
    #[error("{0}")]
    Dial(String),
    /// Took too long.
    #[error("HBONE {0} timed out")]
    Timeout(&'static str),
}

/// The receiving half: the response's body, or (for a CONNECT sent without waiting) the
/// response still to come.
enum Recv {
    Ready(RecvStream),
    Waiting {
        response: h2::client::ResponseFuture,
        deadline: Pin<Box<tokio::time::Sleep>>,
    },
    Refused(StatusCode),
}

/// One tunnelled connection: reads what the peer sends on the stream, writes DATA frames.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: Recv,
    /// Bytes received but not yet read.
    pending: Bytes,
    /// The peer ended its side.
    eof: bool,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream").finish_non_exhaustive()
    }
}

impl H2Stream {
    fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream {
            send,
            recv: Recv::Ready(recv),
            pending: Bytes::new(),
            eof: false,
        }
    }

    /// Aborts the stream (RST_STREAM): the peer sees the tunnelled connection reset.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

/// A refused CONNECT as the I/O error a read or write of the stream reports.
fn refused_io(status: StatusCode) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        HboneError::Refused(status).to_string(),
    )
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl H2Stream {
    /// The next bytes the peer sent, as HTTP/2 received them (no copy); `None` once the
    /// peer has ended its side. A refused CONNECT (sent without waiting) is an error here.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        loop {
            if self.eof {
                return Poll::Ready(Ok(None));
            }
            let recv = match &mut self.recv {
                Recv::Ready(r) => r,
                Recv::Refused(status) => return Poll::Ready(Err(refused_io(*status))),
                Recv::Waiting { response, deadline } => match Pin::new(response).poll(cx) {
                    Poll::Ready(Ok(resp)) if resp.status() == StatusCode::OK => {
                        self.recv = Recv::Ready(resp.into_body());
                        continue;
                    }
                    Poll::Ready(Ok(resp)) => {
                        self.recv = Recv::Refused(resp.status());
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(to_io(e))),
                    Poll::Pending => {
                        ready!(deadline.as_mut().poll(cx));
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no answer to CONNECT in time",
                        )));
                    }
                },
            };
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Give the window back as soon as the bytes are ours: they are bounded
                    // by what the caller writes next.
                    let _ = recv.flow_control().release_capacity(data.len());
                    if !data.is_empty() {
                        return Poll::Ready(Ok(Some(data)));
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => self.eof = true,
            }
        }
    }

    /// Sends the first bytes of `data` as one DATA frame — as many as flow control allows
    /// now — and advances `data` past them (no copy); returns how many.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_window(cx, data.len()))?;
        if n == 0 {
            // Defensive: h2 (0.4) waits rather than report an empty window; were it to,
            // the caller asks again and waits then.
            return Poll::Ready(Ok(0));
        }
        self.send
            .send_data(data.split_to(n), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    /// Waits for send window for up to `len` bytes; returns how much there is. When the
    /// sending side has ended (the peer answered a CONNECT sent without waiting with a
    /// refusal, then reset the stream), the answer is taken first, so the error reports
    /// the refusal and [`H2Stream::refused`] has it.
    fn poll_window(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(len);
        let err = match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(cap)) => return Poll::Ready(Ok(cap.min(len))),
            Some(Err(e)) => to_io(e),
            None => io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed"),
        };
        self.settle_answer(cx);
        if let Recv::Refused(status) = self.recv {
            return Poll::Ready(Err(refused_io(status)));
        }
        Poll::Ready(Err(err))
    }

    /// Takes the answer to a CONNECT sent without waiting, if it has arrived.
    fn settle_answer(&mut self, cx: &mut Context<'_>) {
        if let Recv::Waiting { response, .. } = &mut self.recv
            && let Poll::Ready(Ok(resp)) = Pin::new(response).poll(cx)
        {
            self.recv = if resp.status() == StatusCode::OK {
                Recv::Ready(resp.into_body())
            } else {
                Recv::Refused(resp.status())
            };
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match ready!(self.poll_chunk(cx))? {
                Some(data) => self.pending = data,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl H2Stream {
    /// The peer's refusal of the CONNECT (403 for a policy deny), once a read has seen it.
    pub fn refused(&self) -> Option<StatusCode> {
        match self.recv {
            Recv::Refused(status) => Some(status),
            _ => None,
        }
    }

    /// Whether the peer refused the CONNECT by policy (see [`is_policy_deny`]).
    pub fn denied_by_policy(&self) -> bool {
        self.refused().is_some_and(is_policy_deny)
    }
}

/// Whether a CONNECT refused with `status` was refused by the destination's policy: Trellis
/// answers 403 (docs/hbone.md), Istio's ztunnel 401; both mean the same to the client.
pub fn is_policy_deny(status: StatusCode) -> bool {
    status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_window(cx, buf.len()))?;
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends what it was given as its connection task runs; nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP half-close ⇒ END_STREAM. A stream already closed (reset by the peer) is done.
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) if e.is_reset() || e.is_go_away() => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

/// The client side of one HBONE (TLS) connection: opens streams.
#[derive(Clone)]
pub struct Client {
    send: h2::client::SendRequest<Bytes>,
    /// Set when the connection's task ends (the peer closed it, or it failed).
    closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("hbone::Client").finish_non_exhaustive()
    }
}

impl Client {
    /// Runs the HTTP/2 handshake over `io` (an established mutual-TLS stream) and spawns
    /// the connection's task. The returned client opens streams until the connection ends.
    pub async fn handshake<IO>(io: IO) -> Result<Client, HboneError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(MAX_STREAMS)
            .enable_push(false)
            .handshake(io)
            .await?;
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HBONE client connection ended");
            }
            flag.store(true, std::sync::atomic::Ordering::Release);
        });
        Ok(Client { send, closed })
    }

    /// Whether the connection has ended: no stream can be opened on it any more.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Opens a stream to `target` (`CONNECT target`), with extra `headers`, and waits for
    /// the peer's 200 at most `timeout`: a refusal is [`HboneError::Refused`].
    pub async fn connect(
        &self,
        target: SocketAddr,
        headers: &[(&str, String)],
        timeout: Duration,
    ) -> Result<H2Stream, HboneError> {
        let mut stream = self.connect_early(target, headers, timeout).await?;
        if let Recv::Waiting { response, .. } = &mut stream.recv {
            let resp = tokio::time::timeout(timeout, response)
                .await
                .map_err(|_| HboneError::Timeout("CONNECT"))??;
            if resp.status() != StatusCode::OK {
                return Err(HboneError::Refused(resp.status()));
            }
            stream.recv = Recv::Ready(resp.into_body());
        }
        Ok(stream)
    }

    /// Opens a stream to `target` without waiting for the peer's answer: bytes written go
    /// out right behind the CONNECT (the peer holds them until it has connected), which
    /// saves a round trip per connection. A refusal (403 for a policy deny) then shows as
    /// an error on the first read; no answer within `timeout` likewise.
    pub async fn connect_early(
        &self,
        target: SocketAddr,
        headers: &[(&str, String)],
        timeout: Duration,
    ) -> Result<H2Stream, HboneError> {
        let mut send = tokio::time::timeout(timeout, self.send.clone().ready())
            .await
            .map_err(|_| HboneError::Timeout("stream slot"))??;
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string());
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req
            .body(())
            .map_err(|e| HboneError::BadRequest(e.to_string()))?;
        let (response, stream) = send.send_request(req, false)?;
        Ok(H2Stream {
            send: stream,
            recv: Recv::Waiting {
                response,
                deadline: Box::pin(tokio::time::sleep(timeout)),
            },
            pending: Bytes::new(),
            eof: false,
        })
    }
}

/// A CONNECT the server accepted: where it goes, and how to answer it.
pub struct Incoming {
    /// The `:authority` parsed as `ip:port`.
    pub target: SocketAddr,
    /// Request headers (for instance the original source, when a waypoint forwards).
    pub headers: http::HeaderMap,
    respond: h2::server::SendResponse<Bytes>,
    recv: RecvStream,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// Answers 200 and returns the tunnel.
    pub fn accept(mut self) -> Result<H2Stream, HboneError> {
        let resp = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .map_err(|e| HboneError::BadRequest(e.to_string()))?;
        let send = self.respond.send_response(resp, false)?;
        Ok(H2Stream::new(send, self.recv))
    }

    /// Refuses with `status` (403 for a policy deny, 503 when the target does not answer).
    pub fn refuse(mut self, status: StatusCode) {
        if let Ok(resp) = Response::builder().status(status).body(()) {
            let _ = self.respond.send_response(resp, true);
        }
    }
}

/// Serves one HBONE connection from the raw TCP stream `tcp`, as the server whose
/// certificate is `cert`: the mutual-TLS handshake (within 10 s; the client must present
/// a certificate of `bundle`, counted in
/// `trellis_hbone_handshakes_total{direction="inbound"}`), then [`serve_until`] with
/// `on_connect` receiving the client's verified SPIFFE identity beside each CONNECT.
/// ztunnel's inbound port and the waypoint both accept HBONE this way.
pub async fn accept_mtls<F, Fut, D>(
    tcp: tokio::net::TcpStream,
    cert: &crate::tls::WorkloadCert,
    bundle: std::sync::Arc<crate::tls::TrustBundle>,
    on_connect: F,
    drain: D,
) -> Result<(), HboneError>
where
    F: Fn(crate::identity::SpiffeId, Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    let cfg = crate::tls::server_config(cert, bundle)
        .map_err(|e| HboneError::Dial(format!("TLS server configuration: {e}")))?;
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg)).accept(tcp),
    )
    .await;
    metrics::counter!(
        "trellis_hbone_handshakes_total",
        "direction" => "inbound",
        "result" => if matches!(tls, Ok(Ok(_))) { "ok" } else { "error" },
    )
    .increment(1);
    let tls = tls
        .map_err(|_| HboneError::Timeout("TLS handshake"))?
        .map_err(|e| HboneError::Dial(format!("TLS handshake failed: {e}")))?;
    let source = crate::tls::peer_identity(tls.get_ref().1)
        .map_err(|e| HboneError::Dial(format!("client identity: {e}")))?;
    serve_until(tls, move |inc| on_connect(source.clone(), inc), drain).await
}

/// Serves one HBONE connection over `io` (TLS already accepted): every valid CONNECT is
/// handed to `on_connect` on its own task; anything else is answered 400 (not CONNECT,
/// or an authority that is not `ip:port`). Returns when the connection ends.
pub async fn serve<IO, F, Fut>(io: IO, on_connect: F) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_until(io, on_connect, std::future::pending()).await
}

/// [`serve`], until `drain` resolves: then the peer is told (GOAWAY) that no new stream
/// will be accepted, the streams already open run on, and this returns when they are done
/// (the caller bounds how long it waits).
pub async fn serve_until<IO, F, Fut, D>(io: IO, on_connect: F, drain: D) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    let mut conn = tokio::time::timeout(
        Duration::from_secs(10),
        h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(MAX_STREAMS)
            .handshake::<_, Bytes>(io),
    )
    .await
    .map_err(|_| HboneError::Timeout("HTTP/2 handshake"))??;
    let on_connect = std::sync::Arc::new(on_connect);
    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut drain, if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { break };
        let (req, mut respond) = next?;
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let refuse = |respond: &mut h2::server::SendResponse<Bytes>, why: &str| {
            tracing::info!(target: "hbone", reason = why, %method, %uri, "refusing a malformed HBONE request (400)");
            if let Ok(resp) = Response::builder().status(StatusCode::BAD_REQUEST).body(()) {
                let _ = respond.send_response(resp, true);
            }
        };
        if req.method() != Method::CONNECT {
            refuse(&mut respond, "not CONNECT");
            continue;
        }
        let target = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let Some(target) = target else {
            refuse(&mut respond, "authority is not ip:port");
            continue;
        };
        let (parts, recv) = req.into_parts();
        let incoming = Incoming {
            target,
            headers: parts.headers,
            respond,
            recv,
        };
        let handler = on_connect.clone();
        tokio::spawn(async move { handler(incoming).await });
    }
    Ok(())
}
