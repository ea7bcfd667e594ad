//! The status conditions of the security policies (pure: a policy's state in, the apply
//! configuration of its `status` out).
//!
//! `AuthorizationPolicy` and `PeerAuthentication` get Istio's `ZtunnelAccepted` condition
//! (so `kubectl wait --for=condition=ZtunnelAccepted` works as with Istio):
//! - `True`, reason `Accepted`, "attached to ztunnel";
//! - `True`, reason `UnsupportedValue`, the warnings (what ztunnel cannot enforce, fields
//!   that were ignored) — the policy is in effect as the message says;
//! - `False`, reason `Invalid`, why it was rejected.
//!
//! A policy attached to waypoints with `targetRefs` gets Istio's `WaypointAccepted`
//! instead: `True`, reason `Accepted`, "bound to <ns>/<waypoint>" (reason
//! `UnsupportedValue` and the caveats after it when there are some); `False`, reason
//! `TargetNotFound`, when no waypoint serves what it targets; `False`, `Invalid`, when
//! rejected. (`ZtunnelAccepted` and `WaypointAccepted` are both ours: writing one removes
//! the other.)
//!
//! `RequestAuthentication` is enforced by waypoints, not ztunnel: it gets `Accepted` with
//! the same reasons. So does a `DestinationRule` (`networking.istio.io`), with what the
//! waypoints do not apply of it as `UnsupportedValue`. A `LocalTrafficPolicy` (ours) gets
//! the Gateway API's policy reasons: `Accepted` (its message naming the targets that are
//! missing or held by an older policy, if some are), `False` with `TargetNotFound` or
//! `Conflicted` when none is in effect, `Invalid` when it does not validate. Conditions of other types on the same object (other controllers')
//! are written back as observed: with Istio's CRDs the list is one value, which a
//! server-side apply replaces whole. A condition whose status did not change keeps its
//! `lastTransitionTime`.

use serde_json::{Value, json};

use super::apply::Target;
use crate::config::authz::{PolicyState, PolicyStatus};
use crate::config::load::ObjectRef;

/// The condition type ztunnel-enforced policies get (Istio's name).
pub const ZTUNNEL_ACCEPTED: &str = "ZtunnelAccepted";

/// The condition type of policies attached to waypoints (Istio's name).
pub const WAYPOINT_ACCEPTED: &str = "WaypointAccepted";

/// The `WaypointAccepted` condition's status, reason and message.
fn waypoint_condition(status: &PolicyStatus) -> (&'static str, &'static str, String) {
    let notes: Vec<&str> = status
        .reasons
        .iter()
        .map(|r| r.strip_prefix("waypoint: ").unwrap_or(r))
        .collect();
    if status.state == PolicyState::Rejected {
        return ("False", "Invalid", notes.join("; "));
    }
    let bound = notes.first().and_then(|n| {
        n.strip_prefix("enforced with its L7 rules by the waypoints ")
            .or_else(|| n.strip_prefix("enforced with its L7 rules by the waypoint "))
    });
    match bound {
        Some(gws) if notes.len() == 1 => ("True", "Accepted", format!("bound to {gws}")),
        Some(gws) => (
            "True",
            "UnsupportedValue",
            format!("bound to {gws}; {}", notes[1..].join("; ")),
        ),
        None => ("False", "TargetNotFound", notes.join("; ")),
    }
}

/// Where a policy's status is written; `None` for kinds without one.
pub fn target(id: &ObjectRef) -> Option<Target> {
    let (api_version, kind, plural) = match id.kind.as_str() {
        "AuthorizationPolicy" => (
            "security.istio.io/v1",
            "AuthorizationPolicy",
            "authorizationpolicies",
        ),
        "PeerAuthentication" => (
            "security.istio.io/v1",
            "PeerAuthentication",
            "peerauthentications",
        ),
        "RequestAuthentication" => (
            "security.istio.io/v1",
            "RequestAuthentication",
            "requestauthentications",
        ),
        "DestinationRule" => (
            "networking.istio.io/v1",
            "DestinationRule",
            "destinationrules",
        ),
        "LocalTrafficPolicy" => (
            "trellis.dev/v1alpha1",
            "LocalTrafficPolicy",
            "localtrafficpolicies",
        ),
        _ => return None,
    };
    Some(Target {
        api_version,
        kind,
        plural,
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        status: true,
    })
}

