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

/// Idle HTTP/1.1 connections of one endpoint, each with when it went idle, the requests it
/// carried and how long it may stay idle.
type IdleList = Vec<(std::time::Instant, u32, Duration, http1::SendRequest<Body>)>;

/// A backend's connection settings (a DestinationRule's `connectionPool`): unset fields
/// take the waypoint's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnOpts {
    /// `tcp.connectTimeout`: the deadline of a new connection (TCP, TLS, CONNECT).
    pub connect_timeout: Option<Duration>,
    /// `http.idleTimeout`: how long a connection may stay unused (default 60 s).
    pub idle_timeout: Option<Duration>,
    /// `http.maxRequestsPerConnection`: requests a connection carries before it is
    /// retired (the next request opens a new one).
    pub max_requests: Option<u32>,
}

impl ConnOpts {
    fn idle(&self) -> Duration {
        self.idle_timeout.unwrap_or(IDLE_TIMEOUT)
    }

    fn spent(&self, used: u32) -> bool {
        self.max_requests.is_some_and(|m| used >= m.max(1))
    }
}

/// An endpoint's HTTP/2 connection, its dial in progress (waiters are woken when it
/// ends), or why the last dial failed (for its waiters; a new request dials again).
enum H2Slot {
    /// The connection, the requests it took, when it was last used, its settings.
    Ready(http2::SendRequest<Body>, u32, std::time::Instant, ConnOpts),
    Dialing(Arc<tokio::sync::Notify>),
    Failed(String),
}

impl H2Slot {
    /// Still of use: an open connection or a dial in progress.
    fn alive(&self) -> bool {
        match self {
            H2Slot::Ready(s, used, last, opts) => {
                !s.is_closed() && !opts.spent(*used) && last.elapsed() < opts.idle()
            }
            H2Slot::Dialing(_) => true,
            H2Slot::Failed(_) => false,
        }
    }
}

/// Ends a dial: whatever the outcome (or if the dialing request went away), the dial's
/// slot no longer says "dialing" and its waiters are woken.
struct DialDone<'a> {
    slots: &'a Mutex<HashMap<ConnKey, H2Slot>>,
    key: &'a ConnKey,
    notify: Arc<tokio::sync::Notify>,
}

impl Drop for DialDone<'_> {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(H2Slot::Dialing(n)) = slots.get(self.key)
            && Arc::ptr_eq(n, &self.notify)
        {
            slots.remove(self.key);
        }
        drop(slots);
        self.notify.notify_waiters();
    }
}

/// The waypoint's upstream connections.
pub struct Upstreams {
    mesh: Arc<Mesh>,
    hbone: Pool,
    connect_timeout: Duration,
    /// Idle HTTP/1.1 connections, with when each went idle.
    idle: Mutex<HashMap<ConnKey, IdleList>>,
    /// The HTTP/2 connection of each endpoint, or the dial in progress that requests
    /// arriving meanwhile wait for (one connection, never one per concurrent first request).
    h2: Mutex<HashMap<ConnKey, H2Slot>>,
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

