//! HBONE in, requests out. Each CONNECT names the service VIP and port the client asked
//! for; the waypoint serves it only when the control plane gave it a route for that
//! service port (it sends a waypoint routes only for the services bound to it), and
//! refuses anything else (404). The port's protocol decides what follows: HTTP/1.1,
//! HTTP/2 and gRPC are served by hyper and routed request by request; TCP is forwarded to
//! an endpoint as is; a port of undeclared protocol is detected from the client's first
//! bytes (an HTTP/1.1 request line or the HTTP/2 preface, within the sniff timeout, else
//! TCP).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use trellis_core::SpiffeId;
use trellis_core::hbone;
use trellis_core::routing::random_u64;
use trellis_proto::istio::workload::Service;

use crate::routes::{AppProtocol, Filter, HeaderMod, RequestView, Table, rewrite_path};
use crate::telemetry::RequestRecord;
use crate::upstream::{Body, Dest, UpstreamError, Upstreams};
use crate::{BoxError, Config, Mesh};

/// The waypoint's shared state.
pub struct Waypoint {
    /// Settings.
    pub config: Arc<Config>,
    /// Control-plane data and certificate.
    pub mesh: Arc<Mesh>,
    /// Endpoint connections, one set per worker (see [`Waypoint::upstreams`]).
    upstreams: Vec<Arc<Upstreams>>,
    /// Compiled routes, by name, for one configuration generation; then the tables of
    /// earlier generations not compiled again yet (whose state the next version takes).
    #[allow(clippy::type_complexity)]
    tables: Mutex<(
        u64,
        HashMap<String, Arc<Table>>,
        HashMap<String, Arc<Table>>,
    )>,
    /// Compiled authorization policies, for one configuration generation.
    policies: crate::authz::Cache,
    /// Compiled end-user authentication rules, for one configuration generation.
    jwt: crate::jwt::Cache,
    /// The JWKS of each `jwksUri`.
    jwks: crate::jwt::KeyCache,
    draining: watch::Receiver<bool>,
    /// Open downstream connections.
    active: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Waypoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waypoint")
            .field("identity", &self.mesh.identity.to_string())
            .finish_non_exhaustive()
    }
}

impl Waypoint {
    /// The waypoint of `mesh`; `draining` turns true at shutdown.
    pub fn new(config: Arc<Config>, mesh: Arc<Mesh>, draining: watch::Receiver<bool>) -> Waypoint {
        let jwks_roots = config.jwks_roots_file.clone();
        Waypoint {
            upstreams: {
                let loads = Arc::default();
                (0..config.workers.max(1))
                    .map(|_| {
                        Upstreams::new(mesh.clone(), config.connect_timeout, Arc::clone(&loads))
                    })
                    .collect()
            },
            config,
            mesh,
            tables: Mutex::new((u64::MAX, HashMap::new(), HashMap::new())),
            policies: crate::authz::Cache::default(),
            jwt: crate::jwt::Cache::default(),
            jwks: crate::jwt::KeyCache::default().with_roots_file(jwks_roots),
            draining,
            active: Arc::default(),
        }
    }

    /// The endpoint connections of the worker this runs on: a worker's requests go out on
    /// connections whose tasks run on that worker too, so a request never crosses threads
    /// (code off the workers uses the first set).
    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams[WORKER.get() % self.upstreams.len()]
    }

    /// The authorization policies as of the current configuration (compiled once per
    /// generation).
    pub fn policies(&self) -> Arc<crate::authz::Policies> {
        let generation = *self.mesh.xds.changes().borrow();
        self.policies.get(generation, || {
            crate::authz::Policies::compile(self.mesh.xds.store().l7_policies().map(|(_, p)| p))
        })
    }

    /// The end-user authentication rules as of the current configuration.
    pub fn jwt_rules(&self) -> Arc<crate::jwt::Rules> {
        let generation = *self.mesh.xds.changes().borrow();
        self.jwt.get(generation, || {
            crate::jwt::Rules::compile(self.mesh.xds.store().authentications().map(|(_, r)| r))
        })
    }

    /// The compiled route `name` as of the current configuration (compiled once per
    /// configuration generation).
    pub fn table(&self, name: &str) -> Option<Arc<Table>> {
        let generation = *self.mesh.xds.changes().borrow();
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if tables.0 != generation {
            // The previous version's tables give their lasting state to the new ones.
            // (Only routes that still exist: a deleted route's state goes with it.)
            let previous = std::mem::take(&mut tables.2);
            let current = std::mem::take(&mut tables.1);
            let store = self.mesh.xds.store();
            tables.2 = previous
                .into_iter()
                .chain(current)
                .filter(|(name, _)| store.route(name).is_some())
                .collect();
            tables.0 = generation;
        }
        if let Some(t) = tables.1.get(name) {
            return Some(t.clone());
        }
        let table = Arc::new(Table::compile_after(
            self.mesh.xds.store().route(name)?,
            tables.2.get(name).map(|t| &**t),
        ));
        tables.2.remove(name);
        if let Some(e) = &table.error {
            tracing::error!(route = name, error = %e, "route does not compile: its port answers 500");
        }
        tables.1.insert(name.to_string(), table.clone());
        Some(table)
    }

    /// Ready: configuration synced and the certificate held.
    pub fn is_ready(&self) -> bool {
        self.mesh.xds.is_synced() && self.mesh.certs.identities().contains(&self.mesh.identity)
    }

    /// Whether the waypoint is shutting down.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Waits until every downstream connection has closed, at most `timeout`.
    pub async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Counts an open downstream connection while alive.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

thread_local! {
    /// The index of the worker this thread is (0 off the workers).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What the workers accept from: the HBONE listener, and the plaintext ones with the
/// target each stands for.
#[derive(Debug)]
pub struct Listeners {
    /// HBONE (15008).
    pub hbone: std::net::TcpListener,
    /// `--plaintext-listener`s.
    pub plaintext: Vec<(std::net::TcpListener, SocketAddr)>,
}

/// A connection handed to a worker: HBONE, or plaintext standing for `target`.
enum Accepted {
    Hbone(std::net::TcpStream, SocketAddr),
    Plaintext(std::net::TcpStream, SocketAddr, SocketAddr),
}

/// Starts `config.workers` worker threads, each a single-threaded runtime, and the accept
/// loops (on the calling runtime) that hand each new connection to the worker with the
/// fewest open connections. A connection, its requests and the upstream connections they
/// use then stay on that worker — Envoy's model: no cross-thread wake-up, work stealing or
/// lock handoff per request (with two threads sharing every task, HTTP/2 spent more CPU
/// per request in the scheduler and in futex waits than in the proxy). The accept loops
/// stop when the waypoint drains (the listeners close); connections drain where they
/// are. The worker threads live until the process exits.
pub fn start_workers(wp: &Arc<Waypoint>, listeners: Listeners) -> io::Result<()> {
    let mut workers = Vec::new();
    for i in 0..wp.upstreams.len() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Accepted>();
        let open = Arc::new(AtomicUsize::new(0));
        workers.push((tx, open.clone()));
        let wp = wp.clone();
        std::thread::Builder::new()
            .name(format!("waypoint-worker-{i}"))
            .spawn(move || {
                WORKER.set(i);
                rt.block_on(async move {
                    while let Some(conn) = rx.recv().await {
                        let (std_tcp, peer, target) = match conn {
                            Accepted::Hbone(t, p) => (t, p, None),
                            Accepted::Plaintext(t, p, target) => (t, p, Some(target)),
                        };
                        let on_worker = Active(open.clone());
                        let tcp = match TcpStream::from_std(std_tcp) {
                            Ok(t) => t,
                            Err(e) => {
                                tracing::warn!(%peer, error = %e, "cannot serve an accepted connection");
                                continue;
                            }
                        };
                        wp.active.fetch_add(1, Ordering::AcqRel);
                        let active = Active(wp.active.clone());
                        let wp = wp.clone();
                        tokio::spawn(async move {
                            let _counted = (active, on_worker);
                            match target {
                                None => hbone_connection(wp, tcp, peer).await,
                                Some(target) => plaintext_connection(wp, tcp, peer, target).await,
                            }
                        });
                    }
                    // No more connections to take: the ones open drain on this thread.
                    std::future::pending::<()>().await
                });
            })?;
    }
    let workers = Arc::new(workers);
    let tokio_listener = |l: std::net::TcpListener| -> io::Result<TcpListener> {
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    };
    let hbone = tokio_listener(listeners.hbone)?;
    tokio::spawn(accept_loop(wp.clone(), hbone, workers.clone(), None));
    for (l, target) in listeners.plaintext {
        let l = tokio_listener(l)?;
        tokio::spawn(accept_loop(wp.clone(), l, workers.clone(), Some(target)));
    }
    Ok(())
}

