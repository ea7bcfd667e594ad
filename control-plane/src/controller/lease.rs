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
pub async fn elect(client: kube::Client, config: LeaseConfig, leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut seen: Option<Seen> = None;
    let mut renewed: Option<Instant> = None;
    loop {
        let leads = match try_acquire_or_renew(&api, &config, &mut seen).await {
            Ok(true) => {
                renewed = Some(Instant::now());
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(lease = %config.name, error = %e, "lease: cannot read or write");
                // Keep leading through a short API outage, not past the renew deadline.
                renewed.is_some_and(|t| t.elapsed() < config.renew_deadline)
            }
        };
        if !leads {
            renewed = None;
        }
        if *leader.borrow() != leads {
            tracing::info!(lease = %config.name, identity = %config.identity, leads, "leadership changed");
            if leader.send(leads).is_err() {
                return;
            }
        }
        if leader.is_closed() {
            return;
        }
        tokio::time::sleep(config.retry).await;
    }
}

/// One round: returns whether this replica holds the Lease afterwards.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    seen: &mut Option<Seen>,
) -> Result<bool, kube::Error> {
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
            Err(e) => Err(e),
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
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
