//! Test helpers for this and other crates' tests: an in-process CA that issues workload
//! certificates, including the malformed ones the verifiers must refuse. It is a test double
//! of the control plane's CA, not a CA: no CSR, no authorization.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::identity::SpiffeId;
use crate::tls::{TrustBundle, WorkloadCert};

/// A root CA held in memory.
pub struct TestCa {
    trust_domain: String,
    root: CertificateDer<'static>,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A new self-signed root for `trust_domain`, with a subject name of its own.
    pub fn new(trust_domain: &str) -> TestCa {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TestCa::named(trust_domain, &format!("Trellis test root {n}"))
    }

    /// A new self-signed root with the given common name (two CAs with one name model an
    /// impostor CA).
    pub fn named(trust_domain: &str, common_name: &str) -> TestCa {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(86_400);
        params.not_after = now + Duration::from_secs(10 * 365 * 86_400);
        let root = params.self_signed(&key).expect("self-signed root");
        TestCa {
            trust_domain: trust_domain.to_string(),
            root: root.der().clone(),
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The root certificate.
    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A trust bundle holding only this root.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        Arc::new(TrustBundle::new(&self.trust_domain, vec![self.root()]).expect("bundle"))
    }

    /// A valid certificate (one hour back, one day ahead) for `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn issue(&self, ns: &str, sa: &str) -> WorkloadCert {
        let id = SpiffeId::new(&self.trust_domain, ns, sa).expect("identity");
        self.issue_for(&id)
    }

    /// A valid certificate for `id` (any trust domain).
    pub fn issue_for(&self, id: &SpiffeId) -> WorkloadCert {
        let now = OffsetDateTime::now_utc();
        let (chain, key) = self.issue_raw(
            &[&id.to_string()],
            now - Duration::from_secs(3600),
            now + Duration::from_secs(86_400),
        );
        WorkloadCert::new(chain, key).expect("valid workload certificate")
    }

    /// A certificate with exactly these URI SANs and validity, valid or not.
    pub fn issue_raw(
        &self,
        uris: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let sans = uris
            .iter()
            .map(|u| SanType::URI(u.to_string().try_into().expect("IA5 URI")))
            .collect();
        self.issue_sans(sans, not_before, not_after)
    }

    /// A valid certificate naming a DNS host, as ordinary web PKI uses: the baseline of
    /// comparisons with stock verifiers.
    pub fn issue_dns(&self, host: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let now = OffsetDateTime::now_utc();
        let san = SanType::DnsName(host.to_string().try_into().expect("IA5 host"));
        self.issue_sans(
            vec![san],
            now - Duration::from_secs(3600),
            now + Duration::from_secs(86_400),
        )
    }

    /// A valid certificate for `uri`, then changed by `adjust` (key usages, CA flag, ...):
    /// for tests of what verifiers refuse.
    pub fn issue_custom(
        &self,
        uri: &str,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let now = OffsetDateTime::now_utc();
        let san = SanType::URI(uri.to_string().try_into().expect("IA5 URI"));
        self.issue_params(
            vec![san],
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
            adjust,
        )
    }

    fn issue_sans(
        &self,
        sans: Vec<SanType>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        self.issue_params(sans, not_before, not_after, |_| {})
    }

    fn issue_params(
        &self,
        sans: Vec<SanType>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        adjust(&mut params);
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// Signs a PEM CSR as the control plane's CA would, minus validation and authorization,
    /// valid from a minute ago for `ttl` (negative lifetimes make expired certificates).
    /// Returns the PEM chain, leaf first, root last.
    pub fn sign_csr(&self, csr_pem: &str, not_after_from_now: i64) -> Result<Vec<String>, String> {
        let csr =
            rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| e.to_string())?;
        let mut params = csr.params;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(60);
        params.not_after = now + time::Duration::seconds(not_after_from_now);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| e.to_string())?;
        Ok(vec![leaf.pem(), self.root_pem.clone()])
    }
}
