//! One pod's listeners and what they do with what they accept.
//!
//! Three listeners are created inside the pod's network namespace and served from the
//! ordinary runtime: 15001 (captured outbound: HBONE to mesh destinations through a pool of
//! mutual-TLS connections made as the pod's identity, plain TCP to the rest), 15006
//! (captured plaintext inbound: L4 policy with no peer identity, so STRICT refuses it) and
//! 15008 (HBONE inbound: TLS with the pod's certificate, the peer's identity from its
//! certificate, the CONNECT target checked to be this pod, L4 policy, then the app).
//! A captured connection's original destination comes from `SO_ORIGINAL_DST` (the rules
//! use REDIRECT); the upstream socket is also created in the pod's namespace, so the
//! connection leaves with the pod's own address, and carries mark 0x539 so the rules let
//! it through instead of capturing it again.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use trellis_core::netns::Netns;

use trellis_core::SpiffeId;
use trellis_core::authz::{self, Conn};
use trellis_core::hbone::{
    self,
    pool::{Dial, Pool, PoolKey},
};

use crate::config::{Config, INBOUND_PORT, OUTBOUND_PORT, SOCKET_MARK};
use crate::inpod::PodInfo;
use crate::mesh::{HBONE_PORT, Mesh, Route};
use crate::telemetry::{self, Direction, End};

/// A pod's listeners; dropping the handle does not stop them, [`PodProxy::stop`] does.
pub struct PodProxy {
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

fn listener_in(netns: &Netns, port: u16) -> io::Result<std::net::TcpListener> {
    listener_on(netns, SocketAddr::from(([0, 0, 0, 0], port)))
}

/// `addr`'s listener inside the pod: IPv4 (`0.0.0.0`), or IPv6 only (`[::]`, v6-only, so
/// each family has its own socket and its own original-destination lookup).
fn listener_on(netns: &Netns, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    netns.run(|| -> io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // A ztunnel restarted while the pod runs binds again at once (TIME_WAIT).
        s.set_reuse_address(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_mark(SOCKET_MARK)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    })?
}

/// The pod's IPv6 listeners (`[::]:15001/15006/15008`), when IPv6 is enabled in its
/// namespace: a dual-stack pod's IPv6 connections are captured like its IPv4 ones. `None`
/// where the namespace has no IPv6 (the capture rules then have nothing to redirect).
fn ipv6_listeners(netns: &Netns) -> Option<[TcpListener; 3]> {
    let bind = |port| {
        listener_on(
            netns,
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        )
        .and_then(TcpListener::from_std)
    };
    match (bind(OUTBOUND_PORT), bind(INBOUND_PORT), bind(HBONE_PORT)) {
        (Ok(o), Ok(i), Ok(h)) => Some([o, i, h]),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            tracing::debug!(error = %e, "no IPv6 listeners in this pod (IPv6 off in its namespace?)");
            None
        }
    }
}

/// Everything a pod's connections need.
struct PodCtx {
    netns: Arc<Netns>,
    pod: Arc<PodInfo>,
    config: Arc<Config>,
    mesh: Arc<Mesh>,
    pool: Pool,
    identity: Option<SpiffeId>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Listener {
    Outbound,
    Plaintext,
    Hbone,
}

impl PodProxy {
    /// Opens the pod's listeners in `netns` and starts serving them.
    pub fn start(
        netns: Arc<Netns>,
        pod: Arc<PodInfo>,
        config: Arc<Config>,
        mesh: Arc<Mesh>,
    ) -> io::Result<PodProxy> {
        let outbound = TcpListener::from_std(listener_in(&netns, OUTBOUND_PORT)?)?;
        let inbound = TcpListener::from_std(listener_in(&netns, INBOUND_PORT)?)?;
        let hbone_l = TcpListener::from_std(listener_in(&netns, HBONE_PORT)?)?;
        let identity = SpiffeId::new(&mesh.trust_domain, &pod.namespace, &pod.service_account).ok();
        if let Some(id) = &identity {
            // Fetch the pod's certificate now, so the first connection does not wait for it.
            let (mesh, id) = (mesh.clone(), id.clone());
            tokio::spawn(async move {
                if let Err(e) = mesh.certs.fetch(&id).await {
                    tracing::warn!(identity = %id, error = %e, "cannot obtain the pod's certificate yet");
                }
            });
        }
        let pool = Pool::new(
            dialer(netns.clone(), mesh.clone(), config.clone()),
            Duration::from_secs(60),
        );
        let ctx = Arc::new(PodCtx {
            netns,
            pod,
            config,
            mesh,
            pool,
            identity,
        });
        let v6 = ipv6_listeners(&ctx.netns);
        let (stop, stopped) = watch::channel(false);
        let v4_done = tokio::spawn(serve(
            [outbound, inbound, hbone_l],
            ctx.clone(),
            stopped.clone(),
        ));
        let done = tokio::spawn(async move {
            let v6_done = v6.map(|l| tokio::spawn(serve(l, ctx, stopped)));
            let _ = v4_done.await;
            if let Some(d) = v6_done {
                let _ = d.await;
            }
        });
        Ok(PodProxy { stop, done })
    }