    /// Drops idle connections older than `idle` (or their backend's idle timeout) and
    /// closed ones.
    pub fn sweep(&self, idle: Duration) {
        let now = std::time::Instant::now();
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, list| {
                list.retain(|(since, _, limit, s)| {
                    now.duration_since(*since) < idle.min(*limit) && !s.is_closed()
                });
                !list.is_empty()
            });
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| s.alive());
    }

    /// An endpoint of service `key` (`namespace/hostname`) for its port `port`.
    pub fn choose(&self, key: &str, port: u16, random: u64) -> Result<Dest, UpstreamError> {
        self.choose_skipping(key, port, random, None, Default::default())
    }

    /// [`Upstreams::choose`], passing over the endpoints `skip` names while others are
    /// ready (outlier ejections), by the load balancer's `mode`.
    pub fn choose_skipping(
        &self,
        key: &str,
        port: u16,
        random: u64,
        skip: Option<&(dyn Fn(IpAddr) -> bool + Sync)>,
        mode: trellis_core::routing::Mode<'_>,
    ) -> Result<Dest, UpstreamError> {
        let load = |ip: IpAddr| self.loads.get(ip);
        let pick = Pick {
            random,
            load: &load,
            skip: skip.map(|f| f as &dyn Fn(IpAddr) -> bool),
            mode,
        };
        let store = self.mesh.xds.store();
        dest(trellis_core::routing::to_endpoint(
            &store,
            &self.mesh.trust_domain,
            key,
            port,
            &pick,
        ))
    }

    /// Workload `uid` itself at `target` (workload-addressed traffic).
    pub fn to_workload(&self, uid: &str, target: SocketAddr) -> Result<Dest, UpstreamError> {
        let store = self.mesh.xds.store();
        let Some(w) = store.workload(uid) else {
            return Err(UpstreamError::NoHealthy(format!(
                "workload {uid} is not known"
            )));
        };
        dest(trellis_core::routing::workload_route(
            &self.mesh.trust_domain,
            w,
            target,
        ))
    }

    /// Sends `req` to `dest` over HTTP/2 (`h2`) or HTTP/1.1, reusing a connection when one
    /// is free.
    pub async fn send(
        self: &Arc<Self>,
        dest: &Dest,
        h2: bool,
        req: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        self.send_with(dest, h2, req, ConnOpts::default()).await
    }

    /// [`Upstreams::send`] with a backend's connection settings.
    pub async fn send_with(
        self: &Arc<Self>,
        dest: &Dest,
        h2: bool,
        req: http::Request<Body>,
        opts: ConnOpts,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let key = ConnKey {
            dest: dest.clone(),
            h2,
        };
        if h2 {
            let mut sender = self.h2_sender(&key, opts).await?;
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
        let (mut sender, used) = self.h1_sender(&key, opts).await?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Reset(format!("{}: {e}", dest.target())))?;
        // Back to the idle list once the response is read to its end (the connection is
        // ready for the next request); a connection that closes is dropped.
        let me = self.clone();
        tokio::spawn(async move {
            // A connection that carried its most requests is dropped (closed) instead.
            if !opts.spent(used) && sender.ready().await.is_ok() {
                let mut idle = me.idle.lock().unwrap_or_else(|p| p.into_inner());
                let list = idle.entry(key).or_default();
                if list.len() < MAX_IDLE_PER_ENDPOINT {
                    list.push((std::time::Instant::now(), used, opts.idle(), sender));
                }
            }
        });
        Ok(resp)
    }

    /// The endpoint's HTTP/2 connection: the open one, the one being dialed (waited for),
    /// or a new dial.
    async fn h2_sender(
        &self,
        key: &ConnKey,
        opts: ConnOpts,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let mut waited = false;
        loop {
            let next = {
                let mut slots = self.h2.lock().unwrap_or_else(|p| p.into_inner());
                // A connection past its request count or idle time is retired: replaced
                // here, it closes once its streams in flight end.
                if slots
                    .get(key)
                    .is_some_and(|s| matches!(s, H2Slot::Ready(..)) && !s.alive())
                {
                    slots.remove(key);
                }
                match slots.get_mut(key) {
                    Some(H2Slot::Ready(s, used, last, _)) => {
                        *used += 1;
                        *last = std::time::Instant::now();
                        return Ok(s.clone());
                    }
                    Some(H2Slot::Failed(e)) if waited => {
                        return Err(UpstreamError::Connect(e.clone()));
                    }
                    // Registered before the lock is released: the dial cannot end unseen.
                    Some(H2Slot::Dialing(n)) => Err(n.clone().notified_owned()),
                    _ => {
                        let notify = Arc::new(tokio::sync::Notify::new());
                        slots.insert(key.clone(), H2Slot::Dialing(notify.clone()));
                        Ok(notify)
                    }
                }
            };
            match next {
                Ok(notify) => return self.dial_h2(key, notify, opts).await,
                Err(woken) => woken.await,
            }
            waited = true;
        }
    }

    /// Dials the endpoint's HTTP/2 connection; the slot then holds it, or why it failed.
    async fn dial_h2(
        &self,
        key: &ConnKey,
        notify: Arc<tokio::sync::Notify>,
        opts: ConnOpts,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let _done = DialDone {
            slots: &self.h2,
            key,
            notify: notify.clone(),
        };
        let dialed = async {
            let io = self.open_with(&key.dest, opts.connect_timeout).await?;
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| {
                    UpstreamError::Connect(format!("{}: HTTP/2: {e}", key.dest.target()))
                })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            Ok::<_, UpstreamError>(sender)
        }
        .await;
        let slot = match &dialed {
            Ok(sender) => H2Slot::Ready(sender.clone(), 1, std::time::Instant::now(), opts),
            Err(e) => H2Slot::Failed(e.to_string()),
        };
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), slot);
        dialed
    }

    /// An idle connection to reuse (with the requests it carried, this one included), or a
    /// new one.
    async fn h1_sender(
        &self,
        key: &ConnKey,
        opts: ConnOpts,
    ) -> Result<(http1::SendRequest<Body>, u32), UpstreamError> {
        loop {
            let reused = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.get_mut(key).and_then(Vec::pop)
            };
            match reused {
                Some((since, used, limit, s))
                    if s.is_ready()
                        && since.elapsed() < limit.min(opts.idle())
                        && !opts.spent(used) =>
                {
                    return Ok((s, used + 1));
                }
                Some(_) => continue,
                None => break,
            }
        }
        let io = self.open_with(&key.dest, opts.connect_timeout).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(format!("{}: HTTP/1.1: {e}", key.dest.target())))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok((sender, 1))
    }

    /// A byte stream to the endpoint: an HBONE stream, or TCP.
    pub async fn open(&self, dest: &Dest) -> Result<TokioIo<Box<dyn Io>>, UpstreamError> {
        self.open_with(dest, None).await
    }

    /// [`Upstreams::open`] within `timeout` (default: the waypoint's connect timeout).
    pub async fn open_with(
        &self,
        dest: &Dest,
        timeout: Option<Duration>,
    ) -> Result<TokioIo<Box<dyn Io>>, UpstreamError> {
        let connect_timeout = timeout.unwrap_or(self.connect_timeout);
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
                    .connect(key, *target, &[], connect_timeout)
                    .await
                    .map_err(|e| {
                        UpstreamError::Connect(format!("HBONE to {target} via {via}: {e}"))
                    })?;
                Box::new(stream)
            }
            Dest::Plain(addr) => {
                let tcp =
                    tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr))
                        .await
                        .map_err(|_| {
                            UpstreamError::Connect(format!("connect to {addr} timed out"))
                        })?
                        .map_err(|e| UpstreamError::Connect(format!("connect to {addr}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
        };
        Ok(TokioIo::new(io))
    }
}

