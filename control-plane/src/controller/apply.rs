//! Writing to the API server with server-side apply: the control plane owns exactly the
//! fields it sends (field manager `trellis-control-plane`), so users' edits of other
//! fields, and other controllers' conditions, are left alone.
//!
//! The [`Writer`] remembers what it last wrote per object and sends only what changed: a
//! configuration change that leaves a status as it was costs no API call.

use std::collections::BTreeMap;

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
    Preconditions,
};
use serde_json::Value;

/// The field manager of everything the control plane writes.
pub const FIELD_MANAGER: &str = "trellis-control-plane";

/// An object (or its status) the control plane writes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    /// `group/version` (`v1` for the core group).
    pub api_version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Resource name in URLs.
    pub plural: &'static str,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The `status` subresource (else the object itself).
    pub status: bool,
}

impl Target {
    fn resource(&self) -> ApiResource {
        let (group, version) = self
            .api_version
            .rsplit_once('/')
            .unwrap_or(("", self.api_version));
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, self.kind),
            self.plural,
        )
    }

    fn api(&self, client: &kube::Client) -> Api<DynamicObject> {
        Api::namespaced_with(client.clone(), &self.namespace, &self.resource())
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)?;
        if self.status {
            f.write_str(" status")?;
        }
        Ok(())
    }
}

/// Applies objects and statuses, each only when it differs from what was last applied.
pub struct Writer {
    client: kube::Client,
    written: BTreeMap<Target, Value>,
    /// Bodies the API server refused as invalid (4xx): not sent again until they change
    /// (or the next full re-apply).
    refused: BTreeMap<Target, Value>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("written", &self.written.len())
            .finish()
    }
}

impl Writer {
    /// A writer with nothing written yet.
    pub fn new(client: kube::Client) -> Writer {
        Writer {
            client,
            written: BTreeMap::new(),
            refused: BTreeMap::new(),
        }
    }

    /// Forgets what was written (another replica may have written since): the next
    /// [`Writer::sync`] applies everything again.
    pub fn forget(&mut self) {
        self.written.clear();
        self.refused.clear();
    }

    /// Applies every body of `desired` that differs from the last one applied. Bodies are
    /// complete apply configurations (apiVersion, kind, metadata.name/namespace, and the
    /// fields owned). Condition `lastTransitionTime`s are stamped here: kept from the last
    /// write while a condition's `status` stays the same, else now. Stops as soon as
    /// `leading()` turns false (another replica writes now). Returns how many writes failed
    /// (they are retried by the next call).
    pub async fn sync(
        &mut self,
        desired: &BTreeMap<Target, Value>,
        leading: &(dyn Fn() -> bool + Sync),
    ) -> usize {
        let mut failed = 0;
        self.written.retain(|t, _| desired.contains_key(t));
        for (target, body) in desired {
            if !leading() {
                break;
            }
            if self.refused.get(target) == Some(body) {
                continue;
            }
            let desired_body = body;
            let body = stamp_transitions(body.clone(), self.written.get(target));
            if self.written.get(target) == Some(&body) {
                continue;
            }
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let api = target.api(&self.client);
            let result = if target.status {
                api.patch_status(&target.name, &params, &Patch::Apply(&body))
                    .await
            } else {
                api.patch(&target.name, &params, &Patch::Apply(&body)).await
            };
            match result {
                Ok(_) => {
                    tracing::debug!(%target, "applied");
                    self.refused.remove(target);
                    self.written.insert(target.clone(), body);
                }
                // The object went away meanwhile (its status has nothing to go on).
                Err(kube::Error::Api(s)) if s.code == 404 && target.status => {
                    tracing::debug!(%target, "gone before its status was written");
                }
                // Invalid as sent (not a conflict, not throttling): sending it again
                // cannot help.
                Err(kube::Error::Api(s))
                    if (400..500).contains(&s.code) && ![404, 409, 429].contains(&s.code) =>
                {
                    tracing::error!(%target, code = s.code, reason = %s.message, "the API server refused this; not retried until it changes");
                    self.refused.insert(target.clone(), desired_body.clone());
                    failed += 1;
                }
                Err(e) => {
                    tracing::warn!(%target, error = %e, "cannot apply; retrying");
                    failed += 1;
                }
            }
        }
        failed
    }

    /// Who controls the existing `target`: `Ok(None)` when it does not exist, else the
    /// controller owner reference's (kind, uid), if any.
    pub async fn controller_of(
        &self,
        target: &Target,
    ) -> Result<Option<Option<(String, String)>>, kube::Error> {
        let Some(existing) = target.api(&self.client).get_opt(&target.name).await? else {
            return Ok(None);
        };
        Ok(Some(controller_ref(&existing.metadata)))
    }

