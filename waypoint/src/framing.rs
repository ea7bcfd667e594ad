//! Request-smuggling defence for HTTP/1.1. hyper, given a request with both
//! `Content-Length` and `Transfer-Encoding`, follows RFC 9112 (the chunked coding wins and
//! the connection is closed after the response) and hides the `Content-Length` from the
//! handler. Trellis refuses such a request outright (400): a peer that framed the message
//! the other way may already disagree on where it ends.
//!
//! [`FramingTap`] reads the client's bytes as hyper does and follows the HTTP/1.1 message
//! framing (heads, `Content-Length` bodies, chunked bodies) to note, for each request in
//! order, whether its head had both framing headers. It only observes; once the stream is
//! not HTTP/1.1 as it understands it (the HTTP/2 preface, a head it cannot follow), it stops
//! and leaves the judgement to hyper.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest head followed; hyper's limit is set no higher (past it the tap stops, and a
/// request it did not judge is refused).
pub const MAX_HEAD: usize = 256 * 1024;

/// For each HTTP/1.1 request of the connection, in order: whether its framing was
/// ambiguous.
#[derive(Debug, Clone, Default)]
pub struct Verdicts(Arc<Mutex<VecDeque<bool>>>);

impl Verdicts {
    /// The verdict on the next request: `Some(false)` clean, `Some(true)` ambiguous,
    /// `None` when the tap could not follow the stream (the caller refuses: what cannot be
    /// judged is not passed).
    pub fn next(&self) -> Option<bool> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
    }

    fn push(&self, ambiguous: bool) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(ambiguous);
    }
}

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Body(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    Trailers(Vec<u8>),
    Stopped,
}

/// Wraps the client stream; see the module documentation.
pub struct FramingTap<T> {
    inner: T,
    state: State,
    verdicts: Verdicts,
}

impl<T> FramingTap<T> {
    /// Taps `inner`; verdicts go to the returned [`Verdicts`].
    pub fn new(inner: T) -> (FramingTap<T>, Verdicts) {
        let verdicts = Verdicts::default();
        (
            FramingTap {
                inner,
                state: State::Head(Vec::new()),
                verdicts: verdicts.clone(),
            },
            verdicts,
        )
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Stopped => return,
                State::Head(buf) => {
                    let start = buf.len().saturating_sub(3);
                    buf.extend_from_slice(data);
                    data = &[];
                    if buf.starts_with(b"PRI * HTTP/2.0") {
                        self.state = State::Stopped;
                        return;
                    }
                    if buf.len() > MAX_HEAD {
                        self.state = State::Stopped;
                        return;
                    }
                    // Empty lines before a request line are allowed (RFC 9112 §2.2).
                    while buf.starts_with(b"\r\n") {
                        buf.drain(..2);
                    }
                    let Some(end) = find(&buf[start.min(buf.len())..], b"\r\n\r\n")
                        .map(|i| i + start.min(buf.len()))
                    else {
                        continue;
                    };
                    let rest = buf.split_off(end + 4);
                    let head = std::mem::take(buf);
                    match framing(&head) {
                        None => {
                            self.state = State::Stopped;
                            return;
                        }
                        Some((cl, te)) => {
                            self.verdicts.push(cl.is_some() && te);
                            self.state = if te {
                                State::ChunkSize(Vec::new())
                            } else {
                                match cl {
                                    Some(n) if n > 0 => State::Body(n),
                                    _ => State::Head(Vec::new()),
                                }
                            };
                        }
                    }
                    self.feed(&rest);
                    return;
                }
                State::Body(n) => {
                    let take = (*n).min(data.len() as u64) as usize;
                    *n -= take as u64;
                    data = &data[take..];
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => {
                    let Some(i) = data.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(data);
                        if line.len() > 1024 {
                            self.state = State::Stopped;
                        }
                        return;
                    };
                    line.extend_from_slice(&data[..=i]);
                    data = &data[i + 1..];
                    let text = String::from_utf8_lossy(line);
                    let size = text
                        .trim()
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string();
                    match u64::from_str_radix(&size, 16) {
                        Ok(0) => self.state = State::Trailers(Vec::new()),
                        // Data, then its CRLF.
                        Ok(n) => self.state = State::ChunkData(n.saturating_add(2)),
                        Err(_) => {
                            self.state = State::Stopped;
                            return;
                        }
                    }
                }
                State::ChunkData(n) => {
                    let take = (*n).min(data.len() as u64) as usize;
                    *n -= take as u64;
                    data = &data[take..];
                    if *n == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailers(buf) => {
                    buf.extend_from_slice(data);
                    data = &[];
                    if buf.starts_with(b"\r\n") {
                        let rest = buf.split_off(2);
                        self.state = State::Head(Vec::new());
                        self.feed(&rest);
                        return;
                    }
                    if let Some(end) = find(buf, b"\r\n\r\n") {
                        let rest = buf.split_off(end + 4);
                        self.state = State::Head(Vec::new());
                        self.feed(&rest);
                        return;
                    }
                    if buf.len() > MAX_HEAD {
                        self.state = State::Stopped;
                    }
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The `Content-Length` (if any) and whether a `Transfer-Encoding` is present, from a
/// request head; `None` when the head cannot be read as HTTP/1.1.
fn framing(head: &[u8]) -> Option<(Option<u64>, bool)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next()?;
    if !request_line.ends_with("HTTP/1.1") && !request_line.ends_with("HTTP/1.0") {
        return None;
    }
    let (mut cl, mut te) = (None, false);
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") {
            cl = Some(value.trim().parse().ok()?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
        }
    }
    Some((cl, te))
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingTap<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r
            && !matches!(self.state, State::Stopped)
        {
            let this = &mut *self;
            this.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingTap<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(stream: &[&[u8]]) -> Vec<bool> {
        let (mut tap, v) = FramingTap::new(());
        for part in stream {
            tap.feed(part);
        }
        let mut out = Vec::new();
        while let Some(x) = v.next() {
            out.push(x);
        }
        out
    }

    #[test]
    fn pipelined_requests_are_followed_through_their_bodies() {
        let stream: &[&[u8]] = &[
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel",
            b"loGET /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"POST /c HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ];
        assert_eq!(verdicts(stream), [false, false, true]);
    }

    #[test]
    fn split_heads_and_byte_by_byte_feeding_agree() {
        let req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let bytes: Vec<&[u8]> = req.chunks(1).collect();
        assert_eq!(verdicts(&bytes), [true, false]);
    }

    #[test]
    fn http2_and_unreadable_heads_stop_the_tap() {
        assert!(verdicts(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).is_empty());
        assert!(verdicts(&[b"GARBAGE\r\n\r\nGET / HTTP/1.1\r\n\r\n"]).is_empty());
    }
}

#[cfg(test)]
mod hyper_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_hyper_server_sees_the_verdict_of_each_request() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (tap, verdicts) = FramingTap::new(server);
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let v = verdicts.next() == Some(true);
                    async move {
                        let _ = req;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(if v {
                                "ambiguous"
                            } else {
                                "fine"
                            })),
                        ))
                    }
                });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tap), svc)
                    .await;
        });
        let mut client = client;
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            .await
            .unwrap();
        let mut out = vec![0u8; 4096];
        let n = client.read(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out[..n]);
        assert!(text.ends_with("ambiguous"), "{text}");
    }
}
