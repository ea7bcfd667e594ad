//! A snapshot: every resource the data plane receives, named and versioned, per type URL,
//! with the status of every policy. Two snapshots diff into what changed, which is what a
//! delta xDS stream sends.
//!
//! Names follow Istio's: a workload by its uid, a service by `namespace/hostname`, an
//! authorization by `namespace/name`. A resource's version is a digest of its encoding, so
//! an unchanged resource keeps its version across rebuilds and is never re-sent.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::{Message, Name};
use prost_types::Any;
use trellis_proto::istio::security::Authorization;
use trellis_proto::istio::workload::{Address, address};

use super::authz::{
    PolicyState, PolicyStatus, for_ztunnel, peer_authentication_status,
    request_authentication_status,
};
use super::load::ObjectRef;

/// How the reasons a waypoint adds to a policy's status begin.
const WAYPOINT_NOTE: &str = "waypoint: ";
use super::model::{MeshConfig, Model, STATIC_STRICT};

/// One resource as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// Version: a digest of the encoded resource.
    pub version: String,
    /// The resource.
    pub body: Any,
}

/// All resources of one build.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Builds since the first (0).
    pub generation: u64,
    /// Type URL → name → resource; shared between snapshots, so carrying unchanged
    /// resources into the next snapshot copies no bodies.
    pub resources: BTreeMap<String, BTreeMap<String, Arc<Resource>>>,
    /// Status of every policy (AuthorizationPolicy, PeerAuthentication,
    /// RequestAuthentication).
    pub statuses: BTreeMap<ObjectRef, PolicyStatus>,
    /// What changed since generation − 1, per type URL: computed once here, so the many
    /// streams that are in sync do not each compare every resource.
    pub changes: BTreeMap<String, ChangeSet>,
    /// The waypoint Gateways, (namespace, name): a waypoint runs as the ServiceAccount named
    /// after its Gateway, and only those identities may read xDS as waypoints.
    pub waypoints: std::collections::BTreeSet<(String, String)>,
    /// Per waypoint Gateway, the `Address` resource names it may read
    /// ([`Model::waypoint_views`]); computed only when there are waypoints.
    pub waypoint_views: BTreeMap<(String, String), Arc<std::collections::BTreeSet<String>>>,
}

/// Names updated and removed between two consecutive snapshots of one type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangeSet {
    /// Added or changed.
    pub updated: Vec<String>,
    /// Gone.
    pub removed: Vec<String>,
}

/// What changed for one type between two snapshots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// Resources added or changed.
    pub updated: Vec<(String, Arc<Resource>)>,
    /// Names removed.
    pub removed: Vec<String>,
}

