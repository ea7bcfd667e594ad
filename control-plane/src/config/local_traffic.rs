//! `LocalTrafficPolicy` (`trellis.dev/v1alpha1`): local rate limiting and fault injection
//! at the waypoint, attached in the Gateway API's policy-attachment style.
//!
//! ```yaml
//! apiVersion: trellis.dev/v1alpha1
//! kind: LocalTrafficPolicy
//! metadata: {name: reviews-limits, namespace: shop}
//! spec:
//!   targetRefs:
//!     - {group: "", kind: Service, name: reviews}                 # every request to it
//!     - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews, sectionName: v2}
//!   rateLimit: {tokens: 100, tokensPerFill: 100, fillInterval: 1s}
//!   fault:
//!     delay: {fixedDelay: 50ms, percentage: 10}
//!     abort: {httpStatus: 503, percentage: 1}                     # or grpcStatus: 14
//! ```
//!
//! - **Targets** are in the policy's namespace (Gateway API `LocalPolicyTargetReference`):
//!   a `Service` (all its ports, or the port named by `sectionName`) served by a waypoint,
//!   or an `HTTPRoute`/`GRPCRoute` (all its rules, or the rule named by `sectionName`).
//! - **Precedence**: a policy on a route rule overrides one on the Service, field by field
//!   (a rule's `rateLimit` replaces the Service's bucket for the requests that rule
//!   matches; the Service's `fault` still applies to them unless the rule's policy has
//!   one). Two policies on the same target: the older wins (then `namespace/name`), as the
//!   Gateway API resolves conflicts; the other's status says `Conflicted` for that target.
//! - **Rate limit**: a token bucket per waypoint replica (local, as Envoy's local rate
//!   limit): `tokens` at most, `tokensPerFill` (default `tokens`) added every
//!   `fillInterval` (at least 50 ms, Envoy's floor). A Service's bucket is shared by all
//!   requests to that port; a rule's by all requests its matches take. Past it: 429 with
//!   `retry-after` (seconds until the next fill), response flag `RL`.
//! - **Fault**: each request is delayed with probability `delay.percentage` (0–100,
//!   decimals allowed) by `fixedDelay` (flag `DI`), then aborted with probability
//!   `abort.percentage` with `httpStatus` (200–599) or, as a gRPC status (`grpcStatus`,
//!   0–16) in a trailers-only response (flag `FI`).
//!
//! A policy that does not validate is not applied at all (status `Accepted: False`,
//! reason `Invalid`, naming the field); one whose targets do not exist is `TargetNotFound`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use trellis_proto::trellis::waypoint::v1 as pb;

use super::authz::{PolicyState, PolicyStatus};
use super::model::Model;
use super::routes::{parse_duration, proto_duration};

/// What starts a status reason naming a target that does not exist.
pub const TARGET_NOT_FOUND: &str = "target not found: ";

/// What starts a status reason naming a target another policy holds.
pub const CONFLICTED: &str = "conflicted: ";

/// A `LocalTrafficPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalTrafficPolicy {
    /// Object metadata.
    pub metadata: ObjectMeta,
    /// The policy.
    pub spec: LocalTrafficPolicySpec,
}

/// `spec:`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalTrafficPolicySpec {
    /// What it applies to.
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// A token bucket.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Delays and aborts.
    #[serde(default)]
    pub fault: Option<Fault>,
}

/// A `targetRefs` entry (Gateway API `LocalPolicyTargetReferenceWithSectionName`).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// API group (`""` for a Service).
    #[serde(default)]
    pub group: String,
    /// `Service`, `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
    /// Its name, in the policy's namespace.
    pub name: String,
    /// A Service port's name or a route rule's name.
    #[serde(default)]
    pub section_name: Option<String>,
}

/// `rateLimit`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// The bucket's size (it starts full).
    pub tokens: u32,
    /// Tokens added per fill (default: `tokens`).
    #[serde(default)]
    pub tokens_per_fill: Option<u32>,
    /// Time between fills (`1s`, `500ms`).
    pub fill_interval: String,
}

/// `fault`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// Delays.
    #[serde(default)]
    pub delay: Option<Delay>,
    /// Aborts.
    #[serde(default)]
    pub abort: Option<Abort>,
}

/// `fault.delay`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delay {
    /// How long.
    pub fixed_delay: String,
    /// Share of requests, percent.
    pub percentage: f64,
}

/// `fault.abort`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Abort {
    /// The HTTP status answered.
    #[serde(default)]
    pub http_status: Option<u32>,
    /// The gRPC status answered.
    #[serde(default)]
    pub grpc_status: Option<u32>,
    /// Share of requests, percent.
    pub percentage: f64,
}

