//! The delta xDS server: `DeltaAggregatedResources`, as Istio's ztunnel speaks it.
//!
//! Per stream and per type URL the server keeps what the proxy has (name → version, as
//! ACKed, or as announced in `initial_resource_versions` when it reconnects), what it
//! subscribed to (wildcard, or names), and at most one response in flight: the next one is
//! computed after the proxy ACKs or NACKs, from the snapshot of that moment, so a proxy that
//! falls behind gets one catch-up delta instead of a queue of stale ones.
//!
//! A NACK is logged with the proxy's id and error; the proxy keeps its previous versions and
//! the server records them as such. [`AckTracker`] keeps, per proxy, what it has ACKed:
//! the basis for "is my policy in effect everywhere?".
//!
//! State-of-the-world ADS is refused with UNIMPLEMENTED: Trellis's proxies speak delta only.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use trellis_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};

use crate::config::snapshot::{Held, Snapshot};

/// Resource types one stream may subscribe to (Trellis's proxies use two or three).
pub const MAX_TYPES_PER_STREAM: usize = 16;
/// Names one stream may subscribe to, or announce as held, per type (well above a large
/// cluster's workloads and services): the per-stream state stays bounded.
pub const MAX_NAMES_PER_TYPE: usize = 200_000;

/// The node a proxy says it runs on: `NODE_NAME` in its metadata (Istio's ztunnel sends it),
/// else the second part of an id `ztunnel~<node>` / `node-agent~<node>` (Trellis's).
fn claimed_node(node: &trellis_proto::envoy::config::core::v3::Node) -> Option<String> {
    let from_metadata = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("NODE_NAME"))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        });
    from_metadata.or_else(|| {
        let mut parts = node.id.split('~');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("ztunnel" | "node-agent"), Some(n), None) if !n.is_empty() => Some(n.to_string()),
            _ => None,
        }
    })
}

/// Resource name → version.
pub type Versions = BTreeMap<String, String>;

/// What each connected proxy has ACKed, per type URL.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Proxy id → type URL → what it holds.
    proxies: Mutex<BTreeMap<String, BTreeMap<String, Known>>>,
}

impl AckTracker {
    fn record(&self, proxy: &str, type_url: &str, known: &Known) {
        let mut p = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        p.entry(proxy.to_string())
            .or_default()
            .insert(type_url.to_string(), known.clone());
    }

    fn forget(&self, proxy: &str) {
        let mut p = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        p.remove(proxy);
    }

    /// The versions `proxy` has ACKed for `type_url`.
    pub fn acked(&self, proxy: &str, type_url: &str) -> Option<Versions> {
        let p = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        p.get(proxy)
            .and_then(|t| t.get(type_url))
            .map(|k| k.to_map(type_url))
    }

    /// The connected proxies.
    pub fn proxies(&self) -> Vec<String> {
        let p = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        p.keys().cloned().collect()
    }

    /// The connected proxies that have not ACKed `version` of `name` (type `type_url`).
    pub fn lagging(&self, type_url: &str, name: &str, version: &str) -> Vec<String> {
        let p = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        p.iter()
            .filter(|(_, types)| {
                types
                    .get(type_url)
                    .is_some_and(|known| known.version_of(type_url, name) != Some(version))
            })
            .map(|(proxy, _)| proxy.clone())
            .collect()
    }
}

/// What a proxy holds of one type. A wildcard subscriber that ACKed a snapshot holds
/// exactly that snapshot's resources: it is represented by the (shared) snapshot, so 50
/// proxies in sync cost one snapshot, not 50 copies of every name and version.
#[derive(Debug, Clone)]
enum Known {
    /// Explicit versions: announced on resume, or for subscriptions by name.
    Map(Versions),
    /// Exactly this snapshot's resources of the type.
    At(Arc<Snapshot>),
}

impl Default for Known {
    fn default() -> Self {
        Known::Map(Versions::new())
    }
}

impl Known {
    fn version_of(&self, type_url: &str, name: &str) -> Option<&str> {
        match self {
            Known::Map(m) => m.get(name).map(String::as_str),
            Known::At(snap) => snap
                .of_type(type_url)
                .and_then(|m| m.get(name))
                .map(|r| r.version.as_str()),
        }
    }