/// Each worker's queue of new connections and its count of open ones.
type Workers = Arc<Vec<(mpsc::UnboundedSender<Accepted>, Arc<AtomicUsize>)>>;

/// Accepts from `listener` until the waypoint drains (the listener is then dropped: new
/// connections are refused), handing each connection to the least busy worker.
async fn accept_loop(
    wp: Arc<Waypoint>,
    listener: TcpListener,
    workers: Workers,
    target: Option<SocketAddr>,
) {
    let mut draining = wp.draining.clone();
    let mut next = 0usize;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = async { let _ = draining.wait_for(|d| *d).await; } => return,
        };
        let _ = tcp.set_nodelay(true);
        let Ok(tcp) = tcp.into_std() else { continue };
        // Fewest open connections; ties go round.
        next = next.wrapping_add(1);
        let n = workers.len();
        let Some(i) = (0..n)
            .map(|k| (next + k) % n)
            .min_by_key(|&i| workers[i].1.load(Ordering::Acquire))
        else {
            return;
        };
        workers[i].1.fetch_add(1, Ordering::AcqRel);
        let conn = match target {
            None => Accepted::Hbone(tcp, peer),
            Some(t) => Accepted::Plaintext(tcp, peer, t),
        };
        if workers[i].0.send(conn).is_err() {
            workers[i].1.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(worker = i, "a worker is gone: connection dropped");
        }
    }
}

async fn hbone_connection(wp: Arc<Waypoint>, tcp: TcpStream, peer: SocketAddr) {
    let cert = match wp.mesh.certs.fetch(&wp.mesh.identity).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "no certificate yet; closing the HBONE connection");
            return;
        }
    };
    let mut draining = wp.draining.clone();
    let drain = async move {
        let _ = draining.wait_for(|d| *d).await;
    };
    let handler = wp.clone();
    let result = hbone::accept_mtls(
        tcp,
        &cert,
        wp.mesh.bundle.clone(),
        move |source, inc| {
            let wp = handler.clone();
            async move { on_connect(wp, source, peer, inc).await }
        },
        drain,
    )
    .await;
    match result {
        Err(e @ (hbone::HboneError::Dial(_) | hbone::HboneError::Timeout("TLS handshake"))) => {
            tracing::info!(%peer, error = %e, "HBONE TLS handshake failed");
        }
        Err(e) => tracing::debug!(%peer, error = %e, "HBONE connection ended"),
        Ok(()) => {}
    }
}

/// One tunnelled connection, as the handlers see it.
struct Downstream {
    peer: SocketAddr,
    /// The client's verified identity (none on the plaintext listener).
    source: Option<SpiffeId>,
    target: SocketAddr,
    route: String,
    /// The service it was addressed to (none for workload-addressed traffic).
    service: Option<Service>,
    /// For workload-addressed traffic: the workload (uid) it was addressed to.
    workload: Option<String>,
    /// The identity as policy names it: `<td>/ns/<ns>/sa/<sa>` and `<ns>/<sa>`.
    principal: Option<(String, String)>,
}

/// The identity as policy names it: `<td>/ns/<ns>/sa/<sa>` and `<ns>/<sa>`.
fn policy_names(source: Option<&SpiffeId>) -> Option<(String, String)> {
    source.map(|id| {
        (
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain(),
                id.namespace(),
                id.service_account()
            ),
            format!("{}/{}", id.namespace(), id.service_account()),
        )
    })
}

impl Downstream {
    /// `namespace/hostname` of the service addressed, or empty.
    fn service_key(&self) -> String {
        self.service
            .as_ref()
            .map(|s| format!("{}/{}", s.namespace, s.hostname))
            .unwrap_or_default()
    }

    /// Where the connection goes when no route says otherwise: the workload it was
    /// addressed to, or an endpoint of the service.
    fn default_dest(&self, wp: &Waypoint, random: u64) -> Result<Dest, UpstreamError> {
        match &self.workload {
            Some(uid) => wp.upstreams().to_workload(uid, self.target),
            None => wp
                .upstreams()
                .choose(&self.service_key(), self.target.port(), random),
        }
    }
}

/// Whether the workload at `ip` is bound to this waypoint (`istio.io/use-waypoint` for
/// workload traffic): its uid.
fn workload_bound_here(wp: &Waypoint, ip: std::net::IpAddr) -> Option<String> {
    use trellis_proto::istio::workload::gateway_address::Destination;
    let store = wp.mesh.xds.store();
    let w = store.workload_by_ip(ip)?;
    let gw = w.waypoint.as_ref()?;
    let (ns, name) = &wp.config.gateway;
    let mine = match gw.destination.as_ref()? {
        Destination::Hostname(h) => {
            h.namespace == *ns && h.hostname.starts_with(&format!("{name}.{ns}.svc."))
        }
        Destination::Address(a) => {
            let ip = match a.address.len() {
                4 => <[u8; 4]>::try_from(a.address.as_slice())
                    .ok()
                    .map(std::net::IpAddr::from),
                16 => <[u8; 16]>::try_from(a.address.as_slice())
                    .ok()
                    .map(std::net::IpAddr::from),
                _ => None,
            };
            ip.and_then(|ip| store.service_by_vip(ip))
                .is_some_and(|s| s.namespace == *ns && s.name == *name)
        }
    };
    mine.then(|| w.uid.clone())
}

/// What a connection is for: the route of the service port `target` names, when this
/// waypoint serves it.
fn resolve(wp: &Waypoint, target: SocketAddr) -> Option<(String, Service, Arc<Table>)> {
    let (route, service) = {
        let store = wp.mesh.xds.store();
        store.service_by_vip(target.ip()).and_then(|svc| {
            let name = format!("{}/{}:{}", svc.namespace, svc.hostname, target.port());
            store.route(&name).map(|_| (name, svc.clone()))
        })?
    };
    let table = wp.table(&route)?;
    Some((route, service, table))
}

async fn on_connect(wp: Arc<Waypoint>, source: SpiffeId, peer: SocketAddr, inc: hbone::Incoming) {
    let target = inc.target;
    let Some((route, service, table)) = resolve(&wp, target) else {
        // Workload-addressed: a pod bound to this waypoint, asked for by its address. No
        // routes attach to a workload: requests go to it, under the waypoint's policies.
        if let Some(uid) = workload_bound_here(&wp, target.ip()) {
            let Ok(tunnel) = inc.accept() else { return };
            let principal = policy_names(Some(&source));
            let down = Arc::new(Downstream {
                peer,
                source: Some(source),
                target,
                route: String::new(),
                service: None,
                workload: Some(uid),
                principal,
            });
            serve_connection(wp, down, AppProtocol::Unspecified, tunnel).await;
            return;
        }
        tracing::info!(%peer, %target, source = %source, "refusing a CONNECT for what this waypoint does not serve (404)");
        inc.refuse(StatusCode::NOT_FOUND);
        return;
    };
    if let Some(why) = &table.refused {
        tracing::info!(%peer, %target, source = %source, reason = %why, "refusing a CONNECT (403)");
        inc.refuse(StatusCode::FORBIDDEN);
        return;
    }
    let tunnel = match inc.accept() {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "cannot answer the CONNECT");
            return;
        }
    };
    let principal = policy_names(Some(&source));
    let down = Arc::new(Downstream {
        peer,
        source: Some(source),
        target,
        route,
        service: Some(service),
        workload: None,
        principal,
    });
    serve_connection(wp, down, table.protocol, tunnel).await;
}

/// Serves one client connection (an HBONE tunnel, or a plaintext-listener connection) by
/// the protocol of its service port.
async fn serve_connection<T>(
    wp: Arc<Waypoint>,
    down: Arc<Downstream>,
    protocol: AppProtocol,
    mut io: T,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match protocol {
        AppProtocol::Tcp => tcp_forward(wp, down, Prefixed::new(Bytes::new(), io)).await,
        AppProtocol::Http1 | AppProtocol::Http2 | AppProtocol::Grpc => {
            serve_http(wp, down, Prefixed::new(Bytes::new(), io)).await;
        }
        AppProtocol::Unspecified => match sniff(&mut io, wp.config.sniff_timeout).await {
            Ok((true, seen)) => serve_http(wp, down, Prefixed::new(seen, io)).await,
            Ok((false, seen)) => tcp_forward(wp, down, Prefixed::new(seen, io)).await,
            Err(e) => {
                tracing::debug!(peer = %down.peer, error = %e, "client went away before speaking")
            }
        },
    }
}

