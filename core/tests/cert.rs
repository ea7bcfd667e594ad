//! The certificate manager against an in-process CA, on tokio's paused clock: one CSR per
//! identity however many ask, renewal at about half the lifetime, service through a CA
//! outage, metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use metrics_util::CompositeKey;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

/// One snapshot of the recorder (taking it drains the values).
type Snapshot = Vec<(
    CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;
use trellis_core::SpiffeId;
use trellis_core::cert::{CaClient, CertConfig, CertError, CertManager};
use trellis_core::testing::TestCa;

const DAY: i64 = 24 * 3600;

struct FakeCa {
    ca: TestCa,
    /// Signs with a CA the manager does not trust when set.
    impostor: Option<TestCa>,
    calls: AtomicUsize,
    down: AtomicBool,
    lifetime_secs: std::sync::atomic::AtomicI64,
}

#[derive(Clone)]
struct Shared(Arc<FakeCa>);

impl CaClient for Shared {
    async fn sign(
        &self,
        _identity: &SpiffeId,
        csr_pem: String,
        _ttl: Duration,
    ) -> Result<Vec<String>, CertError> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        // A CA takes a moment: concurrent callers overlap.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if self.0.down.load(Ordering::SeqCst) {
            return Err(CertError::Unreachable {
                endpoint: "fake".into(),
                reason: "down".into(),
            });
        }
        self.0
            .impostor
            .as_ref()
            .unwrap_or(&self.0.ca)
            .sign_csr(&csr_pem, self.0.lifetime_secs.load(Ordering::SeqCst))
            .map_err(|reason| CertError::Refused {
                identity: "?".into(),
                reason,
            })
    }
}

fn setup() -> (Arc<FakeCa>, CertManager<Shared>) {
    setup_with(None)
}

fn setup_with(impostor: Option<TestCa>) -> (Arc<FakeCa>, CertManager<Shared>) {
    let fake = Arc::new(FakeCa {
        ca: TestCa::new("cluster.local"),
        impostor,
        calls: AtomicUsize::new(0),
        down: AtomicBool::new(false),
        lifetime_secs: std::sync::atomic::AtomicI64::new(DAY),
    });
    let mgr = CertManager::new(
        Shared(fake.clone()),
        fake.ca.bundle(),
        CertConfig::default(),
    );
    (fake, mgr)
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa).unwrap()
}

fn calls(fake: &FakeCa) -> usize {
    fake.calls.load(Ordering::SeqCst)
}

async fn advance(d: Duration) {
    // Sleeping on the paused clock advances it, letting every timer due meanwhile fire.
    tokio::time::sleep(d).await;
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(start_paused = true)]
async fn concurrent_requests_for_one_identity_make_one_csr() {
    let (fake, mgr) = setup();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mgr = mgr.clone();
            tokio::spawn(async move { mgr.fetch(&id("cart")).await.unwrap() })
        })
        .collect();
    let mut certs = Vec::new();
    for t in tasks {
        certs.push(t.await.unwrap());
    }
    assert_eq!(calls(&fake), 1, "one CSR for twenty callers");
    assert!(
        certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])),
        "all got the same certificate"
    );
    assert_eq!(certs[0].identity(), &id("cart"));
    // Cached from now on.
    let again = mgr.fetch(&id("cart")).await.unwrap();
    assert!(Arc::ptr_eq(&again, &certs[0]));
    assert_eq!(calls(&fake), 1);
    // Another identity is another CSR.
    mgr.fetch(&id("payments")).await.unwrap();
    assert_eq!(calls(&fake), 2);
}

#[tokio::test(start_paused = true)]
async fn renews_at_about_half_of_the_lifetime() {
    let (fake, mgr) = setup();
    let first = mgr.fetch(&id("cart")).await.unwrap();
    // Jitter keeps renewal between 40% and 60% of the 24 h lifetime.
    advance(9 * HOUR).await;
    assert_eq!(calls(&fake), 1, "renewed too early");
    advance(6 * HOUR).await;
    assert_eq!(calls(&fake), 2, "not renewed by 60% of the lifetime");
    let second = mgr.cached(&id("cart")).unwrap();
    assert!(
        !Arc::ptr_eq(&first, &second),
        "the renewed certificate is served"
    );
}