    fn to_map(&self, type_url: &str) -> Versions {
        match self {
            Known::Map(m) => m.clone(),
            Known::At(snap) => snap
                .of_type(type_url)
                .map(|m| {
                    m.iter()
                        .map(|(n, r)| (n.clone(), r.version.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The explicit map, made from the snapshot if need be.
    fn make_map(&mut self, type_url: &str) -> &mut Versions {
        if let Known::At(_) = self {
            *self = Known::Map(self.to_map(type_url));
        }
        match self {
            Known::Map(m) => m,
            Known::At(_) => unreachable!("just replaced"),
        }
    }

    fn held<'a>(&'a self, type_url: &'a str) -> KnownOf<'a> {
        KnownOf {
            known: self,
            type_url,
        }
    }
}

struct KnownOf<'a> {
    known: &'a Known,
    type_url: &'a str,
}

impl Held for KnownOf<'_> {
    fn version_of(&self, name: &str) -> Option<&str> {
        self.known.version_of(self.type_url, name)
    }

    fn each_name(&self, f: &mut dyn FnMut(&str)) {
        match self.known {
            Known::Map(m) => m.each_name(f),
            Known::At(snap) => {
                if let Some(m) = snap.of_type(self.type_url) {
                    for n in m.keys() {
                        f(n);
                    }
                }
            }
        }
    }
}

/// Publishes snapshots to the xDS server: numbers them and computes what changed since the
/// previous one, once, for all streams.
#[derive(Debug)]
pub struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Publisher {
    /// A publisher starting with `initial`, and the receiver the server reads.
    pub fn new(initial: Snapshot) -> (Publisher, watch::Receiver<Arc<Snapshot>>) {
        let (tx, rx) = watch::channel(Arc::new(initial));
        (Publisher { tx }, rx)
    }

    /// The snapshot served now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Makes `next` the snapshot every stream serves.
    pub fn publish(&self, mut next: Snapshot) {
        let prev = self.tx.borrow().clone();
        next.follow(&prev);
        self.tx.send_replace(Arc::new(next));
    }
}

/// The xDS service, serving the latest snapshot a [`Publisher`] published.
#[derive(Debug, Clone)]
pub struct XdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    acks: Arc<AckTracker>,
    closing: Option<watch::Receiver<bool>>,
}

/// Most resources in one response. A larger delta (a first sync, a catch-up) goes out in
/// several responses, one after the other's ACK, the last one marked complete. Why: the
/// gRPC encoder keeps, per stream, a buffer the size of the largest message it sent; one
/// 4 MB first response per proxy would stay resident for the stream's life.
pub const MAX_RESOURCES_PER_RESPONSE: usize = 1000;

impl XdsServer {
    /// A server publishing what `snapshots` holds.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, acks: Arc<AckTracker>) -> XdsServer {
        XdsServer {
            snapshots,
            acks,
            closing: None,
        }
    }

    /// Ends every stream once `closing` turns true (or its sender is dropped), so that a
    /// graceful shutdown is not held up by proxies' long-lived streams; they reconnect.
    pub fn with_shutdown(mut self, closing: watch::Receiver<bool>) -> XdsServer {
        self.closing = Some(closing);
        self
    }
}

type ResponseStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "Trellis serves incremental xDS only: use DeltaAggregatedResources",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        // Bounded: a proxy that stops reading stalls only its own stream.
        let (tx, rx) = mpsc::channel(16);
        let caller = request
            .extensions()
            .get::<crate::ca::auth::Caller>()
            .cloned();
        let stream = Stream {
            inbound: request.into_inner(),
            tx,
            snapshots: self.snapshots.clone(),
            acks: self.acks.clone(),
            proxy: String::new(),
            caller,
            closing: self.closing.clone(),
            types: BTreeMap::new(),
            next_nonce: 0,
        };
        tokio::spawn(stream.run());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What one response changes in what the proxy has.
#[derive(Debug, Default)]
struct Patch {
    updated: Vec<(String, String)>,
    removed: Vec<String>,
}

impl Patch {
    fn apply(&self, versions: &mut BTreeMap<String, String>) {
        for name in &self.removed {
            versions.remove(name);
        }
        for (name, version) in &self.updated {
            versions.insert(name.clone(), version.clone());
        }
    }
}

#[derive(Debug)]
struct Pending {
    nonce: String,
    /// What the response changes; `None` when it completes a wildcard subscriber's sync
    /// (the proxy then holds the snapshot).
    patch: Option<Patch>,
    /// Whether the proxy is in sync with `snapshot` once it ACKs (the last response of a
    /// delta sent in parts).
    complete: bool,
    /// The snapshot the proxy will be in sync with once it ACKs.
    snapshot: Arc<Snapshot>,
}

#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the proxy has, as far as it has told us (ACKs, initial versions).
    known: Known,
    /// The snapshot `known` matches (for this subscription), when it does: then the next
    /// snapshot's change set is all there is to send.
    synced_generation: Option<u64>,
    /// The response in flight.
    pending: Option<Pending>,
    /// Whether any response was sent (the first one is sent even when empty: it tells the
    /// proxy it is in sync).
    answered: bool,
    /// The snapshot generation whose response the proxy rejected: nothing is resent until
    /// the configuration (or the subscription) changes — a proxy that rejects a response
    /// deterministically would otherwise get it again at once, in a hot loop.
    nacked: Option<u64>,
    /// For a waypoint's `Address` stream: the names it may read, as of the last push (a
    /// change recomputes the response in full, so what left the view is removed).
    view: Option<Arc<BTreeSet<String>>>,
}

struct Stream {
    inbound: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    acks: Arc<AckTracker>,
    proxy: String,
    /// Who authenticated the stream (set by the server's authentication layer).
    caller: Option<crate::ca::auth::Caller>,
    closing: Option<watch::Receiver<bool>>,
    types: BTreeMap<String, TypeState>,
    next_nonce: u64,
}

async fn closed(closing: &mut Option<watch::Receiver<bool>>) {
    match closing {
        Some(rx) => {
            let _ = rx.wait_for(|c| *c).await;
        }
        None => std::future::pending().await,
    }
}

impl Stream {
    async fn run(mut self) {
        loop {
            tokio::select! {
                msg = self.inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if self.on_request(req).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(proxy = %self.proxy, error = %e, "xDS stream ended");
                        break;
                    }
                },
                changed = self.snapshots.changed() => {
                    if changed.is_err() || self.push_all().await.is_err() {
                        break;
                    }
                }
                () = closed(&mut self.closing) => {
                    tracing::debug!(proxy = %self.proxy, "closing the xDS stream: shutting down");
                    break;
                }
            }
        }
        if !self.proxy.is_empty() {
            self.acks.forget(&self.proxy);
        }
    }

    /// Ends the stream with `status` (sent to the proxy, logged).
    async fn refuse(&self, status: Status) -> Result<(), ()> {
        tracing::warn!(proxy = %self.proxy, caller = ?self.caller.as_ref().map(ToString::to_string), reason = %status.message(), "xDS stream refused");
        let _ = self.tx.send(Err(status)).await;
        Err(())
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), ()> {
        if self.proxy.is_empty()
            && let Some(node) = &req.node
        {
            // A node's ztunnel (or node agent) speaks for its own node only.
            if let (Some(crate::ca::auth::Caller::Node(authenticated)), Some(claimed)) =
                (&self.caller, claimed_node(node))
                && claimed != *authenticated
            {
                return self
                    .refuse(Status::permission_denied(format!(
                        "the proxy claims node {claimed:?} but authenticated as the ztunnel of node {authenticated:?}"
                    )))
                    .await;
            }
            // The id a proxy gives itself, qualified by who authenticated: a caller cannot
            // stand in for (and, leaving, erase) another proxy's ACK record.
            self.proxy = match &self.caller {
                Some(c) => format!("{} [{c}]", node.id),
                None => node.id.clone(),
            };
        }
        if let Err(why) = self.allowed(&req.type_url) {
            return self.refuse(Status::permission_denied(why)).await;
        }
        let type_url = req.type_url.clone();
        let first = !self.types.contains_key(&type_url);
        if first && self.types.len() >= MAX_TYPES_PER_STREAM {
            return self
                .refuse(Status::resource_exhausted(format!(
                    "at most {MAX_TYPES_PER_STREAM} resource types per stream"
                )))
                .await;
        }
        let subscribed = self.types.get(&type_url).map_or(0, |t| t.names.len());
        if subscribed + req.resource_names_subscribe.len() > MAX_NAMES_PER_TYPE
            || req.initial_resource_versions.len() > MAX_NAMES_PER_TYPE
        {
            return self
                .refuse(Status::resource_exhausted(format!(
                    "at most {MAX_NAMES_PER_TYPE} resource names per type and stream"
                )))
                .await;
        }
        let state = self.types.entry(type_url.clone()).or_default();
        if !req.response_nonce.is_empty() {
            match state.pending.take() {
                Some(p) if p.nonce == req.response_nonce => {
                    if let Some(err) = &req.error_detail {
                        // Logged once per configuration version: it is not resent.
                        tracing::warn!(
                            proxy = %self.proxy, type_url = %type_url, nonce = %p.nonce,
                            generation = p.snapshot.generation,
                            code = err.code, error = %err.message,
                            "proxy rejected (NACK) the update; it keeps its previous config; not resent until the configuration changes"
                        );
                        state.synced_generation = None;
                        state.nacked = Some(p.snapshot.generation);
                    } else {
                        match &p.patch {
                            // By name: the response changed exactly these.
                            Some(patch) => patch.apply(state.known.make_map(&type_url)),
                            // Wildcard: the proxy now holds the snapshot.
                            None => state.known = Known::At(p.snapshot.clone()),
                        }
                        self.acks.record(&self.proxy, &type_url, &state.known);
                        // After a part, the next push computes what is still missing.
                        state.synced_generation = p.complete.then_some(p.snapshot.generation);
                    }
                }
                // An answer to an older response: ours is still in flight.
                other => state.pending = other,
            }
        }
        if first {
            // Resume: the proxy tells what it already has.
            state.known = Known::Map(req.initial_resource_versions.into_iter().collect());
            state.wildcard = req.resource_names_subscribe.is_empty()
                || req.resource_names_subscribe.iter().any(|n| n == "*");
        }
        if !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty() {
            // The subscription changed: the next response is computed in full.
            state.synced_generation = None;
            state.nacked = None;
        }
        for name in req.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else {
                state.names.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.names.remove(&name);
                // The proxy drops it itself.
                state.known.make_map(&type_url).remove(&name);
            }
        }
        self.push(&type_url).await
    }

    /// Whether the caller may read `type_url` now. A node's ztunnel (and node agent) reads
    /// the mesh; a caller authenticated by another ServiceAccount is a waypoint only while
    /// a waypoint Gateway of that name exists in its namespace (else it reads nothing: any
    /// pod's token would otherwise read the whole mesh), and never reads ztunnel's L4
    /// `Authorization` (waypoints enforce their own L7 resources).
    fn allowed(&self, type_url: &str) -> Result<(), String> {
        let Some(crate::ca::auth::Caller::Waypoint(id)) = &self.caller else {
            return Ok(());
        };
        let key = (id.namespace().to_string(), id.service_account().to_string());
        if !self.snapshots.borrow().waypoints.contains(&key) {
            return Err(format!(
                "{id} is not the identity of a waypoint (no istio-waypoint Gateway {}/{}): it may not read the mesh's configuration",
                key.0, key.1
            ));
        }
        if type_url == trellis_proto::type_url::AUTHORIZATION {
            return Err(format!(
                "{id}: waypoints do not read ztunnel's L4 authorization"
            ));
        }
        Ok(())
    }

    async fn push_all(&mut self) -> Result<(), ()> {
        // A waypoint whose Gateway went away stops reading.
        if let Some(t) = self.types.keys().next().cloned()
            && let Err(why) = self.allowed(&t)
        {
            return self.refuse(Status::permission_denied(why)).await;
        }
        let types: Vec<String> = self.types.keys().cloned().collect();
        for t in types {
            self.push(&t).await?;
        }
        Ok(())
    }

    /// Sends what the proxy lacks for `type_url`, unless a response is in flight.
    async fn push(&mut self, type_url: &str) -> Result<(), ()> {
        let snap = self.snapshots.borrow().clone();
        // A waypoint reads only the Services it fronts and the workloads behind them.
        let view = match &self.caller {
            Some(crate::ca::auth::Caller::Waypoint(id))
                if type_url == trellis_proto::type_url::ADDRESS
                    || type_url == trellis_proto::type_url::WAYPOINT_ROUTE
                    || type_url == trellis_proto::type_url::WAYPOINT_L7_POLICY
                    || type_url == trellis_proto::type_url::WAYPOINT_REQUEST_AUTHENTICATION =>
            {
                let key = (id.namespace().to_string(), id.service_account().to_string());
                Some(snap.waypoint_views.get(&key).cloned().unwrap_or_default())
            }
            _ => None,
        };
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        if state.pending.is_some() {
            return Ok(());
        }
        if let Some(v) = &view
            && state.view.as_deref() != Some(v.as_ref())
        {
            state.synced_generation = None;
            state.view = Some(v.clone());
        }
        if state.synced_generation == Some(snap.generation) {
            return Ok(());
        }
        if state.nacked == Some(snap.generation) {
            return Ok(());
        }
        let (wildcard, names) = (state.wildcard, &state.names);
        let wanted = |n: &str| {
            (wildcard || names.contains(n)) && view.as_ref().is_none_or(|v| v.contains(n))
        };
        let empty = BTreeMap::new();
        let current = snap.of_type(type_url).unwrap_or(&empty);
        let delta = match (state.synced_generation, snap.changes.get(type_url)) {
            // In sync with the previous snapshot: its change set is the whole delta.
            (Some(g), Some(changes)) if g + 1 == snap.generation => {
                crate::config::snapshot::Delta {
                    updated: changes
                        .updated
                        .iter()
                        .filter(|n| wanted(n))
                        .filter_map(|n| current.get(n).map(|r| (n.clone(), r.clone())))
                        .collect(),
                    removed: changes
                        .removed
                        .iter()
                        .filter(|n| state.known.version_of(type_url, n).is_some())
                        .cloned()
                        .collect(),
                }
            }
            _ => snap.delta_from(type_url, &state.known.held(type_url), wanted),
        };
        if state.answered && delta.updated.is_empty() && delta.removed.is_empty() {
            // Nothing for this proxy in this snapshot: what it has matches it.
            state.synced_generation = Some(snap.generation);
            return Ok(());
        }
        let mut delta = delta;
        let complete = delta.updated.len() <= MAX_RESOURCES_PER_RESPONSE;
        delta.updated.truncate(MAX_RESOURCES_PER_RESPONSE);
        // A filtered stream never holds "the snapshot": what it has is tracked by name.
        let mut patch = (!wildcard || !complete || view.is_some()).then(|| Patch {
            updated: Vec::with_capacity(delta.updated.len()),
            removed: delta.removed.clone(),
        });
        let resources = delta
            .updated
            .into_iter()
            .map(|(name, r)| {
                if let Some(p) = &mut patch {
                    p.updated.push((name.clone(), r.version.clone()));
                }
                Resource {
                    name,
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                }
            })
            .collect();
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        state.pending = Some(Pending {
            nonce: nonce.clone(),
            patch,
            snapshot: snap.clone(),
            complete,
        });
        state.answered = true;
        let resp = DeltaDiscoveryResponse {
            type_url: type_url.to_string(),
            resources,
            removed_resources: delta.removed,
            nonce,
            system_version_info: if complete {
                snap.generation.to_string()
            } else {
                trellis_proto::delta::MORE_FOLLOWS.to_string()
            },
            ..Default::default()
        };
        self.tx.send(Ok(resp)).await.map_err(|_| ())
    }
}
