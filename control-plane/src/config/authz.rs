//! `AuthorizationPolicy` → ztunnel's L4 `istio.security.Authorization`, with Istio
//! ambient's semantics (docs/policy.md):
//!
//! - Scope: the root namespace without a selector is global; a selector makes it a
//!   workload-selector policy; otherwise the policy's namespace.
//! - ztunnel sees connections, not requests. A rule using L7 attributes (methods, paths,
//!   hosts, request principals, remote IPs, request conditions) is **dropped from an ALLOW
//!   policy** (a partial rule would allow more than written) and **stripped of those
//!   attributes in a DENY policy** (what remains denies at least what was written). Either
//!   way the policy is accepted with a warning that says so and recommends a waypoint.
//! - AUDIT and CUSTOM policies, and policies attached by `targetRef(s)`, are for waypoints:
//!   ztunnel gets nothing, and the status says why.
//! - Malformed values (a CIDR, a port) reject the whole policy: a policy is never enforced
//!   partly because of a typo.

use std::net::IpAddr;

use trellis_proto::istio::security::{
    self as pb, Authorization, Clause, Match, ServiceAccountMatch, StringMatch,
    string_match::MatchType,
};

use super::istio::{Action, AuthorizationPolicy, Operation, Source};

/// How a policy was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyState {
    /// In effect as written.
    Accepted,
    /// In effect, with caveats in the reasons.
    AcceptedWithWarnings,
    /// Not in effect; the reasons say why.
    Rejected,
}

/// The status of a policy, shown by `trellisctl` and later in the Kubernetes status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStatus {
    /// The outcome.
    pub state: PolicyState,
    /// Warnings or rejection reasons, each naming the field.
    pub reasons: Vec<String>,
    /// Attached to waypoints (`targetRefs`): the waypoints enforce it, and its condition
    /// is Istio's `WaypointAccepted` rather than `ZtunnelAccepted`.
    pub waypoint: bool,
}

/// The result of translating one policy for ztunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct ZtunnelPolicy {
    /// What ztunnel enforces (none when the policy is not for ztunnel or rejected).
    pub authorization: Option<Authorization>,
    /// The policy's status.
    pub status: PolicyStatus,
}

const WAYPOINT_HINT: &str = "deploy a waypoint for the destination to enforce L7 rules";

