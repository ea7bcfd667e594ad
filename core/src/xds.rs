//! The delta xDS client of ztunnel and waypoint, and the typed store it fills.
//!
//! One stream to the control plane carries every subscribed type. Each response is checked
//! whole before anything is applied: a resource that does not decode, or of a type we did
//! not ask for, NACKs the response (logged, the store unchanged), never crashes. While the
//! control plane is away the store keeps serving its last good content; the client
//! reconnects with exponential backoff and resumes with the versions it holds, so only
//! changes are sent again. `synced` turns true once every subscribed type has had its
//! first response, and stays true across reconnects.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prost::{Message, Name};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use trellis_proto::envoy::config::core::v3::Node;
use trellis_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use trellis_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use trellis_proto::google::rpc::Status as RpcStatus;
use trellis_proto::istio::security::{Authorization, Scope};
use trellis_proto::istio::workload::{Address, Service, Workload, address};
use trellis_proto::trellis::waypoint::v1::{
    L7Policy, RequestAuthentication as WaypointAuthn, Route as WaypointRoute,
};

/// What the data plane knows: workloads, services and L4 policies.
#[derive(Debug, Default, Clone)]
pub struct Store {
    workloads: HashMap<String, Workload>,
    workload_by_ip: HashMap<IpAddr, String>,
    services: HashMap<String, Service>,
    service_by_vip: HashMap<IpAddr, String>,
    /// Service key (`namespace/hostname`) → names of the workloads backing it.
    endpoints: HashMap<String, std::collections::BTreeSet<String>>,
    policies: BTreeMap<String, Authorization>,
    /// Waypoint routes, by name (`namespace/hostname:port`).
    routes: BTreeMap<String, WaypointRoute>,
    /// Waypoint authorization policies, by resource name.
    l7_policies: BTreeMap<String, L7Policy>,
    /// Waypoint end-user authentication (JWT) rules, by resource name.
    authentications: BTreeMap<String, WaypointAuthn>,
    /// Type URL → resource name → version: what we hold, sent on resume.
    versions: BTreeMap<String, BTreeMap<String, String>>,
}

impl Store {
    /// The workload with this uid.
    pub fn workload(&self, uid: &str) -> Option<&Workload> {
        self.workloads.get(uid)
    }

