//! Copying a proxied connection both ways, with buffers that grow with the traffic.
//!
//! Each direction starts with an 8 KiB buffer and moves to 64 KiB once a read fills it: a
//! bulk transfer then moves in fewer, larger reads, writes and HTTP/2 frames (64 KiB took
//! one-stream throughput from ~30% to ~70% of direct), while the many connections that carry
//! a request and a response never allocate (and zero) 2 × 64 KiB each — an idle or
//! request/response connection costs 16 KiB of buffers instead of 128 KiB.
//!
//! Between a TCP connection and an HBONE stream ([`tcp_hbone`]) the bytes are not copied in
//! user space at all: what is read from the socket goes into the buffer that becomes the
//! DATA frame, and what HTTP/2 received is written to the socket from its own buffer (the
//! generic copy moved every byte twice more: into a frame, and out of one).
//!
//! Semantics are those of `tokio::io::copy_bidirectional`: each direction reads until end of
//! stream, writes everything, flushes and shuts its writer down (the half-close reaches the
//! other side); the copy ends when both directions have, with the byte counts, or at the
//! first error.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use crate::hbone::H2Stream;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The first buffer of each direction.
pub const INITIAL: usize = 8 << 10;
/// The buffer a direction grows to once a read fills its buffer.
pub const BULK: usize = 64 << 10;

/// One direction's state.
struct Direction {
    buf: Vec<u8>,
    /// Bytes `buf[start..end]` are read and not written yet.
    start: usize,
    end: usize,
    /// The last read filled the buffer: grow it once it is empty.
    grow: bool,
    /// The reader reached its end.
    eof: bool,
    /// Written since the last flush.
    unflushed: bool,
    /// The writer was shut down: this direction is done.
    done: bool,
    copied: u64,
}

impl Direction {
    fn new() -> Direction {
        Direction {
            buf: vec![0; INITIAL],
            start: 0,
            end: 0,
            grow: false,
            eof: false,
            unflushed: false,
            done: false,
            copied: 0,
        }
    }