    /// Closes the listeners now; open connections may finish within `drain`, then they
    /// are cut. The returned handle resolves when all is done.
    pub fn stop(self, drain: Duration) -> tokio::task::JoinHandle<()> {
        let _ = self.stop.send(true);
        let done = self.done;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(drain + Duration::from_secs(1), done).await;
        })
    }
}

/// Dials HBONE connections for the pool: TCP from the pod's namespace (marked, so not
/// captured again), TLS 1.3 as the source identity expecting the destination identity.
fn dialer(netns: Arc<Netns>, mesh: Arc<Mesh>, config: Arc<Config>) -> Dial {
    Arc::new(move |key: PoolKey| {
        let (netns, mesh, config) = (netns.clone(), mesh.clone(), config.clone());
        Box::pin(async move {
            let tcp = connect_in(&netns, key.address, config.connect_timeout);
            trellis_core::hbone::pool::dial_tls(
                &mesh.certs,
                mesh.bundle.clone(),
                &key,
                tcp,
                config.connect_timeout,
            )
            .await
        })
    })
}

async fn serve(listeners: [TcpListener; 3], ctx: Arc<PodCtx>, mut stopped: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    let [out_l, in_l, hb_l] = &listeners;
    loop {
        let (accepted, kind) = tokio::select! {
            r = out_l.accept() => (r, Listener::Outbound),
            r = in_l.accept() => (r, Listener::Plaintext),
            r = hb_l.accept() => (r, Listener::Hbone),
            _ = stopped.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let ctx = ctx.clone();
                match kind {
                    Listener::Outbound => conns.spawn(outbound(stream, peer, ctx)),
                    Listener::Plaintext => conns.spawn(plaintext_inbound(stream, peer, ctx)),
                    Listener::Hbone => {
                        conns.spawn(hbone_inbound(stream, peer, ctx, stopped.clone()))
                    }
                };
            }
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listeners);
    // Drain: connections in flight may finish, within the deadline.
    let drain = tokio::time::sleep(ctx.config.drain_timeout);
    tokio::pin!(drain);
    loop {
        tokio::select! {
            next = conns.join_next() => if next.is_none() { break },
            () = &mut drain => {
                tracing::info!(pod = %format!("{}/{}", ctx.pod.namespace, ctx.pod.name), open = conns.len(), "drain deadline reached; closing the remaining connections");
                conns.abort_all();
                break;
            }
        }
    }
}

/// Copies both ways until both sides are done (buffers that grow with the traffic: see
/// [`crate::copy`]).
async fn copy<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    trellis_core::copy::bidirectional(a, b).await
}

fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    if stream.local_addr()?.is_ipv6() {
        let raw = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::Ip6tOriginalDst)
            .map_err(io::Error::from)?;
        return Ok(SocketAddr::V6(std::net::SocketAddrV6::new(
            std::net::Ipv6Addr::from(raw.sin6_addr.s6_addr),
            u16::from_be(raw.sin6_port),
            0,
            0,
        )));
    }
    let raw = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst)
        .map_err(io::Error::from)?;
    let ip = std::net::Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(raw.sin_port),
    )))
}

async fn connect_in(netns: &Netns, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    connect_from(netns, None, dst, timeout).await
}

