//! L4 authorization at the destination: Istio's evaluation of the `istio.security`
//! policies ztunnel receives.
//!
//! Order (Istio's): DENY policies first — one that matches denies; then, if no ALLOW
//! policy applies to the workload, the connection is allowed; if some apply, one of them
//! must match. Dry-run policies are evaluated and reported but never decide.
//!
//! Matching: a policy matches when any of its rules does; a rule when all its clauses do; a
//! clause when any of its matches does; a match when each field it sets holds — a positive
//! list when some entry matches the connection's value, a `not_` list when none does. A
//! value the connection does not have (no peer identity on a plaintext connection) matches
//! no positive entry and no negative one: `not_principals: [presence]` therefore matches
//! exactly the connections without an identity (the STRICT mTLS policy).

use std::net::IpAddr;

use trellis_proto::istio::security::{
    Action, Address, Authorization, Match, ServiceAccountMatch, StringMatch, string_match,
};

use crate::SpiffeId;

/// What is known about a connection when it is authorized.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The peer's identity (from its certificate); `None` for plaintext.
    pub source: Option<SpiffeId>,
    /// The peer's address.
    pub src_ip: IpAddr,
    /// The destination address.
    pub dst_ip: IpAddr,
    /// The destination port.
    pub dst_port: u16,
}

/// The outcome, with the policy that decided (for the log line and the metric).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// `namespace/name` of the deciding policy: the matching DENY, the matching ALLOW, or
    /// (denied because no ALLOW matched) `None`.
    pub policy: Option<String>,
    /// Why, in words.
    pub reason: String,
    /// Dry-run policies that matched (`namespace/name`, action), for the log.
    pub dry_run: Vec<(String, Action)>,
}

fn key(p: &Authorization) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// Decides `conn` against the policies that apply to the destination workload (from
/// `Store::policies_for`).
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    conn: &Conn,
) -> Decision {
    let policies: Vec<&Authorization> = policies.into_iter().collect();
    let mut dry_run = Vec::new();
    let action = |p: &Authorization| Action::try_from(p.action).unwrap_or(Action::Deny);
    for p in policies.iter().filter(|p| action(p) == Action::Deny) {
        if matches(p, conn) {
            if p.dry_run {
                dry_run.push((key(p), Action::Deny));
                continue;
            }
            return Decision {
                allowed: false,
                policy: Some(key(p)),
                reason: "matched a DENY policy".into(),
                dry_run,
            };
        }
    }
    let allows: Vec<&&Authorization> = policies
        .iter()
        .filter(|p| action(p) == Action::Allow)
        .collect();
    for p in allows.iter().filter(|p| p.dry_run) {
        if matches(p, conn) {
            dry_run.push((key(p), Action::Allow));
        }
    }
    let enforced: Vec<&&&Authorization> = allows.iter().filter(|p| !p.dry_run).collect();
    if enforced.is_empty() {
        return Decision {
            allowed: true,
            policy: None,
            reason: "no ALLOW policy applies".into(),
            dry_run,
        };
    }
    if let Some(p) = enforced.iter().find(|p| matches(p, conn)) {
        return Decision {
            allowed: true,
            policy: Some(key(p)),
            reason: "matched an ALLOW policy".into(),
            dry_run,
        };
    }
    Decision {
        allowed: false,
        policy: None,
        reason: format!(
            "no ALLOW policy matched (applicable: {})",
            enforced
                .iter()
                .map(|p| key(p))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        dry_run,
    }
}

fn matches(p: &Authorization, conn: &Conn) -> bool {
    p.rules.iter().any(|rule| {
        rule.clauses
            .iter()
            .all(|clause| clause.matches.iter().any(|m| match_holds(m, conn)))
    })
}

/// `positive` empty, or some entry matches; and no `negative` entry matches.
fn field<T>(positive: &[T], negative: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&hit)) && !negative.iter().any(&hit)
}

