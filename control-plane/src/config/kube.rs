//! The Kubernetes source: the objects Trellis reads, watched through the API server, fed
//! into the same model as the directory source (each object parsed by the same loader, so
//! both sources give the same xDS for the same objects).
//!
//! One watcher per kind (kube-runtime: list, then watch; on a watch that expired — 410
//! Gone — or broke, it lists again, with backoff). Events come to one [`KubeState`] that
//! applies them to the model: an object that does not load keeps its last good version (as
//! with files) and its error is reported; after a re-list, objects the new list no longer
//! has are deleted.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::sync::mpsc;

use super::load::{ConfigError, Document, ObjectRef, parse_object};
use super::model::Model;

/// A kind the control plane watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// API group (empty for the core group).
    pub group: &'static str,
    /// Version watched.
    pub version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Resource name in URLs.
    pub plural: &'static str,
    /// Only the metadata is read (a metadata watch): the kind's spec and status are large,
    /// change often and are not used.
    pub metadata_only: bool,
}

impl Kind {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }
}

/// Everything the model is built from, as read from the API (v1 of the security CRDs: the
/// API server serves v1beta1 objects as v1 too).
pub const KINDS: &[Kind] = &[
    Kind {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        metadata_only: false,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        metadata_only: false,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        metadata_only: false,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        metadata_only: false,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        metadata_only: true,
    },
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        metadata_only: false,
    },
    Kind {
        group: "security.istio.io",
        version: "v1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        metadata_only: false,
    },
    Kind {
        group: "security.istio.io",
        version: "v1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        metadata_only: false,
    },
    Kind {
        group: "security.istio.io",
        version: "v1",
        kind: "RequestAuthentication",
        plural: "requestauthentications",
        metadata_only: false,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "Gateway",
        plural: "gateways",
        metadata_only: false,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "HTTPRoute",
        plural: "httproutes",
        metadata_only: false,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "GRPCRoute",
        plural: "grpcroutes",
        metadata_only: false,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1beta1",
        kind: "ReferenceGrant",
        plural: "referencegrants",
        metadata_only: false,
    },
    Kind {
        group: "networking.istio.io",
        version: "v1",
        kind: "DestinationRule",
        plural: "destinationrules",
        metadata_only: false,
    },
    Kind {
        group: "trellis.dev",
        version: "v1alpha1",
        kind: "LocalTrafficPolicy",
        plural: "localtrafficpolicies",
        metadata_only: false,
    },
];

