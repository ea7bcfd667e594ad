//! Connections to endpoints: an endpoint of the routed service is chosen from the workload
//! xDS (ready endpoints, two random choices, the one with fewer requests in flight from
//! this waypoint), reached over HBONE to its ztunnel as the waypoint's identity (so the
//! destination sees `spiffe://…/sa/<waypoint>` as its peer), or over plain TCP when the
//! endpoint is not in the mesh. HTTP connections are reused: HTTP/1.1 connections return to
//! an idle list when their response is done; one HTTP/2 connection per endpoint carries
//! every request.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use trellis_core::SpiffeId;
use trellis_core::hbone::pool::{Dial, Pool, PoolKey};
use trellis_core::routing::{Loads, Pick, Route};

use crate::Mesh;

/// A request or response body as the waypoint passes it on.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, crate::BoxError>;

/// How long an upstream connection may stay idle.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often idle connections are swept.
const IDLE_SWEEP: Duration = Duration::from_secs(15);

/// Most idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dest {
    /// HBONE: `target` asked of the ztunnel at `via`, which must prove `identity`.
    Hbone {
        /// The endpoint (`pod-ip:port`).
        target: SocketAddr,
        /// Its HBONE address.
        via: SocketAddr,
        /// Its identity.
        identity: SpiffeId,
    },
    /// Plain TCP (an endpoint outside the mesh).
    Plain(SocketAddr),
}

impl Dest {
    /// The endpoint's address.
    pub fn target(&self) -> SocketAddr {
        match self {
            Dest::Hbone { target, .. } | Dest::Plain(target) => *target,
        }
    }
}

/// Why no response came from upstream, with Envoy's response flag.
#[derive(Debug)]
pub enum UpstreamError {
    /// No ready endpoint (`UH`, 503).
    NoHealthy(String),
    /// The connection could not be made (`UF`, 503).
    Connect(String),
    /// The request failed on the connection (`UF`-like reset before a response; 503).
    Reset(String),
}

impl UpstreamError {
    /// Envoy's response flag.
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::NoHealthy(_) => "UH",
            UpstreamError::Connect(_) => "UF",
            UpstreamError::Reset(_) => "UF",
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::NoHealthy(s) | UpstreamError::Connect(s) | UpstreamError::Reset(s) => {
                f.write_str(s)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ConnKey {
    dest: Dest,
    h2: bool,
}

/// Idle HTTP/1.1 connections of one endpoint, each with when it went idle.
type IdleList = Vec<(std::time::Instant, http1::SendRequest<Body>)>;

/// The waypoint's upstream connections.
pub struct Upstreams {
    mesh: Arc<Mesh>,
    hbone: Pool,
    connect_timeout: Duration,
    /// Idle HTTP/1.1 connections, with when each went idle.
    idle: Mutex<HashMap<ConnKey, IdleList>>,
    h2: Mutex<HashMap<ConnKey, http2::SendRequest<Body>>>,
    /// Requests in flight per endpoint address (for the endpoint choice).
    pub loads: Arc<Loads>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("hbone", &self.hbone)
            .finish_non_exhaustive()
    }
}

fn dialer(mesh: Arc<Mesh>, timeout: Duration) -> Dial {
    Arc::new(move |key: PoolKey| {
        let mesh = mesh.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(key.address);
            trellis_core::hbone::pool::dial_tls(
                &mesh.certs,
                mesh.bundle.clone(),
                &key,
                tcp,
                timeout,
            )
            .await
        })
    })
}

