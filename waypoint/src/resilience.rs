//! What a DestinationRule's `trafficPolicy` makes of a backend at the waypoint: circuit
//! breaking (connection-pool limits) and outlier detection, beside the retry budget.
//!
//! **Limits** (`connectionPool`; overflow answers 503 with flag `UO`, as Envoy):
//! - `http.http2MaxRequests`: requests in flight to the backend;
//! - `tcp.maxConnections` with `http.http1MaxPendingRequests`: over HTTP/1.1 each request
//!   in flight holds a connection, so at most `maxConnections` are sent at once and up to
//!   `http1MaxPendingRequests` more wait for one; the rest overflow.
//!
//! **Outlier detection** (`outlierDetection`): an endpoint answering `consecutive5xxErrors`
//! 5xx (connect failures and resets count) in a row, or `consecutiveGatewayErrors` 502/503/
//! 504 in a row, is ejected for `baseEjectionTime` × the times it was ejected, and
//! re-admitted after that. At most `maxEjectionPercent` of the endpoints seen are ejected
//! at once, and at least one may be (Envoy's rule); an ejected endpoint is only used when
//! no other is ready.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use trellis_proto::trellis::waypoint::v1 as pb;

/// The state of one backend (service and port) of a route.
#[derive(Debug, Default)]
pub struct BackendState {
    /// The traffic policy it was made from (a push with the same one keeps the state).
    pub policy: Option<pb::TrafficPolicy>,
    /// Retries.
    pub budget: crate::retry::Budget,
    /// Connection-pool limits, when a DestinationRule sets some.
    pub limits: Option<Limits>,
    /// Outlier detection, when a DestinationRule sets it.
    pub outlier: Option<Outlier>,
    /// The load balancer, when a DestinationRule sets one.
    pub balancer: Option<Balancer>,
    /// Connection settings (connect and idle timeouts, requests per connection).
    pub conn: crate::upstream::ConnOpts,
}

/// A DestinationRule's `loadBalancer`: ROUND_ROBIN, RANDOM or LEAST_REQUEST (the
/// default: the less loaded of two random endpoints), or a consistent hash of a request
/// attribute (rendezvous hashing; a request without the attribute is balanced by
/// `simple`).
#[derive(Debug)]
pub struct Balancer {
    simple: pb::load_balancer::Simple,
    hash: Option<HashKey>,
    turn: std::sync::atomic::AtomicUsize,
}

/// What a consistent hash hashes.
#[derive(Debug)]
enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    SourceIp,
    Query(String),
}

impl Balancer {
    /// The balancer for `lb`; `None` when it is the default (LEAST_REQUEST, no hash).
    pub fn new(lb: &pb::LoadBalancer) -> Option<Balancer> {
        use pb::load_balancer::consistent_hash::Key;
        let hash = lb
            .consistent_hash
            .as_ref()
            .and_then(|c| c.key.as_ref())
            .and_then(|k| match k {
                Key::Header(h) => http::HeaderName::from_bytes(h.as_bytes())
                    .ok()
                    .map(HashKey::Header),
                Key::Cookie(c) => Some(HashKey::Cookie(c.clone())),
                Key::SourceIp(true) => Some(HashKey::SourceIp),
                Key::SourceIp(false) => None,
                Key::QueryParameter(q) => Some(HashKey::Query(q.clone())),
            });
        let simple = lb.simple();
        if hash.is_none() && simple == pb::load_balancer::Simple::LeastRequest {
            return None;
        }
        Some(Balancer {
            simple,
            hash,
            turn: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// How to pick the endpoint of a request with `headers`, from `client`, with `query`.
    pub fn mode(
        &self,
        headers: &http::HeaderMap,
        client: IpAddr,
        query: Option<&str>,
    ) -> trellis_core::routing::Mode<'_> {
        use trellis_core::routing::{Mode, stable_hash};
        let key: Option<u64> = match &self.hash {
            None => None,
            Some(HashKey::Header(h)) => headers.get(h).map(|v| stable_hash(v.as_bytes())),
            Some(HashKey::SourceIp) => Some(stable_hash(client.to_string().as_bytes())),
            Some(HashKey::Cookie(name)) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| stable_hash(v.as_bytes())),
            Some(HashKey::Query(name)) => {
                query.into_iter().flat_map(|q| q.split('&')).find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then(|| stable_hash(v.as_bytes()))
                })
            }
        };
        match (key, self.simple) {
            (Some(k), _) => Mode::Hash(k),
            (None, pb::load_balancer::Simple::RoundRobin) => Mode::RoundRobin(&self.turn),
            (None, pb::load_balancer::Simple::Random) => Mode::Random,
            (None, _) => Mode::TwoChoices,
        }
    }
}

