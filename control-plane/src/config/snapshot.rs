//! A snapshot: every resource the data plane receives, named and versioned, per type URL,
//! with the status of every policy. Two snapshots diff into what changed, which is what a
//! delta xDS stream sends.
//!
//! Names follow Istio's: a workload by its uid, a service by `namespace/hostname`, an
//! authorization by `namespace/name`. A resource's version is a digest of its encoding, so
//! an unchanged resource keeps its version across rebuilds and is never re-sent.

use std::collections::BTreeMap;

use prost::{Message, Name};
use prost_types::Any;
use trellis_proto::istio::security::Authorization;
use trellis_proto::istio::workload::{Address, address};

use super::authz::{PolicyStatus, for_ztunnel};
use super::load::ObjectRef;
use super::model::{MeshConfig, Model};

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
    /// Type URL → name → resource.
    pub resources: BTreeMap<String, BTreeMap<String, Resource>>,
    /// Status of every AuthorizationPolicy.
    pub statuses: BTreeMap<ObjectRef, PolicyStatus>,
    /// What changed since generation − 1, per type URL: computed once here, so the many
    /// streams that are in sync do not each compare every resource.
    pub changes: BTreeMap<String, ChangeSet>,
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
    pub updated: Vec<(String, Resource)>,
    /// Names removed.
    pub removed: Vec<String>,
}

impl Snapshot {
    /// Builds the snapshot of `model`.
    pub fn build(model: &Model, mesh: &MeshConfig) -> Snapshot {
        let mut snap = Snapshot::default();
        let addresses = snap.resources.entry(Address::type_url()).or_default();
        for w in model.workloads(mesh) {
            let name = w.uid.clone();
            let addr = Address {
                r#type: Some(address::Type::Workload(w)),
            };
            addresses.insert(name, resource(&addr));
        }
        for s in model.services(mesh) {
            let name = format!("{}/{}", s.namespace, s.hostname);
            let addr = Address {
                r#type: Some(address::Type::Service(s)),
            };
            addresses.insert(name, resource(&addr));
        }
        let mut authorizations = BTreeMap::new();
        for ((ns, name), policy) in model.authorization_policies() {
            let t = for_ztunnel(policy, &mesh.root_namespace);
            if let Some(a) = &t.authorization {
                authorizations.insert(format!("{ns}/{name}"), resource(a));
            }
            let id = ObjectRef {
                kind: "AuthorizationPolicy".into(),
                namespace: ns.clone(),
                name: name.clone(),
            };
            snap.statuses.insert(id, t.status);
        }
        for a in model.peer_authentication_policies(mesh) {
            authorizations.insert(format!("{}/{}", a.namespace, a.name), resource(&a));
        }
        snap.resources
            .insert(Authorization::type_url(), authorizations);
        snap
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
    pub fn of_type(&self, type_url: &str) -> Option<&BTreeMap<String, Resource>> {
        self.resources.get(type_url)
    }

    /// What a holder of `known` (name → version) needs to catch up with this snapshot for
    /// `type_url`, restricted to the names `wanted` accepts.
    pub fn delta_from(
        &self,
        type_url: &str,
        known: &BTreeMap<String, String>,
        wanted: impl Fn(&str) -> bool,
    ) -> Delta {
        let empty = BTreeMap::new();
        let current = self.of_type(type_url).unwrap_or(&empty);
        let updated = current
            .iter()
            .filter(|(name, r)| wanted(name) && known.get(*name) != Some(&r.version))
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        let removed = known
            .keys()
            .filter(|name| !current.contains_key(*name) || !wanted(name))
            .cloned()
            .collect();
        Delta { updated, removed }
    }
}

fn resource<M: Message + Name>(m: &M) -> Resource {
    let bytes = m.encode_to_vec();
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let version = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Resource {
        version,
        body: Any {
            type_url: M::type_url(),
            value: bytes,
        },
    }
}
