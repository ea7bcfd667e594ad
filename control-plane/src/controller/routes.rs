//! The status of `HTTPRoute`s and `GRPCRoute`s (pure: the model in, the apply
//! configuration of each route's `status` out).
//!
//! A route gets an entry in `status.parents` for each parent Trellis serves: a waypoint
//! `Gateway`, or a `Service` (a mesh route, served by the service's waypoint). Conditions:
//! - `Accepted`: `True`; `False` with `NoMatchingParent` when the Service does not exist
//!   or has no waypoint (the route cannot take effect until one is bound); `False` with
//!   `Pending` while the waypoint serving it is not ready (its Gateway's `Programmed` is
//!   `False`: no ready pod), so a route never says it is enforced when nothing enforces it;
//! - `ResolvedRefs`: `True`, or `False` with `BackendNotFound` naming the backend Services
//!   that do not exist, or `RefNotPermitted` naming backends in another namespace that no
//!   ReferenceGrant there allows (not used).
//!
//! Parents of other implementations (Gateways of other classes) are not Trellis's to judge:
//! their entries, written by their controllers, are carried over unchanged (the Gateway
//! API's `status.parents` is one list, which server-side apply owns whole).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use super::apply::Target;
use crate::config::gateway::{HttpBackendRef, ParentReference};
use crate::config::model::{MeshConfig, Model};

/// The controller name in route status (the waypoint GatewayClass's `controllerName`).
pub const CONTROLLER_NAME: &str = "trellis.dev/waypoint-controller";

/// Every route status Trellis writes.
pub fn route_statuses(model: &Model, mesh: &MeshConfig) -> BTreeMap<Target, Value> {
    let http = model.http_routes().map(|(_, r)| Route {
        kind: "HTTPRoute",
        plural: "httproutes",
        metadata: &r.metadata,
        parents: &r.spec.parent_refs,
        backends: r
            .spec
            .rules
            .iter()
            .flat_map(|rule| &rule.backend_refs)
            .collect(),
        status: r.status.as_ref(),
    });
    let grpc = model.grpc_routes().map(|(_, r)| Route {
        kind: "GRPCRoute",
        plural: "grpcroutes",
        metadata: &r.metadata,
        parents: &r.spec.parent_refs,
        backends: r
            .spec
            .rules
            .iter()
            .flat_map(|rule| &rule.backend_refs)
            .collect(),
        status: r.status.as_ref(),
    });
    http.chain(grpc)
        .filter_map(|route| route.status(model, mesh))
        .collect()
}

/// Why waypoint `gw` is not serving, when its Gateway's status says so (`Programmed`
/// False: on Kubernetes the controller writes it from the Deployment's ready pods). A
/// Gateway without that condition (directory mode, or not yet observed) is taken as serving.
fn not_programmed(model: &Model, gw: &(String, String)) -> Option<String> {
    let status = model.gateway(&gw.0, &gw.1)?.status.as_ref()?;
    let programmed = status
        .conditions
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Programmed"))?;
    (programmed.get("status").and_then(Value::as_str) == Some("False")).then(|| {
        programmed
            .get("message")
            .and_then(Value::as_str)
            .or_else(|| programmed.get("reason").and_then(Value::as_str))
            .unwrap_or("Programmed is False")
            .to_string()
    })
}

struct Route<'a> {
    kind: &'static str,
    plural: &'static str,
    metadata: &'a ObjectMeta,
    parents: &'a [ParentReference],
    backends: Vec<&'a HttpBackendRef>,
    status: Option<&'a Value>,
}

