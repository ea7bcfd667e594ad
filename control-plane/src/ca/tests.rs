use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SanType, SignatureAlgorithm,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use trellis_core::tls::WorkloadCert;

use super::auth::{Caller, LocalCredentials};
use super::store::{CaFiles, CaStore, DirStore, generate_root};
use super::*;
use x509_parser::prelude::{FromDer, X509CertificationRequest};

const TD: &str = "cluster.local";

fn ca() -> CertificateAuthority {
    let files = generate_root(TD).unwrap();
    CertificateAuthority::new(
        CaConfig::default(),
        RootOfTrust::from_files(&files).unwrap(),
    )
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.to_string().try_into().unwrap())
}

/// A PEM CSR with these SANs, and its key as PEM.
fn csr_with(sans: Vec<SanType>, alg: &'static SignatureAlgorithm) -> (String, String) {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let csr = params.serialize_request(&key).unwrap();
    (csr.pem().unwrap(), key.serialize_pem())
}

fn csr(id: &str) -> (String, String) {
    csr_with(vec![uri(id)], &PKCS_ECDSA_P256_SHA256)
}

fn verify_chain(chain: &[String], roots_pem: &str) -> Result<(), rustls::Error> {
    let certs: Vec<CertificateDer<'static>> = chain
        .iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
        .collect();
    let mut store = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        store.add(root.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        store.into(),
        trellis_core::tls::provider(),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&certs[0], &certs[1..], UnixTime::now())
        .map(|_| ())
}

#[test]
fn issues_a_workload_certificate_for_a_valid_csr() {
    let ca = ca();
    let (pem, key) = csr("spiffe://cluster.local/ns/shop/sa/cart");
    let valid = ca.validate_csr(&pem).unwrap();
    let issued = ca.issue(&valid, None).unwrap();
    assert_eq!(issued.chain.len(), 2, "leaf and root");
    verify_chain(&issued.chain, ca.root().roots_pem()).expect("chains to the root");
    let cert = WorkloadCert::from_pem(&issued.chain.concat(), &key).unwrap();
    assert_eq!(
        cert.identity().to_string(),
        "spiffe://cluster.local/ns/shop/sa/cart"
    );
    let now = SystemTime::now();
    let lifetime = cert.not_after().duration_since(now).unwrap();
    assert!(
        lifetime > Duration::from_secs(24 * 3600 - 60)
            && lifetime <= Duration::from_secs(24 * 3600)
    );
    let backdated = now.duration_since(cert.not_before()).unwrap();
    assert!(
        backdated >= Duration::from_secs(4 * 60),
        "notBefore allows clock skew: {backdated:?}"
    );
}

#[test]
fn lifetime_follows_the_request_within_the_maximum() {
    let ca = ca();
    let (pem, key) = csr("spiffe://cluster.local/ns/shop/sa/cart");
    let valid = ca.validate_csr(&pem).unwrap();
    for (asked, want) in [
        (Some(Duration::from_secs(3600)), Duration::from_secs(3600)),
        (
            Some(Duration::from_secs(30 * 24 * 3600)),
            ca.config().max_ttl,
        ),
    ] {
        let issued = ca.issue(&valid, asked).unwrap();
        let cert = WorkloadCert::from_pem(&issued.chain.concat(), &key).unwrap();
        let got = cert.not_after().duration_since(SystemTime::now()).unwrap();
        assert!(
            got <= want && got > want - Duration::from_secs(60),
            "asked {asked:?}, got {got:?}"
        );
    }
}

#[test]
fn serial_numbers_are_unique() {
    let ca = ca();
    let (pem, _) = csr("spiffe://cluster.local/ns/shop/sa/cart");
    let valid = ca.validate_csr(&pem).unwrap();
    let serials: std::collections::BTreeSet<String> = (0..300)
        .map(|_| ca.issue(&valid, None).unwrap().serial)
        .collect();
    assert_eq!(serials.len(), 300);
}

fn rejected(ca: &CertificateAuthority, pem: &str, reason: &str) {
    match ca.validate_csr(pem) {
        Ok(v) => panic!(
            "accepted a CSR for {}; expected refusal: {reason}",
            v.identity
        ),
        Err(CaError::InvalidCsr(m)) => {
            assert!(m.contains(reason), "refused for another reason: {m}")
        }
        Err(e) => panic!("wrong error kind: {e}"),
    }
}