impl BackendState {
    /// The state for `policy` (none: no limits, no ejection).
    pub fn new(policy: Option<&pb::TrafficPolicy>) -> BackendState {
        BackendState {
            policy: policy.cloned(),
            budget: crate::retry::Budget::default(),
            limits: policy
                .and_then(|p| p.circuit_breaker.as_ref())
                .and_then(Limits::new),
            outlier: policy
                .and_then(|p| p.outlier_detection.as_ref())
                .and_then(Outlier::new),
            balancer: policy
                .and_then(|p| p.load_balancer.as_ref())
                .and_then(Balancer::new),
            conn: crate::upstream::ConnOpts {
                connect_timeout: policy
                    .and_then(|p| crate::routes::duration(p.connect_timeout.as_ref())),
                idle_timeout: policy.and_then(|p| crate::routes::duration(p.idle_timeout.as_ref())),
                max_requests: policy
                    .and_then(|p| p.circuit_breaker.as_ref())
                    .and_then(|c| c.max_requests_per_connection),
            },
        }
    }
}

/// Connection-pool limits of one backend.
#[derive(Debug)]
pub struct Limits {
    max_requests: usize,
    max_connections: usize,
    max_pending: usize,
    in_flight: AtomicUsize,
    pending: AtomicUsize,
    /// HTTP/1.1 requests sent at once (each on its own connection).
    connections: std::sync::Arc<tokio::sync::Semaphore>,
}