/// Where a routing decision sends a request, or why nowhere (`UH`).
fn dest(route: Route) -> Result<Dest, UpstreamError> {
    match route {
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

/// A byte stream to an endpoint.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A mesh whose control plane is never reached (nothing here needs it: the endpoint
    /// is a plain address).
    fn offline_mesh() -> Arc<Mesh> {
        let ca = trellis_core::testing::TestCa::new("cluster.local");
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let xds = trellis_core::xds::XdsClient::start(
            channel,
            trellis_core::xds::XdsConfig {
                node_id: "waypoint~test".into(),
                types: Vec::new(),
                initial_backoff: Duration::from_secs(60),
                max_backoff: Duration::from_secs(60),
                credential: None,
            },
        );
        let grpc = trellis_core::cert::GrpcCaClient::new(&trellis_core::cert::GrpcCaConfig {
            endpoint: "https://127.0.0.1:9".into(),
            roots: trellis_core::channel::ControlPlaneRoots::Pem(ca.root_pem().to_string()),
            server_name: "127.0.0.1".into(),
            credential: "unused".into(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        })
        .unwrap();
        Arc::new(Mesh {
            identity: SpiffeId::new("cluster.local", "ns", "waypoint").unwrap(),
            xds,
            certs: trellis_core::cert::CertManager::new(grpc, ca.bundle(), Default::default()),
            bundle: ca.bundle(),
            trust_domain: "cluster.local".into(),
        })
    }

    fn get() -> http::Request<Body> {
        use http_body_util::BodyExt;
        let body = http_body_util::Empty::<Bytes>::new()
            .map_err(|e: std::convert::Infallible| -> crate::BoxError { match e {} })
            .boxed_unsync();
        http::Request::builder()
            .uri("http://backend/")
            .body(body)
            .unwrap()
    }

    #[tokio::test]
    async fn concurrent_first_http2_requests_share_one_connection() {
        // An HTTP/2 server counting the connections it accepts; slow to answer, so the
        // requests overlap.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from_static(b"ok")),
                        ))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        let up = Upstreams::new(offline_mesh(), Duration::from_secs(5), Arc::default());
        let dest = Dest::Plain(addr);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (up, dest) = (up.clone(), dest.clone());
            calls.spawn(async move { up.send(&dest, true, get()).await.map(|r| r.status()) });
        }
        while let Some(r) = calls.join_next().await {
            assert_eq!(r.unwrap().unwrap(), http::StatusCode::OK);
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "16 concurrent first requests opened more than one HTTP/2 connection"
        );

        // A dial that fails fails every request waiting for it, once, and a later
        // request dials again.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let dest = Dest::Plain(closed);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (up, dest) = (up.clone(), dest.clone());
            calls.spawn(async move { up.send(&dest, true, get()).await.map(|r| r.status()) });
        }
        while let Some(r) = calls.join_next().await {
            let e = r.unwrap().unwrap_err();
            assert_eq!(e.flag(), "UF", "{e}");
        }
        assert!(up.send(&Dest::Plain(closed), true, get()).await.is_err());
    }
}