/// What a valid policy gives the waypoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    /// The token bucket.
    pub rate_limit: Option<pb::LocalRateLimit>,
    /// Delays and aborts.
    pub fault: Option<pb::FaultInjection>,
}

impl LocalTrafficPolicy {
    /// The policy as the waypoint applies it, or every reason it is invalid (each naming
    /// the field).
    pub fn compile(&self) -> Result<Compiled, Vec<String>> {
        let mut errors = Vec::new();
        let spec = &self.spec;
        if spec.target_refs.is_empty() {
            errors.push("spec.targetRefs: at least one target is required".to_string());
        }
        for (i, t) in spec.target_refs.iter().enumerate() {
            let known = matches!(
                (t.group.as_str(), t.kind.as_str()),
                ("" | "core", "Service") | ("gateway.networking.k8s.io", "HTTPRoute" | "GRPCRoute")
            );
            if !known {
                errors.push(format!(
                    "spec.targetRefs[{i}]: {}/{} is not a target (a core Service, or a gateway.networking.k8s.io HTTPRoute or GRPCRoute)",
                    if t.group.is_empty() { "core" } else { &t.group },
                    t.kind
                ));
            }
        }
        if spec.rate_limit.is_none() && spec.fault.is_none() {
            errors.push("spec: sets neither rateLimit nor fault".to_string());
        }
        let percent = |field: &str, p: f64, errors: &mut Vec<String>| {
            if !(0.0..=100.0).contains(&p) {
                errors.push(format!("{field}: {p} is not a percentage (0 to 100)"));
            }
        };
        let rate_limit = spec.rate_limit.as_ref().and_then(|r| {
            let mut ok = true;
            if r.tokens == 0 {
                errors.push("spec.rateLimit.tokens: must be at least 1".to_string());
                ok = false;
            }
            if r.tokens_per_fill == Some(0) {
                errors.push("spec.rateLimit.tokensPerFill: must be at least 1".to_string());
                ok = false;
            }
            let interval = parse_duration(&r.fill_interval);
            match interval {
                None => {
                    errors.push(format!(
                        "spec.rateLimit.fillInterval: {:?} is not a duration (e.g. 1s, 500ms)",
                        r.fill_interval
                    ));
                    ok = false;
                }
                Some(d) if d < std::time::Duration::from_millis(50) => {
                    errors.push(format!(
                        "spec.rateLimit.fillInterval: {:?} is shorter than 50ms",
                        r.fill_interval
                    ));
                    ok = false;
                }
                Some(_) => {}
            }
            ok.then(|| pb::LocalRateLimit {
                max_tokens: r.tokens,
                tokens_per_fill: r.tokens_per_fill.unwrap_or(r.tokens),
                fill_interval: interval.map(proto_duration),
                status_code: 429,
                response_headers: Vec::new(),
            })
        });
        let fault = spec.fault.as_ref().and_then(|f| {
            let before = errors.len();
            if f.delay.is_none() && f.abort.is_none() {
                errors.push("spec.fault: sets neither delay nor abort".to_string());
            }
            let delay = f.delay.as_ref().and_then(|d| {
                percent("spec.fault.delay.percentage", d.percentage, &mut errors);
                let fixed = parse_duration(&d.fixed_delay);
                if fixed.is_none() {
                    errors.push(format!(
                        "spec.fault.delay.fixedDelay: {:?} is not a duration (e.g. 1s, 500ms)",
                        d.fixed_delay
                    ));
                }
                Some(pb::fault_injection::Delay {
                    fixed_delay: Some(proto_duration(fixed?)),
                    percent: d.percentage,
                })
            });
            let abort = f.abort.as_ref().and_then(|a| {
                use pb::fault_injection::abort::Error;
                percent("spec.fault.abort.percentage", a.percentage, &mut errors);
                let error = match (a.http_status, a.grpc_status) {
                    (Some(s), None) if (200..=599).contains(&s) => Some(Error::HttpStatus(s)),
                    (Some(s), None) => {
                        errors.push(format!(
                            "spec.fault.abort.httpStatus: {s} is not an HTTP status (200 to 599)"
                        ));
                        None
                    }
                    (None, Some(s)) if s <= 16 => Some(Error::GrpcStatus(s)),
                    (None, Some(s)) => {
                        errors.push(format!(
                            "spec.fault.abort.grpcStatus: {s} is not a gRPC status (0 to 16)"
                        ));
                        None
                    }
                    _ => {
                        errors.push(
                            "spec.fault.abort: set exactly one of httpStatus and grpcStatus"
                                .to_string(),
                        );
                        None
                    }
                };
                Some(pb::fault_injection::Abort {
                    error: Some(error?),
                    percent: a.percentage,
                })
            });
            (errors.len() == before).then_some(pb::FaultInjection { delay, abort })
        });
        if errors.is_empty() {
            Ok(Compiled { rate_limit, fault })
        } else {
            Err(errors)
        }
    }
}