/// One connection of a plaintext listener (`--plaintext-listener`, loopback only: for
/// benchmarks and debugging), taken as addressed to `target`, from no identity.
async fn plaintext_connection(
    wp: Arc<Waypoint>,
    tcp: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
) {
    let Some((route, service, table)) = resolve(&wp, target) else {
        tracing::info!(%peer, %target, "plaintext listener: this waypoint does not serve its target");
        return;
    };
    if let Some(why) = &table.refused {
        tracing::info!(%peer, %target, reason = %why, "plaintext listener: refused");
        return;
    }
    let down = Arc::new(Downstream {
        peer,
        source: None,
        target,
        route,
        service: Some(service),
        workload: None,
        principal: None,
    });
    serve_connection(wp, down, table.protocol, tcp).await;
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// HTTP (`Some(true)`), not HTTP (`Some(false)`), or not known yet from `b`.
fn classify(b: &[u8]) -> Option<bool> {
    if b.is_empty() {
        return None;
    }
    let mut undecided = false;
    for token in std::iter::once(H2_PREFACE).chain(METHODS.iter().copied()) {
        if b.starts_with(token) {
            return Some(true);
        }
        if token.starts_with(b) {
            undecided = true;
        }
    }
    if undecided { None } else { Some(false) }
}

/// Reads the client's first bytes until they show whether it speaks HTTP, at most
/// `timeout` (a client that says nothing — a server-first protocol — is TCP).
async fn sniff<T: AsyncRead + Unpin>(io: &mut T, timeout: Duration) -> io::Result<(bool, Bytes)> {
    use tokio::io::AsyncReadExt;
    let mut buf = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(http) = classify(&buf) {
            return Ok((http, buf.freeze()));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => return Ok((false, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream with bytes already read put back in front.
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    /// `inner`, read after `prefix`.
    pub fn new(prefix: Bytes, inner: T) -> Prefixed<T> {
        Prefixed { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
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

/// Forwards a non-HTTP connection to an endpoint of the service, bytes as they are.
async fn tcp_forward<T: AsyncRead + AsyncWrite + Unpin>(
    wp: Arc<Waypoint>,
    down: Arc<Downstream>,
    mut io: T,
) {
    let start = Instant::now();
    let result = async {
        // L4 only: the policies with connection attributes (their HTTP fields count as
        // matching in DENY rules and not in ALLOW ones).
        let policies = wp.policies();
        if !policies.is_empty() || wp.config.audit_allows {
            let a = attrs(&wp, &down, None, None);
            let d = policies.decide(&a);
            audit(&d, &a, wp.config.audit_allows);
            if let Some((policy, _)) = d.denied.or(d.custom.map(|(p, _)| (p, true))) {
                // (A CUSTOM match on a TCP port: no request to ask about; denied.)
                return Err(format!("denied by {policy}"));
            }
        }
        let dest = down
            .default_dest(&wp, random_u64())
            .map_err(|e| e.to_string())?;
        let _load = wp.upstreams().loads.hold(dest.target().ip());
        let mut up = wp
            .upstreams()
            .open(&dest)
            .await
            .map_err(|e| e.to_string())?;
        let copied = trellis_core::copy::bidirectional(&mut io, up.inner_mut())
            .await
            .map_err(|e| format!("reset: {e}"))?;
        Ok::<_, String>((dest, copied))
    }
    .await;
    let (upstream, sent, received, outcome) = match &result {
        Ok((dest, (a, b))) => (dest.target().to_string(), *a, *b, "ok".to_string()),
        Err(e) => ("-".to_string(), 0, 0, e.clone()),
    };
    tracing::info!(
        target: "access",
        src = %down.peer,
        peer_identity = %down.source.as_ref().map_or_else(|| "-".to_string(), ToString::to_string),
        service = %down.service.as_ref().map_or("-", |s| s.hostname.as_str()),
        port = down.target.port(),
        protocol = "tcp",
        upstream = %upstream,
        bytes_received = sent,
        bytes_sent = received,
        duration_ms = start.elapsed().as_millis() as u64,
        result = %outcome,
        "connection complete"
    );
}

async fn serve_http<T>(wp: Arc<Waypoint>, down: Arc<Downstream>, io: T)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, verdicts) = crate::framing::FramingTap::new(io);
    let service = {
        let (wp, down) = (wp.clone(), down.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let (wp, down) = (wp.clone(), down.clone());
            // HTTP/1 requests come in order; the tap judged each one's framing (one it
            // could not follow counts as ambiguous: refused, never passed unjudged).
            let ambiguous = req.version() != Version::HTTP_2 && verdicts.next() != Some(false);
            async move { Ok::<_, Infallible>(handle(wp, down, req, ambiguous).await) }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(wp.config.header_read_timeout)
        .max_buf_size(
            wp.config
                .max_header_bytes
                .clamp(8192, crate::framing::MAX_HEAD),
        );
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(wp.config.max_header_bytes).unwrap_or(u32::MAX));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut draining = wp.draining.clone();
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = async { let _ = draining.wait_for(|d| *d).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::info!(peer = %down.peer, error = %e, "HTTP connection ended with an error");
    }
}

/// Headers of one hop only, never forwarded.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for h in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(h);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn local(status: StatusCode, text: &str) -> Response<Body> {
    let body = http_body_util::Full::new(Bytes::from(format!("{text}\n")))
        .map_err(|e: Infallible| -> BoxError { match e {} })
        .boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn head_size(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum()
}

async fn handle(
    wp: Arc<Waypoint>,
    down: Arc<Downstream>,
    req: Request<Incoming>,
    ambiguous: bool,
) -> Response<Body> {
    let start = Instant::now();
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let downstream_h1 = req.version() != Version::HTTP_2;
    let mut req = req;
    // Its span (tracing on and sampled); the upstream gets the waypoint as the parent.
    let span = crate::trace::begin(req.headers_mut());
    let request_bytes = Arc::new(AtomicU64::new(head_size(req.headers())));
    let mut rec = RequestRecord {
        src: Some(down.peer),
        source: down.source.clone(),
        service: down
            .service
            .as_ref()
            .map(|s| format!("{}/{}", s.namespace, s.hostname)),
        xds: Some(wp.mesh.xds.clone()),
        method: req.method().to_string(),
        authority: authority.clone(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        protocol: if downstream_h1 { "HTTP/1.1" } else { "HTTP/2" },
        grpc,
        flags: "-",
        rule: "default".into(),
        span,
        ..RequestRecord::default()
    };
    {
        let store = wp.mesh.xds.store();
        rec.source_workload = store.workload_by_ip(down.peer.ip()).map(|w| w.uid.clone());
    }
    let mut load = Held::default();
    let response = match smuggling(&req, ambiguous) {
        Some(why) => {
            // Framing two parsers could read differently: refused, and the connection
            // closed (whatever follows on it cannot be trusted to be a new request).
            rec.error = Some(why.into());
            let mut resp = local(StatusCode::BAD_REQUEST, why);
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        None => {
            let mut req = req;
            match authenticate(&wp, &down, &mut req, &mut rec).await {
                Err(unauthenticated) => unauthenticated,
                Ok(verified) => {
                    match authorize(&wp, &down, &mut req, verified.as_ref(), &mut rec).await {
                        Some(denied) => denied,
                        None => route(
                            &wp,
                            &down,
                            req,
                            &authority,
                            &mut rec,
                            &request_bytes,
                            &mut load,
                        )
                        .await
                        .unwrap_or_else(|e| e),
                    }
                }
            }
        }
    };
    let (mut parts, body) = response.into_parts();
    if downstream_h1 {
        let close = parts
            .headers
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        strip_hop_by_hop(&mut parts.headers);
        if close || wp.is_draining() {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    rec.status = parts.status.as_u16();
    rec.grpc_status = parts
        .headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let head = head_size(&parts.headers);
    let body = Measured {
        inner: body,
        rec: Some(rec),
        start,
        sent: head,
        request_bytes,
        ended: false,
        _load: load,
    };
    Response::from_parts(parts, body.boxed_unsync())
}

/// The client address policy sees: the `X-Forwarded-For` entry `trusted` from the right
/// (the proxies in front are trusted that far), else the peer's.
fn remote_ip(headers: &HeaderMap, trusted: usize, peer: std::net::IpAddr) -> std::net::IpAddr {
    if trusted == 0 {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    entries
        .len()
        .checked_sub(trusted)
        .and_then(|i| entries.get(i))
        .and_then(|e| e.parse().ok())
        .unwrap_or(peer)
}

/// The connection's (and, given `http`, the request's) attributes for policy.
fn attrs<'a>(
    wp: &Waypoint,
    down: &'a Downstream,
    http: Option<crate::authz::Http<'a>>,
    verified: Option<&'a crate::jwt::Verified>,
) -> crate::authz::Attrs<'a> {
    let remote = match &http {
        Some(h) => remote_ip(h.headers, wp.config.trusted_proxies, down.peer.ip()),
        None => down.peer.ip(),
    };
    crate::authz::Attrs {
        principal: down.principal.as_ref().map(|(p, _)| p.as_str()),
        namespace: down.source.as_ref().map(SpiffeId::namespace),
        service_account: down.principal.as_ref().map(|(_, sa)| sa.as_str()),
        source_ip: down.peer.ip(),
        remote_ip: remote,
        destination_ip: down.target.ip(),
        destination_port: down.target.port(),
        service: down
            .service
            .as_ref()
            .map(|s| (s.namespace.as_str(), s.hostname.as_str())),
        http,
        request_auth: verified.map(|v| (v.principal.as_str(), &v.claims)),
    }
}

/// Logs what policy decided when it is worth an audit line: a deny, an AUDIT match, a
/// dry-run decision, and with `allows` (the mesh config's `auditLog.allows`) every allow.
/// Each line says who (peer principal, end user), what (method, host, path, port), which
/// policy, and the decision; the log line's timestamp says when.
fn audit(d: &crate::authz::Decision, a: &crate::authz::Attrs<'_>, allows: bool) {
    let allowed = d.denied.is_none() && d.custom.is_none();
    if d.audited.is_empty() && d.dry_run.is_empty() && !(allows && allowed) && d.denied.is_none() {
        return;
    }
    let (method, host, path) = a
        .http
        .as_ref()
        .map_or(("-", "-", "-"), |h| (h.method, h.host, h.path));
    let (host, path) = (crate::telemetry::mask(host), crate::telemetry::mask(path));
    let (host, path) = (host.as_ref(), path.as_ref());
    let who = a.principal.unwrap_or("-");
    let user = a.request_auth.map_or("-", |(p, _)| p);
    if let Some((policy, custom)) = &d.denied {
        tracing::info!(target: "audit", decision = "deny", policy = %policy, custom = *custom, principal = %who, request_principal = %user, source_ip = %a.source_ip, method, host, path, port = a.destination_port, "request denied by policy");
    }
    for policy in &d.audited {
        tracing::info!(target: "audit", decision = if d.denied.is_some() { "deny" } else { "allow" }, policy = %policy, principal = %who, request_principal = %user, source_ip = %a.source_ip, method, host, path, port = a.destination_port, "AUDIT policy matched");
    }
    for (policy, deny) in &d.dry_run {
        tracing::info!(target: "audit", decision = if *deny { "would-deny" } else { "would-allow" }, policy = %policy, dry_run = true, principal = %who, request_principal = %user, source_ip = %a.source_ip, method, host, path, port = a.destination_port, "dry-run policy evaluated");
    }
    if allows && allowed {
        let policy = d.allowed_by.as_deref().unwrap_or("-");
        tracing::info!(target: "audit", decision = "allow", policy = %policy, principal = %who, request_principal = %user, source_ip = %a.source_ip, method, host, path, port = a.destination_port, "request allowed by policy");
    }
}

/// Checks the request's end-user token against the RequestAuthentication rules that
/// apply: `Ok` with the verified end user (none without a token), the token removed and
/// the payload and claim headers set as configured; `Err` is the 401 to answer.
async fn authenticate<B>(
    wp: &Waypoint,
    down: &Downstream,
    req: &mut Request<B>,
    rec: &mut RequestRecord,
) -> Result<Option<crate::jwt::Verified>, Response<Body>> {
    let rules = wp.jwt_rules();
    if rules.is_empty() {
        return Ok(None);
    }
    let service = down
        .service
        .as_ref()
        .map(|s| (s.namespace.as_str(), s.hostname.as_str()));
    match rules
        .authenticate(&wp.jwks, service, req.headers(), req.uri().query())
        .await
    {
        Ok(outcome) => {
            let headers = req.headers_mut();
            for h in &outcome.remove {
                headers.remove(h);
            }
            for (h, v) in outcome.set {
                headers.insert(h, v);
            }
            Ok(outcome.verified)
        }
        Err(crate::jwt::Refused(why)) => {
            tracing::info!(
                target: "audit",
                decision = "unauthenticated",
                reason = %why,
                principal = %down.principal.as_ref().map_or("-", |(p, _)| p.as_str()),
                source_ip = %down.peer.ip(),
                method = %req.method(),
                path = %crate::telemetry::mask(req.uri().path()),
                "request token refused"
            );
            rec.error = Some(why.clone());
            let mut resp = local(StatusCode::UNAUTHORIZED, &why);
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            Err(resp)
        }
    }
}

/// Applies the waypoint's authorization policies to a request: `Some` is the denial to
/// answer (403 `RBAC: access denied`, as Istio; nothing of the policy's internals).
async fn authorize<B>(
    wp: &Waypoint,
    down: &Downstream,
    req: &mut Request<B>,
    verified: Option<&crate::jwt::Verified>,
    rec: &mut RequestRecord,
) -> Option<Response<Body>> {
    let policies = wp.policies();
    if policies.is_empty() && !wp.config.audit_allows {
        return None;
    }
    let d = {
        let path = req.uri().path();
        let normalized = crate::authz::normalize_path(path);
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        let http = crate::authz::Http {
            method: req.method().as_str(),
            path: normalized.as_deref().unwrap_or(path),
            host,
            headers: req.headers(),
        };
        let a = attrs(wp, down, Some(http), verified);
        let d = policies.decide(&a);
        audit(&d, &a, wp.config.audit_allows);
        d
    };
    // CUSTOM first: the external authorizer's answer, then DENY and ALLOW.
    if let Some((policy, cfg)) = &d.custom
        && let Some(resp) = ext_authorize(wp, down, policy, cfg.as_deref(), req, rec).await
    {
        return Some(resp);
    }
    match d.denied {
        Some((policy, _)) => {
            rec.flags = "RBAC";
            rec.error = Some(format!("denied by {policy}"));
            rec.policy = Some(policy);
            Some(local(StatusCode::FORBIDDEN, "RBAC: access denied"))
        }
        None => {
            rec.policy = d.allowed_by.map(|n| n.to_string());
            None
        }
    }
}

/// Asks CUSTOM policy `policy`'s external authorizer (Envoy's HTTP `ext_authz`: the
/// request's method and path under the prefix, Host, Authorization and the configured
/// headers, no body): `None` when it allows (its configured headers are added to the
/// request), else the answer to send — the authorizer's status, body and configured
/// headers, or 403 when it cannot be asked and does not fail open.
async fn ext_authorize<B>(
    wp: &Waypoint,
    down: &Downstream,
    policy: &str,
    cfg: Option<&trellis_proto::trellis::waypoint::v1::ExtAuthz>,
    req: &mut Request<B>,
    rec: &mut RequestRecord,
) -> Option<Response<Body>> {
    use trellis_proto::trellis::waypoint::v1::ext_authz::Protocol;
    let denied = |rec: &mut RequestRecord, why: String| {
        rec.flags = "UAEX";
        rec.error = Some(why);
        rec.policy = Some(policy.to_string());
        Some(local(StatusCode::FORBIDDEN, "RBAC: access denied"))
    };
    let Some(cfg) = cfg else {
        return denied(
            rec,
            format!("{policy}: its extension provider is not configured"),
        );
    };
    let Some(svc) = &cfg.service else {
        return denied(rec, format!("{policy}: no authorizer service"));
    };
    if cfg.protocol() == Protocol::Grpc {
        return grpc_ext_authorize(wp, down, policy, cfg, svc, req, rec).await;
    }
    let timeout = ext_authz_timeout(cfg);
    let check = async {
        let key = format!("{}/{}", svc.namespace, svc.hostname);
        let dest = wp
            .upstreams()
            .choose(&key, u16::try_from(svc.port).unwrap_or(0), random_u64())
            .map_err(|e| e.to_string())?;
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut builder = Request::builder()
            .method(req.method().clone())
            .uri(format!("{}{pq}", cfg.path_prefix))
            .header(header::HOST, &svc.hostname)
            .header(header::CONTENT_LENGTH, "0");
        let wanted = ["host", "authorization"]
            .into_iter()
            .map(str::to_string)
            .chain(
                cfg.include_request_headers
                    .iter()
                    .map(|h| h.to_ascii_lowercase()),
            );
        for name in wanted {
            for v in req.headers().get_all(name.as_str()) {
                let name = if name == "host" {
                    "x-forwarded-host"
                } else {
                    name.as_str()
                };
                builder = builder.header(name, v);
            }
        }
        let body: Body = http_body_util::Empty::new()
            .map_err(|e: Infallible| -> BoxError { match e {} })
            .boxed_unsync();
        let check = builder.body(body).map_err(|e| e.to_string())?;
        let resp = wp
            .upstreams()
            .send(&dest, false, check)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = http_body_util::Limited::new(body, 64 << 10)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, String>((parts, body))
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok((parts, _))) if parts.status.is_success() => {
            for name in &cfg.headers_to_upstream_on_allow {
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes())
                    && let Some(v) = parts.headers.get(&name)
                {
                    req.headers_mut().insert(name, v.clone());
                }
            }
            None
        }
        Ok(Ok((parts, body))) => {
            rec.flags = "UAEX";
            rec.error = Some(format!(
                "denied by {policy} (external authorizer: {})",
                parts.status
            ));
            rec.policy = Some(policy.to_string());
            tracing::info!(target: "audit", decision = "deny", policy, custom = true, status = parts.status.as_u16(), "request denied by the external authorizer");
            let body = http_body_util::Full::new(body)
                .map_err(|e: Infallible| -> BoxError { match e {} })
                .boxed_unsync();
            let mut resp = Response::new(body);
            *resp.status_mut() = parts.status;
            for name in &cfg.headers_to_downstream_on_deny {
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    for v in parts.headers.get_all(&name) {
                        resp.headers_mut().append(name.clone(), v.clone());
                    }
                }
            }
            Some(resp)
        }
        Ok(Err(why)) => ext_authz_unavailable(policy, cfg, why, rec),
        Err(_) => ext_authz_unavailable(policy, cfg, format!("no answer within {timeout:?}"), rec),
    }
}

/// How long a check may take (Istio's default: 600 s).
fn ext_authz_timeout(cfg: &trellis_proto::trellis::waypoint::v1::ExtAuthz) -> Duration {
    cfg.timeout
        .as_ref()
        .and_then(|d| Duration::try_from(*d).ok())
        .unwrap_or(Duration::from_secs(600))
}

/// The authorizer could not be asked (`why`): allowed with `failOpen`, else 403.
fn ext_authz_unavailable(
    policy: &str,
    cfg: &trellis_proto::trellis::waypoint::v1::ExtAuthz,
    why: String,
    rec: &mut RequestRecord,
) -> Option<Response<Body>> {
    if cfg.fail_open {
        tracing::warn!(policy, error = %why, "external authorizer unavailable: allowed (failOpen)");
        return None;
    }
    tracing::info!(target: "audit", decision = "deny", policy, custom = true, error = %why, "external authorizer unavailable: denied");
    rec.flags = "UAEX";
    rec.error = Some(format!("{policy}: external authorizer unavailable: {why}"));
    rec.policy = Some(policy.to_string());
    Some(local(StatusCode::FORBIDDEN, "RBAC: access denied"))
}

/// [`ext_authorize`] with Envoy's gRPC `ext_authz` (`envoy.service.auth.v3.Authorization/
/// Check` over HTTP/2 to the authorizer's endpoint, through the mesh): the request's
/// attributes (peer addresses and principals, method, path, host, headers) in, an OK
/// (headers to set and remove upstream) or a denial (status, headers, body) out.
async fn grpc_ext_authorize<B>(
    wp: &Waypoint,
    down: &Downstream,
    policy: &str,
    cfg: &trellis_proto::trellis::waypoint::v1::ExtAuthz,
    svc: &trellis_proto::trellis::waypoint::v1::ServiceRef,
    req: &mut Request<B>,
    rec: &mut RequestRecord,
) -> Option<Response<Body>> {
    use prost::Message;
    use trellis_proto::envoy::config::core::v3 as core;
    use trellis_proto::envoy::service::auth::v3 as authz;
    let timeout = ext_authz_timeout(cfg);
    let address = |a: SocketAddr| core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            protocol: 0,
            address: a.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                a.port(),
            ))),
        })),
    };
    let mut headers: HashMap<String, String> = HashMap::new();
    for (k, v) in req.headers() {
        if let Ok(v) = v.to_str() {
            headers
                .entry(k.as_str().to_string())
                .and_modify(|e| {
                    e.push(',');
                    e.push_str(v);
                })
                .or_insert_with(|| v.to_string());
        }
    }
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("")
        .to_string();
    headers.insert(":method".into(), req.method().to_string());
    headers.insert(":path".into(), pq.clone());
    headers.insert(":authority".into(), host.clone());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let check = authz::CheckRequest {
        attributes: Some(authz::AttributeContext {
            source: Some(authz::attribute_context::Peer {
                address: Some(address(down.peer)),
                principal: down
                    .source
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                ..Default::default()
            }),
            destination: Some(authz::attribute_context::Peer {
                address: Some(address(down.target)),
                principal: wp.mesh.identity.to_string(),
                ..Default::default()
            }),
            request: Some(authz::attribute_context::Request {
                time: Some(prost_types::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                }),
                http: Some(authz::attribute_context::HttpRequest {
                    id: headers.get("x-request-id").cloned().unwrap_or_default(),
                    method: req.method().to_string(),
                    path: pq,
                    host,
                    scheme: "http".into(),
                    protocol: if req.version() == Version::HTTP_2 {
                        "HTTP/2".into()
                    } else {
                        "HTTP/1.1".into()
                    },
                    headers,
                    ..Default::default()
                }),
            }),
            context_extensions: HashMap::new(),
        }),
    };
    let call = async {
        let key = format!("{}/{}", svc.namespace, svc.hostname);
        let dest = wp
            .upstreams()
            .choose(&key, u16::try_from(svc.port).unwrap_or(0), random_u64())
            .map_err(|e| e.to_string())?;
        let body: Body = http_body_util::Full::new(crate::grpc::frame(&check.encode_to_vec()))
            .map_err(|e: Infallible| -> BoxError { match e {} })
            .boxed_unsync();
        let call = Request::builder()
            .method(http::Method::POST)
            .uri(format!(
                "http://{}/envoy.service.auth.v3.Authorization/Check",
                svc.hostname
            ))
            .version(Version::HTTP_2)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .body(body)
            .map_err(|e| e.to_string())?;
        let resp = wp
            .upstreams()
            .send(&dest, true, call)
            .await
            .map_err(|e| e.to_string())?;
        let message = crate::grpc::unary_reply(resp).await?;
        if message.is_empty() {
            return Err("no CheckResponse".into());
        }
        authz::CheckResponse::decode(message).map_err(|e| format!("CheckResponse: {e}"))
    };
    let set_headers = |target: &mut HeaderMap, options: &[core::HeaderValueOption]| {
        for o in options {
            let Some(h) = &o.header else { continue };
            let value = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                &h.raw_value
            };
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(h.key.as_bytes()),
                HeaderValue::from_bytes(value),
            ) else {
                continue;
            };
            use core::header_value_option::HeaderAppendAction as A;
            let append = o.append.unwrap_or(false)
                || (o.append.is_none() && o.append_action == A::AppendIfExistsOrAdd as i32);
            match A::try_from(o.append_action).unwrap_or(A::AppendIfExistsOrAdd) {
                A::AddIfAbsent if target.contains_key(&name) => {}
                A::OverwriteIfExists if !target.contains_key(&name) => {}
                A::OverwriteIfExistsOrAdd | A::OverwriteIfExists => {
                    target.insert(name, value);
                }
                _ if append => {
                    target.append(name, value);
                }
                _ => {
                    target.insert(name, value);
                }
            }
        }
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(answer)) if answer.status.as_ref().is_none_or(|s| s.code == 0) => {
            if let Some(authz::check_response::HttpResponse::OkResponse(ok)) = &answer.http_response
            {
                set_headers(req.headers_mut(), &ok.headers);
                for name in &ok.headers_to_remove {
                    req.headers_mut().remove(name.as_str());
                }
            }
            None
        }
        Ok(Ok(answer)) => {
            let denied = match answer.http_response {
                Some(authz::check_response::HttpResponse::DeniedResponse(d)) => d,
                _ => authz::DeniedHttpResponse::default(),
            };
            let code = denied
                .status
                .as_ref()
                .map(|s| s.code)
                .filter(|c| *c != 0)
                .and_then(|c| StatusCode::from_u16(u16::try_from(c).ok()?).ok())
                .unwrap_or(StatusCode::FORBIDDEN);
            rec.flags = "UAEX";
            rec.error = Some(format!("denied by {policy} (external authorizer: {code})"));
            rec.policy = Some(policy.to_string());
            tracing::info!(target: "audit", decision = "deny", policy, custom = true, status = code.as_u16(), "request denied by the external authorizer");
            let body = http_body_util::Full::new(Bytes::from(denied.body))
                .map_err(|e: Infallible| -> BoxError { match e {} })
                .boxed_unsync();
            let mut resp = Response::new(body);
            *resp.status_mut() = code;
            set_headers(resp.headers_mut(), &denied.headers);
            Some(resp)
        }
        Ok(Err(why)) => ext_authz_unavailable(policy, cfg, why, rec),
        Err(_) => ext_authz_unavailable(policy, cfg, format!("no answer within {timeout:?}"), rec),
    }
}

