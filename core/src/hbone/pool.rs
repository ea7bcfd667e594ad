//! A pool of HBONE connections, keyed by (source identity, destination identity,
//! destination address): a tunnel reuses a TLS connection made for the same pair of
//! identities to the same peer, opening another one only when every connection of the key
//! carries [`super::MAX_STREAMS`] streams. A connection without streams for the idle
//! timeout is closed; a connection that failed is dropped and the next tunnel dials anew.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Client, H2Stream, HboneError, MAX_STREAMS};
use crate::SpiffeId;

/// Which connections may carry a tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity the client presents (the source pod's).
    pub source: SpiffeId,
    /// The identity the server must present (secure naming).
    pub destination: SpiffeId,
    /// The peer's HBONE address (`pod-ip:15008`, or a waypoint's).
    pub address: SocketAddr,
}

struct Conn {
    client: Client,
    streams: Arc<AtomicUsize>,
    idle_since: Mutex<Instant>,
    broken: Arc<std::sync::atomic::AtomicBool>,
}

impl Conn {
    fn new(client: Client) -> Conn {
        metrics::gauge!("trellis_hbone_pool_connections").increment(1.0);
        Conn {
            client,
            streams: Arc::new(AtomicUsize::new(1)),
            idle_since: Mutex::new(Instant::now()),
            broken: Arc::default(),
        }
    }
}

impl Drop for Conn {
    /// The last tunnel and the pool let go: the HTTP/2 connection closes.
    fn drop(&mut self) {
        metrics::gauge!("trellis_hbone_pool_connections").decrement(1.0);
    }
}

/// Makes a new HBONE connection for a key (TCP connect from the right namespace, TLS with
/// the source's certificate, HTTP/2 handshake).
pub type Dial = Arc<
    dyn Fn(PoolKey) -> Pin<Box<dyn Future<Output = Result<Client, HboneError>> + Send>>
        + Send
        + Sync,
>;

/// The pool.
#[derive(Clone)]
pub struct Pool {
    conns: Arc<Conns>,
    /// One dial per key at a time: many tunnels starting together share the new connection.
    dialing: Arc<tokio::sync::Mutex<()>>,
    dial: Dial,
    idle: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("connections", &self.len())
            .finish()
    }
}

/// A tunnel from the pool; counts as a stream of its connection until dropped.
pub struct PooledStream {
    stream: H2Stream,
    conn: Arc<Conn>,
}

