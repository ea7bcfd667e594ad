//! Full mTLS handshakes per second with Trellis's HBONE TLS configuration (TLS 1.3, ECDSA
//! P-256, ring, SPIFFE verification on both sides), against the baseline measured in the
//! same run: stock rustls mutual TLS 1.3 with WebPKI verifiers and the same keys.
//!
//! Handshakes run in memory (no sockets), so only TLS work is timed. Each configuration is
//! measured three ways: the whole handshake, and the time spent in the server's and in the
//! client's processing alone (handshakes per second one core can do on that side).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use trellis_core::SpiffeId;
use trellis_core::testing::TestCa;
use trellis_core::tls;

/// Time spent by each side during one handshake.
#[derive(Default, Clone, Copy)]
struct Split {
    client: Duration,
    server: Duration,
}

/// Drives one complete handshake between fresh connections, timing each side's work.
fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
    name: &ServerName<'static>,
) -> Split {
    let mut split = Split::default();
    let t = Instant::now();
    let mut c = ClientConnection::new(client.clone(), name.clone()).expect("client");
    split.client += t.elapsed();
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).expect("server");
    split.server += t.elapsed();
    let mut buf = Vec::with_capacity(8192);
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        let t = Instant::now();
        c.write_tls(&mut buf).expect("client write");
        split.client += t.elapsed();
        let t = Instant::now();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("server read");
        }
        s.process_new_packets().expect("server accepts the client");
        buf.clear();
        s.write_tls(&mut buf).expect("server write");
        split.server += t.elapsed();
        let t = Instant::now();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("client read");
        }
        c.process_new_packets().expect("client accepts the server");
        split.client += t.elapsed();
    }
    split
}

struct Setup {
    name: &'static str,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: ServerName<'static>,
}

fn setups() -> Vec<Setup> {
    let ca = TestCa::new("cluster.local");
    let bundle = ca.bundle();
    let server_cert = ca.issue("ns-b", "b");
    let client_cert = ca.issue("ns-a", "a");
    let expected = SpiffeId::new("cluster.local", "ns-b", "b").unwrap();
    let trellis = Setup {
        name: "trellis_hbone",
        client: Arc::new(tls::client_config(&client_cert, bundle.clone(), expected).unwrap()),
        server: Arc::new(tls::server_config(&server_cert, bundle).unwrap()),
        server_name: ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 2).into()),
    };

    // Baseline: the same CA and key types, stock verifiers, server named by DNS.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root()).unwrap();
    let roots = Arc::new(roots);
    let (s_chain, s_key) = ca.issue_dns("b.test");
    let now = time::OffsetDateTime::now_utc();
    let (c_chain, c_key) = ca.issue_raw(
        &["spiffe://cluster.local/ns/ns-a/sa/a"],
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), tls::provider())
            .build()
            .unwrap();
    let mut server = ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(s_chain, s_key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(c_chain, c_key)
        .unwrap();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let baseline = Setup {
        name: "baseline_rustls_webpki",
        client: Arc::new(client),
        server: Arc::new(server),
        server_name: ServerName::try_from("b.test").unwrap(),
    };
    // A peer offering only the hybrid post-quantum group (Istio's ztunnel can be set so)
    // against Trellis's server: the server's extra cost of X25519MLKEM768 over X25519.
    let mut pq = rustls::crypto::ring::default_provider();
    pq.kx_groups = vec![tls::x25519_mlkem768()];
    let pq = Arc::new(pq);
    let (pq_chain, pq_key) = ca.issue_raw(
        &["spiffe://cluster.local/ns/ns-a/sa/a"],
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let mut pq_client = ClientConfig::builder_with_provider(pq)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_client_auth_cert(pq_chain, pq_key)
        .unwrap();
    pq_client.alpn_protocols = vec![b"h2".to_vec()];
    let post_quantum = Setup {
        name: "trellis_hbone_x25519mlkem768_peer",
        client: Arc::new(pq_client),
        server: trellis.server.clone(),
        server_name: trellis.server_name.clone(),
    };
    vec![trellis, post_quantum, baseline]
}

/// The post-quantum peer's verifier: it trusts the server (only the key exchange is
/// measured there; the Trellis server still verifies the peer's SPIFFE certificate).
#[derive(Debug)]
struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("mtls_handshake");
    group.throughput(Throughput::Elements(1));
    for s in setups() {
        group.bench_function(format!("{}/full", s.name), |b| {
            b.iter(|| handshake(&s.client, &s.server, &s.server_name))
        });
        group.bench_function(format!("{}/server_side", s.name), |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| handshake(&s.client, &s.server, &s.server_name).server)
                    .sum()
            })
        });
        group.bench_function(format!("{}/client_side", s.name), |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| handshake(&s.client, &s.server, &s.server_name).client)
                    .sum()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