/// Why an HTTP/1.1 request's framing is ambiguous (a request-smuggling attempt), if it
/// is: both `Content-Length` and `Transfer-Encoding` (`ambiguous`, from the framing tap:
/// hyper hides the `Content-Length`), or a transfer coding other than exactly `chunked`
/// (hyper itself refuses conflicting `Content-Length`s and obs-fold).
fn smuggling<B>(req: &Request<B>, ambiguous: bool) -> Option<&'static str> {
    if req.version() == Version::HTTP_2 {
        return None;
    }
    if ambiguous {
        return Some(
            "ambiguous framing (both Content-Length and Transfer-Encoding, or a head the framing check cannot follow)",
        );
    }
    let te: Vec<&HeaderValue> = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .collect();
    if te.is_empty() {
        return None;
    }
    if te.len() != 1 || !te[0].as_bytes().eq_ignore_ascii_case(b"chunked") {
        return Some("a Transfer-Encoding other than chunked");
    }
    None
}

/// Routes one request; an `Err` is a response made here (an error, a redirect).
async fn route(
    wp: &Arc<Waypoint>,
    down: &Arc<Downstream>,
    req: Request<Incoming>,
    authority: &str,
    rec: &mut RequestRecord,
    request_bytes: &Arc<AtomicU64>,
    held: &mut Held,
) -> Result<Response<Body>, Response<Body>> {
    // Workload-addressed traffic has no routes: an empty table sends it to the workload.
    static NO_ROUTES: std::sync::LazyLock<Arc<Table>> =
        std::sync::LazyLock::new(|| Arc::new(Table::compile(&Default::default())));
    let table = if down.workload.is_some() {
        Some(NO_ROUTES.clone())
    } else {
        wp.table(&down.route)
    };
    let table = table.ok_or_else(|| {
        rec.flags = "NR";
        local(StatusCode::NOT_FOUND, "no route")
    })?;
    if let Some(e) = &table.error {
        rec.flags = "NR";
        rec.error = Some(e.clone());
        return Err(local(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the route of this port is invalid",
        ));
    }
    if let Some(why) = &table.refused {
        // A policy attached here that this waypoint cannot enforce yet: fail closed.
        rec.error = Some(why.clone());
        return Err(local(StatusCode::FORBIDDEN, "RBAC: access denied"));
    }
    let (mut parts, body) = req.into_parts();
    // Hop-by-hop headers go first: neither matched on nor able to remove what a filter
    // adds (a client's `Connection: x-added` would otherwise strip the route's header).
    strip_hop_by_hop(&mut parts.headers);
    let pq = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let (path, query) = match pq.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (pq.clone(), None),
    };
    let found = table.find(&RequestView {
        method: &parts.method,
        path: &path,
        query: query.as_deref(),
        headers: &parts.headers,
    });
    // A LocalTrafficPolicy: the rule's, else the Service port's, field by field.
    let (bucket, fault) = match found {
        Some((rule, _)) => (
            rule.rate_limit.as_ref().or(table.rate_limit.as_ref()),
            rule.fault.as_ref().or(table.fault.as_ref()),
        ),
        None => (table.rate_limit.as_ref(), table.fault.as_ref()),
    };
    if let Some((rule, _)) = found {
        rec.rule = rule.name.clone();
    }
    if let Some(b) = bucket
        && let Err(wait) = b.take(std::time::Instant::now())
    {
        rec.flags = "RL";
        let mut resp = local(b.status(), "local_rate_limited");
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(crate::local::retry_after(wait)),
        );
        return Err(resp);
    }
    if let Some(f) = fault {
        let delayed = f.delay(random_u64());
        if let Some(d) = delayed {
            rec.flags = "DI";
            tokio::time::sleep(d).await;
        }
        if let Some(abort) = f.abort(random_u64()) {
            rec.flags = if delayed.is_some() { "DI,FI" } else { "FI" };
            return Err(match abort {
                crate::local::AbortWith::Http(s) => local(
                    StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    "fault filter abort",
                ),
                crate::local::AbortWith::Grpc(code) => {
                    let mut resp = local(StatusCode::OK, "");
                    let h = resp.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/grpc"),
                    );
                    h.insert("grpc-status", HeaderValue::from(code));
                    h.insert(
                        "grpc-message",
                        HeaderValue::from_static("fault filter abort"),
                    );
                    *resp.body_mut() = http_body_util::Empty::new()
                        .map_err(|e: Infallible| -> BoxError { match e {} })
                        .boxed_unsync();
                    resp
                }
            });
        }
    }
    let random = random_u64();
    let mut edits = Edits {
        response_mods: Vec::new(),
        mirrors: Vec::new(),
        host: authority.to_string(),
        new_path: None,
    };
    let (target, request_timeout, backend_timeout, retry, state) = match found {
        None => (
            (table.service.clone(), table.port),
            None,
            None,
            table.default_retry.as_ref(),
            &table.state,
        ),
        Some((rule, prefix)) => {
            // Rule filters first (a redirect answers here); the backend's after the pick.
            for f in &rule.filters {
                if let Some(Filter::Redirect {
                    scheme,
                    hostname,
                    port,
                    path: pm,
                    status,
                }) = edits.apply(f, &mut parts.headers, &path, prefix)
                {
                    let location = redirect_location(
                        &edits.host,
                        down.target.port(),
                        &path,
                        query.as_deref(),
                        prefix,
                        scheme,
                        hostname,
                        *port,
                        pm.as_ref(),
                    );
                    let mut resp = local(
                        StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND),
                        "",
                    );
                    if let Ok(v) = HeaderValue::from_str(&location) {
                        resp.headers_mut().insert(header::LOCATION, v);
                    }
                    for m in &edits.response_mods {
                        m.apply(resp.headers_mut());
                    }
                    return Err(resp);
                }
            }
            let Some(backend) = rule.pick(random_u64()) else {
                rec.error = Some("no backend with a weight".into());
                return Err(local(StatusCode::INTERNAL_SERVER_ERROR, "no backend"));
            };
            let Some(target) = backend.target.clone() else {
                rec.error = Some("the backend does not resolve".into());
                return Err(local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "backend not resolved",
                ));
            };
            // Redirects belong to rules: a backend's is ignored.
            for f in &backend.filters {
                let _ = edits.apply(f, &mut parts.headers, &path, prefix);
            }
            (
                target,
                rule.request_timeout,
                rule.backend_timeout,
                rule.retry.as_ref(),
                &backend.state,
            )
        }
    };
    // Retried: a request without a body (nothing to buffer), by a policy for its method.
    let retry = retry.filter(|r| body.is_end_stream() && r.allows_method(&parts.method));
    let Edits {
        response_mods,
        mirrors,
        host,
        new_path,
    } = edits;
    // Endpoints ejected by outlier detection are passed over while others are ready.
    let ejected = |ip: std::net::IpAddr| state.outlier.as_ref().is_some_and(|o| o.ejected(ip));
    let skip: Option<&(dyn Fn(std::net::IpAddr) -> bool + Sync)> =
        state.outlier.is_some().then_some(&ejected);
    // The DestinationRule's load balancer (the default: two choices).
    let mode = state.balancer.as_ref().map_or(Default::default(), |b| {
        b.mode(&parts.headers, down.peer.ip(), query.as_deref())
    });
    let pick_dest = |random: u64| {
        if found.is_none()
            && (down.workload.is_some() || (skip.is_none() && state.balancer.is_none()))
        {
            down.default_dest(wp, random)
        } else if found.is_none() {
            wp.upstreams().choose_skipping(
                &down.service_key(),
                down.target.port(),
                random,
                skip,
                mode,
            )
        } else {
            wp.upstreams()
                .choose_skipping(&target.0, target.1, random, skip, mode)
        }
    };
    let dest = pick_dest(random).map_err(|e| {
        rec.flags = e.flag();
        rec.error = Some(e.to_string());
        local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
    })?;
    rec.upstream = Some(dest.target());
    if let Dest::Hbone { identity, .. } = &dest {
        rec.destination = Some(identity.clone());
    }
    {
        let store = wp.mesh.xds.store();
        rec.destination_workload = store
            .workload_by_ip(dest.target().ip())
            .map(|w| w.uid.clone());
    }
    // The service the request went to (a route may send it to another).
    if !target.0.is_empty() && rec.service.as_deref() != Some(target.0.as_str()) {
        rec.service = Some(target.0.clone());
    }
    held.load = Some(wp.upstreams().loads.hold(dest.target().ip()));

    // The request as it goes upstream.
    let h2 = match table.protocol {
        AppProtocol::Http2 | AppProtocol::Grpc => true,
        AppProtocol::Http1 => false,
        _ => parts.version == Version::HTTP_2,
    };
    if !parts.headers.contains_key("x-request-id") {
        let id = format!("{:016x}{:016x}", random_u64(), random_u64());
        if let Ok(v) = HeaderValue::from_str(&id) {
            parts.headers.insert("x-request-id", v);
        }
    }
    if rec.span.is_some() {
        rec.request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
    if !parts.headers.contains_key("traceparent") {
        let tp = format!(
            "00-{:016x}{:016x}-{:016x}-00",
            random_u64(),
            random_u64(),
            random_u64()
        );
        if let Ok(v) = HeaderValue::from_str(&tp) {
            parts.headers.insert("traceparent", v);
        }
    }
    let pq_out = match &new_path {
        Some(p) => match &query {
            Some(q) => format!("{p}?{q}"),
            None => p.clone(),
        },
        None => pq.clone(),
    };
    let uri = if h2 {
        Uri::builder()
            .scheme("http")
            .authority(host.as_str())
            .path_and_query(pq_out.as_str())
            .build()
    } else {
        Uri::builder().path_and_query(pq_out.as_str()).build()
    };
    parts.uri = uri.map_err(|e| {
        local(
            StatusCode::BAD_REQUEST,
            &format!("invalid request target: {e}"),
        )
    })?;
    if h2 {
        parts.version = Version::HTTP_2;
        parts.headers.remove(header::HOST);
    } else {
        parts.version = Version::HTTP_11;
        if let Ok(v) = HeaderValue::from_str(&host) {
            parts.headers.insert(header::HOST, v);
        }
    }
    // The body streams; mirrors get a copy as it passes.
    let mut mirror_txs = Vec::new();
    for m in mirrors {
        match wp.upstreams().choose(&m.0, m.1, random_u64()) {
            Ok(mdest) => {
                let (tx, rx) = mpsc::channel(64);
                let aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let mut mparts = Request::new(()).into_parts().0;
                mparts.method = parts.method.clone();
                mparts.uri = parts.uri.clone();
                mparts.version = parts.version;
                mparts.headers = parts.headers.clone();
                let body = ChannelBody {
                    rx,
                    aborted: aborted.clone(),
                }
                .boxed_unsync();
                let up = wp.upstreams().clone();
                let limit = wp.config.connect_timeout * 6;
                tokio::spawn(async move {
                    // Bounded: a mirror that hangs is given up, its response read and
                    // dropped frame by frame (never held whole).
                    let mirror = async {
                        let req = Request::from_parts(mparts, body);
                        match up.send(&mdest, h2, req).await {
                            Ok(resp) => {
                                let mut body = resp.into_body();
                                while let Some(Ok(_)) = body.frame().await {}
                            }
                            Err(e) => tracing::debug!(error = %e, "mirror request failed"),
                        }
                    };
                    if tokio::time::timeout(limit, mirror).await.is_err() {
                        tracing::debug!("mirror request given up after {limit:?}");
                    }
                });
                mirror_txs.push((tx, aborted));
            }
            Err(e) => tracing::debug!(mirror = %m.0, error = %e, "mirror has no endpoint"),
        }
    }
    let mut body: Option<Body> = Some(
        RequestBody {
            inner: body,
            count: request_bytes.clone(),
            mirrors: mirror_txs,
        }
        .boxed_unsync(),
    );
    // Connection-pool limits (a DestinationRule's): overflow answers 503, flag UO.
    let admission = match crate::resilience::admit(state, !h2).await {
        Ok(a) => a,
        Err(crate::resilience::Overflow(what)) => {
            rec.flags = "UO";
            rec.error = Some(format!("circuit breaker open: {what}"));
            return Err(local(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow"));
        }
    };
    held.admission = admission;
    let now = tokio::time::Instant::now();
    // The request timeout covers every attempt; the backend timeout (or the retry
    // policy's per-try timeout) each one.
    let overall = request_timeout.map(|d| (d, now + d));
    let per_try = retry.and_then(|r| r.per_try_timeout).or(backend_timeout);
    let mut dest = dest;
    let mut attempt = 0u32;
    let (resp, deadline) = loop {
        // Kept for a retry only when one may follow (a copy of the head per request).
        let head = if retry.is_some() {
            let mut h = Request::new(()).into_parts().0;
            h.method = parts.method.clone();
            h.uri = parts.uri.clone();
            h.version = parts.version;
            h.headers = parts.headers.clone();
            h
        } else {
            std::mem::replace(&mut parts, Request::new(()).into_parts().0)
        };
        // The first attempt sends the body (and feeds the mirrors); a retried request has
        // none.
        let b = body.take().unwrap_or_else(|| {
            http_body_util::Empty::new()
                .map_err(|e| -> BoxError { match e {} })
                .boxed_unsync()
        });
        let up_req = Request::from_parts(head, b);
        let start = tokio::time::Instant::now();
        let deadline = match (overall, per_try.map(|d| (d, start + d))) {
            (Some(a), Some(b)) => Some(if a.1 <= b.1 { a } else { b }),
            (a, b) => a.or(b),
        };
        state.budget.attempt();
        let send = wp.upstreams().send_with(&dest, h2, up_req, state.conn);
        let result = match deadline {
            Some((d, at)) => match tokio::time::timeout_at(at, send).await {
                Ok(r) => Ok(r),
                Err(_) => Err(d),
            },
            None => Ok(send.await),
        };
        // What this attempt came to, and whether the policy retries it.
        let retryable = match &result {
            Ok(Ok(resp)) => retry.is_some_and(|r| r.on_status(resp.status().as_u16())),
            Ok(Err(UpstreamError::Connect(_))) => retry.is_some_and(|r| r.connect_failure),
            Ok(Err(UpstreamError::Reset(_))) => retry.is_some_and(|r| r.reset),
            Ok(Err(UpstreamError::NoHealthy(_))) => false,
            // A per-try timeout counts as a 504.
            Err(_) => {
                overall.is_none_or(|(_, at)| tokio::time::Instant::now() < at)
                    && retry.is_some_and(|r| r.on_status(504) || r.reset)
            }
        };
        if let Ok(Ok(resp)) = &result
            && resp.status().as_u16() < 500
        {
            state.budget.success();
        }
        if let Some(o) = &state.outlier {
            use crate::resilience::Outcome;
            let outcome = match &result {
                Ok(Ok(resp)) => Some(Outcome::Status(resp.status().as_u16())),
                Ok(Err(UpstreamError::NoHealthy(_))) => None,
                Ok(Err(_)) => Some(Outcome::Failed),
                Err(_) => Some(Outcome::Status(504)),
            };
            if let Some(outcome) = outcome {
                o.record(dest.target().ip(), outcome);
            }
        }
        let more = retry.is_some_and(|r| attempt < r.attempts);
        let exhausted = retryable && !more;
        let refused_by_budget = retryable && more && !state.budget.allow_retry();
        if !retryable || exhausted || refused_by_budget {
            if attempt > 0 || refused_by_budget {
                rec.retries = attempt;
            }
            if exhausted || refused_by_budget {
                // Envoy's flag: the upstream retry limit was reached.
                rec.flags = "URX";
                rec.error = Some(if refused_by_budget {
                    format!("retry budget spent after {} attempts", attempt + 1)
                } else {
                    format!("{} attempts failed", attempt + 1)
                });
            }
            match result {
                Ok(Ok(resp)) => break (resp, deadline),
                Ok(Err(e)) => {
                    if !(exhausted || refused_by_budget) {
                        rec.flags = e.flag();
                        rec.error = Some(e.to_string());
                    }
                    return Err(local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers",
                    ));
                }
                Err(d) => {
                    if !(exhausted || refused_by_budget) {
                        rec.flags = "UT";
                        rec.error = Some(format!("no response within {d:?}"));
                    }
                    return Err(local(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream request timeout",
                    ));
                }
            }
        }
        // Retry: the failed response goes (its stream reset), a pause, another endpoint.
        drop(result);
        attempt += 1;
        if let Some(r) = retry {
            let pause = r.backoff(attempt, random_u64());
            let until = tokio::time::Instant::now() + pause;
            tokio::time::sleep_until(overall.map_or(until, |(_, at)| until.min(at))).await;
        }
        let next = pick_dest(random_u64());
        match next {
            Ok(d) => {
                held.load = Some(wp.upstreams().loads.hold(d.target().ip()));
                rec.upstream = Some(d.target());
                dest = d;
            }
            Err(e) => {
                rec.retries = attempt;
                rec.flags = e.flag();
                rec.error = Some(e.to_string());
                return Err(local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy upstream",
                ));
            }
        }
    };
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    for m in &response_mods {
        m.apply(&mut rparts.headers);
    }
    let rbody = rbody.map_err(|e| -> BoxError { Box::new(e) });
    let rbody = match deadline {
        // The timeout covers the whole response: one that has not ended by then is cut
        // (HTTP/2: the stream is reset; HTTP/1.1: the connection closes), flag `UT`.
        Some((d, at)) => Deadline {
            inner: rbody,
            sleep: Box::pin(tokio::time::sleep_until(at)),
            limit: d,
        }
        .boxed_unsync(),
        None => rbody.boxed_unsync(),
    };
    Ok(Response::from_parts(rparts, rbody))
}