/// What a watcher saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An object was created or changed (JSON as the API sent it).
    Apply(&'static Kind, serde_json::Value),
    /// An object was deleted.
    Delete(&'static Kind, serde_json::Value),
    /// A (re-)list of the kind begins.
    ListStart(&'static Kind),
    /// An object of the list in progress.
    Listed(&'static Kind, serde_json::Value),
    /// The list is complete: what it did not contain is gone.
    ListDone(&'static Kind),
    /// The watch failed (the watcher retries on its own, with backoff).
    Error(&'static Kind, String),
    /// The API server does not serve the kind (its CRD is not installed): there is nothing
    /// of it to read for now; the watcher keeps retrying, so installing the CRD later works.
    Absent(&'static Kind, String),
}

/// Watches every kind of `kinds` with `client` and sends what happens to `tx`, until `tx`
/// closes.
pub async fn watch(client: kube::Client, kinds: &'static [Kind], tx: mpsc::Sender<Event>) {
    let tasks = kinds.iter().map(|kind| {
        let (client, tx) = (client.clone(), tx.clone());
        async move {
            let ar = kind.resource();
            let config = watcher::Config::default();
            let mut stream = if kind.metadata_only {
                // Metadata-only requests: the API server sends no spec and status.
                let api: Api<PartialObjectMeta<DynamicObject>> = Api::all_with(client, &ar);
                watcher(api, config)
                    .default_backoff()
                    .map(move |item| {
                        event(kind, item, |o| serde_json::json!({"metadata": o.metadata}))
                    })
                    .boxed()
            } else {
                let api: Api<DynamicObject> = Api::all_with(client, &ar);
                watcher(api, config)
                    .default_backoff()
                    .map(move |item| {
                        event(kind, item, |o| serde_json::to_value(o).unwrap_or_default())
                    })
                    .boxed()
            };
            while let Some(event) = stream.next().await {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
    });
    futures::future::join_all(tasks).await;
}

/// What a watcher's `item` means, each object as JSON by `json` (named with the kind's
/// apiVersion and kind: items of a list carry neither).
fn event<T>(
    kind: &'static Kind,
    item: Result<watcher::Event<T>, watcher::Error>,
    json: impl Fn(T) -> serde_json::Value,
) -> Event {
    let json = |o: T| {
        let mut v = json(o);
        if let Some(m) = v.as_object_mut() {
            m.insert("apiVersion".into(), kind.api_version().into());
            m.insert("kind".into(), kind.kind.into());
        }
        v
    };
    match item {
        Ok(watcher::Event::Apply(o)) => Event::Apply(kind, json(o)),
        Ok(watcher::Event::Delete(o)) => Event::Delete(kind, json(o)),
        Ok(watcher::Event::Init) => Event::ListStart(kind),
        Ok(watcher::Event::InitApply(o)) => Event::Listed(kind, json(o)),
        Ok(watcher::Event::InitDone) => Event::ListDone(kind),
        Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.code == 404 => {
            Event::Absent(kind, status.message.clone())
        }
        Err(e) => Event::Error(kind, e.to_string()),
    }
}

/// The objects the Kubernetes source has put into the model, and what did not load.
#[derive(Debug, Default)]
pub struct KubeState {
    /// Per kind: the objects in the model.
    known: BTreeMap<&'static str, BTreeSet<ObjectRef>>,
    /// Per kind: the objects of the list in progress.
    listing: BTreeMap<&'static str, BTreeSet<ObjectRef>>,
    /// Objects that do not load, with why (their last good version stays in the model).
    errors: BTreeMap<ObjectRef, ConfigError>,
    /// Unknown fields of loaded objects.
    warnings: BTreeMap<ObjectRef, Vec<String>>,
    /// The last watch error per kind (cleared by the next successful list).
    watch_errors: BTreeMap<&'static str, String>,
    /// The status of the security policies as read (not configuration: kept aside for the
    /// status writer, which carries over other controllers' conditions and times).
    statuses: BTreeMap<ObjectRef, serde_json::Value>,
    /// Counts changes of `statuses`.
    status_changes: u64,
}

impl KubeState {
    /// Applies `event` to `model`; returns whether the model changed.
    pub fn apply(&mut self, event: Event, model: &mut Model) -> bool {
        match event {
            Event::Apply(kind, json) => self.upsert(kind, json, model, false),
            Event::Listed(kind, json) => self.upsert(kind, json, model, true),
            Event::Delete(kind, json) => {
                let id = ObjectRef {
                    kind: kind.kind.to_string(),
                    namespace: meta(&json, "namespace"),
                    name: meta(&json, "name"),
                };
                self.errors.remove(&id);
                self.warnings.remove(&id);
                self.statuses.remove(&id);
                let had = self.known.get_mut(kind.kind).is_some_and(|k| k.remove(&id));
                if had {
                    model.delete(&id);
                }
                had
            }
            Event::ListStart(kind) => {
                self.listing.insert(kind.kind, BTreeSet::new());
                false
            }
            Event::ListDone(kind) => {
                self.watch_errors.remove(kind.kind);
                let listed = self.listing.remove(kind.kind).unwrap_or_default();
                let known = self.known.entry(kind.kind).or_default();
                let gone: Vec<ObjectRef> = known.difference(&listed).cloned().collect();
                for id in &gone {
                    model.delete(id);
                    self.errors.remove(id);
                    self.warnings.remove(id);
                    self.statuses.remove(id);
                }
                *known = listed;
                !gone.is_empty()
            }
            Event::Error(kind, e) => {
                tracing::warn!(kind = kind.kind, error = %e, "watch failed; keeping the last objects and retrying");
                self.watch_errors.insert(kind.kind, e);
                false
            }
            Event::Absent(kind, e) => {
                if !self.watch_errors.contains_key(kind.kind) {
                    tracing::warn!(kind = kind.kind, api_version = %kind.api_version(), error = %e, "the API server does not serve this kind (CRD not installed?); reading none until it does");
                }
                self.watch_errors.insert(
                    kind.kind,
                    format!("not served by the API server (is its CRD installed?): {e}"),
                );
                false
            }
        }
    }

    fn upsert(
        &mut self,
        kind: &'static Kind,
        json: serde_json::Value,
        model: &mut Model,
        listing: bool,
    ) -> bool {
        let id = ObjectRef {
            kind: kind.kind.to_string(),
            namespace: meta(&json, "namespace"),
            name: meta(&json, "name"),
        };
        if kind.group == "security.istio.io" {
            let before = match json.get("status") {
                Some(s) if !s.is_null() => self.statuses.insert(id.clone(), s.clone()),
                _ => self.statuses.remove(&id),
            };
            if before.as_ref() != self.statuses.get(&id) {
                self.status_changes += 1;
            }
        }
        match parse_object("kubernetes", json) {
            Document::Loaded(l) => {
                if listing {
                    self.listing
                        .entry(kind.kind)
                        .or_default()
                        .insert(l.id.clone());
                }
                self.errors.remove(&l.id);
                if l.warnings.is_empty() {
                    self.warnings.remove(&l.id);
                } else {
                    self.warnings.insert(l.id.clone(), l.warnings);
                }
                self.known
                    .entry(kind.kind)
                    .or_default()
                    .insert(l.id.clone());
                // An update that changes nothing the model keeps (a policy's status, which
                // the control plane itself writes) re-translates nothing.
                if model.holds(&l.id, &l.object) {
                    return false;
                }
                model.apply(&l.id, l.object);
                true
            }
            Document::Invalid(e) => {
                tracing::warn!(error = %e, "object does not load; its last good version stays");
                // An object never loaded is not in the model; one that loaded before keeps
                // its last good version and stays known (a re-list must not drop it).
                if self.known.get(kind.kind).is_some_and(|k| k.contains(&id)) && listing {
                    self.listing
                        .entry(kind.kind)
                        .or_default()
                        .insert(id.clone());
                }
                self.errors.insert(id, e);
                false
            }
            Document::Skipped(_) => false,
        }
    }

    /// The objects this source has in the model.
    pub fn objects(&self) -> BTreeSet<ObjectRef> {
        self.known.values().flatten().cloned().collect()
    }

    /// Objects that do not load, each with its error.
    pub fn errors(&self) -> Vec<ConfigError> {
        self.errors.values().cloned().collect()
    }

    /// Unknown-field warnings per object.
    pub fn object_warnings(&self) -> BTreeMap<ObjectRef, Vec<String>> {
        self.warnings.clone()
    }

    /// A number that changes whenever a policy's status as read changes.
    pub fn status_changes(&self) -> u64 {
        self.status_changes
    }

    /// The status of policy `id` as last read from the API.
    pub fn observed_status(&self, id: &ObjectRef) -> Option<&serde_json::Value> {
        self.statuses.get(id)
    }

    /// Kinds whose watch currently fails, with the last error.
    pub fn watch_errors(&self) -> BTreeMap<&'static str, String> {
        self.watch_errors.clone()
    }
}

fn meta(json: &serde_json::Value, key: &str) -> String {
    json.get("metadata")
        .and_then(|m| m.get(key))
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string()
}
