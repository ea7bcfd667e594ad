//! Leader election with a `coordination.k8s.io/v1` `Lease`: one replica at a time writes
//! statuses and waypoint objects; every replica serves xDS.
//!
//! The protocol is client-go's: the holder renews `spec.renewTime` every `retry`; another
//! replica takes the Lease over once it has seen the same record unchanged for
//! `duration`. Expiry is judged by when *this* replica last saw the record change (a local
//! monotonic clock), never by comparing timestamps written by another machine, so clock
//! skew between nodes cannot make two leaders. Every write carries the `resourceVersion`
//! it read: of two replicas racing for the Lease, the API server lets one win (409 for the
//! other). A leader that cannot renew within `renew_deadline` steps down on its own, before
//! `duration` runs out and another replica may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

/// How the election runs.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the control plane's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    /// How long a Lease not renewed stays with its holder.
    pub duration: Duration,
    /// A leader that has not renewed for this long steps down (< `duration`).
    pub renew_deadline: Duration,
    /// How often the holder renews and the others look.
    pub retry: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: &str, name: &str, identity: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// What this replica last saw of the Lease.
struct Seen {
    holder: Option<String>,
    renew: Option<String>,
    /// When the record last changed, by this replica's clock.
    at: Instant,
}

/// Runs the election until `leader` has no receiver left, reporting whether this replica
/// leads on `leader`.
///
/// Leadership is counted from when the last successful renewal was *sent* (the API server
/// applied it later, and other replicas count their `duration` from when they saw it), and
/// it ends at that time plus `renew_deadline` on a timer of its own: a renewal that hangs
/// cannot stretch it.
pub async fn elect(client: kube::Client, config: LeaseConfig, leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut seen: Option<Seen> = None;
    // When the last successful renewal (or acquisition) was sent.
    let mut renewed: Option<Instant> = None;
    let publish = |leads: bool| {
        if *leader.borrow() != leads {
            tracing::info!(lease = %config.name, identity = %config.identity, leads, "leadership changed");
            leader.send_replace(leads);
        }
    };
    loop {
        let sent = Instant::now();
        let attempt = tokio::time::timeout(
            config.renew_deadline,
            try_acquire_or_renew(&api, &config, &mut seen),
        );
        tokio::pin!(attempt);
        let result = loop {
            let deadline = renewed.map(|t| t + config.renew_deadline);
            tokio::select! {
                r = &mut attempt => break r,
                () = tokio::time::sleep_until(deadline.unwrap_or(sent)), if deadline.is_some() => {
                    // Not renewed in time: step down now, whatever the request does later.
                    renewed = None;
                    publish(false);
                }
            }
        };
        match result {
            Ok(Ok(true)) => renewed = Some(sent),
            Ok(Ok(false)) => renewed = None,
            Ok(Err(e)) => {
                tracing::warn!(lease = %config.name, error = %e, "lease: cannot read or write");
            }
            Err(_) => {
                tracing::warn!(lease = %config.name, "lease: the API server did not answer in time")
            }
        }
        // A leader keeps leading through a short API outage, not past the renew deadline.
        if renewed.is_some_and(|t| t.elapsed() >= config.renew_deadline) {
            renewed = None;
        }
        publish(renewed.is_some());
        if leader.is_closed() {
            return;
        }
        let next = match renewed {
            Some(t) => (t + config.renew_deadline).min(Instant::now() + config.retry),
            None => Instant::now() + config.retry,
        };
        tokio::time::sleep_until(next).await;
    }
}

/// A renewal of our own Lease that lost a race (409): another writer touched the Lease;
/// whether it is still ours is read again next round.
#[derive(Debug)]
struct RenewalConflict;

impl std::fmt::Display for RenewalConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the renewal conflicted with another write; reading the Lease again")
    }
}

impl std::error::Error for RenewalConflict {}

/// One round: returns whether this replica holds the Lease afterwards.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    seen: &mut Option<Seen>,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let now = MicroTime(Timestamp::now());
    let Some(current) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(config.duration.as_secs() as i32),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            // Another replica created it first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        };
    };
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let renew = spec
        .renew_time
        .as_ref()
        .map(|t| t.0.to_string())
        .or_else(|| spec.acquire_time.as_ref().map(|t| t.0.to_string()));
    let changed = seen
        .as_ref()
        .is_none_or(|s| s.holder != holder || s.renew != renew);
    if changed {
        *seen = Some(Seen {
            holder: holder.clone(),
            renew,
            at: Instant::now(),
        });
    }
    let ours = holder.as_deref() == Some(config.identity.as_str());
    let duration = spec
        .lease_duration_seconds
        .map_or(config.duration, |s| Duration::from_secs(s.max(1) as u64));
    let expired = seen.as_ref().is_some_and(|s| s.at.elapsed() >= duration);
    if !(ours || holder.is_none() || expired) {
        return Ok(false);
    }
    let mut next = current;
    let mut spec = spec;
    if !ours {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.holder_identity = Some(config.identity.clone());
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(config.duration.as_secs() as i32);
    next.spec = Some(spec);
    // `next` carries the resourceVersion read above: a concurrent writer makes this a 409.
    match api
        .replace(&config.name, &PostParams::default(), &next)
        .await
    {
        Ok(_) => {
            if !ours {
                tracing::info!(lease = %config.name, identity = %config.identity, "lease acquired");
            }
            Ok(true)
        }
        // Renewing our own: not lost yet (the renew deadline decides); taking it over:
        // another replica was faster.
        Err(kube::Error::Api(s)) if s.code == 409 && ours => Err(Box::new(RenewalConflict)),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}