impl Snapshot {
    /// Builds the snapshot of `model`.
    pub fn build(model: &Model, mesh: &MeshConfig) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.resources.insert(Address::type_url(), BTreeMap::new());
        snap.resources
            .insert(Authorization::type_url(), BTreeMap::new());
        for ns in model.namespaces_in_use() {
            snap.add_namespace(model, mesh, &ns);
        }
        snap.add_peer_authentication(model, mesh);
        snap.add_secure_default(model, mesh);
        snap.waypoints = waypoint_keys(model);
        snap.waypoint_views = waypoint_views(model, mesh, &snap.waypoints);
        snap.add_waypoint_routes(model, mesh);
        snap.add_waypoint_policies(model, mesh);
        snap
    }

    /// The waypoint routes, recomputed whole (they cross namespaces: a route, its Service
    /// and its backends may each live elsewhere; a mesh without waypoints has none).
    fn add_waypoint_routes(&mut self, model: &Model, mesh: &MeshConfig) {
        let routes = if self.waypoints.is_empty() {
            BTreeMap::new()
        } else {
            super::routes::waypoint_routes(model, mesh)
                .into_iter()
                .map(|(name, r)| (name, resource(&r)))
                .collect()
        };
        self.resources
            .insert(trellis_proto::type_url::WAYPOINT_ROUTE.to_string(), routes);
    }

    /// The AuthorizationPolicies waypoints enforce, recomputed whole like the routes (a
    /// policy's targets and the Services it covers may live anywhere), each added to the
    /// view of its waypoint; the statuses say where each is enforced.
    fn add_waypoint_policies(&mut self, model: &Model, mesh: &MeshConfig) {
        let type_url = trellis_proto::type_url::WAYPOINT_L7_POLICY.to_string();
        // What an earlier pass said about waypoints goes first (idempotent over rebuilds
        // that keep other namespaces' statuses).
        let ra_type = trellis_proto::type_url::WAYPOINT_REQUEST_AUTHENTICATION.to_string();
        for (id, status) in self.statuses.iter_mut() {
            if id.kind == "AuthorizationPolicy" || id.kind == "RequestAuthentication" {
                status.reasons.retain(|r| !r.starts_with(WAYPOINT_NOTE));
            }
        }
        if self.waypoints.is_empty() {
            self.resources.insert(type_url, BTreeMap::new());
            self.resources.insert(ra_type, BTreeMap::new());
            return;
        }
        let wp = super::l7policy::waypoint_policies(model, mesh);
        let mut authentications = BTreeMap::new();
        for (name, (gw, ra)) in &wp.authentications {
            authentications.insert(name.clone(), resource(ra));
            if let Some(view) = self.waypoint_views.get_mut(gw) {
                Arc::make_mut(view).insert(name.clone());
            }
        }
        self.resources.insert(ra_type, authentications);
        for ((ns, name), notes) in &wp.authentication_notes {
            let id = ObjectRef {
                kind: "RequestAuthentication".into(),
                namespace: ns.clone(),
                name: name.clone(),
            };
            let Some(status) = self.statuses.get_mut(&id) else {
                continue;
            };
            if status.state == PolicyState::Rejected {
                continue;
            }
            let checked = notes
                .first()
                .is_some_and(|n| n.starts_with("tokens checked"));
            // A waypoint checks its tokens: the generic selector caveat no longer applies.
            if checked {
                status.reasons.retain(|r| !r.starts_with("spec.selector:"));
            }
            status
                .reasons
                .extend(notes.iter().map(|n| format!("{WAYPOINT_NOTE}{n}")));
            status.state = if (checked && notes.len() == 1 && status.reasons.len() == 1)
                || status.reasons.is_empty()
            {
                PolicyState::Accepted
            } else {
                PolicyState::AcceptedWithWarnings
            };
        }
        let mut resources = BTreeMap::new();
        for (name, (gw, policy)) in &wp.policies {
            resources.insert(name.clone(), resource(policy));
            if let Some(view) = self.waypoint_views.get_mut(gw) {
                Arc::make_mut(view).insert(name.clone());
            }
        }
        self.resources.insert(type_url, resources);
        // The external authorizers its CUSTOM policies call.
        for (gw, services) in &wp.extra_services {
            if let Some(view) = self.waypoint_views.get_mut(gw) {
                let view = Arc::make_mut(view);
                for (ns, name) in services {
                    view.extend(model.service_view(ns, name, mesh));
                }
            }
        }
        let id = |(ns, name): &(String, String)| ObjectRef {
            kind: "AuthorizationPolicy".into(),
            namespace: ns.clone(),
            name: name.clone(),
        };
        let targeted = |key: &(String, String)| {
            model
                .authorization_policies()
                .find(|(k, _)| *k == key)
                .is_some_and(|(_, p)| p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty())
        };
        for (key, errors) in &wp.rejected {
            if targeted(key) {
                self.statuses.insert(
                    id(key),
                    PolicyStatus {
                        state: PolicyState::Rejected,
                        reasons: errors.clone(),
                        waypoint: true,
                    },
                );
            }
        }
        for (key, notes) in &wp.notes {
            let notes: Vec<String> = notes
                .iter()
                .map(|n| format!("{WAYPOINT_NOTE}{n}"))
                .collect();
            if targeted(key) {
                // Only waypoints enforce it: the status is theirs.
                let enforced = notes
                    .first()
                    .is_some_and(|n| n.starts_with(&format!("{WAYPOINT_NOTE}enforced")));
                let state = if enforced && notes.len() == 1 {
                    PolicyState::Accepted
                } else {
                    PolicyState::AcceptedWithWarnings
                };
                self.statuses.insert(
                    id(key),
                    PolicyStatus {
                        state,
                        reasons: notes,
                        waypoint: true,
                    },
                );
            } else if let Some(status) = self.statuses.get_mut(&id(key)) {
                status.reasons.extend(notes);
            }
        }
    }

    /// Builds the snapshot of `model` from `prev`, re-translating only the namespaces in
    /// `dirty` (from [`Model::take_dirty`]); a change in the root namespace, whose policies
    /// reach every namespace, rebuilds everything.
    pub fn rebuild(
        prev: &Snapshot,
        model: &Model,
        mesh: &MeshConfig,
        dirty: &std::collections::BTreeSet<String>,
    ) -> Snapshot {
        if dirty.contains(&mesh.root_namespace) {
            return Snapshot::build(model, mesh);
        }
        let mut snap = Snapshot {
            generation: prev.generation,
            resources: prev.resources.clone(),
            statuses: prev.statuses.clone(),
            changes: BTreeMap::new(),
            waypoints: waypoint_keys(model),
            waypoint_views: BTreeMap::new(),
        };
        snap.waypoint_views = waypoint_views(model, mesh, &snap.waypoints);
        for map in snap.resources.values_mut() {
            map.retain(|name, _| !namespace_of(name).is_some_and(|ns| dirty.contains(ns)));
        }
        snap.statuses.retain(|id, _| !dirty.contains(&id.namespace));
        // PeerAuthentication policies depend on pods everywhere: recomputed whole (cheap).
        if let Some(authz) = snap.resources.get_mut(&Authorization::type_url()) {
            let strict = format!("/{STATIC_STRICT}");
            let secure = format!("/{}", super::l7policy::SECURE_DEFAULT);
            authz.retain(|name, _| {
                !name.contains("/converted_peer_authentication_")
                    && !name.ends_with(&strict)
                    && !name.ends_with(&secure)
            });
        }
        for ns in dirty {
            snap.add_namespace(model, mesh, ns);
        }
        snap.add_peer_authentication(model, mesh);
        snap.add_secure_default(model, mesh);
        snap.add_waypoint_routes(model, mesh);
        snap.add_waypoint_policies(model, mesh);
        snap
    }

    fn add_namespace(&mut self, model: &Model, mesh: &MeshConfig, ns: &str) {
        let addresses = self.resources.entry(Address::type_url()).or_default();
        for w in model.workloads_in(ns, mesh) {
            let name = w.uid.clone();
            let addr = Address {
                r#type: Some(address::Type::Workload(w)),
            };
            addresses.insert(name, resource(&addr));
        }
        for s in model.services_in(ns, mesh) {
            let name = format!("{}/{}", s.namespace, s.hostname);
            let addr = Address {
                r#type: Some(address::Type::Service(s)),
            };
            addresses.insert(name, resource(&addr));
        }
        let authorizations = self.resources.entry(Authorization::type_url()).or_default();
        for ((pns, name), policy) in model.authorization_policies_in(ns) {
            let t = for_ztunnel(policy, &mesh.root_namespace);
            if let Some(a) = &t.authorization {
                authorizations.insert(format!("{pns}/{name}"), resource(a));
            }
            let id = ObjectRef {
                kind: "AuthorizationPolicy".into(),
                namespace: pns.clone(),
                name: name.clone(),
            };
            self.statuses.insert(id, t.status);
        }
        for ((pns, name), pa) in model.peer_authentications_in(ns) {
            let id = ObjectRef {
                kind: "PeerAuthentication".into(),
                namespace: pns.clone(),
                name: name.clone(),
            };
            self.statuses.insert(id, peer_authentication_status(pa));
        }
        for ((pns, name), ra) in model.request_authentications_in(ns) {
            let id = ObjectRef {
                kind: "RequestAuthentication".into(),
                namespace: pns.clone(),
                name: name.clone(),
            };
            self.statuses.insert(id, request_authentication_status(ra));
        }
        for ((dns, name), dr) in model.destination_rules().filter(|((n, _), _)| n == ns) {
            let id = ObjectRef {
                kind: "DestinationRule".into(),
                namespace: dns.clone(),
                name: name.clone(),
            };
            let notes = super::destination::notes(dr);
            let state = if notes.is_empty() {
                PolicyState::Accepted
            } else {
                PolicyState::AcceptedWithWarnings
            };
            self.statuses.insert(
                id,
                PolicyStatus {
                    state,
                    reasons: notes,
                    waypoint: false,
                },
            );
        }
        for ((pns, name), p) in model.local_traffic_policies().filter(|((n, _), _)| n == ns) {
            let id = ObjectRef {
                kind: "LocalTrafficPolicy".into(),
                namespace: pns.clone(),
                name: name.clone(),
            };
            self.statuses
                .insert(id, super::local_traffic::status(model, pns, name, p));
        }
    }

    fn add_peer_authentication(&mut self, model: &Model, mesh: &MeshConfig) {
        let authorizations = self.resources.entry(Authorization::type_url()).or_default();
        for a in model.peer_authentication_policies(mesh) {
            authorizations.insert(format!("{}/{}", a.namespace, a.name), resource(&a));
        }
    }

    /// The mesh's secure default at ztunnel: each enrolled namespace takes connections from
    /// its own namespace and from waypoints (which enforce their own policies) unless an
    /// ALLOW policy allows more — an implicit ALLOW policy per namespace, recomputed whole.
    fn add_secure_default(&mut self, model: &Model, mesh: &MeshConfig) {
        if !mesh.secure_default {
            return;
        }
        use trellis_proto::istio::security::{
            self as sec, Clause, Match, StringMatch, string_match::MatchType,
        };
        let exact = |v: String| StringMatch {
            match_type: Some(MatchType::Exact(v)),
        };
        let waypoints: Vec<StringMatch> = model
            .gateways()
            .filter(|(_, g)| g.is_waypoint())
            .map(|((ns, name), _)| exact(format!("{}/ns/{ns}/sa/{name}", mesh.trust_domain)))
            .collect();
        let authorizations = self.resources.entry(Authorization::type_url()).or_default();
        for ns in model.enrolled_namespaces() {
            let mut matches = vec![Match {
                namespaces: vec![exact(ns.clone())],
                ..Default::default()
            }];
            if !waypoints.is_empty() {
                matches.push(Match {
                    principals: waypoints.clone(),
                    ..Default::default()
                });
            }
            let a = Authorization {
                name: super::l7policy::SECURE_DEFAULT.to_string(),
                namespace: ns.clone(),
                scope: sec::Scope::Namespace as i32,
                action: sec::Action::Allow as i32,
                rules: vec![sec::Rule {
                    clauses: vec![Clause { matches }],
                }],
                dry_run: false,
            };
            authorizations.insert(
                format!("{ns}/{}", super::l7policy::SECURE_DEFAULT),
                resource(&a),
            );
        }
    }

    /// Records in `self` the generation after `prev` and what changed since it.
    pub(crate) fn follow(&mut self, prev: &Snapshot) {
        self.generation = prev.generation + 1;
        let empty = BTreeMap::new();
        let types: std::collections::BTreeSet<&String> =
            prev.resources.keys().chain(self.resources.keys()).collect();
        let mut changes = BTreeMap::new();
        for t in types {
            let old = prev.resources.get(t).unwrap_or(&empty);
            let new = self.resources.get(t).unwrap_or(&empty);
            let set = ChangeSet {
                updated: new
                    .iter()
                    .filter(|(n, r)| old.get(*n).map(|o| &o.version) != Some(&r.version))
                    .map(|(n, _)| n.clone())
                    .collect(),
                removed: old
                    .keys()
                    .filter(|n| !new.contains_key(*n))
                    .cloned()
                    .collect(),
            };
            changes.insert(t.clone(), set);
        }
        self.changes = changes;
    }

    /// The resources of `type_url` (empty when none).
    pub fn of_type(&self, type_url: &str) -> Option<&BTreeMap<String, Arc<Resource>>> {
        self.resources.get(type_url)
    }

    /// What a holder of `known` needs to catch up with this snapshot for `type_url`,
    /// restricted to the names `wanted` accepts.
    pub fn delta_from(
        &self,
        type_url: &str,
        known: &dyn Held,
        wanted: impl Fn(&str) -> bool,
    ) -> Delta {
        let empty = BTreeMap::new();
        let current = self.of_type(type_url).unwrap_or(&empty);
        let updated = current
            .iter()
            .filter(|(name, r)| wanted(name) && known.version_of(name) != Some(&r.version))
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        let mut removed = Vec::new();
        known.each_name(&mut |name| {
            if !current.contains_key(name) || !wanted(name) {
                removed.push(name.to_string());
            }
        });
        Delta { updated, removed }
    }
}

