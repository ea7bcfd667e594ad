//! The certificate manager: one certificate per workload identity, obtained from the CA on
//! first use, cached, and renewed in the background.
//!
//! - Concurrent requests for one identity make one CSR (the others wait for it).
//! - Renewal starts at about half of the lifetime, with jitter (±10% of the lifetime) so
//!   that certificates issued together do not all renew in the same second.
//! - A failed renewal is retried with exponential backoff; meanwhile the current
//!   certificate keeps being served for as long as it is valid. An expired certificate is
//!   never served: with the CA away too long, new connections fail closed.
//! - Metrics: `trellis_cert_expiry_seconds{identity}` (seconds to expiry, refreshed at least
//!   every minute), `trellis_cert_issuance_total{result="success"|"failure"}`.

mod grpc;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType};
use ring::rand::SecureRandom;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::SpiffeId;
use crate::tls::{TlsError, TrustBundle, WorkloadCert, parse_pem_certs};

pub use grpc::{GrpcCaClient, GrpcCaConfig};

/// Why a certificate could not be obtained.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("the CA refused the request for {identity}: {reason}")]
    Refused { identity: String, reason: String },
    #[error(
        "the CA at {endpoint} is unreachable: {reason}; proxies keep serving with the certificates they hold"
    )]
    Unreachable { endpoint: String, reason: String },
    #[error("the CA answered with an unusable certificate for {identity}: {reason}")]
    BadResponse { identity: String, reason: String },
    #[error("cannot make a key or CSR: {0}")]
    Local(String),
    #[error("no valid certificate for {0} and none could be obtained yet")]
    Unavailable(String),
}

/// A certificate authority the manager can ask: signs a PEM CSR for `identity`, returns the
/// PEM chain (leaf first, root last).
pub trait CaClient: Send + Sync + 'static {
    /// Sends one signing request.
    fn sign(
        &self,
        identity: &SpiffeId,
        csr_pem: String,
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<String>, CertError>> + Send;
}

/// Settings of the certificate manager.
#[derive(Debug, Clone)]
pub struct CertConfig {
    /// Lifetime asked of the CA (it may grant less).
    pub ttl: Duration,
    /// First retry delay after a failed request; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest delay between retries.
    pub max_backoff: Duration,
    /// How often the expiry metric is refreshed while nothing else happens.
    pub metric_refresh: Duration,
}

impl Default for CertConfig {
    fn default() -> Self {
        CertConfig {
            ttl: Duration::from_secs(24 * 3600),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            metric_refresh: Duration::from_secs(60),
        }
    }
}

struct Slot {
    /// The certificate served now.
    current: Mutex<Option<Arc<WorkloadCert>>>,
    /// Held while a request to the CA is in flight: the single flight.
    fetching: tokio::sync::Mutex<()>,
    /// The last failed request, so callers that waited on it share its outcome instead of
    /// each asking the CA again.
    last_failure: Mutex<Option<(tokio::time::Instant, CertError)>>,
    renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Holds and renews the certificates of the identities a proxy serves.
pub struct CertManager<C: CaClient> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    ca: C,
    bundle: Arc<TrustBundle>,
    config: CertConfig,
    slots: Mutex<HashMap<SpiffeId, Arc<Slot>>>,
    rng: ring::rand::SystemRandom,
}

impl<C: CaClient> Clone for CertManager<C> {
    fn clone(&self) -> Self {
        CertManager {
            inner: self.inner.clone(),
        }
    }
}

impl<C: CaClient> CertManager<C> {
    /// A manager asking `ca`; every certificate it accepts must chain to `bundle`.
    pub fn new(ca: C, bundle: Arc<TrustBundle>, config: CertConfig) -> CertManager<C> {
        CertManager {
            inner: Arc::new(Inner {
                ca,
                bundle,
                config,
                slots: Mutex::new(HashMap::new()),
                rng: ring::rand::SystemRandom::new(),
            }),
        }
    }

