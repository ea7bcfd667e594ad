//! HBONE over real sockets on loopback: mutual TLS with SPIFFE identities, CONNECT streams
//! carrying bytes both ways, many streams on one connection, refusals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_core::hbone::{self, HboneError};
use trellis_core::testing::TestCa;
use trellis_core::tls::{client_config, peer_identity, server_config};

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An HBONE server serving `allowed` only; reports each peer identity it saw.
async fn hbone_server(
    ca: &TestCa,
    allowed: SocketAddr,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let cert = ca.issue("shop", "b");
    let acceptor = TlsAcceptor::from(Arc::new(server_config(&cert, ca.bundle()).unwrap()));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = peer_identity(tls.get_ref().1).unwrap();
                let _ = tx.send(peer.to_string());
                let _ = hbone::serve(tls, move |inc| async move {
                    if inc.target != allowed {
                        inc.refuse(http::StatusCode::FORBIDDEN);
                        return;
                    }
                    let Ok(mut upstream) = TcpStream::connect(inc.target).await else {
                        return;
                    };
                    let mut tunnel = inc.accept().unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut upstream).await;
                })
                .await;
            });
        }
    });
    (addr, rx)
}

async fn client(ca: &TestCa, server: SocketAddr, expect: &str) -> Result<hbone::Client, String> {
    let cert = ca.issue("shop", "a");
    let cfg = client_config(&cert, ca.bundle(), expect.parse().unwrap()).unwrap();
    let tcp = TcpStream::connect(server)
        .await
        .map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::IpAddress(server.ip().into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    hbone::Client::handshake(tls)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn streams_carry_bytes_both_ways_with_identities_on_both_ends() {
    let ca = TestCa::new("cluster.local");
    let echo = echo_server().await;
    let (server, mut peers) = hbone_server(&ca, echo).await;
    let c = client(&ca, server, "spiffe://cluster.local/ns/shop/sa/b")
        .await
        .unwrap();
    assert_eq!(
        peers.recv().await.unwrap(),
        "spiffe://cluster.local/ns/shop/sa/a"
    );

    // Ten concurrent tunnels on one TLS connection, 2 MiB each, every byte checked.
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = c.connect(echo, &[], Duration::from_secs(5)).await.unwrap();
            let data: Vec<u8> = (0..2 << 20).map(|n: u32| (n as u8) ^ i).collect();
            let (mut r, mut w) = tokio::io::split(&mut s);
            let write = async {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut back = Vec::new();
            let read = r.read_to_end(&mut back);
            let ((), n) = tokio::join!(write, read);
            n.unwrap();
            assert_eq!(back, data, "stream {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        peers.try_recv().is_err(),
        "one TLS connection for all streams"
    );
}

#[tokio::test]
async fn refusals_and_wrong_identities_fail_cleanly() {
    let ca = TestCa::new("cluster.local");
    let echo = echo_server().await;
    let (server, _peers) = hbone_server(&ca, echo).await;
    let c = client(&ca, server, "spiffe://cluster.local/ns/shop/sa/b")
        .await
        .unwrap();
    let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
    match c.connect(other, &[], Duration::from_secs(5)).await {
        Err(HboneError::Refused(s)) => assert_eq!(s, http::StatusCode::FORBIDDEN),
        other => panic!("{other:?}"),
    }
    // The connection still serves the allowed target.
    let mut s = c.connect(echo, &[], Duration::from_secs(5)).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // Secure naming: a client expecting another identity does not complete the handshake.
    let e = client(&ca, server, "spiffe://cluster.local/ns/shop/sa/payments")
        .await
        .unwrap_err();
    assert!(
        e.contains("payments") || e.to_lowercase().contains("certificate"),
        "{e}"
    );

    // A peer from another mesh (its own CA) is refused by the server.
    let stranger = TestCa::new("cluster.local");
    assert!(
        client(&stranger, server, "spiffe://cluster.local/ns/shop/sa/b")
            .await
            .is_err()
    );
}

/// A pool dialer making real HBONE connections as shop/a, counting its dials.
fn counting_dial(
    ca: &Arc<TestCa>,
) -> (
    trellis_core::hbone::pool::Dial,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use trellis_core::hbone::pool::PoolKey;
    let dials = Arc::new(AtomicUsize::new(0));
    let (ca, counter) = (ca.clone(), dials.clone());
    let dial: trellis_core::hbone::pool::Dial = Arc::new(move |key: PoolKey| {
        let (ca, counter) = (ca.clone(), counter.clone());
        Box::pin(async move {
            counter.fetch_add(1, Ordering::SeqCst);
            client(&ca, key.address, &key.destination.to_string())
                .await
                .map_err(HboneError::BadRequest)
        })
    });
    (dial, dials)
}

#[tokio::test]
async fn the_pool_reuses_a_connection_per_identity_pair_and_closes_idle_ones() {
    use std::sync::atomic::Ordering;
    use trellis_core::hbone::pool::{Pool, PoolKey};
    let ca = Arc::new(TestCa::new("cluster.local"));
    let echo = echo_server().await;
    let (server, _peers) = hbone_server(&ca, echo).await;
    let (dial, dials) = counting_dial(&ca);
    let pool = Pool::new(dial, Duration::from_millis(200));
    let key = PoolKey {
        source: "spiffe://cluster.local/ns/shop/sa/a".parse().unwrap(),
        destination: "spiffe://cluster.local/ns/shop/sa/b".parse().unwrap(),
        address: server,
    };
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = pool
            .connect(key.clone(), echo, &[], Duration::from_secs(5))
            .await
            .unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        open.push(s);
    }
    assert_eq!(
        dials.load(Ordering::SeqCst),
        1,
        "three tunnels, one connection"
    );
    assert_eq!(pool.len(), 1);

    // Another destination identity is another connection (secure naming is per key).
    let mut other = key.clone();
    other.destination = "spiffe://cluster.local/ns/shop/sa/payments"
        .parse()
        .unwrap();
    assert!(
        pool.connect(other, echo, &[], Duration::from_secs(5))
            .await
            .is_err()
    );
    assert_eq!(dials.load(Ordering::SeqCst), 2);

    // Idle: closed after the timeout once its streams are gone (by the pool's own
    // sweeper: no call needed); the next tunnel dials.
    drop(open);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.len(), 0);
    let _s = pool
        .connect(key, echo, &[], Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(dials.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_connection_the_peer_closed_is_not_reused() {
    use std::sync::atomic::Ordering;
    use trellis_core::hbone::pool::{Pool, PoolKey};
    let ca = Arc::new(TestCa::new("cluster.local"));
    let echo = echo_server().await;
    // A peer that drops each connection 300 ms after accepting it (a restarting ztunnel).
    let cert = ca.issue("shop", "b");
    let acceptor = TlsAcceptor::from(Arc::new(server_config(&cert, ca.bundle()).unwrap()));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let serve = hbone::serve(tls, move |inc| async move {
                    let Ok(mut upstream) = TcpStream::connect(inc.target).await else {
                        return;
                    };
                    let mut tunnel = inc.accept().unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut upstream).await;
                });
                let _ = tokio::time::timeout(Duration::from_millis(300), serve).await;
            });
        }
    });
    let (dial, dials) = counting_dial(&ca);
    let pool = Pool::new(dial, Duration::from_secs(60));
    let key = PoolKey {
        source: "spiffe://cluster.local/ns/shop/sa/a".parse().unwrap(),
        destination: "spiffe://cluster.local/ns/shop/sa/b".parse().unwrap(),
        address: server,
    };
    for round in 1..=2 {
        let mut s = pool
            .connect(key.clone(), echo, &[], Duration::from_secs(5))
            .await
            .unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping", "round {round}");
        drop(s);
        assert_eq!(dials.load(Ordering::SeqCst), round);
        // The peer goes away; the pooled connection must not be handed out again.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