#[tokio::test(start_paused = true)]
async fn keeps_serving_through_a_ca_outage_then_recovers() {
    let (fake, mgr) = setup();
    let held = mgr.fetch(&id("cart")).await.unwrap();
    fake.down.store(true, Ordering::SeqCst);
    advance(15 * HOUR).await;
    let attempts = calls(&fake);
    assert!(
        attempts > 2,
        "renewal is retried while the CA is down ({attempts} calls)"
    );
    // Retries back off: within 15 minutes of outage, at most ~1 attempt a minute.
    advance(15 * 60 * Duration::from_secs(1)).await;
    assert!(
        calls(&fake) - attempts <= 16,
        "retries do not back off: {}",
        calls(&fake) - attempts
    );
    let served = mgr
        .cached(&id("cart"))
        .expect("the valid certificate is still served");
    assert!(Arc::ptr_eq(&served, &held));
    // A new identity cannot be served while the CA is away: fail closed.
    let err = mgr.fetch(&id("new-workload")).await.unwrap_err();
    assert!(matches!(err, CertError::Unreachable { .. }), "{err}");

    fake.down.store(false, Ordering::SeqCst);
    advance(Duration::from_secs(61)).await;
    let renewed = mgr.cached(&id("cart")).unwrap();
    assert!(!Arc::ptr_eq(&renewed, &held), "renewed once the CA is back");
}

#[tokio::test(start_paused = true)]
async fn an_expired_certificate_is_never_served() {
    let (fake, mgr) = setup();
    fake.lifetime_secs.store(-60, Ordering::SeqCst);
    let err = mgr.fetch(&id("cart")).await.unwrap_err();
    assert!(err.to_string().contains("already expired"), "{err}");
    assert!(mgr.cached(&id("cart")).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_forgotten_identity_is_no_longer_renewed() {
    let (fake, mgr) = setup();
    mgr.fetch(&id("cart")).await.unwrap();
    mgr.forget(&id("cart"));
    assert!(mgr.identities().is_empty());
    advance(30 * HOUR).await;
    assert_eq!(calls(&fake), 1);
}

fn counter(snap: &Snapshot, name: &str, label: (&str, &str)) -> u64 {
    snap.iter()
        .find_map(|(key, _, _, value)| {
            let k = key.key();
            let matches = k.name() == name
                && k.labels()
                    .any(|l| l.key() == label.0 && l.value() == label.1);
            match value {
                DebugValue::Counter(v) if matches => Some(*v),
                _ => None,
            }
        })
        .unwrap_or(0)
}

fn gauge(snap: &Snapshot, name: &str, label: (&str, &str)) -> Option<f64> {
    snap.iter().find_map(|(key, _, _, value)| {
        let k = key.key();
        let matches = k.name() == name
            && k.labels()
                .any(|l| l.key() == label.0 && l.value() == label.1);
        match value {
            DebugValue::Gauge(v) if matches => Some(v.into_inner()),
            _ => None,
        }
    })
}

#[tokio::test(start_paused = true)]
async fn issuance_and_expiry_are_exported_as_metrics() {
    // Each test runs in its own process under nextest, so a global recorder is ours alone.
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder.install().unwrap();
    let (fake, mgr) = setup();
    mgr.fetch(&id("cart")).await.unwrap();
    let s = snap.snapshot().into_vec();
    assert_eq!(
        counter(&s, "trellis_cert_issuance_total", ("result", "success")),
        1
    );
    let cart = id("cart").to_string();
    let left = gauge(&s, "trellis_cert_expiry_seconds", ("identity", &cart)).unwrap();
    assert!(
        (DAY as f64 - 120.0..=DAY as f64).contains(&left),
        "seconds to expiry {left}"
    );
    fake.down.store(true, Ordering::SeqCst);
    let _ = mgr.fetch(&id("other")).await;
    let s = snap.snapshot().into_vec();
    assert_eq!(
        counter(&s, "trellis_cert_issuance_total", ("result", "failure")),
        1
    );
}

async fn ping(
    s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> std::io::Result<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"p").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(b[0])
}

#[tokio::test(start_paused = true)]
async fn renewal_keeps_open_connections_and_new_ones_use_the_new_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use trellis_core::tls;
    let (fake, mgr) = setup();
    let bundle = Arc::new(tls::TrustBundle::new("cluster.local", vec![fake.ca.root()]).unwrap());
    let server_id = id("server");
    let client_id = id("client");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    // A server that answers each connection with the certificate the manager holds now,
    // as ztunnel's inbound listener does, echoing bytes.
    let (m, b) = (mgr.clone(), bundle.clone());
    let sid = server_id.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let cert = m.fetch(&sid).await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
                tls::server_config(&cert, b.clone()).unwrap(),
            ));
            tokio::spawn(async move {
                let mut s = acceptor.accept(tcp).await.unwrap();
                let mut buf = [0u8; 1];
                while s.read_exact(&mut buf).await.is_ok() {
                    s.write_all(&buf).await.unwrap();
                }
            });
        }
    });
    let connect = || async {
        let cert = mgr.fetch(&client_id).await.unwrap();
        let config = tls::client_config(&cert, bundle.clone(), server_id.clone()).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
                tcp,
            )
            .await
            .unwrap()
    };
    let mut old = connect().await;
    assert_eq!(ping(&mut old).await.unwrap(), b'p');
    let before = old.get_ref().1.peer_certificates().unwrap()[0].clone();

    advance(15 * HOUR).await; // both certificates renewed
    assert_eq!(
        calls(&fake),
        4,
        "server and client certificates renewed once each"
    );

    assert_eq!(
        ping(&mut old).await.unwrap(),
        b'p',
        "the open connection keeps working"
    );
    let mut new = connect().await;
    assert_eq!(ping(&mut new).await.unwrap(), b'p');
    let after = new.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(
        before, after,
        "a new connection gets the renewed server certificate"
    );
}