    /// The certificate for `id`: the cached one while valid, otherwise one obtained now
    /// (and renewed in the background from then on).
    pub async fn fetch(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, CertError> {
        let slot = self.slot(id);
        if let Some(c) = valid(&slot) {
            return Ok(c);
        }
        let asked = tokio::time::Instant::now();
        let _flight = slot.fetching.lock().await;
        // Whoever held the flight before us may have just stored a certificate, or failed:
        // either way their answer is ours too.
        if let Some(c) = valid(&slot) {
            return Ok(c);
        }
        if let Some((at, e)) = lock(&slot.last_failure).clone()
            && at >= asked
        {
            return Err(e);
        }
        let cert = match self.inner.request(id).await {
            Ok(c) => c,
            Err(e) => {
                *lock(&slot.last_failure) = Some((tokio::time::Instant::now(), e.clone()));
                return Err(e);
            }
        };
        // `forget` may have run while we waited on the CA: then the certificate is handed to
        // this caller but not kept or renewed.
        if self.inner.holds(id, &slot) {
            *lock(&slot.current) = Some(cert.clone());
            self.ensure_renewer(id, &slot);
        }
        Ok(cert)
    }

    /// Stops every renewal task (the manager's users are going away).
    pub fn shutdown(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.inner.slots).drain().map(|(_, s)| s).collect();
        for slot in slots {
            if let Some(task) = lock(&slot.renewer).take() {
                task.abort();
            }
        }
    }

    /// The certificate held for `id`, if it is valid now; never asks the CA.
    pub fn cached(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(id).and_then(|s| valid(s))
    }

    /// Stops holding and renewing `id` (its last workload left the node).
    pub fn forget(&self, id: &SpiffeId) {
        let slot = self
            .inner
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(slot) = slot
            && let Some(task) = slot
                .renewer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
        {
            task.abort();
        }
        metrics::gauge!("trellis_cert_expiry_seconds", "identity" => id.to_string()).set(0.0);
    }

    /// The identities held now.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.keys().cloned().collect()
    }

    fn slot(&self, id: &SpiffeId) -> Arc<Slot> {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    current: Mutex::new(None),
                    fetching: tokio::sync::Mutex::new(()),
                    last_failure: Mutex::new(None),
                    renewer: Mutex::new(None),
                })
            })
            .clone()
    }

    fn ensure_renewer(&self, id: &SpiffeId, slot: &Arc<Slot>) {
        let mut renewer = slot.renewer.lock().unwrap_or_else(|e| e.into_inner());
        if renewer.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        // The task holds the manager weakly: once every handle is dropped it ends.
        let inner = Arc::downgrade(&self.inner);
        let slot = slot.clone();
        let id = id.clone();
        *renewer = Some(tokio::spawn(renew_loop(inner, id, slot)));
    }
}

fn valid(slot: &Slot) -> Option<Arc<WorkloadCert>> {
    let current = slot.current.lock().unwrap_or_else(|e| e.into_inner());
    current
        .as_ref()
        .filter(|c| SystemTime::now() < c.not_after())
        .cloned()
}