    /// Deletes `target` if a `Gateway` controls it (never anything a user made). Already
    /// gone, or not a Gateway's, counts as done. Returns whether that is settled.
    pub async fn delete_gateway_owned(&mut self, target: &Target) -> bool {
        self.written.remove(target);
        let api = target.api(&self.client);
        let existing = match api.get_opt(&target.name).await {
            Ok(Some(o)) => o,
            Ok(None) => return true,
            Err(e) => {
                tracing::warn!(%target, error = %e, "cannot read before deleting; retrying");
                return false;
            }
        };
        if controller_ref(&existing.metadata).is_none_or(|(kind, _)| kind != "Gateway") {
            tracing::warn!(%target, "not created for a waypoint Gateway: left alone");
            return true;
        }
        // Only that object: one re-created meanwhile under the name is another object.
        let mut params = DeleteParams::background();
        params.preconditions = existing.metadata.uid.clone().map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        });
        match api.delete(&target.name, &params).await {
            Ok(_) => true,
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => true,
            Err(e) => {
                tracing::warn!(%target, error = %e, "cannot delete; retrying");
                false
            }
        }
    }
}

/// The (kind, uid) of `meta`'s controller owner reference.
fn controller_ref(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<(String, String)> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.clone(), o.uid.clone()))
}

/// Gives each condition of `conditions` the `lastTransitionTime` of the condition of the
/// same type and status in `observed` (the object's status as read from the API): a
/// condition that did not change keeps its time across restarts and leader changes.
pub fn carry_times(conditions: &mut [Value], observed: &[Value]) {
    for c in conditions {
        let same = observed
            .iter()
            .find(|o| o.get("type") == c.get("type") && o.get("status") == c.get("status"));
        if let Some(t) = same
            .and_then(|o| o.get("lastTransitionTime"))
            .filter(|t| t.is_string())
        {
            c["lastTransitionTime"] = t.clone();
        }
    }
}

/// Sets each `status.conditions[*].lastTransitionTime` of `body`: the time of the same
/// condition type in `previous` if its `status` is unchanged, else now.
pub fn stamp_transitions(mut body: Value, previous: Option<&Value>) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
        .to_string();
    let before = |kind: &Value, status: &Value| -> Option<Value> {
        previous?
            .pointer("/status/conditions")?
            .as_array()?
            .iter()
            .find(|c| c.get("type") == Some(kind) && c.get("status") == Some(status))?
            .get("lastTransitionTime")
            .cloned()
    };
    stamp_list(body.pointer_mut("/status/conditions"), &before, &now);
    // Route statuses: conditions per parent, matched to the previous write by parentRef.
    if let Some(parents) = body
        .pointer_mut("/status/parents")
        .and_then(Value::as_array_mut)
    {
        for parent in parents {
            // Other controllers' entries are carried over as they wrote them.
            if parent.get("controllerName").and_then(Value::as_str)
                != Some(super::routes::CONTROLLER_NAME)
            {
                continue;
            }
            let Some(conditions) = parent.get("conditions").cloned() else {
                continue;
            };
            let previous_parent = previous
                .and_then(|p| p.pointer("/status/parents"))
                .and_then(Value::as_array)
                .and_then(|list| {
                    list.iter()
                        .find(|p| p.get("parentRef") == parent.get("parentRef"))
                });
            let before = |kind: &Value, status: &Value| -> Option<Value> {
                previous_parent?
                    .get("conditions")?
                    .as_array()?
                    .iter()
                    .find(|c| c.get("type") == Some(kind) && c.get("status") == Some(status))?
                    .get("lastTransitionTime")
                    .cloned()
            };
            let mut conditions = conditions;
            stamp_list(Some(&mut conditions), &before, &now);
            parent["conditions"] = conditions;
        }
    }
    body
}

fn stamp_list(
    list: Option<&mut Value>,
    before: &dyn Fn(&Value, &Value) -> Option<Value>,
    now: &str,
) {
    let Some(list) = list.and_then(Value::as_array_mut) else {
        return;
    };
    for c in list {
        // A time already given (carried over from the object as observed) stays.
        if c.get("lastTransitionTime").is_some_and(Value::is_string) {
            continue;
        }
        let (Some(kind), Some(status)) = (c.get("type").cloned(), c.get("status").cloned()) else {
            continue;
        };
        let t = before(&kind, &status).unwrap_or_else(|| Value::from(now));
        if let Some(m) = c.as_object_mut() {
            m.insert("lastTransitionTime".into(), t);
        }
    }
}