/// Whether connecting to the app as the client works here (IP_TRANSPARENT needs
/// CAP_NET_ADMIN); after the first refusal, ztunnel connects from the pod's own address.
static TRANSPARENT_OK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Connects to this pod's app for an inbound connection from `client`, keeping the
/// client's address where the kernel allows (IP_TRANSPARENT, bound to the client's IP; the
/// node agent installs the return path for the replies), else from the pod's address.
async fn connect_as(
    netns: &Netns,
    client: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let transparent = TRANSPARENT_OK.load(std::sync::atomic::Ordering::Relaxed)
        && client.is_ipv4() == dst.is_ipv4();
    if !transparent {
        return connect_in(netns, dst, timeout).await;
    }
    match connect_from(netns, Some(client.ip()), dst, timeout).await {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            TRANSPARENT_OK.store(false, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "cannot connect to apps with the client's address (IP_TRANSPARENT refused); apps will see the pod's own address");
            connect_in(netns, dst, timeout).await
        }
        r => r,
    }
}

async fn connect_from(
    netns: &Netns,
    source: Option<std::net::IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    // Only socket() needs the pod's namespace; the socket keeps it for everything after.
    let s = netns
        .run(|| Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)))??;
    s.set_mark(SOCKET_MARK)?;
    s.set_nonblocking(true)?;
    // A proxy must not add Nagle's delay to small writes its client already decided
    // to send (request/response traffic would wait for the peer's delayed ACK).
    s.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        if ip.is_ipv4() {
            s.set_ip_transparent_v4(true)?;
        } else {
            s.set_ip_transparent_v6(true)?;
        }
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    let socket = s;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out after {timeout:?}"),
        )),
    }
}

/// What one connection did, for the access log and metrics.
struct Outcome {
    _open: crate::memory::Open,
    route: &'static str,
    labels: telemetry::ConnLabels,
    /// Istio's response flag: `-`, `DENY`, `CONNECT`.
    flags: &'static str,
    peer_identity: Option<String>,
    policy: Option<String>,
    sent: u64,
    received: u64,
    result: String,
}

impl Outcome {
    /// A connection starts: counted as opened with `labels`.
    fn new(route: &'static str, labels: telemetry::ConnLabels) -> Outcome {
        labels.opened();
        Outcome {
            _open: crate::memory::Open::new(),
            route,
            labels,
            flags: "-",
            peer_identity: None,
            policy: None,
            sent: 0,
            received: 0,
            result: "ok".into(),
        }
    }
}

fn finish(
    ctx: &PodCtx,
    direction: Direction,
    src: SocketAddr,
    dst: SocketAddr,
    start: Instant,
    o: Outcome,
) {
    o.labels.closed(o.flags, o.sent, o.received);
    telemetry::access_log(&telemetry::AccessLog {
        direction,
        pod: &ctx.pod,
        src,
        dst,
        route: o.route,
        peer_identity: o.peer_identity.as_deref(),
        policy: o.policy.as_deref(),
        sent: o.sent,
        received: o.received,
        duration: start.elapsed(),
        result: &o.result,
    });
}

