//! Local rate limiting and fault injection (a `LocalTrafficPolicy`, attached to a Service
//! port or a route rule), applied after routing and before the request goes upstream.
//!
//! - **Rate limit**: a token bucket per replica, as Envoy's local rate limit: it starts
//!   full with `max_tokens`; every `fill_interval` from its creation `tokens_per_fill` are
//!   added (up to `max_tokens`), in discrete fills. A request takes a token or is answered
//!   429 with `retry-after` (whole seconds to the next fill, at least 1), flag `RL`. The
//!   bucket outlives configuration pushes that leave its settings unchanged.
//! - **Fault**: a delay with probability `delay.percent` (flag `DI`), then an abort with
//!   probability `abort.percent` (flag `FI`; `DI,FI` when both): the HTTP status, or a
//!   gRPC status in a trailers-only response (`content-type: application/grpc`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use trellis_proto::trellis::waypoint::v1 as pb;

/// A token bucket.
#[derive(Debug)]
pub struct Bucket {
    /// The settings it was made from (a push with the same ones keeps the bucket).
    pub config: pb::LocalRateLimit,
    max: u32,
    per_fill: u32,
    interval: Duration,
    state: Mutex<(u32, Instant)>,
}

impl Bucket {
    /// The bucket for `config`; `None` when it is unusable (no tokens or no interval —
    /// the control plane rejects those).
    pub fn new(config: &pb::LocalRateLimit) -> Option<Bucket> {
        let interval = crate::routes::duration(config.fill_interval.as_ref())?;
        if config.max_tokens == 0 || interval.is_zero() {
            return None;
        }
        Some(Bucket {
            config: config.clone(),
            max: config.max_tokens,
            per_fill: config.tokens_per_fill.max(1),
            interval,
            state: Mutex::new((config.max_tokens, Instant::now() + interval)),
        })
    }

    /// Takes a token at `now`; `Err` with the time to the next fill when there is none.
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, next) = &mut *s;
        if now >= *next {
            let fills = (now - *next).as_nanos() / self.interval.as_nanos() + 1;
            let added = u64::try_from(fills)
                .unwrap_or(u64::MAX)
                .saturating_mul(u64::from(self.per_fill));
            *tokens = u32::try_from(u64::from(*tokens).saturating_add(added))
                .unwrap_or(u32::MAX)
                .min(self.max);
            *next += self.interval * u32::try_from(fills).unwrap_or(u32::MAX);
        }
        if *tokens == 0 {
            return Err(*next - now);
        }
        *tokens -= 1;
        Ok(())
    }

    /// The status of a limited request (429 unless configured).
    pub fn status(&self) -> http::StatusCode {
        http::StatusCode::from_u16(u16::try_from(self.config.status_code).unwrap_or(429))
            .ok()
            .filter(|s| s.as_u16() >= 400)
            .unwrap_or(http::StatusCode::TOO_MANY_REQUESTS)
    }
}

/// `retry-after` for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

/// How an abort answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortWith {
    /// An HTTP status.
    Http(u16),
    /// A gRPC status (HTTP 200, trailers only).
    Grpc(u32),
}

/// Delays and aborts.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// The delay and its probability (0 to 1).
    pub delay: Option<(Duration, f64)>,
    /// The abort and its probability (0 to 1).
    pub abort: Option<(AbortWith, f64)>,
}

impl Fault {
    /// The fault of `f`; `None` when it does nothing.
    pub fn new(f: &pb::FaultInjection) -> Option<Fault> {
        let share = |p: f64| (p / 100.0).clamp(0.0, 1.0);
        let delay = f.delay.as_ref().and_then(|d| {
            Some((
                crate::routes::duration(d.fixed_delay.as_ref())?,
                share(d.percent),
            ))
        });
        let abort = f.abort.as_ref().and_then(|a| {
            use pb::fault_injection::abort::Error;
            let with = match a.error? {
                Error::HttpStatus(s) => AbortWith::Http(u16::try_from(s).ok()?),
                Error::GrpcStatus(s) => AbortWith::Grpc(s),
            };
            Some((with, share(a.percent)))
        });
        (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
    }

    /// The delay for a request drawing `random` (uniform over `u64`), if it is delayed.
    pub fn delay(&self, random: u64) -> Option<Duration> {
        self.delay
            .filter(|(_, p)| chance(random, *p))
            .map(|(d, _)| d)
    }

    /// The abort for a request drawing `random`, if it is aborted.
    pub fn abort(&self, random: u64) -> Option<AbortWith> {
        self.abort
            .filter(|(_, p)| chance(random, *p))
            .map(|(a, _)| a)
    }
}

/// Whether `random` (uniform over `u64`) falls in the first `p` (0 to 1) of the range
/// (fault shares, trace sampling).
pub(crate) fn chance(random: u64, p: f64) -> bool {
    if p >= 1.0 {
        return true;
    }
    ((random >> 11) as f64 / (1u64 << 53) as f64) < p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(max: u32, per_fill: u32, interval_ms: i32) -> Bucket {
        Bucket::new(&pb::LocalRateLimit {
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: interval_ms * 1_000_000,
            }),
            status_code: 429,
            response_headers: Vec::new(),
        })
        .unwrap()
    }

    #[test]
    fn the_bucket_starts_full_and_fills_in_steps() {
        let b = bucket(3, 2, 500);
        let t0 = Instant::now();
        for _ in 0..3 {
            b.take(t0).unwrap();
        }
        let wait = b.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        assert_eq!(retry_after(wait), 1);
        // One fill: two tokens.
        let t1 = t0 + Duration::from_millis(600);
        b.take(t1).unwrap();
        b.take(t1).unwrap();
        assert!(b.take(t1).is_err());
        // Many intervals later it holds at most its size.
        let t2 = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            b.take(t2).unwrap();
        }
        assert!(b.take(t2).is_err());
        assert_eq!(b.status(), http::StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after(Duration::from_millis(1)), 1);
        assert_eq!(retry_after(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn faults_hit_their_share() {
        let f = Fault::new(&pb::FaultInjection {
            delay: Some(pb::fault_injection::Delay {
                fixed_delay: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 5_000_000,
                }),
                percent: 25.0,
            }),
            abort: Some(pb::fault_injection::Abort {
                error: Some(pb::fault_injection::abort::Error::GrpcStatus(14)),
                percent: 100.0,
            }),
        })
        .unwrap();
        // Evenly spread draws: a quarter are delayed.
        let n = 10_000u64;
        let step = u64::MAX / n;
        let delayed = (0..n).filter(|i| f.delay(i * step).is_some()).count();
        assert!((2499..=2501).contains(&delayed), "{delayed}");
        assert_eq!(f.abort(u64::MAX), Some(AbortWith::Grpc(14)));
        assert!(
            Fault::new(&pb::FaultInjection::default()).is_none(),
            "an empty fault does nothing"
        );
    }
}
