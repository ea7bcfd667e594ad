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

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use ring::rand::SecureRandom;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::SpiffeId;
use crate::tls::{TlsError, WorkloadCert, parse_pem_certs};

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
    renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Holds and renews the certificates of the identities a proxy serves.
pub struct CertManager<C: CaClient> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    ca: C,
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
    /// A manager asking `ca`.
    pub fn new(ca: C, config: CertConfig) -> CertManager<C> {
        CertManager {
            inner: Arc::new(Inner {
                ca,
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
        let _flight = slot.fetching.lock().await;
        // Whoever held the flight before us may have just stored a certificate.
        if let Some(c) = valid(&slot) {
            return Ok(c);
        }
        let cert = self.inner.request(id).await?;
        *slot.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(cert.clone());
        self.ensure_renewer(id, &slot);
        Ok(cert)
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
        let inner = self.inner.clone();
        let slot = slot.clone();
        let id = id.clone();
        *renewer = Some(tokio::spawn(
            async move { inner.renew_loop(id, slot).await },
        ));
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
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let cert = WorkloadCert::new(chain, key).map_err(bad)?;
        if cert.not_after() <= SystemTime::now() {
            return Err(CertError::BadResponse {
                identity: id.to_string(),
                reason: "the certificate has already expired; is the CA's clock right?".into(),
            });
        }
        if cert.identity() != id {
            return Err(CertError::BadResponse {
                identity: id.to_string(),
                reason: format!("the certificate is for {}", cert.identity()),
            });
        }
        Ok(Arc::new(cert))
    }

    async fn renew_loop(self: Arc<Self>, id: SpiffeId, slot: Arc<Slot>) {
        use tokio::time::{Instant, sleep, sleep_until};
        loop {
            let Some(cert) = slot
                .current
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            else {
                return;
            };
            // The schedule runs on the runtime's clock, fixed once per certificate.
            let deadline = Instant::now() + self.renew_delay(&cert);
            while Instant::now() < deadline {
                sleep_until((Instant::now() + self.config.metric_refresh).min(deadline)).await;
                set_expiry_metric(&id, &cert);
            }
            let mut backoff = self.config.initial_backoff;
            loop {
                let flight = slot.fetching.lock().await;
                match self.request(&id).await {
                    Ok(new) => {
                        *slot.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(new);
                        break;
                    }
                    Err(_) => {
                        drop(flight);
                        // The current certificate stays in service while it is valid.
                        set_expiry_metric(&id, &cert);
                        sleep(backoff).await;
                        backoff = (backoff * 2).min(self.config.max_backoff);
                    }
                }
            }
        }
    }

    /// Time until renewal is due: half the lifetime, ±10% of the lifetime, from notBefore.
    fn renew_delay(&self, cert: &WorkloadCert) -> Duration {
        let lifetime = cert
            .not_after()
            .duration_since(cert.not_before())
            .unwrap_or_default();
        let mut r = [0u8; 4];
        let unit = match self.rng.fill(&mut r) {
            Ok(()) => f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX),
            Err(_) => 0.5,
        };
        let fraction = 0.4 + 0.2 * unit;
        let renew_at = cert.not_before() + lifetime.mul_f64(fraction);
        renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

fn set_expiry_metric(id: &SpiffeId, cert: &WorkloadCert) {
    let left = cert
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    metrics::gauge!("trellis_cert_expiry_seconds", "identity" => id.to_string())
        .set(left.as_secs_f64());
}