impl Upstreams {
    /// Upstreams of `mesh`'s identity, counting requests in flight in `loads` (shared by
    /// every worker's upstreams, so the endpoint choice sees the whole waypoint's load).
    pub fn new(mesh: Arc<Mesh>, connect_timeout: Duration, loads: Arc<Loads>) -> Arc<Upstreams> {
        let up = Arc::new(Upstreams {
            hbone: Pool::new(
                dialer(mesh.clone(), connect_timeout),
                Duration::from_secs(60),
            ),
            mesh,
            connect_timeout,
            idle: Mutex::default(),
            h2: Mutex::default(),
            loads,
        });
        // Connections idle past a minute (an endpoint that left, a burst that passed) and
        // closed ones are dropped, so their HBONE streams and connections close too.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&up);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(IDLE_SWEEP);
                loop {
                    tick.tick().await;
                    let Some(up) = weak.upgrade() else { return };
                    up.sweep(IDLE_TIMEOUT);
                }
            });
        }
        up
    }

    /// Drops idle HTTP/1.1 connections older than `idle` and closed connections.
    pub fn sweep(&self, idle: Duration) {
        let now = std::time::Instant::now();
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, list| {
                list.retain(|(since, s)| now.duration_since(*since) < idle && !s.is_closed());
                !list.is_empty()
            });
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| !s.is_closed());
    }

    /// An endpoint of service `key` (`namespace/hostname`) for its port `port`.
    pub fn choose(&self, key: &str, port: u16, random: u64) -> Result<Dest, UpstreamError> {
        let load = |ip: IpAddr| self.loads.get(ip);
        let pick = Pick {
            random,
            load: &load,
        };
        let store = self.mesh.xds.store();
        match trellis_core::routing::to_endpoint(&store, &self.mesh.trust_domain, key, port, &pick)
        {
            Route::Hbone {
                target,
                via,
                identity,
            } => Ok(Dest::Hbone {
                target,
                via,
                identity,
            }),
            Route::Passthrough(addr) => Ok(Dest::Plain(addr)),
            Route::Refuse(why) => Err(UpstreamError::NoHealthy(why)),
        }
    }

    /// Workload `uid` itself at `target` (workload-addressed traffic).
    pub fn to_workload(&self, uid: &str, target: SocketAddr) -> Result<Dest, UpstreamError> {
        let store = self.mesh.xds.store();
        let Some(w) = store.workload(uid) else {
            return Err(UpstreamError::NoHealthy(format!(
                "workload {uid} is not known"
            )));
        };
        match trellis_core::routing::workload_route(&self.mesh.trust_domain, w, target) {
            Route::Hbone {
                target,
                via,
                identity,
            } => Ok(Dest::Hbone {
                target,
                via,
                identity,
            }),
            Route::Passthrough(addr) => Ok(Dest::Plain(addr)),
            Route::Refuse(why) => Err(UpstreamError::NoHealthy(why)),
        }
    }

    /// Sends `req` to `dest` over HTTP/2 (`h2`) or HTTP/1.1, reusing a connection when one
    /// is free.
    pub async fn send(
        self: &Arc<Self>,
        dest: &Dest,
        h2: bool,
        req: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let key = ConnKey {
            dest: dest.clone(),
            h2,
        };
        if h2 {
            let mut sender = self.h2_sender(&key).await?;
            return sender.send_request(req).await.map_err(|e| {
                // A connection that died is not reused; one stream's failure (a reset, a
                // body error) leaves the shared connection to the others.
                if sender.is_closed() {
                    self.h2
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                }
                UpstreamError::Reset(format!("{}: {e}", dest.target()))
            });
        }
        let mut sender = self.h1_sender(&key).await?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Reset(format!("{}: {e}", dest.target())))?;
        // Back to the idle list once the response is read to its end (the connection is
        // ready for the next request); a connection that closes is dropped.
        let me = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = me.idle.lock().unwrap_or_else(|p| p.into_inner());
                let list = idle.entry(key).or_default();
                if list.len() < MAX_IDLE_PER_ENDPOINT {
                    list.push((std::time::Instant::now(), sender));
                }
            }
        });
        Ok(resp)
    }

    async fn h2_sender(&self, key: &ConnKey) -> Result<http2::SendRequest<Body>, UpstreamError> {
        if let Some(s) = self.h2.lock().unwrap_or_else(|p| p.into_inner()).get(key)
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let io = self.open(&key.dest).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(format!("{}: HTTP/2: {e}", key.dest.target())))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), sender.clone());
        Ok(sender)
    }

    async fn h1_sender(&self, key: &ConnKey) -> Result<http1::SendRequest<Body>, UpstreamError> {
        loop {
            let reused = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.get_mut(key).and_then(Vec::pop).map(|(_, s)| s)
            };
            match reused {
                Some(s) if s.is_ready() => return Ok(s),
                Some(_) => continue,
                None => break,
            }
        }
        let io = self.open(&key.dest).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(format!("{}: HTTP/1.1: {e}", key.dest.target())))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    /// A byte stream to the endpoint: an HBONE stream, or TCP.
    pub async fn open(&self, dest: &Dest) -> Result<TokioIo<Box<dyn Io>>, UpstreamError> {
        let io: Box<dyn Io> = match dest {
            Dest::Hbone {
                target,
                via,
                identity,
            } => {
                let key = PoolKey {
                    source: self.mesh.identity.clone(),
                    destination: identity.clone(),
                    address: *via,
                };
                let stream = self
                    .hbone
                    .connect(key, *target, &[], self.connect_timeout)
                    .await
                    .map_err(|e| {
                        UpstreamError::Connect(format!("HBONE to {target} via {via}: {e}"))
                    })?;
                Box::new(stream)
            }
            Dest::Plain(addr) => {
                let tcp = tokio::time::timeout(
                    self.connect_timeout,
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                .map_err(|_| UpstreamError::Connect(format!("connect to {addr} timed out")))?
                .map_err(|e| UpstreamError::Connect(format!("connect to {addr}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
        };
        Ok(TokioIo::new(io))
    }
}

/// A byte stream to an endpoint.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