#[test]
fn invalid_csrs_are_refused_with_the_reason() {
    let ca = ca();
    let good = "spiffe://cluster.local/ns/shop/sa/cart";
    rejected(&ca, "not a csr", "not a PEM CERTIFICATE REQUEST");
    rejected(
        &ca,
        &csr_with(vec![], &PKCS_ECDSA_P256_SHA256).0,
        "no subject alternative name",
    );
    let dns = SanType::DnsName("cart.shop.svc".try_into().unwrap());
    rejected(
        &ca,
        &csr_with(vec![dns.clone()], &PKCS_ECDSA_P256_SHA256).0,
        "must be a URI",
    );
    rejected(
        &ca,
        &csr_with(vec![uri(good), dns], &PKCS_ECDSA_P256_SHA256).0,
        "2 subject alternative names",
    );
    let two = vec![uri(good), uri("spiffe://cluster.local/ns/shop/sa/other")];
    rejected(
        &ca,
        &csr_with(two, &PKCS_ECDSA_P256_SHA256).0,
        "2 subject alternative names",
    );
    rejected(
        &ca,
        &csr("https://cart.example/").0,
        "not a workload SPIFFE ID",
    );
    rejected(
        &ca,
        &csr("spiffe://other.domain/ns/shop/sa/cart").0,
        "not of this mesh's trust domain",
    );
    rejected(
        &ca,
        &csr_with(vec![uri(good)], &PKCS_ED25519).0,
        "not accepted",
    );

    // A CSR whose signature does not match its content.
    let (pem, _) = csr(good);
    let mut der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    rejected(&ca, &tampered, "signature does not verify");
}

/// An organisation root and an intermediate signed by it, in `cacerts` layout.
fn intermediate_files() -> (CaFiles, String) {
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = CertificateParams::default();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Example Corp root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut int_params = CertificateParams::default();
    int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    int_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Trellis intermediate");
    let int = int_params.signed_by(&int_key, &root_issuer).unwrap();
    let files = CaFiles {
        ca_cert: int.pem(),
        ca_key: int_key.serialize_pem(),
        root_cert: root.pem(),
        cert_chain: format!("{}{}", int.pem(), root.pem()),
    };
    (files, root.pem())
}

#[test]
fn runs_as_an_intermediate_under_an_organisation_root() {
    let (files, org_root) = intermediate_files();
    let ca = CertificateAuthority::new(
        CaConfig::default(),
        RootOfTrust::from_files(&files).unwrap(),
    );
    let (pem, _) = csr("spiffe://cluster.local/ns/shop/sa/cart");
    let issued = ca.issue(&ca.validate_csr(&pem).unwrap(), None).unwrap();
    assert_eq!(issued.chain.len(), 3, "leaf, intermediate, root");
    verify_chain(&issued.chain, &org_root).expect("chains to the organisation's root");
}

#[test]
fn broken_cacerts_are_refused_naming_the_file() {
    let (mut files, _) = intermediate_files();
    files.ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .serialize_pem();
    let e = RootOfTrust::from_files(&files).unwrap_err().to_string();
    assert!(
        e.contains("ca-key.pem") && e.contains("does not belong"),
        "{e}"
    );

    let (mut files, _) = intermediate_files();
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = CertificateParams::default().self_signed(&leaf_key).unwrap();
    files.ca_cert = leaf.pem();
    files.ca_key = leaf_key.serialize_pem();
    let e = RootOfTrust::from_files(&files).unwrap_err().to_string();
    assert!(
        e.contains("ca-cert.pem") && e.contains("not a CA certificate"),
        "{e}"
    );
}

#[test]
fn a_generated_root_is_persisted_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::new(dir.path().join("cacerts"));
    let (first, generated) = RootOfTrust::load_or_generate(&store, TD).unwrap();
    assert!(generated);
    let (second, generated) = RootOfTrust::load_or_generate(&store, TD).unwrap();
    assert!(!generated, "the second start loads what the first saved");
    assert_eq!(first.roots_pem(), second.roots_pem());
    let mode = std::fs::metadata(dir.path().join("cacerts/ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "ca-key.pem readable by others: {mode:o}");

    std::fs::remove_file(dir.path().join("cacerts/ca-key.pem")).unwrap();
    let e = store.load().unwrap_err().to_string();
    assert!(e.contains("only some of"), "{e}");
}

#[test]
fn local_credentials_authenticate_persist_and_rotate() {
    use tonic::metadata::MetadataMap;
    let dir = tempfile::tempdir().unwrap();
    let creds = LocalCredentials::open(dir.path()).unwrap();
    let token = creds.issue_node("node1").unwrap();
    let bearer = |t: &str| {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {t}").parse().unwrap());
        m
    };
    assert_eq!(
        creds.check(&bearer(&token)).unwrap(),
        Caller::Node("node1".into())
    );
    assert!(matches!(
        creds.check(&bearer("nope")),
        Err(CaError::Unauthenticated(_))
    ));
    assert!(matches!(
        creds.check(&MetadataMap::new()),
        Err(CaError::Unauthenticated(_))
    ));

    // A restarted control plane still knows the node; no file holds the token itself.
    let reopened = LocalCredentials::open(dir.path()).unwrap();
    assert_eq!(
        reopened.check(&bearer(&token)).unwrap(),
        Caller::Node("node1".into())
    );
    for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
        assert!(!std::fs::read_to_string(f.path()).unwrap().contains(&token));
    }
    // Re-issuing replaces the old credential.
    let newer = reopened.issue_node("node1").unwrap();
    assert!(reopened.check(&bearer(&token)).is_err());
    assert!(reopened.check(&bearer(&newer)).is_ok());
}

