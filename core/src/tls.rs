//! TLS for HBONE: TLS 1.3 only, ALPN `h2`, mutual authentication with SPIFFE identities.
//!
//! - The server requires a client certificate chaining to the trust bundle and carrying
//!   exactly one URI SAN, a SPIFFE ID of our trust domain; that ID is the peer identity.
//! - The client checks the server's chain against the trust bundle and that the server's
//!   SPIFFE ID is exactly the identity the control plane says serves the destination
//!   (secure naming, NIST SP 800-204B SAUN-SR-2). DNS names play no part.
//! - The trust bundle may hold several roots and is read at every handshake, so a root is
//!   rotated (add new, re-issue, remove old) without rebuilding configurations or failing
//!   a connection.

mod pq;
mod verify;

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::identity::{IdentityError, SpiffeId};

pub use verify::{spiffe_id_of, validity_of};

/// ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a certificate, key or handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "the certificate has no URI SAN; a workload certificate carries exactly one, its SPIFFE ID"
    )]
    NoUriSan,
    #[error(
        "the certificate has {0} URI SANs; a workload certificate carries exactly one, its SPIFFE ID"
    )]
    SeveralUriSans(usize),
    #[error(transparent)]
    NotSpiffe(#[from] IdentityError),
    #[error("peer identity {got} is from trust domain {}, but this mesh trusts only {want}", got.trust_domain())]
    WrongTrustDomain { got: Box<SpiffeId>, want: String },
    #[error(
        "server identity is {got}, but the control plane says {want} serves this destination (secure naming)"
    )]
    IdentityMismatch {
        got: Box<SpiffeId>,
        want: Box<SpiffeId>,
    },
    #[error("malformed certificate: {0}")]
    BadCertificate(String),
    #[error("malformed PEM ({what}): {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the trust bundle is empty or unusable: {0}")]
    Bundle(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider of every Trellis TLS configuration: ring (see docs/identity.md).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The hybrid post-quantum group HBONE offers (for tests that play a peer offering only
/// it, and benchmarks).
pub fn x25519_mlkem768() -> &'static dyn rustls::crypto::SupportedKxGroup {
    pq::X25519_MLKEM768
}

/// HBONE's provider for a side: ring plus the hybrid post-quantum group X25519MLKEM768
/// (`tls/pq.rs`), so a peer that offers only that group (Istio's ztunnel can be set so)
/// handshakes. A server prefers it whenever the client offers it; a client sends its first
/// key share for X25519 (cheap) and moves to X25519MLKEM768 when a server asks for it
/// (HelloRetryRequest). P-256 and P-384 stay. Measured in docs/performance.md.
fn hbone_provider(server: bool) -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let classical = p.kx_groups.clone();
    p.kx_groups = if server {
        std::iter::once(pq::X25519_MLKEM768)
            .chain(classical)
            .collect()
    } else {
        let mut groups = classical;
        groups.insert(1.min(groups.len()), pq::X25519_MLKEM768);
        groups
    };
    Arc::new(p)
}

/// A certificate with its chain and private key, as held for one workload identity.
#[derive(Debug)]
pub struct WorkloadCert {
    identity: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl WorkloadCert {
    /// From a PEM chain (leaf first) and a PEM private key; the identity is the leaf's
    /// SPIFFE ID.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<WorkloadCert, TlsError> {
        let chain = parse_pem_certs(chain_pem, "certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: "private key",
            reason: e.to_string(),
        })?;
        WorkloadCert::new(chain, key)
    }

    /// From DER parts.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<WorkloadCert, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoPeerCertificate)?;
        let identity = spiffe_id_of(leaf)?;
        let (not_before, not_after) = validity_of(leaf)?;
        Ok(WorkloadCert {
            identity,
            chain,
            key,
            not_before,
            not_after,
        })
    }

    /// The identity the certificate proves.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// The set of root certificates this proxy trusts, shared by all its TLS configurations and
/// read at every handshake.
#[derive(Debug)]
pub struct TrustBundle {
    trust_domain: String,
    roots: RwLock<Arc<Roots>>,
}