/// Translates `policy` for ztunnel; `root_namespace` is the mesh's root (`istio-system`).
pub fn for_ztunnel(policy: &AuthorizationPolicy, root_namespace: &str) -> ZtunnelPolicy {
    let namespace = policy
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = policy.metadata.name.clone().unwrap_or_default();
    let spec = &policy.spec;
    let mut warnings = Vec::new();
    let has_targets = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    if has_targets && spec.selector.is_some() {
        return rejected(vec![
            "spec: selector and targetRef(s) cannot both be set".into(),
        ]);
    }
    if has_targets {
        return not_for_ztunnel(
            "spec.targetRefs: the policy is attached to a waypoint or gateway, not to ztunnel",
        );
    }
    let action = match spec.action {
        Action::Allow => pb::Action::Allow,
        Action::Deny => pb::Action::Deny,
        Action::Audit | Action::Custom => {
            return not_for_ztunnel(
                "spec.action: AUDIT and CUSTOM policies are enforced only by waypoints; ztunnel ignores this policy",
            );
        }
    };
    if spec.action == Action::Allow && spec.provider.is_some() {
        warnings.push("spec.provider: only used by CUSTOM policies; ignored".to_string());
    }
    let scope = match (&spec.selector, namespace == root_namespace) {
        (Some(_), _) => pb::Scope::WorkloadSelector,
        (None, true) => pb::Scope::Global,
        (None, false) => pb::Scope::Namespace,
    };

    let mut rules = Vec::new();
    let mut errors = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let l7 = l7_attributes(
            &rule.from.iter().map(|f| &f.source).collect::<Vec<_>>(),
            &rule.to.iter().map(|t| &t.operation).collect::<Vec<_>>(),
            rule.when.iter().map(|c| c.key.as_str()),
        );
        if !l7.is_empty() && action == pb::Action::Allow {
            warnings.push(format!(
                "{at}: uses L7 attributes ({}) that ztunnel cannot see; the rule is dropped from this ALLOW policy, so at L4 it allows nothing; {WAYPOINT_HINT}",
                l7.join(", ")
            ));
            continue;
        }
        if !l7.is_empty() {
            warnings.push(format!(
                "{at}: L7 attributes ({}) are removed for ztunnel, which enforces the rest of the rule; at L4 this DENY applies to all such connections, not only the L7 requests named; {WAYPOINT_HINT}",
                l7.join(", ")
            ));
        }
        let mut clauses = Vec::new();
        if !rule.from.is_empty() {
            let matches = rule
                .from
                .iter()
                .enumerate()
                .map(|(j, f)| {
                    source_match(&f.source, &format!("{at}.from[{j}].source"), &mut errors)
                })
                .collect();
            clauses.push(Clause { matches });
        }
        if !rule.to.is_empty() {
            let matches = rule
                .to
                .iter()
                .enumerate()
                .map(|(j, t)| {
                    operation_match(
                        &t.operation,
                        &format!("{at}.to[{j}].operation"),
                        &mut errors,
                    )
                })
                .collect();
            clauses.push(Clause { matches });
        }
        for (j, cond) in rule.when.iter().enumerate() {
            if let Some(m) = condition_match(cond, &format!("{at}.when[{j}]"), &mut errors) {
                clauses.push(Clause { matches: vec![m] });
            }
        }
        // A clause holding an empty match is always true (its matches are OR-ed): leave it
        // out, so a stripped DENY rule reads as what it enforces.
        clauses.retain(|c| !c.matches.iter().any(|m| *m == Match::default()));
        rules.push(pb::Rule { clauses });
    }
    if !errors.is_empty() {
        return rejected(errors);
    }
    if action == pb::Action::Allow && rules.is_empty() && !spec.rules.is_empty() {
        warnings.push(
            "spec.rules: no rule is left for ztunnel, so this ALLOW policy denies every connection to the workloads it selects".into(),
        );
    }
    ZtunnelPolicy {
        authorization: Some(Authorization {
            name,
            namespace,
            scope: scope as i32,
            action: action as i32,
            rules,
            dry_run: false,
        }),
        status: PolicyStatus {
            state: if warnings.is_empty() {
                PolicyState::Accepted
            } else {
                PolicyState::AcceptedWithWarnings
            },
            reasons: warnings,
            waypoint: false,
        },
    }
}

fn rejected(reasons: Vec<String>) -> ZtunnelPolicy {
    ZtunnelPolicy {
        authorization: None,
        status: PolicyStatus {
            state: PolicyState::Rejected,
            reasons,
            waypoint: false,
        },
    }
}

fn not_for_ztunnel(reason: &str) -> ZtunnelPolicy {
    ZtunnelPolicy {
        authorization: None,
        status: PolicyStatus {
            state: PolicyState::AcceptedWithWarnings,
            reasons: vec![reason.to_string()],
            waypoint: false,
        },
    }
}

/// Adds to `statuses` what the loader refused (`errors`): a security policy whose latest
/// version did not load keeps its previous version's status, with the reason and never
/// plainly accepted; one that never loaded is rejected with the reason.
pub fn with_load_errors(
    statuses: &mut std::collections::BTreeMap<super::load::ObjectRef, PolicyStatus>,
    errors: &[super::load::ConfigError],
) {
    for e in errors {
        let Some(id) = &e.id else { continue };
        if !matches!(
            id.kind.as_str(),
            "AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication"
        ) {
            continue;
        }
        let reason = format!("{}: {} ({})", e.field, e.reason, e.file);
        match statuses.get_mut(id) {
            Some(status) => {
                status.reasons.push(format!(
                    "the latest version was rejected, the previous one stays in effect: {reason}"
                ));
                if status.state == PolicyState::Accepted {
                    status.state = PolicyState::AcceptedWithWarnings;
                }
            }
            None => {
                statuses.insert(
                    id.clone(),
                    PolicyStatus {
                        state: PolicyState::Rejected,
                        reasons: vec![reason],
                        waypoint: false,
                    },
                );
            }
        }
    }
}