/// The apply configuration of the status of policy `id`, at metadata.generation
/// `generation`; `observed` is its status as read from the API.
pub fn policy_status(
    id: &ObjectRef,
    status: &PolicyStatus,
    generation: Option<i64>,
    observed: Option<&Value>,
) -> Value {
    let kind = if matches!(
        id.kind.as_str(),
        "RequestAuthentication" | "DestinationRule" | "LocalTrafficPolicy"
    ) {
        "Accepted"
    } else if status.waypoint {
        WAYPOINT_ACCEPTED
    } else {
        ZTUNNEL_ACCEPTED
    };
    let (state, reason, message) = match status.state {
        _ if kind == WAYPOINT_ACCEPTED => waypoint_condition(status),
        PolicyState::Accepted if kind == ZTUNNEL_ACCEPTED && status.reasons.is_empty() => {
            ("True", "Accepted", "attached to ztunnel".to_string())
        }
        // Where waypoints enforce it.
        PolicyState::Accepted if kind == ZTUNNEL_ACCEPTED => {
            ("True", "Accepted", status.reasons.join("; "))
        }
        PolicyState::Accepted if status.reasons.is_empty() => {
            ("True", "Accepted", "accepted".to_string())
        }
        PolicyState::Accepted => ("True", "Accepted", status.reasons.join("; ")),
        PolicyState::AcceptedWithWarnings if id.kind == "LocalTrafficPolicy" => {
            ("True", "Accepted", status.reasons.join("; "))
        }
        PolicyState::AcceptedWithWarnings => {
            ("True", "UnsupportedValue", status.reasons.join("; "))
        }
        // A Trellis policy's targets that do not exist, or that older policies hold
        // (Gateway API policy reasons).
        PolicyState::Rejected
            if id.kind == "LocalTrafficPolicy"
                && status.reasons.iter().all(|r| {
                    r.starts_with(crate::config::local_traffic::TARGET_NOT_FOUND)
                        || r.starts_with(crate::config::local_traffic::CONFLICTED)
                }) =>
        {
            let reason = if status
                .reasons
                .iter()
                .any(|r| r.starts_with(crate::config::local_traffic::TARGET_NOT_FOUND))
            {
                "TargetNotFound"
            } else {
                "Conflicted"
            };
            ("False", reason, status.reasons.join("; "))
        }
        PolicyState::Rejected => ("False", "Invalid", status.reasons.join("; ")),
    };
    let mut condition = json!({
        "type": kind,
        "status": state,
        "reason": reason,
        "message": message,
    });
    // Istio's status is a protobuf message: int64 fields are JSON strings.
    if let Some(g) = generation {
        condition["observedGeneration"] = Value::from(g.to_string());
    }
    let observed: Vec<Value> = observed
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut conditions: Vec<Value> = observed
        .iter()
        .filter(|c| {
            let t = c.get("type").and_then(Value::as_str);
            t != Some(kind)
                && !(kind != "Accepted" && matches!(t, Some(ZTUNNEL_ACCEPTED | WAYPOINT_ACCEPTED)))
        })
        .cloned()
        .collect();
    conditions.push(condition);
    super::apply::carry_times(&mut conditions, &observed);
    json!({
        "apiVersion": match id.kind.as_str() {
            "DestinationRule" => "networking.istio.io/v1",
            "LocalTrafficPolicy" => "trellis.dev/v1alpha1",
            _ => "security.istio.io/v1",
        },
        "kind": id.kind,
        "metadata": {"name": id.name, "namespace": id.namespace},
        "status": {"conditions": conditions},
    })
}