#[tokio::test(start_paused = true)]
async fn callers_waiting_on_a_failed_request_share_its_failure() {
    let (fake, mgr) = setup();
    fake.down.store(true, Ordering::SeqCst);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let mgr = mgr.clone();
            tokio::spawn(async move { mgr.fetch(&id("cart")).await })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().is_err());
    }
    assert_eq!(
        calls(&fake),
        1,
        "one request to a CA that is down, not ten in a row"
    );
}

#[tokio::test(start_paused = true)]
async fn a_forgotten_identity_fetched_meanwhile_is_not_kept_or_renewed() {
    let (fake, mgr) = setup();
    let m = mgr.clone();
    let pending = tokio::spawn(async move { m.fetch(&id("cart")).await });
    tokio::task::yield_now().await; // the request is now with the CA
    mgr.forget(&id("cart"));
    assert!(
        pending.await.unwrap().is_ok(),
        "the caller still gets its certificate"
    );
    assert!(mgr.cached(&id("cart")).is_none());
    advance(30 * HOUR).await;
    assert_eq!(calls(&fake), 1, "no renewal for a forgotten identity");
}

#[tokio::test(start_paused = true)]
async fn a_certificate_from_an_untrusted_ca_is_refused() {
    let (_, mgr) = setup_with(Some(TestCa::new("cluster.local")));
    let err = mgr.fetch(&id("cart")).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("does not lead to the trust bundle"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn short_lifetimes_do_not_renew_in_a_tight_loop() {
    let (fake, mgr) = setup();
    // Five minutes, backdated one minute by the CA: renewal 2-3 minutes after receipt.
    fake.lifetime_secs.store(300, Ordering::SeqCst);
    mgr.fetch(&id("cart")).await.unwrap();
    advance(Duration::from_secs(100)).await;
    assert_eq!(calls(&fake), 1, "renewed before 40% of the usable lifetime");
    advance(Duration::from_secs(100)).await;
    assert_eq!(calls(&fake), 2, "not renewed by 60% of the usable lifetime");
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_renewal() {
    let (fake, mgr) = setup();
    mgr.fetch(&id("cart")).await.unwrap();
    mgr.shutdown();
    advance(30 * HOUR).await;
    assert_eq!(calls(&fake), 1);
}
