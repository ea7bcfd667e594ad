//! AuthorizationPolicy → ztunnel Authorization, with Istio ambient's semantics, starting
//! from the seed articles' DENY example as written.

use std::path::Path;

use trellis_control_plane::config::authz::{PolicyState, ZtunnelPolicy, for_ztunnel};
use trellis_control_plane::config::load::{Document, Object, parse_file};
use trellis_proto::istio::security::{
    Action, Clause, Match, Rule, Scope, StringMatch, string_match::MatchType,
};

const SEED: &str = include_str!("../../examples/seed-policies.yaml");

fn translate(yaml: &str) -> ZtunnelPolicy {
    let docs = parse_file(Path::new("test.yaml"), yaml);
    let policy = docs
        .iter()
        .find_map(|d| match d {
            Document::Loaded(l) => match &l.object {
                Object::AuthorizationPolicy(p) => Some(p.clone()),
                _ => None,
            },
            other => panic!("{other:?}"),
        })
        .expect("an AuthorizationPolicy");
    for_ztunnel(&policy, "istio-system")
}

fn exact(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Exact(s.into())),
    }
}

#[test]
fn the_seed_deny_policy_denies_everything_from_dev_at_l4() {
    let docs = parse_file(Path::new("seed-policies.yaml"), SEED);
    let policy = docs
        .iter()
        .find_map(|d| match d {
            Document::Loaded(l) => match &l.object {
                Object::AuthorizationPolicy(p) => Some(p.clone()),
                _ => None,
            },
            _ => None,
        })
        .unwrap();
    let t = for_ztunnel(&policy, "istio-system");
    let authz = t.authorization.expect("enforced by ztunnel");
    assert_eq!(authz.name, "httpbin");
    assert_eq!(authz.namespace, "foo");
    assert_eq!(authz.scope, Scope::Namespace as i32);
    assert_eq!(authz.action, Action::Deny as i32);
    // The POST method is invisible at L4: what is left denies all traffic from dev.
    assert_eq!(
        authz.rules,
        vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    namespaces: vec![exact("dev")],
                    ..Default::default()
                }],
            }],
        }]
    );
    assert_eq!(t.status.state, PolicyState::AcceptedWithWarnings);
    assert_eq!(t.status.reasons.len(), 1, "{:?}", t.status.reasons);
    let w = &t.status.reasons[0];
    assert!(
        w.starts_with("spec.rules[0]: L7 attributes (methods) are removed"),
        "{w}"
    );
    assert!(w.contains("waypoint"), "{w}");
}

#[test]
fn an_allow_rule_with_l7_attributes_is_dropped() {
    let t = translate(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-some, namespace: shop}
spec:
  rules:
  - to: [{operation: {ports: ["8080"]}}]
  - from: [{source: {namespaces: [web]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
"#,
    );
    let authz = t.authorization.unwrap();
    assert_eq!(authz.action, Action::Allow as i32);
    assert_eq!(authz.rules.len(), 1, "only the L4 rule remains");
    assert_eq!(
        authz.rules[0].clauses[0].matches[0].destination_ports,
        vec![8080]
    );
    assert!(t.status.reasons[0].starts_with("spec.rules[1]: uses L7 attributes (methods, paths)"));

    // When nothing is left, the ALLOW policy allows nothing: it denies all, and says so.
    let t = translate(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-l7, namespace: shop}
spec:
  rules:
  - to: [{operation: {methods: [GET]}}]
"#,
    );
    assert!(t.authorization.unwrap().rules.is_empty());
    assert!(
        t.status
            .reasons
            .iter()
            .any(|r| r.contains("denies every connection")),
        "{:?}",
        t.status.reasons
    );
}

#[test]
fn scope_follows_namespace_and_selector() {
    let yaml = |ns: &str, selector: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: {ns}}}\nspec:\n  {selector}\n  action: DENY\n  rules: [{{}}]\n"
        )
    };
    let scope = |ns, sel| translate(&yaml(ns, sel)).authorization.unwrap().scope;
    assert_eq!(scope("istio-system", ""), Scope::Global as i32);
    assert_eq!(scope("shop", ""), Scope::Namespace as i32);
    assert_eq!(
        scope("shop", "selector: {matchLabels: {app: cart}}"),
        Scope::WorkloadSelector as i32
    );
}