    /// Moves what `reader` gives to `writer` until the reader ends (then shuts the writer
    /// down) or one of them is not ready. While the writer is busy, the free part of the
    /// buffer is filled from the reader, so the next write is a large one.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.copied));
            }
            if self.start == self.end && !self.eof {
                // Empty: read (into a grown buffer if the last read filled the old one).
                self.start = 0;
                self.end = 0;
                if self.grow {
                    self.buf = vec![0; BULK];
                    self.grow = false;
                }
                match self.poll_fill(cx, reader.as_mut()) {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        // Nothing to read now: push out what was written before waiting.
                        if self.unflushed {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
                continue;
            }
            while self.start < self.end {
                match writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.start..self.end])
                {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "the peer accepts no more data",
                        )));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.start += n;
                        self.copied += n as u64;
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The writer is busy: read ahead into the free tail meanwhile.
                        if self.end < self.buf.len()
                            && !self.eof
                            && let Poll::Ready(r) = self.poll_fill(cx, reader.as_mut())
                        {
                            r?;
                            continue;
                        }
                        return Poll::Pending;
                    }
                }
            }
            if self.eof {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
            }
        }
    }

    /// Reads into `buf[end..]`; marks the end of stream, and a read that filled the buffer.
    fn poll_fill<R>(&mut self, cx: &mut Context<'_>, reader: Pin<&mut R>) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
    {
        let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(reader.poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            self.eof = true;
        } else {
            self.end += n;
            if self.end == self.buf.len() && self.buf.len() < BULK {
                self.grow = true;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Copies `a` → `b` and `b` → `a` until both directions are done; returns the bytes copied
/// each way (a → b, b → a).
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::new(), Direction::new());
    poll_fn(|cx| {
        let forward = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let backward = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (forward, backward) {
            (Poll::Ready(sent), Poll::Ready(received)) => Poll::Ready(Ok((sent, received))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// Copies `tcp` → `hbone` and `hbone` → `tcp` until both directions are done, without
/// copying the bytes in user space; returns the bytes copied each way (tcp → hbone,
/// hbone → tcp). Same semantics as [`bidirectional`].
pub async fn tcp_hbone(tcp: &mut TcpStream, hbone: &mut H2Stream) -> io::Result<(u64, u64)> {
    let (mut up, mut down) = (Up::new(), Down::default());
    poll_fn(|cx| {
        // The receiving side first, so an answer already there is read before sending
        // (a refusal arriving meanwhile is still recognised: see `H2Stream::poll_window`).
        let backward = down.poll_copy(cx, hbone, tcp)?;
        let forward = up.poll_copy(cx, tcp, hbone)?;
        match (forward, backward) {
            (Poll::Ready(sent), Poll::Ready(received)) => Poll::Ready(Ok((sent, received))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// TCP → HBONE: reads into a buffer whose filled part is handed to HTTP/2 as a frame.
struct Up {
    /// Read, not yet handed over; its spare capacity is where the next read goes.
    buf: BytesMut,
    /// Handed to the stream in parts as flow control allows.
    chunk: Bytes,
    /// What a new buffer is allocated with: [`INITIAL`], [`BULK`] once a read filled one.
    size: usize,
    eof: bool,
    done: bool,
    copied: u64,
}

impl Up {
    fn new() -> Up {
        Up {
            buf: BytesMut::new(),
            chunk: Bytes::new(),
            size: INITIAL,
            eof: false,
            done: false,
            copied: 0,
        }
    }

    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &TcpStream,
        hbone: &mut H2Stream,
    ) -> Poll<io::Result<u64>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.copied));
            }
            if self.chunk.is_empty() && !self.buf.is_empty() {
                self.chunk = self.buf.split().freeze();
            }
            if !self.chunk.is_empty() {
                match hbone.poll_send(cx, &mut self.chunk) {
                    Poll::Ready(Ok(n)) => {
                        self.copied += n as u64;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // No window yet: read ahead into the buffer's free part meanwhile.
                        if !self.eof
                            && self.buf.capacity() > self.buf.len()
                            && let Poll::Ready(r) = self.poll_fill(cx, tcp)
                        {
                            r?;
                            continue;
                        }
                        return Poll::Pending;
                    }
                }
            }
            if self.eof {
                ready!(Pin::new(&mut *hbone).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            ready!(self.poll_fill(cx, tcp))?;
        }
    }

    /// Reads what the socket has into the buffer's spare capacity; marks the end of stream.
    /// An empty buffer starts with a whole buffer's room (what is left behind the last
    /// chunk handed over would split a message in two reads and two frames): `reserve`
    /// takes back the old allocation once HTTP/2 has let go of the earlier chunks, or
    /// allocates a new one. Only a read that fills a whole buffer grows the next ones.
    fn poll_fill(&mut self, cx: &mut Context<'_>, tcp: &TcpStream) -> Poll<io::Result<()>> {
        let spare = self.buf.capacity() - self.buf.len();
        if spare == 0 || (self.buf.is_empty() && spare < self.size) {
            self.buf.reserve(self.size);
        }
        let room = self.buf.capacity() - self.buf.len();
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            match tcp.try_read_buf(&mut self.buf) {
                Ok(0) => {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    if n >= room && room >= self.size {
                        self.size = BULK;
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// HBONE → TCP: writes each received frame's bytes to the socket from HTTP/2's buffer.
#[derive(Default)]
struct Down {
    chunk: Bytes,
    eof: bool,
    done: bool,
    copied: u64,
}

impl Down {
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        hbone: &mut H2Stream,
        tcp: &mut TcpStream,
    ) -> Poll<io::Result<u64>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.copied));
            }
            while !self.chunk.is_empty() {
                let n = ready!(Pin::new(&mut *tcp).poll_write(cx, &self.chunk))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the peer accepts no more data",
                    )));
                }
                self.chunk.advance(n);
                self.copied += n as u64;
            }
            if self.eof {
                ready!(Pin::new(&mut *tcp).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            match ready!(hbone.poll_chunk(cx))? {
                Some(data) => self.chunk = data,
                None => self.eof = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// A client and a server joined through `bidirectional`, as a proxy joins them.
    async fn through_proxy(request: Vec<u8>, reply: Vec<u8>) -> (Vec<u8>, Vec<u8>, (u64, u64)) {
        let (mut client, mut proxy_front) = duplex(4096);
        let (mut proxy_back, mut server) = duplex(4096);
        let proxy = tokio::spawn(async move {
            bidirectional(&mut proxy_front, &mut proxy_back)
                .await
                .unwrap()
        });
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap(); // until the client's half-close
            server.write_all(&reply).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        let counts = proxy.await.unwrap();
        (server.await.unwrap(), answer, counts)
    }

    #[tokio::test]
    async fn small_exchanges_and_half_closes_pass_both_ways() {
        let (at_server, at_client, counts) =
            through_proxy(b"ping".to_vec(), b"pong!".to_vec()).await;
        assert_eq!(at_server, b"ping");
        assert_eq!(at_client, b"pong!");
        assert_eq!(counts, (4, 5));
    }

    #[tokio::test]
    async fn bulk_transfers_arrive_whole_and_in_order_as_the_buffers_grow() {
        let request: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let reply: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let (at_server, at_client, counts) = through_proxy(request.clone(), reply.clone()).await;
        assert!(at_server == request, "the request arrived altered");
        assert!(at_client == reply, "the reply arrived altered");
        assert_eq!(counts, (request.len() as u64, reply.len() as u64));
    }

    #[tokio::test]
    async fn a_buffer_grows_only_when_a_read_fills_it() {
        let mut d = Direction::new();
        let (mut w, r) = duplex(1 << 20);
        let (sink, mut sink_r) = duplex(1 << 20);
        w.write_all(&[7u8; 100]).await.unwrap();
        let mut r = Box::pin(r);
        let mut sink = Box::pin(sink);
        let _ = poll_fn(|cx| match d.poll_copy(cx, r.as_mut(), sink.as_mut()) {
            Poll::Pending => Poll::Ready(()),
            other => panic!("{other:?}"),
        })
        .await;
        assert_eq!(d.buf.len(), INITIAL, "a small read keeps the small buffer");
        w.write_all(&vec![9u8; 200_000]).await.unwrap();
        let _ = poll_fn(|cx| match d.poll_copy(cx, r.as_mut(), sink.as_mut()) {
            Poll::Pending => Poll::Ready(()),
            other => panic!("{other:?}"),
        })
        .await;
        assert_eq!(d.buf.len(), BULK, "a full read grows it");
        let mut got = vec![0u8; 200_100];
        sink_r.read_exact(&mut got).await.unwrap();
        assert!(got[..100].iter().all(|&b| b == 7) && got[100..].iter().all(|&b| b == 9));
    }

    #[tokio::test]
    async fn an_error_on_either_side_ends_the_copy_with_it() {
        let (client, mut proxy_front) = duplex(64);
        let (mut proxy_back, server) = duplex(64);
        drop(server); // the server end is gone: writing to it fails
        let mut client = client;
        client.write_all(b"hello").await.unwrap();
        let r = bidirectional(&mut proxy_front, &mut proxy_back).await;
        assert!(r.is_err(), "{r:?}");
    }

    /// A connected pair of loopback TCP sockets.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Both ends of one HBONE stream over an in-memory connection: the client's (CONNECT
    /// sent without waiting) and the server's, answered with `status`.
    async fn hbone_pair(status: http::StatusCode) -> (H2Stream, Option<H2Stream>) {
        let (client_io, server_io) = duplex(1 << 16);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        tokio::spawn(crate::hbone::serve(server_io, move |inc| {
            let tx = tx.lock().unwrap().take();
            async move {
                let stream = if status == http::StatusCode::OK {
                    Some(inc.accept().unwrap())
                } else {
                    inc.refuse(status);
                    None
                };
                if let Some(tx) = tx {
                    let _ = tx.send(stream);
                }
            }
        }));
        let client = crate::hbone::Client::handshake(client_io).await.unwrap();
        let stream = client
            .connect_early(
                "10.1.2.3:80".parse().unwrap(),
                &[],
                std::time::Duration::from_secs(10),
            )
            .await
            .unwrap();
        (stream, rx.await.unwrap())
    }

    #[tokio::test]
    async fn small_messages_travel_as_one_frame_each_and_keep_the_small_buffer() {
        let (mut stream, server) = hbone_pair(http::StatusCode::OK).await;
        let mut server = server.unwrap();
        let (mut app, near) = tcp_pair().await;
        let mut up = Up::new();
        // 100 × 200 B is more than the first buffer: each message must still be read
        // whole (not split across the end of the buffer) and sent as one frame.
        for i in 0..100u64 {
            app.write_all(&[i as u8; 200]).await.unwrap();
            let want = (i + 1) * 200;
            let sent = poll_fn(|cx| match up.poll_copy(cx, &near, &mut stream) {
                Poll::Pending if up.copied >= want => Poll::Ready(up.copied),
                Poll::Pending => Poll::Pending,
                Poll::Ready(r) => panic!("the copy ended: {r:?}"),
            });
            let sent = tokio::time::timeout(std::time::Duration::from_secs(10), sent)
                .await
                .expect("the message was not sent");
            assert_eq!(sent, want);
            let frame = poll_fn(|cx| server.poll_chunk(cx)).await.unwrap().unwrap();
            assert_eq!(frame.len(), 200, "message {i} arrived split");
            assert!(frame.iter().all(|&b| b == i as u8));
        }
        assert_eq!(up.size, INITIAL, "small messages must not grow the buffer");
    }

    #[tokio::test]
    async fn a_refusal_is_recognised_when_sending_fails_first() {
        // The peer refused (403) and reset the stream; nothing has read the answer yet.
        let (mut stream, none) = hbone_pair(http::StatusCode::FORBIDDEN).await;
        assert!(none.is_none());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let err = loop {
            let mut data = Bytes::from_static(b"hello");
            match poll_fn(|cx| stream.poll_send(cx, &mut data)).await {
                Err(e) => break e,
                // Sent before the reset arrived: try again shortly.
                Ok(_) => {
                    assert!(std::time::Instant::now() < deadline, "the reset never came");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        assert_eq!(stream.refused(), Some(http::StatusCode::FORBIDDEN));
    }

    #[tokio::test]
    async fn tcp_through_an_hbone_stream_arrives_whole_both_ways_with_half_closes() {
        // client app <-> [tcp_hbone] <-> HTTP/2 <-> [tcp_hbone] <-> server app; more than a
        // stream window (4 MiB) one way, so sending waits for window and reads ahead.
        let request: Vec<u8> = (0..9_000_000u32).map(|i| (i % 251) as u8).collect();
        let reply: Vec<u8> = (0..1_500_000u32).map(|i| (i % 241) as u8).collect();
        let (mut client_stream, server_stream) = hbone_pair(http::StatusCode::OK).await;
        let mut server_stream = server_stream.unwrap();
        let (mut app_client, mut near) = tcp_pair().await;
        let (mut far, mut app_server) = tcp_pair().await;
        let source = tokio::spawn(async move { tcp_hbone(&mut near, &mut client_stream).await });
        let destination =
            tokio::spawn(async move { tcp_hbone(&mut far, &mut server_stream).await });
        let reply2 = reply.clone();
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            app_server.read_to_end(&mut got).await.unwrap(); // until the client's half-close
            app_server.write_all(&reply2).await.unwrap();
            app_server.shutdown().await.unwrap();
            got
        });
        let (mut r, mut w) = app_client.split();
        let exchange = async {
            tokio::join!(
                async {
                    w.write_all(&request).await.unwrap();
                    w.shutdown().await.unwrap();
                },
                async {
                    let mut answer = Vec::new();
                    r.read_to_end(&mut answer).await.unwrap();
                    answer
                }
            )
        };
        // A lost wake-up or half-close would hang: fail instead.
        let (_, answer) = tokio::time::timeout(std::time::Duration::from_secs(60), exchange)
            .await
            .expect("the exchange did not finish");
        let at_server = server.await.unwrap();
        assert!(
            at_server == request,
            "the request arrived altered ({} bytes)",
            at_server.len()
        );
        assert!(
            answer == reply,
            "the reply arrived altered ({} bytes)",
            answer.len()
        );
        let (req, rep) = (request.len() as u64, reply.len() as u64);
        assert_eq!(source.await.unwrap().unwrap(), (req, rep));
        // The server's side counts the other way round: its socket sent the reply.
        assert_eq!(destination.await.unwrap().unwrap(), (rep, req));
    }

    #[tokio::test]
    async fn a_refused_connect_ends_the_copy_with_an_error_and_the_status() {
        let (mut stream, none) = hbone_pair(http::StatusCode::FORBIDDEN).await;
        assert!(none.is_none());
        let (mut app, mut near) = tcp_pair().await;
        app.write_all(b"hello").await.unwrap();
        let _app = app;
        let r = tcp_hbone(&mut near, &mut stream).await;
        assert!(r.is_err(), "{r:?}");
        assert_eq!(stream.refused(), Some(http::StatusCode::FORBIDDEN));
        assert!(stream.denied_by_policy());
    }

    #[tokio::test]
    async fn istio_ztunnels_401_is_a_policy_deny_too_and_503_is_not() {
        for (status, deny) in [
            (http::StatusCode::UNAUTHORIZED, true),
            (http::StatusCode::SERVICE_UNAVAILABLE, false),
        ] {
            let (mut stream, _) = hbone_pair(status).await;
            let (mut app, mut near) = tcp_pair().await;
            app.write_all(b"hello").await.unwrap();
            let _app = app;
            assert!(tcp_hbone(&mut near, &mut stream).await.is_err());
            assert_eq!(stream.refused(), Some(status));
            assert_eq!(stream.denied_by_policy(), deny, "{status}");
        }
    }
}
