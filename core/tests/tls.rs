//! HBONE's TLS on loopback sockets: what is accepted, and each rejection rule on its own.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_core::SpiffeId;
use trellis_core::testing::TestCa;
use trellis_core::tls::{self, TrustBundle, WorkloadCert};

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

/// One handshake over loopback plus one byte each way; returns what each side saw.
async fn handshake(
    server: ServerConfig,
    client: ClientConfig,
) -> (Result<SpiffeId, String>, Result<SpiffeId, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| tls::handshake_failure(&e))?;
        let peer = tls::peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        tls.write_all(&b).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .map_err(|e| tls::handshake_failure(&e))?;
        // In TLS 1.3 the server judges the client certificate after the client finished;
        // a rejection reaches the client as an alert on its next read.
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b)
            .await
            .map_err(|e| tls::handshake_failure(&e))?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls::peer_identity(tls.get_ref().1).map_err(|e| e.to_string())
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .expect("client side hung");
    let server = tokio::time::timeout(Duration::from_secs(10), server_side)
        .await
        .expect("server side hung")
        .unwrap();
    (server, client)
}

fn assert_rejected(result: &Result<SpiffeId, String>, reason: &str) {
    match result {
        Ok(id) => panic!("accepted {id}, expected a rejection for {reason:?}"),
        Err(e) => assert!(e.contains(reason), "rejected for another reason: {e}"),
    }
}

