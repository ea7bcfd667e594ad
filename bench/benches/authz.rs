//! The waypoint's authorization policy evaluator (issue 15 target: one request against
//! 100 policies × 10 rules in ≤ 2 µs), beside the baseline of the same request with no
//! policy, in one run: `cargo bench -p trellis-bench --bench authz`.
//!
//! The policies are the shape users write: half DENY, half ALLOW, each rule with a
//! source (principals or namespaces), an operation (methods, path prefix or template) and
//! a header condition; the request matches no DENY rule and only the last ALLOW policy's
//! last rule, so every rule of every policy is evaluated.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use trellis_proto::trellis::waypoint::v1 as pb;
use trellis_waypoint::authz::{Attrs, Http, Policies};

fn exact(v: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Exact(v.into())),
        ignore_case: false,
    }
}

fn prefix(v: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Prefix(v.into())),
        ignore_case: false,
    }
}

/// `by_peer`: each rule names its peers (a team's namespace, or its principals), as
/// policies usually do; otherwise rules name only request attributes (methods, paths,
/// headers), which no index can skip.
fn policies(n: usize, rules: usize, by_peer: bool) -> Vec<pb::L7Policy> {
    use pb::l7_policy::Action;
    (0..n)
        .map(|i| {
            let action = if i % 2 == 0 {
                Action::Deny
            } else {
                Action::Allow
            };
            let last_allow = i == n - 1;
            pb::L7Policy {
                name: format!("bench/p{i}"),
                namespace: "bench".into(),
                target: Some(pb::PolicyTarget {
                    scope: pb::policy_target::Scope::Waypoint as i32,
                    services: Vec::new(),
                }),
                action: action as i32,
                rules: (0..rules)
                    .map(|r| {
                        let hit = last_allow && r == rules - 1;
                        pb::Rule {
                            from: match (by_peer, hit, r % 2) {
                                (false, _, _) => Vec::new(),
                                (true, true, _) => vec![pb::Source {
                                    namespaces: vec![exact("shop")],
                                    ..Default::default()
                                }],
                                (true, false, 0) => vec![pb::Source {
                                    principals: vec![prefix(&format!(
                                        "cluster.local/ns/team{r}-{i}/"
                                    ))],
                                    ..Default::default()
                                }],
                                (true, false, _) => vec![pb::Source {
                                    namespaces: vec![exact(&format!("team{r}-{i}"))],
                                    ..Default::default()
                                }],
                            },
                            to: vec![pb::Operation {
                                methods: vec![exact("GET"), exact("POST")],
                                paths: vec![
                                    prefix(if hit { "/api/" } else { "/admin/" }),
                                    pb::StringMatch {
                                        kind: Some(pb::string_match::Kind::Regex(
                                            "/v[0-9]+/items/[^/]+".into(),
                                        )),
                                        ignore_case: false,
                                    },
                                ],
                                ..Default::default()
                            }],
                            when: vec![pb::Condition {
                                key: "request.headers[x-tenant]".into(),
                                values: vec![exact(if hit { "acme" } else { "other" })],
                                not_values: vec![],
                            }],
                        }
                    })
                    .collect(),
                dry_run: false,
                provider: String::new(),
                ext_authz: None,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tenant", "acme".parse().unwrap());
    headers.insert("user-agent", "bench".parse().unwrap());
    let attrs = Attrs {
        principal: Some("cluster.local/ns/shop/sa/client"),
        namespace: Some("shop"),
        service_account: Some("shop/client"),
        source_ip: "10.244.1.5".parse().unwrap(),
        remote_ip: "10.244.1.5".parse().unwrap(),
        destination_ip: "10.96.0.10".parse().unwrap(),
        destination_port: 80,
        service: Some(("shop", "web.shop.svc.cluster.local")),
        http: Some(Http {
            method: "GET",
            path: "/api/orders",
            host: "web.shop.svc.cluster.local",
            headers: &headers,
        }),
        request_auth: None,
    };
    let none = Policies::compile(std::iter::empty());
    let by_peer = Policies::compile(policies(100, 10, true).iter());
    let by_request = Policies::compile(policies(100, 10, false).iter());
    for p in [&by_peer, &by_request] {
        let d = p.decide(&attrs);
        assert!(
            d.denied.is_none() && d.allowed_by.as_deref() == Some("bench/p99"),
            "{d:?}"
        );
    }
    let mut g = c.benchmark_group("authz");
    g.bench_function("no policy (baseline)", |b| {
        b.iter(|| black_box(none.decide(black_box(&attrs))))
    });
    g.bench_function("100 policies x 10 rules, rules name their peers", |b| {
        b.iter(|| black_box(by_peer.decide(black_box(&attrs))))
    });
    g.bench_function("100 policies x 10 rules, request attributes only", |b| {
        b.iter(|| black_box(by_request.decide(black_box(&attrs))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
