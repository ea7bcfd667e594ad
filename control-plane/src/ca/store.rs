//! The root of trust and where it is kept.
//!
//! Files follow Istio's `cacerts` layout, so an organisation's intermediate (for example one
//! signed by a root kept in Vault) plugs in unchanged:
//! - `ca-cert.pem`: the certificate the CA signs with;
//! - `ca-key.pem`: its private key (PKCS#8);
//! - `root-cert.pem`: the root(s) every workload trusts (the trust bundle);
//! - `cert-chain.pem`: the chain from `ca-cert.pem` up to the root, appended to every leaf.
//!
//! A self-signed root is generated on first start when the store is empty, and persisted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::CaError;

/// The four files of a root of trust, as PEM text.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// `ca-cert.pem`.
    pub ca_cert: String,
    /// `ca-key.pem`.
    pub ca_key: String,
    /// `root-cert.pem`.
    pub root_cert: String,
    /// `cert-chain.pem`.
    pub cert_chain: String,
}

impl std::fmt::Debug for CaFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("CaFiles").finish_non_exhaustive()
    }
}

/// Where the root of trust is kept: a directory in local mode; a Kubernetes Secret later,
/// through the same interface.
pub trait CaStore: Send + Sync {
    /// The stored files, or `None` when nothing is stored yet.
    fn load(&self) -> Result<Option<CaFiles>, CaError>;
    /// Stores the files (a generated root).
    fn save(&self, files: &CaFiles) -> Result<(), CaError>;
}

/// A directory in the `cacerts` layout.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    /// A store in `dir` (created when a generated root is saved).
    pub fn new(dir: impl Into<PathBuf>) -> DirStore {
        DirStore { dir: dir.into() }
    }
}

const FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
];

impl CaStore for DirStore {
    fn load(&self) -> Result<Option<CaFiles>, CaError> {
        let read = |name: &str| -> Result<Option<String>, CaError> {
            let path = self.dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(CaError::Store(format!(
                    "cannot read {}: {e}",
                    path.display()
                ))),
            }
        };
        let (cert, key, root) = (read(FILES[0])?, read(FILES[1])?, read(FILES[2])?);
        let chain = read(FILES[3])?;
        match (cert, key, root) {
            (None, None, None) => Ok(None),
            (Some(ca_cert), Some(ca_key), Some(root_cert)) => Ok(Some(CaFiles {
                // Without cert-chain.pem the chain is the CA certificate (up to the root).
                cert_chain: chain.unwrap_or_else(|| ca_cert.clone()),
                ca_cert,
                ca_key,
                root_cert,
            })),
            _ => Err(CaError::Store(format!(
                "{} holds only some of ca-cert.pem, ca-key.pem, root-cert.pem: all three are needed",
                self.dir.display()
            ))),
        }
    }

    fn save(&self, files: &CaFiles) -> Result<(), CaError> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let err = |p: &Path, e: std::io::Error| {
            CaError::Store(format!("cannot write {}: {e}", p.display()))
        };
        // The set is written into a fresh private directory, then renamed into place in one
        // step: a crash never leaves half a set, and of two replicas generating at once one
        // wins and the other finds the directory taken (and loads it).
        let parent = self.dir.parent().unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| err(parent, e))?;
        let name = self
            .dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("cacerts");
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| err(&tmp, e))?;
        for (file, text) in FILES.iter().zip([
            &files.ca_cert,
            &files.ca_key,
            &files.root_cert,
            &files.cert_chain,
        ]) {
            let path = tmp.join(file);
            // create_new: never reuse (or follow a symlink at) an existing path; 0600 from
            // the moment the key exists.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| err(&path, e))?;
            f.write_all(text.as_bytes()).map_err(|e| err(&path, e))?;
            f.sync_all().map_err(|e| err(&path, e))?;
        }
        // rename(2) replaces an empty directory and fails on a non-empty one.
        if let Err(e) = std::fs::rename(&tmp, &self.dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(err(&self.dir, e));
        }
        Ok(())
    }
}

/// The CA's signing certificate and key, and the chain and roots handed out with every
/// certificate.
pub struct RootOfTrust {
    issuer: Issuer<'static, KeyPair>,
    chain: Vec<String>,
    roots: String,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for RootOfTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootOfTrust")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl RootOfTrust {
    /// Loads the root of trust from `store`, or generates a self-signed root for
    /// `trust_domain` and saves it when the store is empty. Returns whether it generated.
    pub fn load_or_generate(
        store: &dyn CaStore,
        trust_domain: &str,
    ) -> Result<(RootOfTrust, bool), CaError> {
        if let Some(files) = store.load()? {
            return Ok((RootOfTrust::from_files(&files)?, false));
        }
        let files = generate_root(trust_domain)?;
        if let Err(e) = store.save(&files) {
            // Another replica may have saved its root first: use that one.
            if let Some(theirs) = store.load()? {
                return Ok((RootOfTrust::from_files(&theirs)?, false));
            }
            return Err(e);
        }
        Ok((RootOfTrust::from_files(&files)?, true))
    }