/// A client config with a certificate the product code would never build (bad SANs and the
/// like), trusting any server: to test what the server refuses.
fn raw_client(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> ClientConfig {
    let mut c = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_client_auth_cert(chain, key)
        .unwrap();
    c.alpn_protocols = vec![b"h2".to_vec()];
    c
}

/// A server config with a certificate the product code would never build, requiring no
/// client certificate: to test what the client refuses.
fn raw_server(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> ServerConfig {
    let mut s = ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    s.alpn_protocols = vec![b"h2".to_vec()];
    s
}

#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn pair(
    ca: &TestCa,
    server: &WorkloadCert,
    client: &WorkloadCert,
    expect: SpiffeId,
) -> (ServerConfig, ClientConfig) {
    (
        tls::server_config(server, ca.bundle()).unwrap(),
        tls::client_config(client, ca.bundle(), expect).unwrap(),
    )
}

#[tokio::test]
async fn mutual_tls_proves_both_identities() {
    let ca = TestCa::new(TD);
    let (b, a) = (ca.issue("ns-b", "b"), ca.issue("ns-a", "a"));
    let (s, c) = pair(&ca, &b, &a, id("ns-b", "b"));
    let (server, client) = handshake(s, c).await;
    assert_eq!(
        server.unwrap(),
        id("ns-a", "a"),
        "server sees the client's identity"
    );
    assert_eq!(
        client.unwrap(),
        id("ns-b", "b"),
        "client sees the server's identity"
    );
}

#[tokio::test]
async fn unknown_ca_is_rejected_both_ways() {
    let ours = TestCa::new(TD);
    let theirs = TestCa::new(TD);
    // A server whose certificate comes from a CA we do not trust.
    let s = tls::server_config(&theirs.issue("ns-b", "b"), theirs.bundle()).unwrap();
    let c = tls::client_config(&ours.issue("ns-a", "a"), ours.bundle(), id("ns-b", "b")).unwrap();
    let (_, client) = handshake(s, c).await;
    assert_rejected(&client, "UnknownIssuer");
    // A client whose certificate comes from a CA we do not trust.
    let s = tls::server_config(&ours.issue("ns-b", "b"), ours.bundle()).unwrap();
    let c = tls::client_config(&theirs.issue("ns-a", "a"), ours.bundle(), id("ns-b", "b")).unwrap();
    let (server, _) = handshake(s, c).await;
    assert_rejected(&server, "UnknownIssuer");
    // An impostor CA with the very name of ours: found by name, refused by signature.
    let ours = TestCa::named(TD, "Trellis root");
    let impostor = TestCa::named(TD, "Trellis root");
    let s = tls::server_config(&impostor.issue("ns-b", "b"), impostor.bundle()).unwrap();
    let c = tls::client_config(&ours.issue("ns-a", "a"), ours.bundle(), id("ns-b", "b")).unwrap();
    let (_, client) = handshake(s, c).await;
    assert_rejected(&client, "BadSignature");
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_rejected() {
    let ca = TestCa::new(TD);
    let now = OffsetDateTime::now_utc();
    let hour = Duration::from_secs(3600);
    let uri = id("ns-a", "a").to_string();
    for (not_before, not_after, reason) in [
        (now - 3 * hour, now - hour, "certificate expired"),
        (now + hour, now + 3 * hour, "certificate not valid yet"),
    ] {
        // As a client certificate, judged by the server...
        let (chain, key) = ca.issue_raw(&[&uri], not_before, not_after);
        let s = tls::server_config(&ca.issue("ns-b", "b"), ca.bundle()).unwrap();
        let (server, _) = handshake(s, raw_client(chain.clone(), key.clone_key())).await;
        assert_rejected(&server, reason);
        // ...and as a server certificate, judged by the client.
        let c = tls::client_config(&ca.issue("ns-b", "b"), ca.bundle(), id("ns-a", "a")).unwrap();
        let (_, client) = handshake(raw_server(chain, key), c).await;
        assert_rejected(&client, reason);
    }
}

#[tokio::test]
async fn wrong_trust_domain_is_rejected() {
    let ca = TestCa::new(TD);
    let foreign = SpiffeId::new("evil.example", "ns-a", "a").unwrap();
    let s = tls::server_config(&ca.issue("ns-b", "b"), ca.bundle()).unwrap();
    let c = tls::client_config(&ca.issue_for(&foreign), ca.bundle(), id("ns-b", "b")).unwrap();
    let (server, _) = handshake(s, c).await;
    assert_rejected(&server, "trust domain evil.example");
    // And a server of the foreign trust domain, even when the client was told to expect it.
    let s = tls::server_config(&ca.issue_for(&foreign), ca.bundle()).unwrap();
    let c = tls::client_config(&ca.issue("ns-b", "b"), ca.bundle(), foreign.clone()).unwrap();
    let (_, client) = handshake(s, c).await;
    assert_rejected(&client, "trust domain evil.example");
}

#[tokio::test]
async fn missing_or_several_uri_sans_are_rejected() {
    let ca = TestCa::new(TD);
    let now = OffsetDateTime::now_utc();
    let (nb, na) = (
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let a = id("ns-a", "a").to_string();
    let b = id("ns-b", "b").to_string();
    for (uris, reason) in [
        (vec![], "no URI SAN"),
        (vec![a.as_str(), b.as_str()], "2 URI SANs"),
        (vec!["https://example.com/a"], "not a workload SPIFFE ID"),
    ] {
        let (chain, key) = ca.issue_raw(&uris, nb, na);
        let s = tls::server_config(&ca.issue("ns-b", "b"), ca.bundle()).unwrap();
        let (server, _) = handshake(s, raw_client(chain.clone(), key.clone_key())).await;
        assert_rejected(&server, reason);
        let c = tls::client_config(&ca.issue("ns-c", "c"), ca.bundle(), id("ns-a", "a")).unwrap();
        let (_, client) = handshake(raw_server(chain, key), c).await;
        assert_rejected(&client, reason);
    }
    // The product never builds such a certificate into a configuration.
    let (chain, key) = ca.issue_raw(&[], nb, na);
    assert!(WorkloadCert::new(chain, key).is_err());
}

#[tokio::test]
async fn a_server_with_another_identity_is_rejected() {
    // Secure naming: the control plane says ns-b/b serves the address; ns-c/c answers with
    // a perfectly valid certificate of the same mesh.
    let ca = TestCa::new(TD);
    let (s, c) = pair(
        &ca,
        &ca.issue("ns-c", "c"),
        &ca.issue("ns-a", "a"),
        id("ns-b", "b"),
    );
    let (_, client) = handshake(s, c).await;
    assert_rejected(
        &client,
        "server identity is spiffe://cluster.local/ns/ns-c/sa/c, but the control plane says \
         spiffe://cluster.local/ns/ns-b/sa/b serves this destination",
    );
}

#[tokio::test]
async fn tls12_is_rejected() {
    let ca = TestCa::new(TD);
    let s = tls::server_config(&ca.issue("ns-b", "b"), ca.bundle()).unwrap();
    let now = OffsetDateTime::now_utc();
    let (chain, key) = ca.issue_raw(
        &[&id("ns-a", "a").to_string()],
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let c = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let (server, client) = handshake(s, c).await;
    assert_rejected(&server, "peer is incompatible");
    assert!(client.is_err(), "a TLS 1.2-only client got through");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_rejected() {
    let ca = TestCa::new(TD);
    let s = tls::server_config(&ca.issue("ns-b", "b"), ca.bundle()).unwrap();
    let mut c = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"h2".to_vec()];
    let (server, client) = handshake(s, c).await;
    assert_rejected(&server, "peer sent no certificates");
    assert!(client.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_fails_no_connection() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    // Both sides share one bundle object each, as a ztunnel does for all its configs, and
    // build each connection's configuration from the certificate they hold at that moment.
    let old = TestCa::new(TD);
    let new = TestCa::new(TD);
    let server_bundle = Arc::new(TrustBundle::new(TD, vec![old.root()]).unwrap());
    let client_bundle = Arc::new(TrustBundle::new(TD, vec![old.root()]).unwrap());
    let server_cert = Arc::new(Mutex::new(Arc::new(old.issue("ns-b", "b"))));
    let client_cert = Arc::new(Mutex::new(Arc::new(old.issue("ns-a", "a"))));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));

    let traffic = {
        let (sb, cb) = (server_bundle.clone(), client_bundle.clone());
        let (sc, cc) = (server_cert.clone(), client_cert.clone());
        let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let s_cert = sc.lock().unwrap().clone();
                let c_cert = cc.lock().unwrap().clone();
                let s = tls::server_config(&s_cert, sb.clone()).unwrap();
                let c = tls::client_config(&c_cert, cb.clone(), id("ns-b", "b")).unwrap();
                match handshake(s, c).await {
                    (Ok(_), Ok(_)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
            }
        })
    };
    // Each step lets at least five more connections through before the next.
    let settle = || async {
        let target = ok.load(Ordering::SeqCst) + 5;
        while ok.load(Ordering::SeqCst) < target && failures.lock().unwrap().is_empty() {
            // A dead traffic task fails the test below instead of hanging it here.
            assert!(!traffic.is_finished(), "the traffic loop stopped");
            tokio::task::yield_now().await;
        }
    };
    settle().await;
    // 1. The new root is added everywhere.
    server_bundle.add_root(new.root()).unwrap();
    client_bundle.add_root(new.root()).unwrap();
    settle().await;
    // 2. Certificates are re-issued from the new root, one side after the other.
    *server_cert.lock().unwrap() = Arc::new(new.issue("ns-b", "b"));
    settle().await;
    *client_cert.lock().unwrap() = Arc::new(new.issue("ns-a", "a"));
    settle().await;
    // 3. The old root is removed.
    server_bundle.remove_root(&old.root()).unwrap();
    client_bundle.remove_root(&old.root()).unwrap();
    settle().await;
    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "connections failed during rotation: {failures:#?}"
    );
    assert!(
        ok.load(Ordering::SeqCst) >= 25,
        "too few connections to tell"
    );

    // The old root is really gone: an old certificate is refused now.
    let s = tls::server_config(&new.issue("ns-b", "b"), server_bundle.clone()).unwrap();
    let c = tls::client_config(
        &old.issue("ns-a", "a"),
        client_bundle.clone(),
        id("ns-b", "b"),
    )
    .unwrap();
    let (server, _) = handshake(s, c).await;
    assert_rejected(&server, "UnknownIssuer");
    // The last root cannot be removed.
    assert!(server_bundle.remove_root(&new.root()).is_err());
}

#[tokio::test]
async fn a_client_certificate_not_for_client_auth_is_rejected() {
    let ca = TestCa::new(TD);
    let (chain, key) = ca.issue_custom(&id("ns-a", "a").to_string(), |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    });
    let s = tls::server_config(&ca.issue("ns-b", "b"), ca.bundle()).unwrap();
    let (server, _) = handshake(s, raw_client(chain, key)).await;
    assert_rejected(&server, "invalid peer certificate");
}