/// What a request holds until its response ends: its count in the endpoint's load, and
/// its place under the backend's connection-pool limits.
#[derive(Debug, Default)]
struct Held {
    load: Option<trellis_core::routing::LoadGuard>,
    admission: Option<crate::resilience::Admission>,
}

/// The response did not end within the route's timeout.
#[derive(Debug)]
struct TimedOut(Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the response did not end within {:?}", self.0)
    }
}

impl std::error::Error for TimedOut {}

/// A response body that must end by a deadline.
struct Deadline<B> {
    inner: B,
    sleep: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

impl<B> HttpBody for Deadline<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(TimedOut(self.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a rule's and its backend's filters change on the way: response header changes to
/// make, mirrors to copy to, the host and path to send.
struct Edits<'t> {
    response_mods: Vec<&'t HeaderMod>,
    mirrors: Vec<&'t (String, u16)>,
    host: String,
    new_path: Option<String>,
}

impl<'t> Edits<'t> {
    /// Applies filter `f` (request headers now, the rest recorded); a redirect is returned
    /// for the caller to answer.
    fn apply(
        &mut self,
        f: &'t Filter,
        headers: &mut HeaderMap,
        path: &str,
        prefix: &str,
    ) -> Option<&'t Filter> {
        match f {
            Filter::RequestHeaders(m) => m.apply(headers),
            Filter::ResponseHeaders(m) => self.response_mods.push(m),
            Filter::Rewrite { hostname, path: pm } => {
                if let Some(h) = hostname {
                    self.host.clone_from(h);
                }
                if let Some(pm) = pm {
                    self.new_path = Some(rewrite_path(path, prefix, pm));
                }
            }
            Filter::Mirror { target, percent } => {
                if let Some(t) = target
                    && (random_u64() % 10_000) as f64 / 100.0 < *percent
                {
                    self.mirrors.push(t);
                }
            }
            Filter::Redirect { .. } => return Some(f),
        }
        None
    }
}

/// The `Location` of a redirect (Gateway API `RequestRedirect`): each part from the filter,
/// else from the request; the port is left out when it is the scheme's default.
#[allow(clippy::too_many_arguments)]
fn redirect_location(
    host: &str,
    listener_port: u16,
    path: &str,
    query: Option<&str>,
    prefix: &str,
    scheme: &Option<String>,
    hostname: &Option<String>,
    port: Option<u16>,
    pm: Option<&crate::routes::PathMod>,
) -> String {
    let scheme_out = scheme.clone().unwrap_or_else(|| "http".into());
    let (req_host, req_port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h.to_string(), Some(p)),
            Err(_) => (host.to_string(), None),
        },
        _ => (host.to_string(), None),
    };
    let host_out = hostname.clone().unwrap_or(req_host);
    let port_out = port.or(if scheme.is_some() {
        None
    } else {
        req_port.or(Some(listener_port))
    });
    let default = if scheme_out == "https" { 443 } else { 80 };
    let port_part = match port_out {
        Some(p) if p != default => format!(":{p}"),
        _ => String::new(),
    };
    let path_out = pm.map_or_else(|| path.to_string(), |m| rewrite_path(path, prefix, m));
    let query_part = query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("{scheme_out}://{host_out}{port_part}{path_out}{query_part}")
}