    /// From the four files; checks that the key belongs to the CA certificate, that the
    /// certificate may sign and is valid now, and that `cert-chain.pem` leads, signature by
    /// signature, to a root of `root-cert.pem`.
    pub fn from_files(files: &CaFiles) -> Result<RootOfTrust, CaError> {
        let bad = |file: &str, reason: String| CaError::Store(format!("{file}: {reason}"));
        let key = KeyPair::from_pem(&files.ca_key).map_err(|e| bad("ca-key.pem", e.to_string()))?;
        let ca_der = pem_certs(&files.ca_cert, "ca-cert.pem")?.swap_remove(0);
        let (_, ca) =
            X509Certificate::from_der(&ca_der).map_err(|e| bad("ca-cert.pem", e.to_string()))?;
        if !ca.is_ca() {
            return Err(bad(
                "ca-cert.pem",
                "not a CA certificate (basicConstraints CA:FALSE)".into(),
            ));
        }
        if ca.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad(
                "ca-key.pem",
                "does not belong to the certificate in ca-cert.pem".into(),
            ));
        }
        if !ca.validity().is_valid() {
            return Err(bad(
                "ca-cert.pem",
                format!(
                    "not valid now (valid {} to {})",
                    ca.validity().not_before,
                    ca.validity().not_after
                ),
            ));
        }
        let not_after = OffsetDateTime::from_unix_timestamp(ca.validity().not_after.timestamp())
            .map_err(|e| bad("ca-cert.pem", e.to_string()))?;
        let roots = pem_certs(&files.root_cert, "root-cert.pem")?;
        let mut chain = pem_certs(&files.cert_chain, "cert-chain.pem")?;
        if chain.first() != Some(&ca_der) {
            chain.insert(0, ca_der.clone());
        }
        for (i, pair) in chain.windows(2).enumerate() {
            let (child, parent) = (
                parse_x509(&pair[0], "cert-chain.pem")?,
                parse_x509(&pair[1], "cert-chain.pem")?,
            );
            child
                .verify_signature(Some(parent.public_key()))
                .map_err(|_| {
                    bad(
                        "cert-chain.pem",
                        format!("certificate {i} is not signed by certificate {}", i + 1),
                    )
                })?;
        }
        let last = chain.last().cloned().unwrap_or_default();
        if !roots.contains(&last) {
            let tail = parse_x509(&last, "cert-chain.pem")?;
            let issuer = roots
                .iter()
                .find(|r| {
                    parse_x509(r, "root-cert.pem")
                        .is_ok_and(|root| tail.verify_signature(Some(root.public_key())).is_ok())
                })
                .ok_or_else(|| {
                    bad(
                        "cert-chain.pem",
                        "the chain does not lead to a root in root-cert.pem".into(),
                    )
                })?;
            chain.push(issuer.clone());
        }
        let issuer = Issuer::from_ca_cert_der(&ca_der.clone().into(), key)
            .map_err(|e| bad("ca-cert.pem", e.to_string()))?;
        Ok(RootOfTrust {
            issuer,
            chain: chain.iter().map(|d| to_pem(d)).collect(),
            roots: files.root_cert.clone(),
            not_after,
        })
    }

    /// End of validity of the signing certificate; no leaf outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// PEM certificates appended after every leaf: the CA certificate up to the root.
    pub fn chain_pem(&self) -> &[String] {
        &self.chain
    }

    /// The trust bundle (`root-cert.pem`).
    pub fn roots_pem(&self) -> &str {
        &self.roots
    }
}

/// A new self-signed ECDSA P-256 root, valid ten years.
pub fn generate_root(trust_domain: &str) -> Result<CaFiles, CaError> {
    let sign = |e: rcgen::Error| CaError::Signing(e.to_string());
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign)?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, "Trellis root CA");
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
    let cert = params.self_signed(&key).map_err(sign)?;
    let pem = cert.pem();
    Ok(CaFiles {
        ca_cert: pem.clone(),
        ca_key: key.serialize_pem(),
        root_cert: pem.clone(),
        cert_chain: pem,
    })
}

fn parse_x509<'a>(der: &'a [u8], file: &str) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| CaError::Store(format!("{file}: {e}")))
}

/// DER certificates of a PEM file (at least one), the error naming the file.
fn pem_certs(text: &str, file: &'static str) -> Result<Vec<Vec<u8>>, CaError> {
    trellis_core::tls::parse_pem_certs(text, file)
        .map(|certs| certs.into_iter().map(|c| c.to_vec()).collect())
        .map_err(|e| CaError::Store(e.to_string()))
}

fn to_pem(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), config)
}