#[test]
fn the_key_certified_is_the_key_of_the_request_validated() {
    // A PEM whose first block (under another label) is a request the CA would refuse
    // (Ed25519), followed by an acceptable one: the acceptable one's key is certified.
    let ca = ca();
    let id = "spiffe://cluster.local/ns/shop/sa/cart";
    let refused = csr_with(vec![uri(id)], &PKCS_ED25519).0;
    let refused_der =
        rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(refused.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
    let (accepted, _) = csr(id);
    let pem = format!(
        "{}{accepted}",
        pem::encode(&pem::Pem::new("X", refused_der))
    );
    let valid = ca.validate_csr(&pem).unwrap();
    let issued = ca.issue(&valid, None).unwrap();
    let leaf = CertificateDer::from_pem_slice(issued.chain[0].as_bytes()).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    let accepted_der =
        rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(accepted.as_bytes())
            .unwrap();
    let (_, req) = X509CertificationRequest::from_der(accepted_der.as_ref()).unwrap();
    assert_eq!(
        x509.public_key().raw,
        req.certification_request_info.subject_pki.raw,
        "certified the validated request's key"
    );
}

#[test]
fn a_cacerts_chain_must_lead_to_root_cert_and_be_valid_now() {
    // cert-chain.pem and root-cert.pem from different organisations.
    let (mut files, _) = intermediate_files();
    let (other, other_root) = intermediate_files();
    files.root_cert = other_root;
    files.cert_chain = files.ca_cert.clone();
    let e = RootOfTrust::from_files(&files).unwrap_err().to_string();
    assert!(
        e.contains("cert-chain.pem") && e.contains("does not lead to a root"),
        "{e}"
    );
    drop(other);

    // A chain whose links do not sign each other.
    let (mut files, _) = intermediate_files();
    let (stranger, _) = intermediate_files();
    files.cert_chain = format!("{}{}", files.ca_cert, stranger.ca_cert);
    let e = RootOfTrust::from_files(&files).unwrap_err().to_string();
    assert!(
        e.contains("certificate 0 is not signed by certificate 1"),
        "{e}"
    );

    // An expired CA certificate.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.not_before = time::OffsetDateTime::now_utc() - Duration::from_secs(3 * 86_400);
    params.not_after = time::OffsetDateTime::now_utc() - Duration::from_secs(86_400);
    let cert = params.self_signed(&key).unwrap();
    let files = CaFiles {
        ca_cert: cert.pem(),
        ca_key: key.serialize_pem(),
        root_cert: cert.pem(),
        cert_chain: cert.pem(),
    };
    let e = RootOfTrust::from_files(&files).unwrap_err().to_string();
    assert!(e.contains("ca-cert.pem: not valid now"), "{e}");
}

#[test]
fn no_leaf_outlives_the_ca_certificate() {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.not_after = time::OffsetDateTime::now_utc() + Duration::from_secs(2 * 3600);
    let cert = params.self_signed(&key).unwrap();
    let files = CaFiles {
        ca_cert: cert.pem(),
        ca_key: key.serialize_pem(),
        root_cert: cert.pem(),
        cert_chain: cert.pem(),
    };
    let ca = CertificateAuthority::new(
        CaConfig::default(),
        RootOfTrust::from_files(&files).unwrap(),
    );
    let (pem, k) = csr("spiffe://cluster.local/ns/shop/sa/cart");
    let issued = ca.issue(&ca.validate_csr(&pem).unwrap(), None).unwrap();
    let leaf = WorkloadCert::from_pem(&issued.chain.concat(), &k).unwrap();
    let left = leaf.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(
        left <= Duration::from_secs(2 * 3600),
        "leaf outlives its CA: {left:?}"
    );
}

#[test]
fn a_corrupt_credential_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("node_x.sha256"),
        format!("{} node x\n", "é".repeat(32)),
    )
    .unwrap();
    let e = LocalCredentials::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not 64 hex digits"), "{e}");
}
