//! One pod's capture listeners and the passthrough forwarding of what they accept.
//!
//! Both listeners are created inside the pod's network namespace (so they receive what the
//! pod's redirect rules send to 15001 and 15006) and then served from the ordinary runtime.
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

use crate::config::{Config, INBOUND_PORT, OUTBOUND_PORT, SOCKET_MARK};
use crate::inpod::PodInfo;
use crate::telemetry::{self, Direction};

/// A pod's listeners; dropping the handle does not stop them, [`PodProxy::stop`] does.
pub struct PodProxy {
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

fn listener_in(netns: &Netns, port: u16) -> io::Result<std::net::TcpListener> {
    netns.run(|| -> io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        // A ztunnel restarted while the pod runs binds again at once (TIME_WAIT).
        s.set_reuse_address(true)?;
        s.set_mark(SOCKET_MARK)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        s.listen(1024)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    })?
}

impl PodProxy {
    /// Opens the pod's listeners in `netns` and starts serving them.
    pub fn start(
        netns: Arc<Netns>,
        pod: Arc<PodInfo>,
        config: Arc<Config>,
    ) -> io::Result<PodProxy> {
        let outbound = TcpListener::from_std(listener_in(&netns, OUTBOUND_PORT)?)?;
        let inbound = TcpListener::from_std(listener_in(&netns, INBOUND_PORT)?)?;
        let (stop, stopped) = watch::channel(false);
        let done = tokio::spawn(serve(
            [
                (outbound, Direction::Outbound),
                (inbound, Direction::Inbound),
            ],
            netns,
            pod,
            config,
            stopped,
        ));
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

async fn serve(
    listeners: [(TcpListener, Direction); 2],
    netns: Arc<Netns>,
    pod: Arc<PodInfo>,
    config: Arc<Config>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let [(out_l, _), (in_l, _)] = &listeners;
    loop {
        let (accepted, direction) = tokio::select! {
            r = out_l.accept() => (r, Direction::Outbound),
            r = in_l.accept() => (r, Direction::Inbound),
            _ = stopped.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        match accepted {
            Ok((stream, peer)) => {
                conns.spawn(handle(
                    stream,
                    peer,
                    direction,
                    netns.clone(),
                    pod.clone(),
                    config.clone(),
                ));
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
    let drain = tokio::time::sleep(config.drain_timeout);
    tokio::pin!(drain);
    loop {
        tokio::select! {
            next = conns.join_next() => if next.is_none() { break },
            () = &mut drain => {
                tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), open = conns.len(), "drain deadline reached; closing the remaining connections");
                conns.abort_all();
                break;
            }
        }
    }
}

fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let raw = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst)
        .map_err(io::Error::from)?;
    let ip = std::net::Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(raw.sin_port),
    )))
}

async fn connect_in(netns: &Netns, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = netns.run(|| -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        s.set_mark(SOCKET_MARK)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })??;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out after {timeout:?}"),
        )),
    }
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    direction: Direction,
    netns: Arc<Netns>,
    pod: Arc<PodInfo>,
    config: Arc<Config>,
) {
    let start = Instant::now();
    let dst = match original_dst(&client) {
        Ok(d) => d,
        Err(e) => {
            // Reached the listener directly, not through the capture rules.
            tracing::warn!(%peer, error = %e, "connection without an original destination; closing");
            return;
        }
    };
    let own = [OUTBOUND_PORT, INBOUND_PORT];
    if dst.ip().is_loopback() && own.contains(&dst.port()) {
        tracing::warn!(%peer, %dst, "connection addressed to ztunnel's own listener; closing");
        return;
    }
    let labels = telemetry::ConnLabels::new(direction, &pod);
    labels.opened();
    let mut result = "ok".to_string();
    let (mut sent, mut received) = (0u64, 0u64);
    match connect_in(&netns, dst, config.connect_timeout).await {
        Ok(mut upstream) => match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((to_upstream, to_client)) => {
                sent = to_upstream;
                received = to_client;
            }
            Err(e) => result = format!("reset: {e}"),
        },
        Err(e) => result = format!("upstream connect failed: {e}"),
    }
    labels.closed(sent, received);
    telemetry::access_log(&telemetry::AccessLog {
        direction,
        pod: &pod,
        src: peer,
        dst,
        sent,
        received,
        duration: start.elapsed(),
        result: &result,
    });
}