type MirrorTx = (
    mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    Arc<std::sync::atomic::AtomicBool>,
);

/// The request body on its way upstream: counts what passes and copies each frame to the
/// mirrors; a mirror that cannot keep up is cut off (its request aborted), never waited
/// for.
struct RequestBody {
    inner: Incoming,
    count: Arc<AtomicU64>,
    mirrors: Vec<MirrorTx>,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                if !self.mirrors.is_empty() {
                    let copy = || {
                        f.data_ref()
                            .map(|d| Frame::data(d.clone()))
                            .or_else(|| f.trailers_ref().map(|t| Frame::trailers(t.clone())))
                    };
                    self.mirrors.retain(|(tx, aborted)| {
                        let kept = copy().is_none_or(|c| tx.try_send(Ok(c)).is_ok());
                        if !kept {
                            aborted.store(true, Ordering::Release);
                        }
                        kept
                    });
                }
                Poll::Ready(Some(Ok(f)))
            }
            Some(Err(e)) => {
                for (_, aborted) in &self.mirrors {
                    aborted.store(true, Ordering::Release);
                }
                self.mirrors.clear();
                Poll::Ready(Some(Err(Box::new(e))))
            }
            None => {
                self.mirrors.clear();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A mirror's request body, fed by [`RequestBody`].
struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    aborted: Arc<std::sync::atomic::AtomicBool>,
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match ready!(self.rx.poll_recv(cx)) {
            Some(f) => Poll::Ready(Some(f)),
            None if self.aborted.load(Ordering::Acquire) => Poll::Ready(Some(Err(
                "the mirror fell behind; its copy was cut off".into(),
            ))),
            None => Poll::Ready(None),
        }
    }
}