    /// Every workload.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values()
    }

    /// The workloads backing service `key` (`namespace/hostname`), in name order, from an
    /// index (no scan of every workload per connection).
    pub fn endpoints(&self, key: &str) -> impl Iterator<Item = &Workload> {
        self.endpoints
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|n| self.workloads.get(n))
    }

    /// The workload that owns `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.workload_by_ip
            .get(&ip)
            .and_then(|u| self.workloads.get(u))
    }

    /// The service named `namespace/hostname`.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    /// The service whose VIP is `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.service_by_vip
            .get(&ip)
            .and_then(|n| self.services.get(n))
    }

    /// The names (`namespace/name`) of the policies held.
    pub fn policy_names(&self) -> Vec<String> {
        self.policies.keys().cloned().collect()
    }

    /// The policy named `namespace/name`.
    pub fn policy(&self, name: &str) -> Option<&Authorization> {
        self.policies.get(name)
    }

    /// The policies that apply to `w`: global, its namespace's, and the workload-selector
    /// policies the control plane attached to it.
    pub fn policies_for(&self, w: &Workload) -> Vec<&Authorization> {
        self.policies
            .iter()
            .filter(|(name, p)| match Scope::try_from(p.scope) {
                Ok(Scope::Global) => true,
                Ok(Scope::Namespace) => p.namespace == w.namespace,
                Ok(Scope::WorkloadSelector) => w.authorization_policies.contains(name),
                Err(_) => false,
            })
            .map(|(_, p)| p)
            .collect()
    }

    /// Counts: (workloads, services, policies).
    pub fn len(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.services.len(),
            self.policies.len(),
        )
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0, 0)
    }

    /// A store holding `addresses`, each under its resource name (for tests of the
    /// decisions made from a store).
    #[cfg(feature = "testing")]
    pub fn from_addresses(addresses: Vec<(String, Address)>) -> Store {
        let resources = addresses
            .into_iter()
            .map(
                |(name, a)| trellis_proto::envoy::service::discovery::v3::Resource {
                    name,
                    version: "1".into(),
                    resource: prost_types::Any::from_msg(&a).ok(),
                    ..Default::default()
                },
            )
            .collect();
        let mut store = Store::default();
        let resp = DeltaDiscoveryResponse {
            type_url: Address::type_url(),
            resources,
            ..Default::default()
        };
        if let Err(e) = store.apply(&resp) {
            panic!("test addresses do not apply: {e}");
        }
        store
    }

    /// Checks a whole response, then applies it; on error nothing is applied and the
    /// reason is what the NACK says.
    pub fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<(), String> {
        enum Decoded {
            Address(Box<Address>),
            Policy(Authorization),
            Route(Box<WaypointRoute>),
            L7(Box<L7Policy>),
            Authn(Box<WaypointAuthn>),
        }
        let mut decoded = Vec::with_capacity(resp.resources.len());
        for r in &resp.resources {
            let any = r
                .resource
                .as_ref()
                .ok_or_else(|| format!("resource {:?} has no body", r.name))?;
            if any.type_url != resp.type_url {
                return Err(format!(
                    "resource {:?} is a {} in a {} response",
                    r.name, any.type_url, resp.type_url
                ));
            }
            let d = if resp.type_url == Address::type_url() {
                Decoded::Address(Box::new(
                    Address::decode(any.value.as_slice())
                        .map_err(|e| format!("resource {:?} does not decode: {e}", r.name))?,
                ))
            } else if resp.type_url == Authorization::type_url() {
                Decoded::Policy(
                    Authorization::decode(any.value.as_slice())
                        .map_err(|e| format!("resource {:?} does not decode: {e}", r.name))?,
                )
            } else if resp.type_url == WaypointRoute::type_url() {
                let route = WaypointRoute::decode(any.value.as_slice())
                    .map_err(|e| format!("resource {:?} does not decode: {e}", r.name))?;
                check_route(&route).map_err(|e| format!("route {:?}: {e}", r.name))?;
                Decoded::Route(Box::new(route))
            } else if resp.type_url == L7Policy::type_url() {
                let policy = L7Policy::decode(any.value.as_slice())
                    .map_err(|e| format!("resource {:?} does not decode: {e}", r.name))?;
                check_l7_policy(&policy).map_err(|e| format!("policy {:?}: {e}", r.name))?;
                Decoded::L7(Box::new(policy))
            } else if resp.type_url == WaypointAuthn::type_url() {
                let ra = WaypointAuthn::decode(any.value.as_slice())
                    .map_err(|e| format!("resource {:?} does not decode: {e}", r.name))?;
                let target = ra
                    .target
                    .as_ref()
                    .ok_or_else(|| format!("{:?}: no target", r.name))?;
                check_target(target).map_err(|e| format!("{:?}: {e}", r.name))?;
                Decoded::Authn(Box::new(ra))
            } else {
                return Err(format!("type {} was not subscribed", resp.type_url));
            };
            decoded.push((r.name.clone(), r.version.clone(), d));
        }
        for name in &resp.removed_resources {
            self.remove(&resp.type_url, name);
        }
        for (name, version, d) in decoded {
            self.remove(&resp.type_url, &name);
            match d {
                Decoded::Address(a) => match a.r#type {
                    Some(address::Type::Workload(w)) => {
                        for ip in w.addresses.iter().filter_map(|b| ip_of(b)) {
                            self.workload_by_ip.insert(ip, name.clone());
                        }
                        for svc in w.services.keys() {
                            self.endpoints
                                .entry(svc.clone())
                                .or_default()
                                .insert(name.clone());
                        }
                        self.workloads.insert(name.clone(), w);
                    }
                    Some(address::Type::Service(s)) => {
                        for ip in s.addresses.iter().filter_map(|a| ip_of(&a.address)) {
                            self.service_by_vip.insert(ip, name.clone());
                        }
                        self.services.insert(name.clone(), s);
                    }
                    None => {}
                },
                Decoded::Policy(p) => {
                    self.policies.insert(name.clone(), p);
                }
                Decoded::Route(r) => {
                    self.routes.insert(name.clone(), *r);
                }
                Decoded::L7(p) => {
                    self.l7_policies.insert(name.clone(), *p);
                }
                Decoded::Authn(a) => {
                    self.authentications.insert(name.clone(), *a);
                }
            }
            self.versions
                .entry(resp.type_url.clone())
                .or_default()
                .insert(name, version);
        }
        Ok(())
    }

    fn remove(&mut self, type_url: &str, name: &str) {
        if let Some(v) = self.versions.get_mut(type_url) {
            v.remove(name);
        }
        // Only a resource of the same type: names of different types may be equal.
        if type_url != Address::type_url() {
            self.remove_other(type_url, name);
            return;
        }
        if let Some(w) = self.workloads.remove(name) {
            for ip in w.addresses.iter().filter_map(|b| ip_of(b)) {
                if self.workload_by_ip.get(&ip).is_some_and(|n| n == name) {
                    self.workload_by_ip.remove(&ip);
                }
            }
            for svc in w.services.keys() {
                if let Some(set) = self.endpoints.get_mut(svc) {
                    set.remove(name);
                    if set.is_empty() {
                        self.endpoints.remove(svc);
                    }
                }
            }
        }
        if let Some(s) = self.services.remove(name) {
            for ip in s.addresses.iter().filter_map(|a| ip_of(&a.address)) {
                if self.service_by_vip.get(&ip).is_some_and(|n| n == name) {
                    self.service_by_vip.remove(&ip);
                }
            }
        }
    }

    /// [`Store::remove`] of a resource that is not an `Address`.
    fn remove_other(&mut self, type_url: &str, name: &str) {
        if type_url == Authorization::type_url() {
            self.policies.remove(name);
        }
        if type_url == WaypointRoute::type_url() {
            self.routes.remove(name);
        }
        if type_url == L7Policy::type_url() {
            self.l7_policies.remove(name);
        }
        if type_url == WaypointAuthn::type_url() {
            self.authentications.remove(name);
        }
    }

    /// Every waypoint end-user authentication rule set, by resource name.
    pub fn authentications(&self) -> impl Iterator<Item = (&String, &WaypointAuthn)> {
        self.authentications.iter()
    }

    /// Every waypoint authorization policy, by resource name.
    pub fn l7_policies(&self) -> impl Iterator<Item = (&String, &L7Policy)> {
        self.l7_policies.iter()
    }

    /// The waypoint route of a service port (`namespace/hostname:port`).
    pub fn route(&self, name: &str) -> Option<&WaypointRoute> {
        self.routes.get(name)
    }

    /// Every waypoint route, by name.
    pub fn routes(&self) -> impl Iterator<Item = (&String, &WaypointRoute)> {
        self.routes.iter()
    }
}