#[test]
fn waypoint_only_policies_are_not_sent_to_ztunnel_and_say_why() {
    for (spec, why) in [
        ("action: AUDIT", "AUDIT and CUSTOM"),
        (
            "action: CUSTOM\n  provider: {name: ext-authz}",
            "AUDIT and CUSTOM",
        ),
        (
            "targetRefs: [{kind: Service, group: \"\", name: cart}]",
            "attached to a waypoint",
        ),
    ] {
        let t = translate(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  {spec}\n"
        ));
        assert!(t.authorization.is_none(), "{spec}");
        assert_eq!(t.status.state, PolicyState::AcceptedWithWarnings);
        assert!(t.status.reasons[0].contains(why), "{:?}", t.status.reasons);
    }
}

#[test]
fn malformed_values_reject_the_whole_policy_naming_the_field() {
    let t = translate(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: ["10.0.0.0/8", "10.0.0.0/33"]}}]
    to: [{operation: {ports: ["http"]}}]
"#,
    );
    assert!(t.authorization.is_none(), "never enforced partly");
    assert_eq!(t.status.state, PolicyState::Rejected);
    assert_eq!(
        t.status.reasons,
        [
            "spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0.0/33\" is not an IP address or CIDR",
            "spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port (1-65535)",
        ]
    );
}

#[test]
fn principals_wildcards_conditions_and_negations_translate() {
    let t = translate(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/web/*", "*"]
        notPrincipals: ["*/sa/legacy"]
        serviceAccounts: ["web/frontend"]
    when:
    - key: source.ip
      notValues: ["192.168.0.0/16"]
    - key: destination.port
      values: ["443"]
"#,
    );
    let rule = &t.authorization.unwrap().rules[0];
    let from = &rule.clauses[0].matches[0];
    assert_eq!(
        from.principals,
        vec![
            StringMatch {
                match_type: Some(MatchType::Prefix("cluster.local/ns/web/".into()))
            },
            StringMatch {
                match_type: Some(MatchType::Presence(()))
            },
        ]
    );
    assert_eq!(
        from.not_principals,
        vec![StringMatch {
            match_type: Some(MatchType::Suffix("/sa/legacy".into()))
        }]
    );
    assert_eq!(from.service_accounts[0].namespace, "web");
    assert_eq!(from.service_accounts[0].service_account, "frontend");
    assert_eq!(
        rule.clauses[1].matches[0].not_source_ips[0].address,
        vec![192, 168, 0, 0]
    );
    assert_eq!(rule.clauses[1].matches[0].not_source_ips[0].length, 16);
    assert_eq!(rule.clauses[2].matches[0].destination_ports, vec![443]);
    assert_eq!(t.status.state, PolicyState::Accepted);
}

/// What ztunnel decides with the translated seed policy: the control plane's translation
/// and the data plane's evaluation together.
#[test]
fn the_translated_seed_deny_blocks_dev_and_nothing_else_at_ztunnel() {
    use trellis_core::authz::{Conn, evaluate};
    let seed = SEED
        .split("\n---")
        .find(|d| d.contains("kind: AuthorizationPolicy"))
        .unwrap();
    let policy = translate(seed).authorization.expect("enforced by ztunnel");
    let conn = |id: Option<&str>| Conn {
        source: id.map(|s| s.parse().unwrap()),
        src_ip: "10.244.1.2".parse().unwrap(),
        dst_ip: "10.244.2.2".parse().unwrap(),
        dst_port: 8000,
    };
    let from_dev = evaluate(
        [&policy],
        &conn(Some("spiffe://cluster.local/ns/dev/sa/sleep")),
    );
    assert!(!from_dev.allowed);
    assert_eq!(from_dev.policy.as_deref(), Some("foo/httpbin"));
    assert!(
        evaluate(
            [&policy],
            &conn(Some("spiffe://cluster.local/ns/prod/sa/sleep"))
        )
        .allowed
    );
    assert!(
        evaluate([&policy], &conn(None)).allowed,
        "no identity: not from dev"
    );
}