impl Route<'_> {
    fn status(&self, model: &Model, _mesh: &MeshConfig) -> Option<(Target, Value)> {
        let ns = self.metadata.namespace.clone().unwrap_or_default();
        let name = self.metadata.name.clone().unwrap_or_default();
        let generation = self.metadata.generation;
        let condition = |kind: &str, ok: bool, reason: &str, message: &str| {
            let mut c = json!({"type": kind, "status": if ok { "True" } else { "False" },
                               "reason": reason, "message": message});
            if let Some(g) = generation {
                c["observedGeneration"] = Value::from(g);
            }
            c
        };
        // Backends that do not exist (only Services are looked up).
        let missing: Vec<String> = self
            .backends
            .iter()
            .filter(|b| {
                b.group.as_deref().unwrap_or("").is_empty()
                    && b.kind.as_deref().unwrap_or("Service") == "Service"
            })
            .filter_map(|b| {
                let bns = b.namespace.as_deref().unwrap_or(&ns);
                model
                    .service_labels(bns, &b.name)
                    .is_none()
                    .then(|| format!("{bns}/{}", b.name))
            })
            .collect();
        // A cross-namespace backend needs a ReferenceGrant of its namespace allowing the
        // route: without one it is not used (its share answers 500), and the status says so.
        let foreign: Vec<String> = self
            .backends
            .iter()
            .filter_map(|b| {
                let bns = b.namespace.as_deref().unwrap_or(&ns);
                (!model.backend_allowed(self.kind, &ns, bns, &b.name))
                    .then(|| format!("{bns}/{}", b.name))
            })
            .collect();
        let resolved = if missing.is_empty() && foreign.is_empty() {
            condition("ResolvedRefs", true, "ResolvedRefs", "every backend exists")
        } else if missing.is_empty() {
            condition(
                "ResolvedRefs",
                false,
                "RefNotPermitted",
                &format!(
                    "backends in another namespace without a ReferenceGrant allowing this route are not used: {}",
                    foreign.join(", ")
                ),
            )
        } else {
            condition(
                "ResolvedRefs",
                false,
                "BackendNotFound",
                &format!("no such Service: {}", missing.join(", ")),
            )
        };
        let observed: Vec<Value> = self
            .status
            .and_then(|s| s.get("parents"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let is_ours =
            |p: &Value| p.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME);
        let mut ours = Vec::new();
        for p in self.parents {
            let pns = p.namespace.clone().unwrap_or_else(|| ns.clone());
            let accepted = if p.is_service() && pns != ns {
                condition(
                    "Accepted",
                    false,
                    "UnsupportedValue",
                    "a route from another namespace than its Service's (a consumer route) is not applied: the waypoint cannot yet limit it to that namespace's clients",
                )
            } else if p.is_service() {
                match model.service_labels(&pns, &p.name) {
                    None => condition(
                        "Accepted",
                        false,
                        "NoMatchingParent",
                        &format!("no Service {pns}/{}", p.name),
                    ),
                    Some(labels) => match model.waypoint_key_of(&pns, &labels, "service") {
                        Some(gw) => match not_programmed(model, &gw) {
                            Some(why) => condition(
                                "Accepted",
                                false,
                                "Pending",
                                &format!(
                                    "the Service's waypoint {}/{} is not ready ({why}): the route takes effect once it is",
                                    gw.0, gw.1
                                ),
                            ),
                            None => condition(
                                "Accepted",
                                true,
                                "Accepted",
                                "served by the Service's waypoint",
                            ),
                        },
                        None => condition(
                            "Accepted",
                            false,
                            "NoMatchingParent",
                            &format!(
                                "Service {pns}/{} has no waypoint: bind one (label istio.io/use-waypoint) for the route to take effect",
                                p.name
                            ),
                        ),
                    },
                }
            } else {
                match crate::config::routes::gateway_attachment(model, self.kind, &ns, p) {
                    Some(Ok(gw)) => match not_programmed(model, &gw) {
                        Some(why) => condition(
                            "Accepted",
                            false,
                            "Pending",
                            &format!(
                                "the waypoint is not ready ({why}): the route takes effect once it is"
                            ),
                        ),
                        None => condition(
                            "Accepted",
                            true,
                            "Accepted",
                            "attached to the waypoint: applies to the Services it fronts that the route's hostnames name (all of them without hostnames)",
                        ),
                    },
                    Some(Err((reason, why))) => condition("Accepted", false, reason, &why),
                    // Another implementation's parent, or none at all: not ours to judge.
                    None => continue,
                }
            };
            let parent_ref = strip_nulls(serde_json::to_value(p).unwrap_or_default());
            let mut conditions = vec![accepted, resolved.clone()];
            let observed_conditions = observed
                .iter()
                .filter(|o| is_ours(o))
                .find(|o| o.get("parentRef") == Some(&parent_ref))
                .and_then(|o| o.get("conditions"))
                .and_then(Value::as_array);
            if let Some(before) = observed_conditions {
                super::apply::carry_times(&mut conditions, before);
            }
            ours.push(json!({
                "parentRef": parent_ref,
                "controllerName": CONTROLLER_NAME,
                "conditions": conditions,
            }));
        }
        // Nothing of ours to say, and nothing of ours said before: no write. (Entries of
        // ours for parents the route no longer has are removed by writing without them.)
        if ours.is_empty() && !observed.iter().any(is_ours) {
            return None;
        }
        let mut parents: Vec<Value> = observed.iter().filter(|p| !is_ours(p)).cloned().collect();
        parents.extend(ours);
        Some((
            Target {
                api_version: "gateway.networking.k8s.io/v1",
                kind: self.kind,
                plural: self.plural,
                namespace: ns.clone(),
                name: name.clone(),
                status: true,
            },
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": self.kind,
                "metadata": super::waypoint::with_uid(
                    json!({"name": name, "namespace": ns}),
                    self.metadata.uid.as_deref(),
                ),
                "status": {"parents": parents},
            }),
        ))
    }
}

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}