#[tokio::test]
async fn a_ca_certificate_is_not_a_workload_certificate() {
    let ca = TestCa::new(TD);
    let (chain, key) = ca.issue_custom(&id("ns-b", "b").to_string(), |p| {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    });
    let c = tls::client_config(&ca.issue("ns-a", "a"), ca.bundle(), id("ns-b", "b")).unwrap();
    let (_, client) = handshake(raw_server(chain.clone(), key.clone_key()), c).await;
    assert_rejected(&client, "invalid peer certificate");
    let s = tls::server_config(&ca.issue("ns-c", "c"), ca.bundle()).unwrap();
    let (server, _) = handshake(s, raw_client(chain, key)).await;
    assert_rejected(&server, "invalid peer certificate");
}

/// A provider whose only key exchange is the hybrid X25519MLKEM768: a peer such as Istio's
/// ztunnel configured for post-quantum key exchange only.
fn post_quantum_only() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![tls::x25519_mlkem768()];
    Arc::new(p)
}

/// One handshake; the key-exchange group the client negotiated, or why it failed.
async fn negotiated(
    server: ServerConfig,
    client: ClientConfig,
) -> Result<rustls::NamedGroup, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| tls::handshake_failure(&e))?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        tls.write_all(&b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = TlsConnector::from(Arc::new(client))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| tls::handshake_failure(&e))?;
    tls.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    tls.read_exact(&mut b)
        .await
        .map_err(|e| tls::handshake_failure(&e))?;
    server_side.await.unwrap()?;
    tls.get_ref()
        .1
        .negotiated_key_exchange_group()
        .map(|g| g.name())
        .ok_or_else(|| "no key exchange group".to_string())
}