/// What a target is, resolved in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// A Service's port (`None`: every port).
    Service(&'a str, Option<&'a str>),
    /// A route's rule (`None`: every rule), of kind `HTTPRoute` or `GRPCRoute`.
    Rule(&'a str, &'a str, Option<&'a str>),
}

impl TargetRef {
    fn target(&self) -> Option<Target<'_>> {
        match (self.group.as_str(), self.kind.as_str()) {
            ("" | "core", "Service") => {
                Some(Target::Service(&self.name, self.section_name.as_deref()))
            }
            ("gateway.networking.k8s.io", k @ ("HTTPRoute" | "GRPCRoute")) => {
                Some(Target::Rule(k, &self.name, self.section_name.as_deref()))
            }
            _ => None,
        }
    }
}

/// The valid policies of namespace `ns` in precedence order (oldest first, then name),
/// each with what it compiles to.
fn valid_in<'m>(model: &'m Model, ns: &str) -> Vec<(&'m str, &'m LocalTrafficPolicy, Compiled)> {
    let mut out: Vec<_> = model
        .local_traffic_policies()
        .filter(|((pns, _), _)| pns == ns)
        .filter_map(|((_, name), p)| Some((name.as_str(), p, p.compile().ok()?)))
        .collect();
    out.sort_by(|a, b| {
        let age = |p: &LocalTrafficPolicy| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (age(a.1).is_none(), age(a.1), a.0).cmp(&(age(b.1).is_none(), age(b.1), b.0))
    });
    out
}