/// What a proxy holds of one type: resource name → version.
pub trait Held {
    /// The version held of `name`.
    fn version_of(&self, name: &str) -> Option<&str>;
    /// Calls `f` with every name held.
    fn each_name(&self, f: &mut dyn FnMut(&str));
}

impl Held for BTreeMap<String, String> {
    fn version_of(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }

    fn each_name(&self, f: &mut dyn FnMut(&str)) {
        for n in self.keys() {
            f(n);
        }
    }
}

/// Exactly the resources of one type in a snapshot: what a wildcard subscriber holds once
/// it ACKed that snapshot. Shared, so the many proxies in sync cost nothing each.
#[derive(Debug, Clone)]
pub struct HeldSnapshot {
    /// The snapshot.
    pub snapshot: Arc<Snapshot>,
    /// The type.
    pub type_url: String,
}

impl Held for HeldSnapshot {
    fn version_of(&self, name: &str) -> Option<&str> {
        self.snapshot
            .of_type(&self.type_url)
            .and_then(|m| m.get(name))
            .map(|r| r.version.as_str())
    }

    fn each_name(&self, f: &mut dyn FnMut(&str)) {
        if let Some(m) = self.snapshot.of_type(&self.type_url) {
            for n in m.keys() {
                f(n);
            }
        }
    }
}