fn match_holds(m: &Match, conn: &Conn) -> bool {
    let principal = conn.source.as_ref().map(|id| {
        format!(
            "{}/ns/{}/sa/{}",
            id.trust_domain(),
            id.namespace(),
            id.service_account()
        )
    });
    let namespace = conn.source.as_ref().map(|id| id.namespace().to_string());
    let string = |s: &StringMatch, value: &Option<String>| string_matches(s, value.as_deref());
    field(&m.namespaces, &m.not_namespaces, |s| string(s, &namespace))
        && field(&m.principals, &m.not_principals, |s| string(s, &principal))
        && field(&m.service_accounts, &m.not_service_accounts, |sa| {
            sa_matches(sa, conn.source.as_ref())
        })
        && field(&m.source_ips, &m.not_source_ips, |a| {
            in_cidr(a, conn.src_ip)
        })
        && field(&m.destination_ips, &m.not_destination_ips, |a| {
            in_cidr(a, conn.dst_ip)
        })
        && field(&m.destination_ports, &m.not_destination_ports, |p| {
            *p == u32::from(conn.dst_port)
        })
}

fn string_matches(s: &StringMatch, value: Option<&str>) -> bool {
    let Some(v) = value else {
        return false;
    };
    match &s.match_type {
        Some(string_match::MatchType::Exact(e)) => v == e,
        Some(string_match::MatchType::Prefix(p)) => v.starts_with(p.as_str()),
        Some(string_match::MatchType::Suffix(x)) => v.ends_with(x.as_str()),
        Some(string_match::MatchType::Presence(())) => !v.is_empty(),
        // An entry with no match type matches nothing (fail closed for ALLOW, and a DENY
        // with only such entries in a `not_` list still denies everything else).
        None => false,
    }
}

fn sa_matches(sa: &ServiceAccountMatch, source: Option<&SpiffeId>) -> bool {
    source.is_some_and(|id| {
        id.namespace() == sa.namespace && id.service_account() == sa.service_account
    })
}