impl<C: CaClient> Inner<C> {
    /// One CSR to the CA, with a fresh key.
    async fn request(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, CertError> {
        let result = self.request_once(id).await;
        let outcome = if result.is_ok() { "success" } else { "failure" };
        metrics::counter!("trellis_cert_issuance_total", "result" => outcome).increment(1);
        match &result {
            Ok(c) => {
                tracing::info!(identity = %id, not_after = ?c.not_after(), "obtained certificate");
                set_expiry_metric(id, c);
            }
            Err(e) => tracing::warn!(identity = %id, error = %e, "certificate request failed"),
        }
        result
    }

    async fn request_once(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, CertError> {
        let local = |e: rcgen::Error| CertError::Local(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(local)?;
        let mut params = CertificateParams::default();
        let uri = id.to_string().try_into().map_err(local)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params.serialize_request(&key).map_err(local)?;
        let csr_pem = csr.pem().map_err(local)?;
        let chain_pem = self.ca.sign(id, csr_pem, self.config.ttl).await?;
        let bad = |e: TlsError| CertError::BadResponse {
            identity: id.to_string(),
            reason: e.to_string(),
        };
        let chain = parse_pem_certs(&chain_pem.concat(), "CA response").map_err(bad)?;
        let (_, not_after) = crate::tls::validity_of(&chain[0]).map_err(bad)?;
        if not_after <= SystemTime::now() {
            return Err(CertError::BadResponse {
                identity: id.to_string(),
                reason: "the certificate has already expired; is the CA's clock right?".into(),
            });
        }
        // The CA's answer is checked before it is used: the key it certified is ours, and
        // the chain leads to our trust bundle. Otherwise every handshake would fail with it.
        let leaf_spki = x509_parser::parse_x509_certificate(chain[0].as_ref())
            .map(|(_, c)| c.public_key().raw.to_vec())
            .map_err(|e| bad(TlsError::BadCertificate(e.to_string())))?;
        if leaf_spki != key.subject_public_key_info() {
            return Err(CertError::BadResponse {
                identity: id.to_string(),
                reason: "the certificate does not certify the key of our request".into(),
            });
        }
        self.bundle
            .verify_chain(&chain)
            .map_err(|e| CertError::BadResponse {
                identity: id.to_string(),
                reason: format!("the chain does not lead to the trust bundle: {e}"),
            })?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let cert = WorkloadCert::new(chain, key).map_err(bad)?;
        if cert.identity() != id {
            return Err(CertError::BadResponse {
                identity: id.to_string(),
                reason: format!("the certificate is for {}", cert.identity()),
            });
        }
        Ok(Arc::new(cert))
    }

    /// Whether `slot` is still the one held for `id` (not forgotten meanwhile).
    fn holds(&self, id: &SpiffeId, slot: &Arc<Slot>) -> bool {
        lock(&self.slots)
            .get(id)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
    }

    /// Time until renewal is due: half the lifetime, ±10% of it, counted from when the
    /// certificate became usable here (a CA backdates notBefore for clock skew, which must
    /// not shorten the schedule), and never less than the first backoff step.
    fn renew_delay(&self, cert: &WorkloadCert) -> Duration {
        let start = cert.not_before().max(SystemTime::now());
        let lifetime = cert.not_after().duration_since(start).unwrap_or_default();
        let mut r = [0u8; 4];
        let unit = match self.rng.fill(&mut r) {
            Ok(()) => f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX),
            Err(_) => 0.5,
        };
        lifetime
            .mul_f64(0.4 + 0.2 * unit)
            .max(self.config.initial_backoff)
    }
}

/// Renews the certificate of `slot` for as long as the manager and the slot live.
async fn renew_loop<C: CaClient>(inner: std::sync::Weak<Inner<C>>, id: SpiffeId, slot: Arc<Slot>) {
    use tokio::time::{Instant, sleep, sleep_until};
    loop {
        let Some(cert) = lock(&slot.current).clone() else {
            return;
        };
        let (deadline, refresh, initial_backoff, max_backoff) = {
            let Some(inner) = inner.upgrade() else { return };
            if !inner.holds(&id, &slot) {
                return;
            }
            let c = &inner.config;
            (
                Instant::now() + inner.renew_delay(&cert),
                c.metric_refresh,
                c.initial_backoff,
                c.max_backoff,
            )
        };
        // The schedule runs on the runtime's clock, fixed once per certificate.
        while Instant::now() < deadline {
            sleep_until((Instant::now() + refresh).min(deadline)).await;
            set_expiry_metric(&id, &cert);
        }
        let mut backoff = initial_backoff;
        loop {
            let Some(inner) = inner.upgrade() else { return };
            if !inner.holds(&id, &slot) {
                return;
            }
            let flight = slot.fetching.lock().await;
            // A caller may have obtained a newer certificate meanwhile.
            if lock(&slot.current)
                .as_ref()
                .is_some_and(|c| !Arc::ptr_eq(c, &cert))
            {
                break;
            }
            match inner.request(&id).await {
                Ok(new) => {
                    *lock(&slot.current) = Some(new);
                    break;
                }
                Err(e) => {
                    *lock(&slot.last_failure) = Some((Instant::now(), e));
                    drop(flight);
                    drop(inner);
                    // The current certificate stays in service while it is valid.
                    set_expiry_metric(&id, &cert);
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_expiry_metric(id: &SpiffeId, cert: &WorkloadCert) {
    let left = cert
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    metrics::gauge!("trellis_cert_expiry_seconds", "identity" => id.to_string())
        .set(left.as_secs_f64());
}