/// What a waypoint policy must be to be applied: a known action and a known target scope
/// (services named when the scope says so). Anything else is NACKed, never read as
/// something wider or narrower.
fn check_l7_policy(p: &L7Policy) -> Result<(), String> {
    use trellis_proto::trellis::waypoint::v1::l7_policy::Action;
    Action::try_from(p.action).map_err(|_| format!("unknown action {}", p.action))?;
    check_target(p.target.as_ref().ok_or("no target")?)
}

/// A known target scope, with services when the scope says so.
fn check_target(target: &trellis_proto::trellis::waypoint::v1::PolicyTarget) -> Result<(), String> {
    use trellis_proto::trellis::waypoint::v1::policy_target::Scope;
    match Scope::try_from(target.scope) {
        Ok(Scope::Waypoint) => Ok(()),
        Ok(Scope::Services) if !target.services.is_empty() => Ok(()),
        Ok(Scope::Services) => Err("scope SERVICES without services".into()),
        _ => Err(format!("unknown target scope {}", target.scope)),
    }
}

/// What a waypoint route must be to be applied: a known protocol and a service. Anything
/// else is NACKed (never read as something wider).
fn check_route(r: &WaypointRoute) -> Result<(), String> {
    use trellis_proto::trellis::waypoint::v1::route::AppProtocol;
    AppProtocol::try_from(r.protocol).map_err(|_| format!("unknown protocol {}", r.protocol))?;
    if r.service.is_none() {
        return Err("no service".into());
    }
    Ok(())
}

/// The last segment of a type URL (`istio.workload.Address`), for metric labels.
fn short_type(type_url: &str) -> String {
    type_url.rsplit('/').next().unwrap_or(type_url).to_string()
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// Settings of the xDS client.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// This proxy's id (Istio: `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    pub node_id: String,
    /// Type URLs to subscribe to (wildcard).
    pub types: Vec<String>,
    /// First reconnect delay; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// Bearer credential presented on every stream (the node's or waypoint's, as for the
    /// CA); `None` for a control plane that does not authenticate its clients.
    pub credential: Option<crate::credential::Credential>,
}

/// A running client: the store it fills and whether it is synced.
#[derive(Debug, Clone)]
pub struct XdsClient {
    store: Arc<RwLock<Store>>,
    synced: watch::Receiver<bool>,
    generation: watch::Receiver<u64>,
}

impl XdsClient {
    /// Starts the client on `channel` (reconnecting on its own) and returns its handle.
    pub fn start(channel: Channel, config: XdsConfig) -> XdsClient {
        let store = Arc::new(RwLock::new(Store::default()));
        let (synced_tx, synced) = watch::channel(false);
        let (generation_tx, generation) = watch::channel(0);
        let notify = Notify {
            synced: synced_tx,
            generation: generation_tx,
        };
        tokio::spawn(run(channel, config, store.clone(), notify));
        XdsClient {
            store,
            synced,
            generation,
        }
    }

