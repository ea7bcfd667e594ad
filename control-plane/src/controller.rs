//! What the control plane writes to the Kubernetes API: policy status conditions, and for
//! each waypoint `Gateway` its ServiceAccount, Service, Deployment and status.
//!
//! One replica writes at a time (a [`lease`] elects it); every replica computes the same
//! [`Inputs`] from its own watches, so a new leader picks up where the old one stopped. The
//! reconcile is level-based: each round applies what the inputs call for (only what
//! changed since the last write reaches the API), and deletes the waypoint objects no
//! waypoint Gateway calls for any more. Failed writes are retried every few seconds.

pub mod apply;
pub mod lease;
pub mod routes;
pub mod status;
pub mod waypoint;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use tokio::sync::watch;

use apply::{Target, Writer};
use waypoint::{Observed, WaypointTemplate};

use crate::config::gateway::Gateway;
use crate::config::model::{MeshConfig, Model};

/// What the writes are computed from, taken from the model after each change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    /// Every kind has been read in full: until then nothing is deleted (an object not read
    /// yet is not an object gone).
    pub synced: bool,
    /// Policy statuses to write.
    pub statuses: BTreeMap<Target, Value>,
    /// Waypoint Gateways by (namespace, name), each with its Service's cluster IP if known.
    pub waypoints: BTreeMap<(String, String), (Gateway, Option<String>)>,
    /// The trust bundle (PEM) and the namespaces that get it as ConfigMap
    /// `trellis-ca-root-cert` (its pods mount it to verify the control plane and peers).
    pub trust_bundle: Option<(String, BTreeSet<String>)>,
}

/// The ConfigMap holding the trust bundle, in every namespace with mesh pods (Istio's is
/// `istio-ca-root-cert`, same key).
pub const TRUST_BUNDLE_CONFIG_MAP: &str = "trellis-ca-root-cert";

/// The apply configurations of the trust bundle's ConfigMaps.
pub fn trust_bundle_config_maps(
    roots_pem: &str,
    namespaces: &BTreeSet<String>,
) -> BTreeMap<Target, Value> {
    namespaces
        .iter()
        .map(|ns| {
            (
                Target {
                    api_version: "v1",
                    kind: "ConfigMap",
                    plural: "configmaps",
                    namespace: ns.clone(),
                    name: TRUST_BUNDLE_CONFIG_MAP.into(),
                    status: false,
                },
                serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {
                        "name": TRUST_BUNDLE_CONFIG_MAP,
                        "namespace": ns,
                        "labels": {"app.kubernetes.io/part-of": "trellis"},
                    },
                    "data": {"root-cert.pem": roots_pem},
                }),
            )
        })
        .collect()
}

/// Waypoint Gateways by (namespace, name), each with its Service's cluster IP if known.
pub fn waypoints(model: &Model) -> BTreeMap<(String, String), (Gateway, Option<String>)> {
    model
        .gateways()
        .filter(|(_, gw)| gw.is_waypoint())
        .map(|((ns, name), gw)| {
            let ip = model.service_vip(ns, name).map(|ip| ip.to_string());
            ((ns.clone(), name.clone()), (gw.clone(), ip))
        })
        .collect()
}

/// Where the trust bundle goes: wherever mesh pods run, enrolled namespaces and those of
/// waypoints (their pods mount it).
pub fn bundle_namespaces(
    model: &Model,
    waypoints: &BTreeMap<(String, String), (Gateway, Option<String>)>,
) -> BTreeSet<String> {
    let mut namespaces = model.enrolled_namespaces();
    namespaces.extend(waypoints.keys().map(|(ns, _)| ns.clone()));
    namespaces
}