#[tokio::test]
async fn a_peer_offering_only_x25519mlkem768_handshakes_both_ways_and_ours_stay_on_x25519() {
    let ca = TestCa::new(TD);
    let server = ca.issue("shop", "api");
    let client = ca.issue("shop", "web");
    let (our_server, our_client) = pair(&ca, &server, &client, id("shop", "api"));
    let now = OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let peer = |sa: &str| ca.issue_raw(&[&id("shop", sa).to_string()], now - hour, now + hour);

    // A post-quantum-only client against our server.
    let (web_chain, web_key) = peer("web");
    let mut pq_client = ClientConfig::builder_with_provider(post_quantum_only())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_client_auth_cert(web_chain, web_key)
        .unwrap();
    pq_client.alpn_protocols = vec![b"h2".to_vec()];
    assert_eq!(
        negotiated(our_server.clone(), pq_client).await,
        Ok(rustls::NamedGroup::X25519MLKEM768)
    );

    // Our client against a post-quantum-only server (it asks our client to retry with the
    // hybrid group).
    let (api_chain, api_key) = peer("api");
    let mut pq_server = ServerConfig::builder_with_provider(post_quantum_only())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(api_chain, api_key)
        .unwrap();
    pq_server.alpn_protocols = vec![b"h2".to_vec()];
    assert_eq!(
        negotiated(pq_server, our_client.clone()).await,
        Ok(rustls::NamedGroup::X25519MLKEM768)
    );

    // Between Trellis proxies the first key share, X25519, is taken: no extra cost.
    assert_eq!(
        negotiated(our_server, our_client).await,
        Ok(rustls::NamedGroup::X25519)
    );
}
