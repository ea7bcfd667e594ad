//! The certificate authority: validates certificate signing requests and issues short-lived
//! SPIFFE workload certificates, as Istio's `IstioCertificateService` does.
//!
//! - [`store`]: the root of trust (generated and persisted, or Istio's `cacerts` files so
//!   Trellis can run as an intermediate under an organisation's root).
//! - [`auth`]: who is calling (a node's ztunnel, a waypoint) and what it may obtain.
//! - [`service`]: the gRPC service on TLS.

pub mod auth;
pub mod secret;
pub mod service;
pub mod store;
pub mod token_review;

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, ExtendedKeyUsagePurpose,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use time::OffsetDateTime;
use trellis_core::SpiffeId;
use x509_parser::oid_registry;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509CertificationRequest};
use x509_parser::public_key::PublicKey;

pub use store::RootOfTrust;

/// Settings of the CA.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// Trust domain of every identity issued, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Lifetime when the request asks for none (Istio's default: 24 h).
    pub default_ttl: Duration,
    /// Longest lifetime granted; longer requests are shortened to this.
    pub max_ttl: Duration,
    /// How far `notBefore` is set in the past, so peers whose clocks lag a little accept
    /// a certificate the moment it is issued.
    pub clock_skew: Duration,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            trust_domain: "cluster.local".into(),
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            clock_skew: Duration::from_secs(5 * 60),
        }
    }
}

/// Why a request was refused. Each maps to one gRPC status in [`service`].
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    #[error("caller not authenticated: {0}")]
    Unauthenticated(String),
    #[error("{caller} may not obtain a certificate for {identity}: {reason}")]
    PermissionDenied {
        caller: String,
        identity: String,
        reason: String,
    },
    #[error("root of trust: {0}")]
    Store(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

/// A validated request: the identity the CSR asks for and its public key.
#[derive(Debug)]
pub struct ValidCsr {
    /// The SPIFFE ID of the CSR's single URI SAN.
    pub identity: SpiffeId,
    public_key: rcgen::PublicKey,
}

/// An issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM certificates: leaf, intermediates, root (Istio's `cert_chain` order).
    pub chain: Vec<String>,
    /// Serial number of the leaf, hex.
    pub serial: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The certificate authority.
pub struct CertificateAuthority {
    config: CaConfig,
    /// Replaced whole when the operator rotates the root (`replace_root`); a request signs
    /// with the one it read at its start.
    root: std::sync::RwLock<std::sync::Arc<RootOfTrust>>,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A CA signing with `root` under `config`.
    pub fn new(config: CaConfig, root: RootOfTrust) -> CertificateAuthority {
        CertificateAuthority {
            config,
            root: std::sync::RwLock::new(std::sync::Arc::new(root)),
            rng: ring::rand::SystemRandom::new(),
        }
    }

    /// The CA's settings.
    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    /// The root of trust in use.
    pub fn root(&self) -> std::sync::Arc<RootOfTrust> {
        self.root.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Signs with `root` from now on (the operator replaced `cacerts`).
    pub fn replace_root(&self, root: RootOfTrust) {
        *self.root.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(root);
    }

    /// Checks a PEM CSR: its signature, its key (ECDSA P-256/P-384, or RSA of 2048 bits or
    /// more), and its names (exactly one SAN, a URI that is a SPIFFE ID of our trust
    /// domain).
    pub fn validate_csr(&self, csr_pem: &str) -> Result<ValidCsr, CaError> {
        let invalid = |m: String| CaError::InvalidCsr(m);
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(csr_pem.as_bytes())
            .map(|d: rustls::pki_types::CertificateSigningRequestDer<'static>| d)
            .map_err(|e| invalid(format!("not a PEM CERTIFICATE REQUEST: {e}")))?;
        let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| invalid(format!("not a PKCS#10 request: {e}")))?;
        csr.verify_signature()
            .map_err(|e| invalid(format!("signature does not verify: {e}")))?;

        let spki = &csr.certification_request_info.subject_pki;
        match spki.parsed() {
            Ok(PublicKey::EC(_)) => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok());
                let ok = curve.as_ref().is_some_and(|c| {
                    *c == oid_registry::OID_EC_P256 || *c == oid_registry::OID_NIST_EC_P384
                });
                if !ok {
                    return Err(invalid(format!(
                        "EC key on curve {curve:?}; accepted: P-256, P-384"
                    )));
                }
            }
            Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 => {}
            Ok(PublicKey::RSA(rsa)) => {
                return Err(invalid(format!(
                    "RSA key of {} bits; at least 2048 required",
                    rsa.key_size()
                )));
            }
            _ => {
                return Err(invalid(format!(
                    "key algorithm {} not accepted; use ECDSA P-256 (or P-384, RSA >= 2048)",
                    spki.algorithm.algorithm
                )));
            }
        }

        let mut names = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                names.extend(san.general_names.iter().cloned());
            }
        }
        let uri = match names.as_slice() {
            [GeneralName::URI(uri)] => *uri,
            [] => {
                return Err(invalid(
                    "no subject alternative name; exactly one URI SAN (the SPIFFE ID) is required"
                        .into(),
                ));
            }
            [_] => return Err(invalid("the only SAN must be a URI (the SPIFFE ID)".into())),
            many => {
                return Err(invalid(format!(
                    "{} subject alternative names; exactly one URI SAN (the SPIFFE ID) is required",
                    many.len()
                )));
            }
        };
        let identity: SpiffeId = uri.parse().map_err(|e| invalid(format!("{e}")))?;
        if identity.trust_domain() != self.config.trust_domain {
            return Err(invalid(format!(
                "{identity} is not of this mesh's trust domain {}",
                self.config.trust_domain
            )));
        }
        // The key certified is taken from the very DER validated above (a PEM may hold
        // other blocks before it; re-reading the PEM could pick another request).
        let params =
            CertificateSigningRequestParams::from_der(&der).map_err(|e| invalid(format!("{e}")))?;
        Ok(ValidCsr {
            identity,
            public_key: params.public_key,
        })
    }

    /// Issues a certificate for a validated request, valid for `requested` (or the default),
    /// at most the maximum lifetime.
    pub fn issue(&self, csr: &ValidCsr, requested: Option<Duration>) -> Result<Issued, CaError> {
        let ttl = requested
            .filter(|d| !d.is_zero())
            .unwrap_or(self.config.default_ttl)
            .min(self.config.max_ttl);
        let now = OffsetDateTime::now_utc();
        let root = self.root();
        // A leaf never outlives the certificate that signs it.
        let not_after = (now + ttl).min(root.not_after());
        let mut params = CertificateParams::default();
        // Workload certificates name their subject only in the SAN (as Istio's do).
        params.distinguished_name = DistinguishedName::new();
        let uri = csr
            .identity
            .to_string()
            .try_into()
            .map_err(|e| CaError::Signing(format!("{e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.not_before = now - self.config.clock_skew;
        params.not_after = not_after;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        // 127 random bits, positive: unique without coordination between replicas.
        let mut serial = [0u8; 16];
        self.rng
            .fill(&mut serial)
            .map_err(|_| CaError::Signing("no randomness for the serial number".into()))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(&csr.public_key, root.issuer())
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut chain = vec![cert.pem()];
        chain.extend(root.chain_pem().iter().cloned());
        Ok(Issued {
            chain,
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
            not_after: SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(not_after.unix_timestamp()).unwrap_or(0)),
        })
    }
}

#[cfg(test)]
mod tests;