/// Condition keys ztunnel can evaluate.
const L4_CONDITIONS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

fn l7_attributes<'a>(
    sources: &[&Source],
    ops: &[&Operation],
    conditions: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    let mut found = Vec::new();
    let mut note = |present: bool, name: &str| {
        if present && !found.iter().any(|f| f == name) {
            found.push(name.to_string());
        }
    };
    for s in sources {
        note(!s.request_principals.is_empty(), "requestPrincipals");
        note(!s.not_request_principals.is_empty(), "notRequestPrincipals");
        note(!s.remote_ip_blocks.is_empty(), "remoteIpBlocks");
        note(!s.not_remote_ip_blocks.is_empty(), "notRemoteIpBlocks");
    }
    for o in ops {
        note(!o.hosts.is_empty(), "hosts");
        note(!o.not_hosts.is_empty(), "notHosts");
        note(!o.methods.is_empty(), "methods");
        note(!o.not_methods.is_empty(), "notMethods");
        note(!o.paths.is_empty(), "paths");
        note(!o.not_paths.is_empty(), "notPaths");
    }
    for key in conditions {
        if !L4_CONDITIONS.contains(&key) {
            note(true, &format!("when {key}"));
        }
    }
    found
}

/// Istio's string matching: `*` any non-empty value, `*x` suffix, `x*` prefix, else exact.
fn string_match(v: &str) -> StringMatch {
    let match_type = if v == "*" {
        MatchType::Presence(())
    } else if let Some(rest) = v.strip_prefix('*') {
        MatchType::Suffix(rest.to_string())
    } else if let Some(rest) = v.strip_suffix('*') {
        MatchType::Prefix(rest.to_string())
    } else {
        MatchType::Exact(v.to_string())
    };
    StringMatch {
        match_type: Some(match_type),
    }
}

fn strings(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|v| string_match(v)).collect()
}

fn cidrs(values: &[String], at: &str, errors: &mut Vec<String>) -> Vec<pb::Address> {
    values
        .iter()
        .enumerate()
        .filter_map(|(k, v)| match cidr(v) {
            Some(a) => Some(a),
            None => {
                errors.push(format!("{at}[{k}]: {v:?} is not an IP address or CIDR"));
                None
            }
        })
        .collect()
}

fn cidr(v: &str) -> Option<pb::Address> {
    parse_cidr(v).map(|(address, length)| pb::Address { address, length })
}

/// An IP address or CIDR as (address bytes, prefix length); `None` when it is neither.
pub(super) fn parse_cidr(v: &str) -> Option<(Vec<u8>, u32)> {
    let (ip, len) = match v.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, Some(len.parse::<u32>().ok()?)),
        None => (v.parse::<IpAddr>().ok()?, None),
    };
    let (bytes, max) = match ip {
        IpAddr::V4(a) => (a.octets().to_vec(), 32),
        IpAddr::V6(a) => (a.octets().to_vec(), 128),
    };
    let length = len.unwrap_or(max);
    (length <= max).then_some((bytes, length))
}

fn ports(values: &[String], at: &str, errors: &mut Vec<String>) -> Vec<u32> {
    values
        .iter()
        .enumerate()
        .filter_map(|(k, v)| match v.parse::<u16>() {
            Ok(p) if p > 0 => Some(u32::from(p)),
            _ => {
                errors.push(format!("{at}[{k}]: {v:?} is not a port (1-65535)"));
                None
            }
        })
        .collect()
}

fn service_accounts(
    values: &[String],
    at: &str,
    errors: &mut Vec<String>,
) -> Vec<ServiceAccountMatch> {
    values
        .iter()
        .enumerate()
        .filter_map(|(k, v)| match v.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Some(ServiceAccountMatch {
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })
            }
            _ => {
                errors.push(format!(
                    "{at}[{k}]: {v:?} is not <namespace>/<service-account>"
                ));
                None
            }
        })
        .collect()
}