async fn outbound(mut client: TcpStream, peer: SocketAddr, ctx: Arc<PodCtx>) {
    let start = Instant::now();
    let dst = match original_dst(&client) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "connection without an original destination; closing");
            return;
        }
    };
    if dst.ip().is_loopback() && [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT].contains(&dst.port()) {
        tracing::warn!(%peer, %dst, "connection addressed to ztunnel's own listener; closing");
        return;
    }
    let route = ctx.mesh.route(dst, crate::mesh::random_u64());
    // Counted as load on the peer it goes to while it lasts (endpoint choice compares it).
    let _load = match &route {
        Route::Hbone { via, .. } => Some(ctx.mesh.loads.hold(via.ip())),
        Route::Passthrough(to) => Some(ctx.mesh.loads.hold(to.ip())),
        Route::Refuse(_) => None,
    };
    let labels = {
        let store = ctx.mesh.xds.store();
        let source = match store.workload_by_ip(peer.ip()) {
            Some(w) => End::new(Some(w), ctx.identity.as_ref()),
            None => End::pod(&ctx.pod, ctx.identity.as_ref()),
        };
        let (to, principal) = match &route {
            Route::Hbone {
                target, identity, ..
            } => (target.ip(), Some(identity)),
            Route::Passthrough(to) => (to.ip(), None),
            Route::Refuse(_) => (dst.ip(), None),
        };
        let destination = End::new(store.workload_by_ip(to), principal);
        telemetry::ConnLabels::new(
            Direction::Outbound,
            &source,
            &destination,
            store.service_by_vip(dst.ip()),
            matches!(route, Route::Hbone { .. }),
        )
    };
    let mut o = Outcome::new(
        match route {
            Route::Hbone { .. } => "hbone",
            Route::Passthrough(_) => "passthrough",
            Route::Refuse(_) => "refused",
        },
        labels,
    );
    match route {
        Route::Refuse(why) => {
            o.flags = "DENY";
            o.result = why;
        }
        Route::Passthrough(to) => {
            match connect_in(&ctx.netns, to, ctx.config.connect_timeout).await {
                Ok(mut upstream) => match copy(&mut client, &mut upstream).await {
                    Ok((a, b)) => (o.sent, o.received) = (a, b),
                    Err(e) => o.result = format!("reset: {e}"),
                },
                Err(e) => {
                    o.flags = "CONNECT";
                    o.result = format!("upstream connect failed: {e}");
                }
            }
        }
        Route::Hbone {
            target,
            via,
            identity,
        } => {
            o.peer_identity = Some(identity.to_string());
            match &ctx.identity {
                // Never downgrade: a pod without an identity does not reach the mesh.
                None => {
                    o.flags = "DENY";
                    o.result =
                        "the pod has no valid identity; refusing (no plaintext fallback)".into()
                }
                Some(source) => {
                    let key = PoolKey {
                        source: source.clone(),
                        destination: identity,
                        address: via,
                    };
                    match ctx
                        .pool
                        .connect(key, target, &[], ctx.config.connect_timeout)
                        .await
                    {
                        Ok(mut tunnel) => {
                            match trellis_core::copy::tcp_hbone(&mut client, tunnel.stream_mut())
                                .await
                            {
                                Ok((a, b)) => (o.sent, o.received) = (a, b),
                                // The CONNECT went out without waiting: a refusal arrives here.
                                // 403 from Trellis, 401 from Istio's ztunnel.
                                Err(_) if tunnel.denied_by_policy() => {
                                    o.flags = "DENY";
                                    o.result = "denied by the destination's policy".into();
                                }
                                Err(e) => o.result = format!("reset: {e}"),
                            }
                        }
                        Err(e) => {
                            o.flags = "CONNECT";
                            o.result = format!("HBONE to {via} failed: {e}");
                        }
                    }
                }
            }
        }
    }
    finish(&ctx, Direction::Outbound, peer, dst, start, o);
}

/// The metric labels of an inbound connection from `peer` to `dst` (this pod), the peer
/// identified as `source` when it presented a certificate.
fn inbound_labels(
    ctx: &PodCtx,
    peer: SocketAddr,
    dst: SocketAddr,
    source: Option<&SpiffeId>,
    mtls: bool,
) -> telemetry::ConnLabels {
    let store = ctx.mesh.xds.store();
    let source = End::new(store.workload_by_ip(peer.ip()), source);
    let destination = match store.workload_by_ip(dst.ip()) {
        Some(w) => End::new(Some(w), ctx.identity.as_ref()),
        None => End::pod(&ctx.pod, ctx.identity.as_ref()),
    };
    telemetry::ConnLabels::new(Direction::Inbound, &source, &destination, None, mtls)
}

/// The destination workload (this pod) and whether `conn` may reach it.
fn authorize(ctx: &PodCtx, conn: &Conn) -> Result<Option<String>, String> {
    let store = ctx.mesh.xds.store();
    let Some(w) = store.workload_by_ip(conn.dst_ip) else {
        return Err(format!(
            "{} is not a known workload; denying (fail closed)",
            conn.dst_ip
        ));
    };
    if w.namespace != ctx.pod.namespace || w.name != ctx.pod.name {
        return Err(format!("{} is not this pod's address", conn.dst_ip));
    }
    let d = authz::evaluate(store.policies_for(w), conn);
    for (p, action) in &d.dry_run {
        tracing::info!(policy = %p, ?action, "dry-run policy matched");
    }
    if d.allowed {
        Ok(d.policy)
    } else {
        let by = d.policy.clone().unwrap_or_else(|| "-".into());
        metrics::counter!("trellis_authz_denials_total", "policy" => by.clone()).increment(1);
        tracing::info!(target: "authz", policy = %by, reason = %d.reason, src = %conn.src_ip, dst = %conn.dst_ip, port = conn.dst_port, peer = ?conn.source.as_ref().map(ToString::to_string), "connection denied");
        Err(format!("denied: {} ({by})", d.reason))
    }
}

