//! Retries: a route rule's policy (HTTPRoute `retry`), Istio's default when the rule has
//! none, and the budget that keeps retries from amplifying an outage.
//!
//! Only a request without a body is retried (nothing has to be buffered to send it again;
//! a request with a body goes once). Each attempt picks an endpoint again.
//!
//! **The budget** is success-aware, after the adaptive client throttling of Google's SRE
//! book: per service port, over the last 10–20 s, a retry is allowed while the attempts
//! sent are fewer than [`RATIO`] × the successful ones plus [`ALLOWANCE`]. A service that
//! fails half its requests is retried as often as needed (about two attempts per
//! success); one that fails everything gets about [`ALLOWANCE`] retries per window, so the
//! load on it stays close to what clients send.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use trellis_proto::trellis::waypoint::v1 as pb;

/// Attempts per success the budget allows.
pub const RATIO: u64 = 3;
/// Retries per window allowed whatever the successes.
pub const ALLOWANCE: u64 = 10;
/// Length of one budget window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Back-off base when the policy sets none (Envoy's 25 ms).
pub const BASE_BACKOFF: Duration = Duration::from_millis(25);

/// A compiled retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Retry when the connection could not be made.
    pub connect_failure: bool,
    /// Retry when the stream was refused or reset before a response.
    pub reset: bool,
    /// Retry these response statuses.
    pub statuses: Vec<u16>,
    /// Retry any 5xx.
    pub server_error: bool,
    /// Only idempotent methods (Istio's default policy).
    pub idempotent_only: bool,
    /// Back-off: full jitter up to `base × 2^n`, capped at `max`.
    pub base: Duration,
    /// Back-off cap.
    pub max: Duration,
    /// Deadline of each attempt.
    pub per_try_timeout: Option<Duration>,
}

impl Retry {
    /// Istio's default for HTTP routes: 2 retries on connect failure, refused stream and
    /// 503, for idempotent requests.
    pub fn istio_default() -> Retry {
        Retry {
            attempts: 2,
            connect_failure: true,
            reset: true,
            statuses: vec![503],
            server_error: false,
            idempotent_only: true,
            base: BASE_BACKOFF,
            max: BASE_BACKOFF * 10,
            per_try_timeout: None,
        }
    }

    /// The policy of a route rule (`None` for `attempts: 0`: no retries).
    pub fn compile(p: &pb::RetryPolicy) -> Option<Retry> {
        use pb::retry_policy::RetryOn;
        if p.attempts == 0 {
            return None;
        }
        let on = |o: RetryOn| p.retry_on.contains(&(o as i32));
        let base = duration(p.backoff_base_interval.as_ref()).unwrap_or(BASE_BACKOFF);
        Some(Retry {
            attempts: p.attempts,
            connect_failure: on(RetryOn::ConnectFailure),
            reset: on(RetryOn::Reset) || on(RetryOn::RefusedStream),
            statuses: {
                let mut s: Vec<u16> = p
                    .retry_on_status_codes
                    .iter()
                    .filter_map(|c| u16::try_from(*c).ok())
                    .collect();
                if on(RetryOn::GatewayError) {
                    s.extend([502, 503, 504]);
                }
                s
            },
            server_error: on(RetryOn::ServerError),
            idempotent_only: false,
            base,
            max: duration(p.backoff_max_interval.as_ref()).unwrap_or(base * 10),
            per_try_timeout: duration(p.per_try_timeout.as_ref()),
        })
    }

    /// Whether a response with `status` is retried.
    pub fn on_status(&self, status: u16) -> bool {
        self.statuses.contains(&status) || (self.server_error && (500..600).contains(&status))
    }

    /// Whether `method` may be retried under this policy.
    pub fn allows_method(&self, method: &http::Method) -> bool {
        !self.idempotent_only
            || matches!(
                *method,
                http::Method::GET
                    | http::Method::HEAD
                    | http::Method::OPTIONS
                    | http::Method::PUT
                    | http::Method::DELETE
                    | http::Method::TRACE
            )
    }

    /// The pause before retry `n` (1-based): uniformly random up to the exponential step.
    pub fn backoff(&self, n: u32, random: u64) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.max);
        let nanos = u64::try_from(step.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(if nanos == 0 { 0 } else { random % nanos })
    }
}

use crate::routes::duration;

/// The retry budget of one service port (see the module's documentation).
#[derive(Debug)]
pub struct Budget {
    /// Attempts sent and successes, in this window.
    attempts: AtomicU64,
    successes: AtomicU64,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// The previous window's attempts and successes.
    previous: (u64, u64),
}

impl Default for Budget {
    fn default() -> Budget {
        Budget {
            attempts: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            window: Mutex::new(Window {
                started: Instant::now(),
                previous: (0, 0),
            }),
        }
    }
}

impl Budget {
    /// Counts an attempt sent (first tries and retries alike).
    pub fn attempt(&self) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an attempt that succeeded (a response not retried for its status).
    pub fn success(&self) {
        self.successes.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a retry may be sent now.
    pub fn allow_retry(&self) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = w.started.elapsed();
        if elapsed >= WINDOW {
            let now = (
                self.attempts.swap(0, Ordering::Relaxed),
                self.successes.swap(0, Ordering::Relaxed),
            );
            // More than a window idle: the previous window is empty too.
            w.previous = if elapsed >= WINDOW * 2 { (0, 0) } else { now };
            w.started = Instant::now();
        }
        let attempts = w.previous.0 + self.attempts.load(Ordering::Relaxed);
        let successes = w.previous.1 + self.successes.load(Ordering::Relaxed);
        attempts < RATIO * successes + ALLOWANCE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mostly_failing_service_is_retried_and_a_failing_one_is_not_hammered() {
        // Half the attempts succeed: every retry is allowed.
        let b = Budget::default();
        for i in 0..10_000u64 {
            b.attempt();
            if i % 2 == 0 {
                b.success();
            } else {
                assert!(b.allow_retry(), "retry {i} refused at 50% failure");
            }
        }
        // Nothing succeeds: after the allowance, no retry.
        let b = Budget::default();
        let mut retries = 0;
        for _ in 0..1_000 {
            b.attempt();
            if b.allow_retry() {
                retries += 1;
                b.attempt();
            }
        }
        assert!(retries <= ALLOWANCE, "{retries} retries of a dead service");
    }

    #[test]
    fn policies_compile_as_the_route_says() {
        use pb::retry_policy::RetryOn;
        let p = pb::RetryPolicy {
            attempts: 3,
            retry_on: vec![RetryOn::ConnectFailure as i32],
            retry_on_status_codes: vec![500, 503],
            backoff_base_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            ..Default::default()
        };
        let r = Retry::compile(&p).unwrap();
        assert_eq!(r.attempts, 3);
        assert!(r.on_status(500) && r.on_status(503) && !r.on_status(502));
        assert!(
            r.allows_method(&http::Method::POST),
            "routes retry any method"
        );
        assert!(r.backoff(1, u64::MAX - 1) < Duration::from_millis(100));
        assert!(r.backoff(4, u64::MAX - 1) < Duration::from_millis(800));
        assert!(
            Retry::compile(&pb::RetryPolicy {
                attempts: 0,
                ..p.clone()
            })
            .is_none(),
            "attempts 0 turns retries off"
        );
        let d = Retry::istio_default();
        assert!(d.allows_method(&http::Method::GET) && !d.allows_method(&http::Method::POST));
        assert!(d.on_status(503) && !d.on_status(500));
    }
}