fn source_match(s: &Source, at: &str, errors: &mut Vec<String>) -> Match {
    Match {
        namespaces: strings(&s.namespaces),
        not_namespaces: strings(&s.not_namespaces),
        service_accounts: service_accounts(
            &s.service_accounts,
            &format!("{at}.serviceAccounts"),
            errors,
        ),
        not_service_accounts: service_accounts(
            &s.not_service_accounts,
            &format!("{at}.notServiceAccounts"),
            errors,
        ),
        principals: strings(&s.principals),
        not_principals: strings(&s.not_principals),
        source_ips: cidrs(&s.ip_blocks, &format!("{at}.ipBlocks"), errors),
        not_source_ips: cidrs(&s.not_ip_blocks, &format!("{at}.notIpBlocks"), errors),
        ..Default::default()
    }
}

fn operation_match(o: &Operation, at: &str, errors: &mut Vec<String>) -> Match {
    Match {
        destination_ports: ports(&o.ports, &format!("{at}.ports"), errors),
        not_destination_ports: ports(&o.not_ports, &format!("{at}.notPorts"), errors),
        ..Default::default()
    }
}

fn condition_match(
    c: &super::istio::Condition,
    at: &str,
    errors: &mut Vec<String>,
) -> Option<Match> {
    let (values, not_values) = (&c.values, &c.not_values);
    let m = match c.key.as_str() {
        "source.ip" => Match {
            source_ips: cidrs(values, &format!("{at}.values"), errors),
            not_source_ips: cidrs(not_values, &format!("{at}.notValues"), errors),
            ..Default::default()
        },
        "source.namespace" => Match {
            namespaces: strings(values),
            not_namespaces: strings(not_values),
            ..Default::default()
        },
        "source.principal" => Match {
            principals: strings(values),
            not_principals: strings(not_values),
            ..Default::default()
        },
        "destination.ip" => Match {
            destination_ips: cidrs(values, &format!("{at}.values"), errors),
            not_destination_ips: cidrs(not_values, &format!("{at}.notValues"), errors),
            ..Default::default()
        },
        "destination.port" => Match {
            destination_ports: ports(values, &format!("{at}.values"), errors),
            not_destination_ports: ports(not_values, &format!("{at}.notValues"), errors),
            ..Default::default()
        },
        // L7 conditions were reported (and stripped or the rule dropped) by the caller.
        _ => return None,
    };
    Some(m)
}

/// The status of a `PeerAuthentication`: accepted, with a warning for settings Istio
/// ignores (per-port modes without a selector).
pub fn peer_authentication_status(pa: &super::istio::PeerAuthentication) -> PolicyStatus {
    let mut reasons = Vec::new();
    if pa.spec.selector.is_none() && !pa.spec.port_level_mtls.is_empty() {
        reasons.push(
            "spec.portLevelMtls: applies only to a policy with a selector; ignored".to_string(),
        );
    }
    status_from(reasons)
}

/// The status of a `RequestAuthentication`: JWTs are checked by waypoints; a policy that
/// selects pods by label is not enforced in ambient mode (there is no sidecar), which the
/// status says, as Istio does.
pub fn request_authentication_status(ra: &super::istio::RequestAuthentication) -> PolicyStatus {
    let mut reasons = Vec::new();
    let has_targets = ra.spec.target_ref.is_some() || !ra.spec.target_refs.is_empty();
    if has_targets && ra.spec.selector.is_some() {
        return PolicyStatus {
            state: PolicyState::Rejected,
            reasons: vec!["spec: selector and targetRefs cannot both be set".into()],
            waypoint: false,
        };
    }
    if ra.spec.selector.is_some() {
        reasons.push(
            "spec.selector: JWTs are checked only by a waypoint serving the selected workloads (ztunnel does not inspect requests); without one the policy has no effect".to_string(),
        );
    }
    status_from(reasons)
}

fn status_from(reasons: Vec<String>) -> PolicyStatus {
    PolicyStatus {
        state: if reasons.is_empty() {
            PolicyState::Accepted
        } else {
            PolicyState::AcceptedWithWarnings
        },
        reasons,
        waypoint: false,
    }
}