/// Resolves, with the reason, once the policy in force no longer allows `conn`: checked
/// again on every configuration change, as Istio's ztunnel does, so a DENY applied (or an
/// ALLOW removed) closes connections already open. Costs nothing until a change arrives.
async fn revoked(ctx: &PodCtx, conn: &Conn) -> String {
    let mut changes = ctx.mesh.xds.changes();
    // Only changes after this connection was authorized count.
    changes.borrow_and_update();
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Err(reason) = authorize(ctx, conn) {
            return reason;
        }
    }
}

/// The outcome of a connection closed because its policy changed.
fn closed_by_policy(o: &mut Outcome, reason: String) {
    o.flags = "DENY";
    o.result = format!("closed: the policy changed while the connection was open; {reason}");
}

async fn plaintext_inbound(mut client: TcpStream, peer: SocketAddr, ctx: Arc<PodCtx>) {
    let start = Instant::now();
    let Ok(dst) = original_dst(&client) else {
        return;
    };
    let mut o = Outcome::new("plaintext", inbound_labels(&ctx, peer, dst, None, false));
    let conn = Conn {
        source: None,
        src_ip: peer.ip(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    match authorize(&ctx, &conn) {
        Err(e) => {
            o.flags = "DENY";
            o.result = e;
        }
        Ok(policy) => {
            o.policy = policy;
            match connect_as(&ctx.netns, peer, dst, ctx.config.connect_timeout).await {
                Ok(mut up) => tokio::select! {
                    biased;
                    r = copy(&mut client, &mut up) => match r {
                        Ok((a, b)) => (o.sent, o.received) = (a, b),
                        Err(e) => o.result = format!("reset: {e}"),
                    },
                    reason = revoked(&ctx, &conn) => closed_by_policy(&mut o, reason),
                },
                Err(e) => {
                    o.flags = "CONNECT";
                    o.result = format!("app connect failed: {e}");
                }
            }
        }
    }
    finish(&ctx, Direction::Inbound, peer, dst, start, o);
}

async fn hbone_inbound(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: Arc<PodCtx>,
    mut stopped: watch::Receiver<bool>,
) {
    let Some(identity) = ctx.identity.clone() else {
        tracing::warn!(%peer, "HBONE connection for a pod without identity; closing");
        return;
    };
    let cert = match ctx.mesh.certs.fetch(&identity).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%identity, error = %e, "no certificate for the pod; refusing HBONE");
            return;
        }
    };
    let handler_ctx = ctx.clone();
    // When the pod's listeners close (pod gone, ztunnel stopping), the peer is told to
    // open no new stream here; open ones run on within the drain deadline.
    let drain = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let result = hbone::accept_mtls(
        tcp,
        &cert,
        ctx.mesh.bundle.clone(),
        move |source, inc| {
            let ctx = handler_ctx.clone();
            async move {
                let start = Instant::now();
                let labels = inbound_labels(&ctx, peer, inc.target, Some(&source), true);
                let mut o = Outcome::new("hbone", labels);
                o.peer_identity = Some(source.to_string());
                let conn = Conn {
                    source: Some(source),
                    src_ip: peer.ip(),
                    dst_ip: inc.target.ip(),
                    dst_port: inc.target.port(),
                };
                let target = inc.target;
                match authorize(&ctx, &conn) {
                    Err(e) => {
                        o.flags = "DENY";
                        o.result = e;
                        inc.refuse(http::StatusCode::FORBIDDEN);
                    }
                    Ok(policy) => {
                        o.policy = policy;
                        match connect_as(&ctx.netns, peer, target, ctx.config.connect_timeout).await
                        {
                            Err(e) => {
                                o.flags = "CONNECT";
                                o.result = format!("app connect failed: {e}");
                                inc.refuse(http::StatusCode::SERVICE_UNAVAILABLE);
                            }
                            Ok(mut app) => match inc.accept() {
                                Ok(mut tunnel) => tokio::select! {
                                    biased;
                                    r = trellis_core::copy::tcp_hbone(&mut app, &mut tunnel) => match r {
                                        // Sent is what the client sent: tunnel → app.
                                        Ok((up, down)) => (o.sent, o.received) = (down, up),
                                        Err(e) => o.result = format!("reset: {e}"),
                                    },
                                    reason = revoked(&ctx, &conn) => closed_by_policy(&mut o, reason),
                                },
                                Err(e) => o.result = format!("HBONE: {e}"),
                            },
                        }
                    }
                }
                finish(&ctx, Direction::Inbound, peer, target, start, o);
            }
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