    /// Counts applied responses: it changes each time the store does, so users (listeners,
    /// the admin dump, benchmarks) can wait for a change instead of polling.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.clone()
    }

    /// A read view of the store (never held across an await).
    pub fn store(&self) -> std::sync::RwLockReadGuard<'_, Store> {
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether every subscribed type has had its first response.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until synced.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

struct Notify {
    synced: watch::Sender<bool>,
    generation: watch::Sender<u64>,
}

async fn run(channel: Channel, config: XdsConfig, store: Arc<RwLock<Store>>, notify: Notify) {
    let mut backoff = config.initial_backoff;
    loop {
        match stream_once(&channel, &config, &store, &notify).await {
            Ok(()) => tracing::info!("xDS stream closed by the control plane; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, "xDS stream failed; serving the last good config and reconnecting")
            }
        }
        if notify.synced.is_closed() {
            return; // nobody listens any more
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

async fn stream_once(
    channel: &Channel,
    config: &XdsConfig,
    store: &Arc<RwLock<Store>>,
    notify: &Notify,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    for type_url in &config.types {
        // Resume: tell the server what we hold so only changes come back.
        let initial = store
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .versions
            .get(type_url)
            .cloned()
            .unwrap_or_default();
        let req = DeltaDiscoveryRequest {
            node: Some(Node {
                id: config.node_id.clone(),
                ..Default::default()
            }),
            type_url: type_url.clone(),
            initial_resource_versions: initial.into_iter().collect(),
            ..Default::default()
        };
        tx.send(req)
            .await
            .map_err(|_| tonic::Status::internal("request queue closed"))?;
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel.clone());
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(credential) = &config.credential {
        // Read for each stream: a rotated token is used from the next reconnect on.
        let value = credential
            .header()
            .map_err(tonic::Status::invalid_argument)?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut inbound = client
        .delta_aggregated_resources(request)
        .await
        .inspect_err(|_| metrics::gauge!("trellis_xds_connected").set(0.0))?
        .into_inner();
    metrics::gauge!("trellis_xds_connected").set(1.0);
    // Whichever way the stream ends, it is no longer connected.
    struct Disconnected;
    impl Drop for Disconnected {
        fn drop(&mut self) {
            metrics::gauge!("trellis_xds_connected").set(0.0);
        }
    }
    let _disconnected = Disconnected;
    let mut answered = std::collections::BTreeSet::new();
    while let Some(resp) = inbound.message().await? {
        let result = store
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(&resp);
        let error_detail = match result {
            Ok(()) => None,
            Err(reason) => {
                tracing::warn!(type_url = %resp.type_url, nonce = %resp.nonce, %reason, "rejecting (NACK) an xDS response; keeping the previous config");
                Some(RpcStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message: reason,
                    details: vec![],
                })
            }
        };
        let nacked = error_detail.is_some();
        metrics::counter!(
            "trellis_xds_responses_total",
            "type" => short_type(&resp.type_url),
            "result" => if nacked { "nack" } else { "ack" },
        )
        .increment(1);
        if !nacked {
            notify.generation.send_modify(|g| *g += 1);
            let (w, s, p) = store.read().unwrap_or_else(|e| e.into_inner()).len();
            metrics::gauge!("trellis_xds_resources", "kind" => "workload").set(w as f64);
            metrics::gauge!("trellis_xds_resources", "kind" => "service").set(s as f64);
            metrics::gauge!("trellis_xds_resources", "kind" => "authorization").set(p as f64);
        }
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail,
            ..Default::default()
        };
        tx.send(ack)
            .await
            .map_err(|_| tonic::Status::internal("request queue closed"))?;
        let part = resp.system_version_info == trellis_proto::delta::MORE_FOLLOWS;
        if !nacked && !part && config.types.contains(&resp.type_url) {
            answered.insert(resp.type_url.clone());
            if answered.len() == config.types.len() {
                notify.synced.send_replace(true);
                metrics::gauge!("trellis_xds_synced").set(1.0);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Any;
    use trellis_proto::envoy::service::discovery::v3::Resource;

    fn workload_resource(name: &str, ip: [u8; 4]) -> Resource {
        let a = Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: name.into(),
                name: "web".into(),
                namespace: "foo".into(),
                addresses: vec![ip.to_vec()],
                ..Default::default()
            })),
        };
        Resource {
            name: name.into(),
            version: "1".into(),
            resource: Some(Any::from_msg(&a).unwrap()),
            ..Default::default()
        }
    }

    fn response(resources: Vec<Resource>, removed: Vec<String>) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: Address::type_url(),
            resources,
            removed_resources: removed,
            nonce: "1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn workloads_are_found_by_uid_and_ip_and_removed_cleanly() {
        let mut s = Store::default();
        s.apply(&response(
            vec![workload_resource("w1", [10, 0, 0, 1])],
            vec![],
        ))
        .unwrap();
        let ip = IpAddr::from([10, 0, 0, 1]);
        assert_eq!(s.workload_by_ip(ip).unwrap().uid, "w1");
        // The workload moves to another IP: the old IP no longer resolves.
        s.apply(&response(
            vec![workload_resource("w1", [10, 0, 0, 2])],
            vec![],
        ))
        .unwrap();
        assert!(s.workload_by_ip(ip).is_none());
        assert!(s.workload_by_ip(IpAddr::from([10, 0, 0, 2])).is_some());
        s.apply(&response(vec![], vec!["w1".into()])).unwrap();
        assert!(s.is_empty());
    }

    #[test]
    fn a_removal_removes_only_the_resource_of_its_type() {
        let mut s = Store::default();
        s.apply(&response(
            vec![workload_resource("same", [10, 0, 0, 1])],
            vec![],
        ))
        .unwrap();
        // A policy removed under the name a workload has: the workload stays.
        let mut removal = response(vec![], vec!["same".into()]);
        removal.type_url = Authorization::type_url();
        s.apply(&removal).unwrap();
        assert!(s.workload("same").is_some());
        assert!(s.workload_by_ip(IpAddr::from([10, 0, 0, 1])).is_some());
    }

    #[test]
    fn bad_input_is_refused_whole_and_nothing_is_applied() {
        let mut s = Store::default();
        s.apply(&response(
            vec![workload_resource("w1", [10, 0, 0, 1])],
            vec![],
        ))
        .unwrap();
        let garbage = Resource {
            name: "bad".into(),
            resource: Some(Any {
                type_url: Address::type_url(),
                value: vec![0xff, 0xff, 0xff],
            }),
            ..Default::default()
        };
        // A good resource and a removal in the same response as garbage: none applied.
        let err = s
            .apply(&response(
                vec![workload_resource("w2", [10, 0, 0, 2]), garbage],
                vec!["w1".into()],
            ))
            .unwrap_err();
        assert!(err.contains("\"bad\" does not decode"), "{err}");
        assert_eq!(s.len(), (1, 0, 0));
        assert!(s.workload("w1").is_some());

        let mut wrong = response(vec![workload_resource("w3", [10, 0, 0, 3])], vec![]);
        wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        let err = s.apply(&wrong).unwrap_err();
        assert!(
            err.contains("in a type.googleapis.com/envoy.config.cluster.v3.Cluster response"),
            "{err}"
        );
        assert_eq!(s.len(), (1, 0, 0));
    }

    #[test]
    fn the_endpoint_index_follows_workload_changes() {
        let with_services = |name: &str, services: &[&str]| {
            let w = Workload {
                uid: name.into(),
                name: name.into(),
                namespace: "foo".into(),
                services: services
                    .iter()
                    .map(|s| ((*s).to_string(), Default::default()))
                    .collect(),
                ..Default::default()
            };
            (
                name.to_string(),
                Address {
                    r#type: Some(address::Type::Workload(w)),
                },
            )
        };
        let names = |s: &Store, key: &str| -> Vec<String> {
            s.endpoints(key).map(|w| w.name.clone()).collect()
        };
        let mut s = Store::from_addresses(vec![
            with_services("a", &["foo/web"]),
            with_services("b", &["foo/web", "foo/api"]),
        ]);
        assert_eq!(names(&s, "foo/web"), ["a", "b"]);
        assert_eq!(names(&s, "foo/api"), ["b"]);
        // b stops backing web; a is removed.
        let (name, addr) = with_services("b", &["foo/api"]);
        let resp = DeltaDiscoveryResponse {
            type_url: Address::type_url(),
            resources: vec![Resource {
                name,
                version: "2".into(),
                resource: Some(Any::from_msg(&addr).unwrap()),
                ..Default::default()
            }],
            removed_resources: vec!["a".into()],
            ..Default::default()
        };
        s.apply(&resp).unwrap();
        assert!(names(&s, "foo/web").is_empty());
        assert_eq!(names(&s, "foo/api"), ["b"]);
    }
}