/// What the writer applies for `model` (loaded with `errors`) on an API that holds nothing
/// of Trellis's yet (no status observed, no waypoint Deployment ready): policy statuses
/// (rejected versions included) and route statuses, the trust bundle's ConfigMaps when
/// `roots_pem` is given and, with a `template`, each waypoint's objects and Gateway status.
/// `trellis-control-plane render` prints it, so the writes can be checked against the
/// API's schemas without a cluster.
pub fn first_writes(
    model: &Model,
    mesh: &MeshConfig,
    errors: &[crate::config::load::ConfigError],
    template: Option<&WaypointTemplate>,
    roots_pem: Option<&str>,
) -> BTreeMap<Target, Value> {
    let mut statuses = crate::config::snapshot::Snapshot::build(model, mesh).statuses;
    crate::config::authz::with_load_errors(&mut statuses, errors);
    let mut desired: BTreeMap<Target, Value> = statuses
        .iter()
        .filter_map(|(id, s)| {
            let body = status::policy_status(id, s, model.generation(id), None);
            Some((status::target(id)?, body))
        })
        .collect();
    desired.extend(routes::route_statuses(model, mesh));
    let waypoints = waypoints(model);
    if let Some(roots) = roots_pem {
        desired.extend(trust_bundle_config_maps(
            roots,
            &bundle_namespaces(model, &waypoints),
        ));
    }
    if let Some(template) = template {
        for (gw, service_ip) in waypoints.values() {
            let observed = Observed {
                ready_replicas: None,
                service_ip: service_ip.clone(),
            };
            desired.extend(waypoint_writes(
                gw,
                waypoint::objects(gw, template),
                &observed,
            ));
        }
    }
    // Condition times as the writer stamps them when it applies.
    desired
        .into_iter()
        .map(|(t, body)| (t, apply::stamp_transitions(body, None)))
        .collect()
}

/// The writes for waypoint `gw`: its objects if they could be made (`made`), and its
/// status, which says why not otherwise.
fn waypoint_writes(
    gw: &Gateway,
    made: Result<Vec<(Target, Value)>, String>,
    observed: &Observed,
) -> Vec<(Target, Value)> {
    let problem = made.as_ref().err().cloned();
    let mut writes = made.unwrap_or_default();
    writes.push(waypoint::gateway_status(gw, observed, problem.as_deref()));
    writes
}

/// Managed waypoint Deployments seen on the API, by (namespace, name): their ready
/// replicas.
pub type Deployments = BTreeMap<(String, String), i32>;

/// Applies what [`Inputs`] call for.
#[derive(Debug)]
pub struct Reconciler {
    writer: Writer,
    template: Option<WaypointTemplate>,
    /// Waypoint objects found free or already this Gateway's: (target, Gateway uid).
    verified: BTreeSet<(Target, String)>,
}

impl Reconciler {
    /// A reconciler writing through `client`.
    pub fn new(client: kube::Client, template: Option<WaypointTemplate>) -> Reconciler {
        Reconciler {
            writer: Writer::new(client),
            template,
            verified: BTreeSet::new(),
        }
    }

    /// Forgets what was written (leadership was lost: another replica writes now).
    pub fn forget(&mut self) {
        self.writer.forget();
        self.verified.clear();
    }

    /// Why the Gateway `gw` cannot have `objects`: one of them exists and is not
    /// controlled by this Gateway (a user's Service, the namespace's `default`
    /// ServiceAccount, ztunnel's ServiceAccount...). Never taken over. `Err` when the API
    /// could not be asked (retried next round).
    async fn conflict(
        &mut self,
        uid: &str,
        objects: &[(Target, Value)],
    ) -> Result<Option<String>, ()> {
        for (target, _) in objects {
            let key = (target.clone(), uid.to_string());
            if self.verified.contains(&key) {
                continue;
            }
            match self.writer.controller_of(target).await {
                Ok(None) => {}
                Ok(Some(Some((kind, owner)))) if kind == "Gateway" && owner == uid => {}
                Ok(Some(_)) => {
                    return Ok(Some(format!(
                        "{} {}/{} exists and is not this waypoint's: rename the Gateway or remove it",
                        target.kind, target.namespace, target.name
                    )));
                }
                Err(e) => {
                    tracing::warn!(%target, error = %e, "cannot check the waypoint's objects; retrying");
                    return Err(());
                }
            }
            self.verified.insert(key);
        }
        Ok(None)
    }