impl Drop for PooledStream {
    fn drop(&mut self) {
        // The idle clock starts when the last stream ends.
        *self
            .conn
            .idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.conn.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PooledStream {
    /// The tunnel itself (to copy without going through `AsyncRead`/`AsyncWrite`); it
    /// still counts as a stream of its connection while this lives.
    pub fn stream_mut(&mut self) -> &mut H2Stream {
        &mut self.stream
    }

    /// The peer's refusal of the CONNECT, once a read has seen it (see [`H2Stream::refused`]).
    pub fn refused(&self) -> Option<http::StatusCode> {
        self.stream.refused()
    }

    /// Whether the peer refused the CONNECT by policy (see [`super::is_policy_deny`]).
    pub fn denied_by_policy(&self) -> bool {
        self.stream.denied_by_policy()
    }
}

impl AsyncRead for PooledStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PooledStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Pool {
    /// A pool dialing with `dial`, closing connections idle for `idle` (checked at every
    /// new tunnel and, within a Tokio runtime, every `idle / 2` until the pool is dropped).
    pub fn new(dial: Dial, idle: Duration) -> Pool {
        let pool = Pool {
            conns: Arc::default(),
            dialing: Arc::default(),
            dial,
            idle,
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let conns = Arc::downgrade(&pool.conns);
            rt.spawn(async move {
                let mut tick = tokio::time::interval((idle / 2).max(Duration::from_millis(10)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(conns) = conns.upgrade() else { return };
                    sweep(&conns, idle);
                }
            });
        }
        pool
    }

    /// Open connections (all keys).
    pub fn len(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Whether there is no open connection.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A connection of `key` with room for one more stream, its count already taken.
    fn checkout(&self, key: &PoolKey) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.broken.load(Ordering::Acquire) && !c.client.is_closed());
        for c in list.iter() {
            let n = c.streams.load(Ordering::Acquire);
            if n < MAX_STREAMS as usize
                && c.streams
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(c.clone());
            }
        }
        None
    }

    /// Opens a tunnel to `target` over a connection of `key`, without waiting for the
    /// peer's answer (see [`Client::connect_early`]): a refusal shows on the first read.
    pub async fn connect(
        &self,
        key: PoolKey,
        target: SocketAddr,
        headers: &[(&str, String)],
        timeout: Duration,
    ) -> Result<PooledStream, HboneError> {
        self.sweep();
        loop {
            let (conn, reused) = match self.checkout(&key) {
                Some(c) => (c, true),
                None => (self.dial_new(&key, timeout).await?, false),
            };
            match conn.client.connect_early(target, headers, timeout).await {
                Ok(stream) => return Ok(PooledStream { stream, conn }),
                Err(e) => {
                    conn.streams.fetch_sub(1, Ordering::AcqRel);
                    if matches!(e, HboneError::H2(_) | HboneError::Timeout(_)) {
                        // The connection itself failed or is going away (the peer said
                        // GOAWAY while draining): never hand it out again.
                        conn.broken.store(true, Ordering::Release);
                        if reused {
                            // A pooled connection that went away is not this tunnel's
                            // failure: try again on a fresh one (once: a fresh one is
                            // never `reused`).
                            continue;
                        }
                    }
                    return Err(e);
                }
            }
        }
    }

    /// A connection of `key` with its first stream taken: one another tunnel dialed while
    /// this one waited, or a new one.
    async fn dial_new(&self, key: &PoolKey, timeout: Duration) -> Result<Arc<Conn>, HboneError> {
        let _one = self.dialing.lock().await;
        if let Some(c) = self.checkout(key) {
            return Ok(c);
        }
        let client = tokio::time::timeout(timeout, (self.dial)(key.clone()))
            .await
            .map_err(|_| HboneError::Timeout("connection"))??;
        let conn = Arc::new(Conn::new(client));
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok(conn)
    }

    /// Closes connections that carried no stream for the idle timeout.
    pub fn sweep(&self) {
        sweep(&self.conns, self.idle);
    }
}

type Conns = Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>;

fn sweep(conns: &Conns, idle: Duration) {
    let now = Instant::now();
    let mut conns = conns.lock().unwrap_or_else(|e| e.into_inner());
    for list in conns.values_mut() {
        list.retain(|c| {
            if c.broken.load(Ordering::Acquire) || c.client.is_closed() {
                return false;
            }
            let since = *c.idle_since.lock().unwrap_or_else(|e| e.into_inner());
            c.streams.load(Ordering::Acquire) > 0 || now.duration_since(since) < idle
        });
    }
    conns.retain(|_, l| !l.is_empty());
}

/// Dials one HBONE connection for `key`: TCP from `tcp` (the caller opens it where it must:
/// a pod's namespace for ztunnel, its own for a waypoint), then TLS 1.3 as `key.source`
/// expecting `key.destination`, then HTTP/2. Every step's failure names the peer; the
/// handshake is counted in `trellis_hbone_handshakes_total{direction="outbound"}`.
pub async fn dial_tls<C, F>(
    certs: &crate::cert::CertManager<C>,
    bundle: Arc<crate::tls::TrustBundle>,
    key: &PoolKey,
    tcp: F,
    timeout: Duration,
) -> Result<Client, HboneError>
where
    C: crate::cert::CaClient,
    F: Future<Output = std::io::Result<tokio::net::TcpStream>>,
{
    let cert = certs
        .fetch(&key.source)
        .await
        .map_err(|e| HboneError::Dial(format!("no certificate for {}: {e}", key.source)))?;
    let tls = crate::tls::client_config(&cert, bundle, key.destination.clone())
        .map_err(|e| HboneError::Dial(format!("TLS configuration for {}: {e}", key.source)))?;
    let tcp = tokio::time::timeout(timeout, tcp)
        .await
        .map_err(|_| HboneError::Timeout("TCP connect"))
        .and_then(|r| {
            r.map_err(|e| {
                HboneError::Dial(format!(
                    "connect to {}: {e}; is the HBONE port 15008 reachable?",
                    key.address
                ))
            })
        })?;
    let name = rustls::pki_types::ServerName::IpAddress(key.address.ip().into());
    let tls = tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .map_err(|_| HboneError::Timeout("TLS handshake"))
    .and_then(|r| {
        r.map_err(|e| {
            HboneError::Dial(format!(
                "TLS handshake with {} expecting {} failed: {e}",
                key.address, key.destination
            ))
        })
    });
    metrics::counter!(
        "trellis_hbone_handshakes_total",
        "direction" => "outbound",
        "result" => if tls.is_ok() { "ok" } else { "error" },
    )
    .increment(1);
    Client::handshake(tls?).await
}