/// The namespace a resource belongs to, from its name: `<cluster>//Pod/<ns>/<name>` for a
/// workload, `<ns>/<rest>` for services and policies.
fn namespace_of(name: &str) -> Option<&str> {
    let rest = match name.split_once("//Pod/") {
        Some((_, rest)) => rest,
        None => name,
    };
    rest.split_once('/').map(|(ns, _)| ns)
}

fn resource<M: Message + Name>(m: &M) -> Arc<Resource> {
    let bytes = m.encode_to_vec();
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let version = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Arc::new(Resource {
        version,
        body: Any {
            type_url: M::type_url(),
            value: bytes,
        },
    })
}

/// The (namespace, name) of every waypoint Gateway (few: recomputed whole each build).
fn waypoint_keys(model: &Model) -> std::collections::BTreeSet<(String, String)> {
    model
        .gateways()
        .filter(|(_, gw)| gw.is_waypoint())
        .map(|(key, _)| key.clone())
        .collect()
}

/// [`Model::waypoint_views`], when there is a waypoint to read them (a mesh without
/// waypoints pays nothing).
fn waypoint_views(
    model: &Model,
    mesh: &MeshConfig,
    waypoints: &std::collections::BTreeSet<(String, String)>,
) -> BTreeMap<(String, String), Arc<std::collections::BTreeSet<String>>> {
    if waypoints.is_empty() {
        return BTreeMap::new();
    }
    model
        .waypoint_views(mesh)
        .into_iter()
        .map(|(k, v)| (k, Arc::new(v)))
        .collect()
}