    /// One round. `deployments` is `None` until the managed Deployments were listed; the
    /// round stops writing once `leading()` is false. Returns how many writes failed.
    pub async fn reconcile(
        &mut self,
        inputs: &Inputs,
        deployments: Option<&Deployments>,
        leading: &(dyn Fn() -> bool + Sync),
    ) -> usize {
        let mut desired = inputs.statuses.clone();
        if let Some((roots, namespaces)) = &inputs.trust_bundle {
            desired.extend(trust_bundle_config_maps(roots, namespaces));
        }
        let Some(template) = self.template.clone() else {
            // Not deploying waypoints: statuses only.
            return self.writer.sync(&desired, leading).await;
        };
        let mut failed = 0;
        for ((ns, name), (gw, service_ip)) in &inputs.waypoints {
            let mut made = waypoint::objects(gw, &template);
            if let Ok(objects) = &made {
                let uid = gw.metadata.uid.clone().unwrap_or_default();
                match self.conflict(&uid, objects).await {
                    Ok(None) => {}
                    Ok(Some(p)) => made = Err(p),
                    Err(()) => {
                        failed += 1;
                        continue;
                    }
                }
            }
            if let Err(p) = &made {
                tracing::warn!(gateway = %format!("{ns}/{name}"), problem = %p, "waypoint not deployed");
            }
            let observed = Observed {
                ready_replicas: deployments
                    .and_then(|d| d.get(&(ns.clone(), name.clone())).copied()),
                service_ip: service_ip.clone(),
            };
            desired.extend(waypoint_writes(gw, made, &observed));
        }
        // Waypoint objects no waypoint calls for: the Gateway changed class (a deleted
        // Gateway's objects go with it through their owner reference anyway).
        if inputs.synced
            && let Some(deployments) = deployments
        {
            let stale: BTreeSet<&(String, String)> = deployments
                .keys()
                .filter(|k| !inputs.waypoints.contains_key(*k))
                .collect();
            for (ns, name) in stale {
                if !leading() {
                    return failed;
                }
                tracing::info!(gateway = %format!("{ns}/{name}"), "no waypoint Gateway any more: deleting its objects");
                for t in waypoint::object_targets(ns, name).iter().rev() {
                    if !self.writer.delete_gateway_owned(t).await {
                        failed += 1;
                    }
                }
            }
        }
        failed + self.writer.sync(&desired, leading).await
    }
}

/// Where and as whom the controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The Lease electing the writer.
    pub lease: lease::LeaseConfig,
    /// What waypoint Deployments are made from (`None`: waypoints are not deployed).
    pub template: Option<WaypointTemplate>,
}

/// Runs the controller until `inputs` has no sender left.
pub async fn run(
    client: kube::Client,
    config: ControllerConfig,
    mut inputs: watch::Receiver<Inputs>,
) {
    let (leader_tx, mut leader) = watch::channel(false);
    let election = tokio::spawn(lease::elect(
        client.clone(),
        config.lease.clone(),
        leader_tx,
    ));
    let api: Api<Deployment> = Api::all(client.clone());
    let selector = format!("{}={}", waypoint::MANAGED_LABEL, waypoint::MANAGED_BY);
    let mut deployment_events = watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .boxed();
    let mut deployments: Option<Deployments> = None;
    let mut listing: Deployments = BTreeMap::new();
    let mut reconciler = Reconciler::new(client, config.template);
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    // What was written is re-applied now and then (unchanged objects cost the API server
    // nothing): an object someone deleted or edited comes back.
    let mut resync = tokio::time::interval(Duration::from_secs(300));
    resync.tick().await;
    loop {
        tokio::select! {
            changed = inputs.changed() => if changed.is_err() { break },
            changed = leader.changed() => if changed.is_err() { break },
            Some(event) = deployment_events.next() => {
                let key = |d: &Deployment| (
                    d.metadata.namespace.clone().unwrap_or_default(),
                    d.metadata.name.clone().unwrap_or_default(),
                );
                let ready = |d: &Deployment| d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
                match event {
                    Ok(watcher::Event::Init) => listing.clear(),
                    Ok(watcher::Event::InitApply(d)) => { listing.insert(key(&d), ready(&d)); }
                    Ok(watcher::Event::InitDone) => deployments = Some(std::mem::take(&mut listing)),
                    Ok(watcher::Event::Apply(d)) => {
                        if let Some(m) = deployments.as_mut() { m.insert(key(&d), ready(&d)); }
                    }
                    Ok(watcher::Event::Delete(d)) => {
                        if let Some(m) = deployments.as_mut() { m.remove(&key(&d)); }
                        // Deleted by someone: applied again if still called for.
                        reconciler.forget();
                    }
                    Err(e) => tracing::warn!(error = %e, "watching waypoint Deployments failed; retrying"),
                }
            }
            _ = retry.tick() => {}
            _ = resync.tick() => reconciler.forget(),
        }
        if !*leader.borrow_and_update() {
            reconciler.forget();
            continue;
        }
        let now = inputs.borrow_and_update().clone();
        let leading = || *leader.borrow();
        reconciler
            .reconcile(&now, deployments.as_ref(), &leading)
            .await;
    }
    election.abort();
}