/// The response body on its way to the client: counts bytes, notes `grpc-status` in the
/// trailers, and records the request when it ends (or the client goes away: `DC`).
struct Measured {
    inner: Body,
    rec: Option<RequestRecord>,
    start: Instant,
    sent: u64,
    request_bytes: Arc<AtomicU64>,
    ended: bool,
    _load: Held,
}

impl HttpBody for Measured {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.sent += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    let status = t
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let size = head_size(t);
                    self.sent += size;
                    if let (Some(s), Some(rec)) = (status, self.rec.as_mut()) {
                        rec.grpc_status = Some(s);
                    }
                }
            }
            Some(Err(e)) => {
                let timed_out = e.is::<TimedOut>();
                let e = e.to_string();
                if let Some(rec) = self.rec.as_mut() {
                    if timed_out {
                        rec.flags = "UT";
                    } else if rec.flags == "-" {
                        rec.flags = "UPE";
                    }
                    rec.error = Some(e);
                }
                self.ended = true;
            }
            None => self.ended = true,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        let Some(mut rec) = self.rec.take() else {
            return;
        };
        if !self.ended && !self.inner.is_end_stream() && rec.flags == "-" {
            rec.flags = "DC";
        }
        rec.duration = self.start.elapsed();
        rec.response_bytes = self.sent;
        rec.request_bytes = self.request_bytes.load(Ordering::Relaxed);
        rec.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_other_protocols_by_its_first_bytes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"P"), None, "PRI, POST, PUT, PATCH");
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(classify(b"POST "), Some(true));
        assert_eq!(classify(H2_PREFACE), Some(true));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(false), "a TLS ClientHello");
        assert_eq!(classify(b"GETX"), Some(false));
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers, deflate".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn redirects_keep_what_the_filter_does_not_change() {
        let loc = redirect_location(
            "web.shop:8080",
            80,
            "/a/b",
            Some("q=1"),
            "/a",
            &None,
            &Some("example.com".into()),
            None,
            None,
        );
        assert_eq!(loc, "http://example.com:8080/a/b?q=1");
        let loc = redirect_location(
            "web.shop",
            80,
            "/a",
            None,
            "",
            &Some("https".into()),
            &None,
            None,
            None,
        );
        assert_eq!(loc, "https://web.shop/a");
        let full = crate::routes::PathMod::Full("/new".into());
        let loc = redirect_location(
            "web",
            8000,
            "/old",
            None,
            "",
            &None,
            &None,
            None,
            Some(&full),
        );
        assert_eq!(loc, "http://web:8000/new");
    }
}