/// One version of the bundle's roots, with the verifier built for them.
#[derive(Debug)]
pub(crate) struct Roots {
    pub(crate) certs: Vec<CertificateDer<'static>>,
    pub(crate) store: Arc<RootCertStore>,
    pub(crate) client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl TrustBundle {
    /// A bundle for `trust_domain` holding `roots` (at least one).
    pub fn new(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<TrustBundle, TlsError> {
        Ok(TrustBundle {
            trust_domain: trust_domain.to_string(),
            roots: RwLock::new(Arc::new(Roots::build(roots)?)),
        })
    }

    /// From concatenated PEM root certificates.
    pub fn from_pem(trust_domain: &str, pem: &str) -> Result<TrustBundle, TlsError> {
        TrustBundle::new(trust_domain, parse_pem_certs(pem, "trust bundle")?)
    }

    /// The trust domain whose identities this bundle accepts.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots now trusted.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.current().certs.clone()
    }

    /// Replaces the roots; handshakes from now on use the new set.
    pub fn replace(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), TlsError> {
        let built = Arc::new(Roots::build(roots)?);
        *self.roots.write().unwrap_or_else(|e| e.into_inner()) = built;
        Ok(())
    }

    /// Adds a root (the first step of a root rotation); a root already present is kept once.
    pub fn add_root(&self, root: CertificateDer<'static>) -> Result<(), TlsError> {
        self.update(|certs| {
            if !certs.contains(&root) {
                certs.push(root);
            }
        })
    }

    /// Removes a root (the last step of a root rotation). Removing the last root is refused:
    /// an empty bundle would fail every connection.
    pub fn remove_root(&self, root: &CertificateDer<'_>) -> Result<(), TlsError> {
        self.update(|certs| certs.retain(|c| c != root))
    }

    /// Read-modify-write under the write lock, so concurrent rotation steps never lose one
    /// another's change.
    fn update(
        &self,
        change: impl FnOnce(&mut Vec<CertificateDer<'static>>),
    ) -> Result<(), TlsError> {
        let mut guard = self.roots.write().unwrap_or_else(|e| e.into_inner());
        let mut certs = guard.certs.clone();
        change(&mut certs);
        *guard = Arc::new(Roots::build(certs)?);
        Ok(())
    }

    /// Checks that `chain` (leaf first) leads to a root of the bundle and is valid now, as
    /// a peer would check it.
    pub fn verify_chain(&self, chain: &[CertificateDer<'_>]) -> Result<(), TlsError> {
        let (leaf, intermediates) = chain.split_first().ok_or(TlsError::NoPeerCertificate)?;
        self.current()
            .client_verifier
            .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(TlsError::Config)
    }

    pub(crate) fn current(&self) -> Arc<Roots> {
        self.roots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Roots {
    fn build(certs: Vec<CertificateDer<'static>>) -> Result<Roots, TlsError> {
        if certs.is_empty() {
            return Err(TlsError::Bundle("no root certificate".into()));
        }
        let mut store = RootCertStore::empty();
        for c in &certs {
            store
                .add(c.clone())
                .map_err(|e| TlsError::Bundle(format!("root certificate refused: {e}")))?;
        }
        let store = Arc::new(store);
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(store.clone(), provider())
                .build()
                .map_err(|e| TlsError::Bundle(e.to_string()))?;
        Ok(Roots {
            certs,
            store,
            client_verifier,
        })
    }
}

/// Parses concatenated PEM certificates.
pub fn parse_pem_certs(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Server configuration for an HBONE listener serving `cert`'s identity: TLS 1.3 only, ALPN
/// h2, a client certificate of the bundle's trust domain required.
pub fn server_config(
    cert: &WorkloadCert,
    bundle: Arc<TrustBundle>,
) -> Result<ServerConfig, TlsError> {
    let verifier = Arc::new(verify::SpiffeClientVerifier::new(bundle));
    let mut config = ServerConfig::builder_with_provider(hbone_provider(true))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Client configuration for HBONE as `cert`'s identity to a server that must prove
/// `expected_server`: TLS 1.3 only, ALPN h2.
pub fn client_config(
    cert: &WorkloadCert,
    bundle: Arc<TrustBundle>,
    expected_server: SpiffeId,
) -> Result<ClientConfig, TlsError> {
    let verifier = Arc::new(verify::SpiffeServerVerifier::new(bundle, expected_server));
    let mut config = ClientConfig::builder_with_provider(hbone_provider(false))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The peer's identity after a completed handshake (already verified by the configuration).
pub fn peer_identity(conn: &rustls::CommonState) -> Result<SpiffeId, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    spiffe_id_of(leaf)
}

/// Why a handshake failed, in words an operator can act on: our verifier's own reason when it
/// refused the peer's certificate, rustls's description otherwise.
pub fn handshake_failure(err: &std::io::Error) -> String {
    let Some(rustls_err) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return err.to_string();
    };
    if let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = rustls_err
        && let Some(ours) = other.0.downcast_ref::<TlsError>()
    {
        return format!("invalid peer certificate: {ours}");
    }
    rustls_err.to_string()
}

/// Re-reads the trust bundle file every two seconds; new contents that parse replace the
/// roots peers are verified against (handshakes from then on use them; open connections
/// are not affected). During a root rotation the file holds the old and the new roots, then
/// the new ones only (docs/identity.md). A file that does not parse is logged and ignored.
pub async fn follow_roots_file(
    path: std::path::PathBuf,
    bundle: Arc<TrustBundle>,
    mut last: String,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A small file, read every two seconds: a blocking read costs nothing measurable.
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the trust bundle; keeping the current roots");
                continue;
            }
        };
        if text == last {
            continue;
        }
        match parse_pem_certs(&text, "trust bundle")
            .map_err(|e| e.to_string())
            .and_then(|roots| {
                let n = roots.len();
                bundle.replace(roots).map(|()| n).map_err(|e| e.to_string())
            }) {
            Ok(n) => tracing::info!(file = %path.display(), roots = n, "trust bundle reloaded"),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "the trust bundle changed but cannot be used; keeping the current roots")
            }
        }
        last = text;
    }
}