/// A request admitted by [`Limits`]: in flight until dropped (with its response's end).
#[derive(Debug)]
pub struct Admission {
    limits: std::sync::Arc<BackendState>,
    _connection: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(l) = &self.limits.limits {
            l.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Why a request was not admitted: the limit that overflowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overflow(pub &'static str);

impl Limits {
    fn new(c: &pb::CircuitBreaker) -> Option<Limits> {
        let v = |x: Option<u32>| x.map(|n| n as usize);
        let (req, conn, pend) = (
            v(c.max_requests),
            v(c.max_connections),
            v(c.max_pending_requests),
        );
        if req.is_none() && conn.is_none() && pend.is_none() {
            return None;
        }
        // Istio's defaults for what a rule leaves unset: effectively unlimited.
        let unlimited = u32::MAX as usize;
        let max_connections = conn.unwrap_or(unlimited);
        Some(Limits {
            max_requests: req.unwrap_or(unlimited),
            max_connections,
            max_pending: pend.unwrap_or(unlimited),
            in_flight: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            connections: std::sync::Arc::new(tokio::sync::Semaphore::new(
                max_connections.min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
        })
    }
}

/// Admits a request to `state`'s backend, or says which limit overflowed. `h1`: the
/// request goes over HTTP/1.1 (it holds a connection while in flight).
pub async fn admit(
    state: &std::sync::Arc<BackendState>,
    h1: bool,
) -> Result<Option<Admission>, Overflow> {
    let Some(l) = &state.limits else {
        return Ok(None);
    };
    if l.in_flight.fetch_add(1, Ordering::AcqRel) >= l.max_requests {
        l.in_flight.fetch_sub(1, Ordering::AcqRel);
        return Err(Overflow("max requests (http2MaxRequests)"));
    }
    let admission = |permit| Admission {
        limits: state.clone(),
        _connection: permit,
    };
    if !h1 || l.max_connections >= u32::MAX as usize {
        return Ok(Some(admission(None)));
    }
    let permit = match l.connections.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            if l.pending.fetch_add(1, Ordering::AcqRel) >= l.max_pending {
                l.pending.fetch_sub(1, Ordering::AcqRel);
                l.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(Overflow(
                    "max connections (maxConnections) and pending requests (http1MaxPendingRequests)",
                ));
            }
            let got = l.connections.clone().acquire_owned().await;
            l.pending.fetch_sub(1, Ordering::AcqRel);
            match got {
                Ok(p) => p,
                // (Never closed; were it, the request goes without a permit.)
                Err(_) => return Ok(Some(admission(None))),
            }
        }
    };
    Ok(Some(admission(Some(permit))))
}

/// How one attempt at an endpoint ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// No response: the connection failed or the stream was reset (counts as 503).
    Failed,
}

/// Outlier detection of one backend's endpoints.
#[derive(Debug)]
pub struct Outlier {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    base_ejection: Duration,
    max_ejection_percent: u32,
    hosts: Mutex<HashMap<IpAddr, Health>>,
}

#[derive(Debug, Default)]
struct Health {
    five_xx: u32,
    gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

impl Outlier {
    fn new(o: &pb::OutlierDetection) -> Option<Outlier> {
        let d = crate::routes::duration;
        Some(Outlier {
            // Istio's defaults: 5 consecutive 5xx, gateway errors off, 30 s, 10%.
            consecutive_5xx: o.consecutive_5xx.unwrap_or(5),
            consecutive_gateway: o.consecutive_gateway_errors.unwrap_or(0),
            base_ejection: d(o.base_ejection_time.as_ref()).unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(10).min(100),
            hosts: Mutex::default(),
        })
    }

    /// Records how an attempt at `ip` ended; may eject it.
    pub fn record(&self, ip: IpAddr, outcome: Outcome) {
        let status = match outcome {
            Outcome::Status(s) => s,
            Outcome::Failed => 503,
        };
        let now = Instant::now();
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let seen = hosts.len().max(1);
        let ejected = hosts
            .values()
            .filter(|h| h.ejected_until.is_some_and(|t| t > now))
            .count();
        let h = hosts.entry(ip).or_default();
        if h.ejected_until.is_some_and(|t| t <= now) {
            // Back after its ejection: a fresh start.
            h.ejected_until = None;
            h.five_xx = 0;
            h.gateway = 0;
        }
        if (500..600).contains(&status) {
            h.five_xx += 1;
        } else {
            h.five_xx = 0;
        }
        if matches!(status, 502..=504) {
            h.gateway += 1;
        } else {
            h.gateway = 0;
        }
        let tripped = (self.consecutive_5xx > 0 && h.five_xx >= self.consecutive_5xx)
            || (self.consecutive_gateway > 0 && h.gateway >= self.consecutive_gateway);
        let allowed = (seen * self.max_ejection_percent as usize / 100).max(1);
        if tripped && h.ejected_until.is_none() && ejected < allowed {
            h.ejections += 1;
            h.ejected_until = Some(now + self.base_ejection * h.ejections.min(10));
            h.five_xx = 0;
            h.gateway = 0;
            tracing::info!(endpoint = %ip, ejections = h.ejections, "endpoint ejected (outlier detection)");
        }
    }

    /// Whether `ip` is ejected now.
    pub fn ejected(&self, ip: IpAddr) -> bool {
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .get(&ip)
            .and_then(|h| h.ejected_until)
            .is_some_and(|t| t > Instant::now())
    }
}