fn in_cidr(a: &Address, ip: IpAddr) -> bool {
    let bits = a.length;
    match (ip, a.address.len()) {
        (IpAddr::V4(v4), 4) if bits <= 32 => {
            let want = u32::from_be_bytes([a.address[0], a.address[1], a.address[2], a.address[3]]);
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(v4) & mask == want & mask
        }
        (IpAddr::V6(v6), 16) if bits <= 128 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&a.address);
            let want = u128::from_be_bytes(b);
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(v6) & mask == want & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::istio::security::{Clause, Rule, Scope};

    fn conn(source: Option<&str>, src: &str, port: u16) -> Conn {
        Conn {
            source: source.map(|s| s.parse().unwrap()),
            src_ip: src.parse().unwrap(),
            dst_ip: "10.244.2.5".parse().unwrap(),
            dst_port: port,
        }
    }

    fn policy(name: &str, action: Action, matches: Vec<Match>) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: "shop".into(),
            scope: Scope::Namespace as i32,
            action: action as i32,
            rules: vec![Rule {
                clauses: vec![Clause { matches }],
            }],
            dry_run: false,
        }
    }

    fn exact(s: &str) -> StringMatch {
        StringMatch {
            match_type: Some(string_match::MatchType::Exact(s.into())),
        }
    }

    const DEV: &str = "spiffe://cluster.local/ns/dev/sa/tool";
    const FRONT: &str = "spiffe://cluster.local/ns/shop/sa/front";

    #[test]
    fn deny_first_then_allow_else_default_allow() {
        let deny_dev = policy(
            "deny-dev",
            Action::Deny,
            vec![Match {
                namespaces: vec![exact("dev")],
                ..Default::default()
            }],
        );
        let d = evaluate([&deny_dev], &conn(Some(DEV), "10.244.1.2", 80));
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("shop/deny-dev"));
        // No ALLOW policy: everything else is allowed.
        assert!(evaluate([&deny_dev], &conn(Some(FRONT), "10.244.1.3", 80)).allowed);

        let allow_front = policy(
            "allow-front",
            Action::Allow,
            vec![Match {
                principals: vec![exact("cluster.local/ns/shop/sa/front")],
                destination_ports: vec![8080],
                ..Default::default()
            }],
        );
        let both = [&deny_dev, &allow_front];
        let ok = evaluate(both, &conn(Some(FRONT), "10.244.1.3", 8080));
        assert!(ok.allowed);
        assert_eq!(ok.policy.as_deref(), Some("shop/allow-front"));
        let wrong_port = evaluate(both, &conn(Some(FRONT), "10.244.1.3", 9090));
        assert!(!wrong_port.allowed, "an ALLOW applies but does not match");
        assert!(
            wrong_port.reason.contains("allow-front"),
            "{}",
            wrong_port.reason
        );
        assert!(
            !evaluate(both, &conn(None, "10.244.1.3", 8080)).allowed,
            "plaintext has no principal"
        );
    }

    #[test]
    fn strict_mtls_denies_exactly_the_connections_without_identity() {
        let strict = policy(
            "istio_converted_static_strict",
            Action::Deny,
            vec![Match {
                not_principals: vec![StringMatch {
                    match_type: Some(string_match::MatchType::Presence(())),
                }],
                ..Default::default()
            }],
        );
        assert!(!evaluate([&strict], &conn(None, "10.244.1.2", 80)).allowed);
        assert!(evaluate([&strict], &conn(Some(FRONT), "10.244.1.2", 80)).allowed);
    }

    #[test]
    fn cidrs_service_accounts_negations_prefixes_and_dry_run() {
        let p = policy(
            "mixed",
            Action::Allow,
            vec![Match {
                source_ips: vec![Address {
                    address: vec![10, 244, 1, 0],
                    length: 24,
                }],
                not_source_ips: vec![Address {
                    address: vec![10, 244, 1, 66],
                    length: 32,
                }],
                service_accounts: vec![ServiceAccountMatch {
                    namespace: "shop".into(),
                    service_account: "front".into(),
                }],
                not_destination_ports: vec![22],
                ..Default::default()
            }],
        );
        assert!(evaluate([&p], &conn(Some(FRONT), "10.244.1.2", 80)).allowed);
        assert!(
            !evaluate([&p], &conn(Some(FRONT), "10.244.1.66", 80)).allowed,
            "not_source_ips"
        );
        assert!(
            !evaluate([&p], &conn(Some(FRONT), "10.244.2.2", 80)).allowed,
            "outside the CIDR"
        );
        assert!(
            !evaluate([&p], &conn(Some(DEV), "10.244.1.2", 80)).allowed,
            "other service account"
        );
        assert!(
            !evaluate([&p], &conn(Some(FRONT), "10.244.1.2", 22)).allowed,
            "not_destination_ports"
        );

        let prefix = policy(
            "prefix",
            Action::Deny,
            vec![Match {
                principals: vec![StringMatch {
                    match_type: Some(string_match::MatchType::Prefix(
                        "cluster.local/ns/dev/".into(),
                    )),
                }],
                ..Default::default()
            }],
        );
        assert!(!evaluate([&prefix], &conn(Some(DEV), "10.244.1.2", 80)).allowed);

        let mut dry = prefix.clone();
        dry.dry_run = true;
        let d = evaluate([&dry], &conn(Some(DEV), "10.244.1.2", 80));
        assert!(d.allowed, "a dry-run DENY never denies");
        assert_eq!(d.dry_run, [("shop/prefix".to_string(), Action::Deny)]);
    }

    #[test]
    fn an_allow_without_rules_allows_nothing_and_rules_need_every_clause() {
        let mut empty = policy("empty", Action::Allow, vec![]);
        empty.rules.clear();
        assert!(!evaluate([&empty], &conn(Some(FRONT), "10.244.1.2", 80)).allowed);

        let mut two = policy(
            "two-clauses",
            Action::Allow,
            vec![Match {
                namespaces: vec![exact("shop")],
                ..Default::default()
            }],
        );
        two.rules[0].clauses.push(Clause {
            matches: vec![Match {
                destination_ports: vec![80],
                ..Default::default()
            }],
        });
        assert!(evaluate([&two], &conn(Some(FRONT), "10.244.1.2", 80)).allowed);
        assert!(!evaluate([&two], &conn(Some(FRONT), "10.244.1.2", 81)).allowed);
    }
}