/// The policy (by precedence) that `matches` one of its targets, in namespace `ns`.
fn first_for(model: &Model, ns: &str, matches: impl Fn(&Target<'_>) -> bool) -> Option<Compiled> {
    valid_in(model, ns).into_iter().find_map(|(_, p, c)| {
        p.spec
            .target_refs
            .iter()
            .filter_map(TargetRef::target)
            .any(|t| matches(&t))
            .then_some(c)
    })
}

/// The policy of Service `ns/name`'s port `port` (named `port_name`), if any.
pub fn for_service(model: &Model, ns: &str, name: &str, port_name: Option<&str>) -> Compiled {
    first_for(model, ns, |t| match t {
        Target::Service(n, section) => *n == name && section.is_none_or(|s| Some(s) == port_name),
        Target::Rule(..) => false,
    })
    .unwrap_or_default()
}

/// The policy of rule `rule_name` of route `kind` `ns/route`, if any.
pub fn for_rule(
    model: &Model,
    kind: &str,
    ns: &str,
    route: &str,
    rule_name: Option<&str>,
) -> Compiled {
    first_for(model, ns, |t| match t {
        Target::Rule(k, n, section) => {
            *k == kind && *n == route && section.is_none_or(|s| Some(s) == rule_name)
        }
        Target::Service(..) => false,
    })
    .unwrap_or_default()
}

/// The status of policy `ns/name`: `Invalid` with the reasons; per target, whether it
/// exists (`TargetNotFound`) and whether an older policy holds it (`Conflicted`).
pub fn status(model: &Model, ns: &str, name: &str, policy: &LocalTrafficPolicy) -> PolicyStatus {
    if let Err(reasons) = policy.compile() {
        return PolicyStatus {
            state: PolicyState::Rejected,
            reasons,
            waypoint: false,
        };
    }
    let ahead: Vec<&LocalTrafficPolicy> = valid_in(model, ns)
        .into_iter()
        .take_while(|(n, _, _)| *n != name)
        .map(|(_, p, _)| p)
        .collect();
    let mut missing = Vec::new();
    let mut conflicted = Vec::new();
    let mut in_effect = 0;
    for (i, t) in policy.spec.target_refs.iter().enumerate() {
        let Some(target) = t.target() else { continue };
        let found = match &target {
            Target::Service(svc, section) => model.service_objects().any(|((sns, sname), s)| {
                sns == ns
                    && sname == svc
                    && section.is_none_or(|sec| {
                        s.spec
                            .as_ref()
                            .and_then(|s| s.ports.as_ref())
                            .is_some_and(|ps| ps.iter().any(|p| p.name.as_deref() == Some(sec)))
                    })
            }),
            Target::Rule(kind, route, section) => {
                let names: Option<Vec<Option<&str>>> = if *kind == "HTTPRoute" {
                    model
                        .http_routes()
                        .find(|((rns, rn), _)| rns == ns && rn == route)
                        .map(|(_, r)| r.spec.rules.iter().map(|r| r.name.as_deref()).collect())
                } else {
                    model
                        .grpc_routes()
                        .find(|((rns, rn), _)| rns == ns && rn == route)
                        .map(|(_, r)| r.spec.rules.iter().map(|r| r.name.as_deref()).collect())
                };
                names.is_some_and(|ns| section.is_none_or(|s| ns.contains(&Some(s))))
            }
        };
        let at = format!(
            "spec.targetRefs[{i}] ({} {}{})",
            t.kind,
            t.name,
            t.section_name
                .as_deref()
                .map(|s| format!(" section {s}"))
                .unwrap_or_default()
        );
        if !found {
            missing.push(format!("{TARGET_NOT_FOUND}{at} does not exist"));
            continue;
        }
        // The same target, or one covering it, held by an older policy.
        let covers = |a: &TargetRef| {
            a.group == t.group
                && a.kind == t.kind
                && a.name == t.name
                && (a.section_name.is_none() || a.section_name == t.section_name)
        };
        if let Some(older) = ahead.iter().find(|p| p.spec.target_refs.iter().any(covers)) {
            conflicted.push(format!(
                "{CONFLICTED}{at} is held by the older policy {}",
                older.metadata.name.as_deref().unwrap_or_default()
            ));
            continue;
        }
        in_effect += 1;
    }
    let notes: Vec<String> = missing.iter().chain(&conflicted).cloned().collect();
    let state = match (in_effect, notes.is_empty()) {
        (_, true) => PolicyState::Accepted,
        (0, false) => PolicyState::Rejected,
        (_, false) => PolicyState::AcceptedWithWarnings,
    };
    PolicyStatus {
        state,
        reasons: notes,
        waypoint: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> LocalTrafficPolicy {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn a_valid_policy_compiles_with_envoy_defaults() {
        let p = policy(
            r#"
metadata: {name: p, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: web}]
  rateLimit: {tokens: 10, fillInterval: 2s}
  fault:
    delay: {fixedDelay: 30ms, percentage: 12.5}
    abort: {grpcStatus: 14, percentage: 1}
"#,
        );
        let c = p.compile().unwrap();
        let r = c.rate_limit.unwrap();
        assert_eq!(
            (r.max_tokens, r.tokens_per_fill, r.status_code),
            (10, 10, 429)
        );
        assert_eq!(r.fill_interval.unwrap().seconds, 2);
        let f = c.fault.unwrap();
        assert_eq!(f.delay.unwrap().percent, 12.5);
        assert_eq!(
            f.abort.unwrap().error,
            Some(pb::fault_injection::abort::Error::GrpcStatus(14))
        );
    }

    #[test]
    fn the_example_loads_without_warnings_and_compiles() {
        let docs = super::super::load::parse_file(
            std::path::Path::new("examples/local-traffic-policy.yaml"),
            include_str!("../../../examples/local-traffic-policy.yaml"),
        );
        assert_eq!(docs.len(), 2);
        for d in docs {
            match d {
                super::super::load::Document::Loaded(l) => {
                    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
                    let super::super::load::Object::LocalTrafficPolicy(p) = l.object else {
                        panic!("not a LocalTrafficPolicy");
                    };
                    p.compile().unwrap();
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn invalid_fields_are_each_named() {
        let p = policy(
            r#"
metadata: {name: p, namespace: shop}
spec:
  targetRefs: [{group: apps, kind: Deployment, name: web}]
  rateLimit: {tokens: 0, fillInterval: 10ms}
  fault:
    delay: {fixedDelay: soon, percentage: 120}
    abort: {httpStatus: 700, percentage: 5}
"#,
        );
        let errors = p.compile().unwrap_err().join("\n");
        for field in [
            "spec.targetRefs[0]: apps/Deployment",
            "spec.rateLimit.tokens",
            "spec.rateLimit.fillInterval: \"10ms\" is shorter than 50ms",
            "spec.fault.delay.percentage: 120",
            "spec.fault.delay.fixedDelay: \"soon\"",
            "spec.fault.abort.httpStatus: 700",
        ] {
            assert!(errors.contains(field), "{field} missing from:\n{errors}");
        }
        let both = policy(
            r#"
metadata: {name: p, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: web}]
  fault: {abort: {httpStatus: 503, grpcStatus: 14, percentage: 5}}
"#,
        );
        assert!(
            both.compile().unwrap_err()[0].contains("exactly one of httpStatus and grpcStatus")
        );
        let empty = policy("metadata: {name: p}\nspec: {}\n");
        let errors = empty.compile().unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
    }
}
