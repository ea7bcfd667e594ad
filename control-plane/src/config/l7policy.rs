//! `AuthorizationPolicy` → the waypoint's `trellis.waypoint.v1.L7Policy`, one resource per
//! policy and waypoint it applies to (named `namespace/name@gateway-namespace/gateway-name`).
//!
//! A waypoint enforces, with every L7 attribute (docs/waypoint.md, "Authorization"):
//! - policies whose `targetRefs` name its `Gateway` (all its traffic), a `Service` it fronts
//!   (that Service's traffic), or the `istio-waypoint` GatewayClass from the root namespace
//!   (every waypoint's traffic);
//! - policies without `selector` or `targetRefs` — namespace-wide ones for the Services it
//!   fronts in that namespace, root-namespace ones for all of them — so their L7 rules take
//!   effect where requests are visible (ztunnel keeps enforcing them at L4 as well).
//!
//! Policies with a `selector` are for ztunnel only (as in Istio). Values are translated to
//! the waypoint's matchers: Istio's `*`, `prefix*`, `*suffix` and exact strings; hosts case
//! insensitively; paths with Istio's templates `{*}` (one segment) and `{**}` (any rest) as
//! anchored regular expressions. A `when` key the waypoint cannot evaluate
//! (`experimental.envoy.filters.*`) makes its rule match nothing in an ALLOW policy and
//! everything in a DENY or CUSTOM one (never more allowed than written), and the status
//! says so.

use std::collections::BTreeMap;

use trellis_proto::trellis::waypoint::v1 as pb;

use super::istio::{Action, AuthorizationPolicy, Condition, Operation, Source};
use super::model::{MeshConfig, Model};

type Key = (String, String);

/// The name of the implicit policies of the mesh's secure default.
pub const SECURE_DEFAULT: &str = "trellis-secure-default";

/// The waypoint policies of the mesh, by resource name, with the waypoint each is for,
/// and per policy (namespace, name) what its status should add.
#[derive(Debug, Default)]
pub struct WaypointPolicies {
    /// Resource name → (waypoint, policy).
    pub policies: BTreeMap<String, (Key, pb::L7Policy)>,
    /// Policy → notes for its status (where it is enforced, what could not be).
    pub notes: BTreeMap<Key, Vec<String>>,
    /// Policy → why no waypoint enforces it (a value that does not parse).
    pub rejected: BTreeMap<Key, Vec<String>>,
    /// Services a waypoint must reach beyond those it fronts (external authorizers).
    pub extra_services: BTreeMap<Key, std::collections::BTreeSet<Key>>,
    /// RequestAuthentications: resource name → (waypoint, resource).
    pub authentications: BTreeMap<String, (Key, pb::RequestAuthentication)>,
    /// RequestAuthentication → notes for its status.
    pub authentication_notes: BTreeMap<Key, Vec<String>>,
}

/// Translates every AuthorizationPolicy a waypoint enforces.
pub fn waypoint_policies(model: &Model, mesh: &MeshConfig) -> WaypointPolicies {
    let mut out = WaypointPolicies::default();
    // The Services each waypoint fronts, by namespace.
    let mut fronted: BTreeMap<Key, Vec<(String, String)>> = BTreeMap::new();
    for ((ns, name), svc) in model.service_objects() {
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        if let Some(gw) = model.waypoint_key_of(ns, &labels, "service") {
            fronted
                .entry(gw)
                .or_default()
                .push((ns.clone(), name.clone()));
        }
    }
    let waypoints: Vec<Key> = model
        .gateways()
        .filter(|(_, g)| g.is_waypoint())
        .map(|(k, _)| k.clone())
        .collect();
    for ((pns, pname), policy) in model.authorization_policies() {
        let spec = &policy.spec;
        if spec.selector.is_some() {
            continue;
        }
        let targets: Vec<_> = spec.target_ref.iter().chain(&spec.target_refs).collect();
        let mut notes = Vec::new();
        let applies = placement(
            model, mesh, pns, &targets, None, &fronted, &waypoints, &mut notes,
        );
        if applies.is_empty() {
            if !targets.is_empty() {
                out.notes
                    .entry((pns.clone(), pname.clone()))
                    .or_default()
                    .extend(notes);
            }
            continue;
        }
        let (rules, rule_notes) = match translate_rules(policy) {
            Ok(r) => r,
            Err(errors) => {
                // A policy is never enforced partly because of a typo: rejected whole.
                out.rejected.insert((pns.clone(), pname.clone()), errors);
                continue;
            }
        };
        notes.extend(rule_notes);
        let ext_authz = if matches!(spec.action, Action::Custom) {
            let name = spec.provider.as_ref().map_or("", |p| p.name.as_str());
            match ext_authz(mesh, name) {
                Ok((cfg, svc)) => Some((cfg, svc)),
                Err(why) => {
                    notes.push(format!(
                        "spec.provider: {why}: the requests this policy's rules match are denied (fail closed)"
                    ));
                    None
                }
            }
        } else {
            None
        };
        let action = match spec.action {
            Action::Allow => pb::l7_policy::Action::Allow,
            Action::Deny => pb::l7_policy::Action::Deny,
            Action::Audit => pb::l7_policy::Action::Audit,
            Action::Custom => pb::l7_policy::Action::Custom,
        };
        let dry_run = policy
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("istio.io/dry-run"))
            .is_some_and(|v| v == "true");
        let mut enforced_by = Vec::new();
        for (gw, services) in applies {
            let target = policy_target(services, mesh);
            enforced_by.push(format!("{}/{}", gw.0, gw.1));
            if let Some((_, svc)) = &ext_authz {
                out.extra_services
                    .entry(gw.clone())
                    .or_default()
                    .insert(svc.clone());
            }
            let name = format!("{pns}/{pname}@{}/{}", gw.0, gw.1);
            out.policies.insert(
                name,
                (
                    gw,
                    pb::L7Policy {
                        name: format!("{pns}/{pname}"),
                        namespace: pns.clone(),
                        target: Some(target),
                        action: action as i32,
                        rules: rules.clone(),
                        dry_run,
                        provider: spec
                            .provider
                            .as_ref()
                            .map(|p| p.name.clone())
                            .unwrap_or_default(),
                        ext_authz: ext_authz.as_ref().map(|(cfg, _)| cfg.clone()),
                    },
                ),
            );
        }
        notes.insert(
            0,
            format!(
                "enforced with its L7 rules by the waypoint{} {}",
                if enforced_by.len() == 1 { "" } else { "s" },
                enforced_by.join(", ")
            ),
        );
        out.notes.insert((pns.clone(), pname.clone()), notes);
    }
    // The secure default at waypoints: the Services a waypoint fronts in a namespace take
    // calls from that namespace unless an ALLOW policy allows more.
    if mesh.secure_default {
        for (gw, services) in &fronted {
            let mut by_ns: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
            for (ns, name) in services {
                by_ns
                    .entry(ns.as_str())
                    .or_default()
                    .push((ns.clone(), name.clone()));
            }
            for (ns, list) in by_ns {
                out.policies.insert(
                    format!("{ns}/{SECURE_DEFAULT}@{}/{}", gw.0, gw.1),
                    (
                        gw.clone(),
                        pb::L7Policy {
                            name: format!("{ns}/{SECURE_DEFAULT}"),
                            namespace: ns.to_string(),
                            target: Some(policy_target(Some(list), mesh)),
                            action: pb::l7_policy::Action::Allow as i32,
                            rules: vec![pb::Rule {
                                from: vec![pb::Source {
                                    namespaces: vec![string_match(ns, false)],
                                    ..Default::default()
                                }],
                                ..Default::default()
                            }],
                            ..Default::default()
                        },
                    ),
                );
            }
        }
    }
    for ((rns, rname), ra) in model.request_authentications() {
        let spec = &ra.spec;
        let targets: Vec<_> = spec.target_ref.iter().chain(&spec.target_refs).collect();
        if !targets.is_empty() && spec.selector.is_some() {
            continue; // rejected by its status
        }
        let mut notes = Vec::new();
        let applies = placement(
            model,
            mesh,
            rns,
            &targets,
            spec.selector.as_ref().map(|s| &s.match_labels),
            &fronted,
            &waypoints,
            &mut notes,
        );
        let providers: Vec<pb::JwtProvider> = spec.jwt_rules.iter().map(jwt_provider).collect();
        let mut checked_by = Vec::new();
        for (gw, services) in applies {
            let target = policy_target(services, mesh);
            checked_by.push(format!("{}/{}", gw.0, gw.1));
            out.authentications.insert(
                format!("{rns}/{rname}@{}/{}", gw.0, gw.1),
                (
                    gw,
                    pb::RequestAuthentication {
                        name: format!("{rns}/{rname}"),
                        namespace: rns.clone(),
                        target: Some(target),
                        providers: providers.clone(),
                        require_token: mesh.secure_default,
                    },
                ),
            );
        }
        if !checked_by.is_empty() {
            notes.insert(
                0,
                format!(
                    "tokens checked by the waypoint{} {}",
                    if checked_by.len() == 1 { "" } else { "s" },
                    checked_by.join(", ")
                ),
            );
        }
        out.authentication_notes
            .insert((rns.clone(), rname.clone()), notes);
    }
    out
}

/// The external authorizer `name` of the mesh config, and its Service (namespace, name).
fn ext_authz(mesh: &MeshConfig, name: &str) -> Result<(pb::ExtAuthz, Key), String> {
    let p = mesh
        .extension_providers
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| format!("no extension provider {name:?} in the mesh config"))?;
    let duration = |t: &Option<String>| {
        let d = t
            .as_deref()
            .and_then(super::routes::parse_duration)
            .unwrap_or(std::time::Duration::from_secs(600));
        prost_types::Duration {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }
    };
    let (protocol, service, port, cfg) = match (&p.envoy_ext_authz_http, &p.envoy_ext_authz_grpc) {
        (Some(h), _) => (
            pb::ext_authz::Protocol::Http,
            &h.service,
            h.port,
            pb::ExtAuthz {
                path_prefix: h.path_prefix.clone(),
                timeout: Some(duration(&h.timeout)),
                fail_open: h.fail_open,
                include_request_headers: h.include_request_headers_in_check.clone(),
                headers_to_upstream_on_allow: h.headers_to_upstream_on_allow.clone(),
                headers_to_downstream_on_deny: h.headers_to_downstream_on_deny.clone(),
                ..Default::default()
            },
        ),
        (None, Some(g)) => (
            pb::ext_authz::Protocol::Grpc,
            &g.service,
            g.port,
            pb::ExtAuthz {
                timeout: Some(duration(&g.timeout)),
                fail_open: g.fail_open,
                ..Default::default()
            },
        ),
        (None, None) => {
            return Err(format!(
                "extension provider {name:?} is neither envoyExtAuthzHttp nor envoyExtAuthzGrpc"
            ));
        }
    };
    let suffix = format!(".svc.{}", mesh.domain_suffix);
    let (svc, ns) = service
        .strip_suffix(&suffix)
        .and_then(|s| s.split_once('.'))
        .ok_or_else(|| {
            format!(
                "extension provider {name:?}: service {service:?} is not a Service's name.namespace{suffix}"
            )
        })?;
    Ok((
        pb::ExtAuthz {
            protocol: protocol as i32,
            service: Some(pb::ServiceRef {
                namespace: ns.to_string(),
                hostname: service.clone(),
                port: u32::from(port),
            }),
            ..cfg
        },
        (ns.to_string(), svc.to_string()),
    ))
}

/// A policy target: all of a waypoint's traffic (`None`), or these Services.
fn policy_target(services: Option<Vec<(String, String)>>, mesh: &MeshConfig) -> pb::PolicyTarget {
    match services {
        None => pb::PolicyTarget {
            scope: pb::policy_target::Scope::Waypoint as i32,
            services: Vec::new(),
        },
        Some(list) => pb::PolicyTarget {
            scope: pb::policy_target::Scope::Services as i32,
            services: list
                .iter()
                .map(|(ns, name)| pb::ServiceRef {
                    namespace: ns.clone(),
                    hostname: format!("{name}.{ns}.svc.{}", mesh.domain_suffix),
                    port: 0,
                })
                .collect(),
        },
    }
}

/// A `jwtRules` entry as the waypoint's provider.
fn jwt_provider(r: &super::istio::JwtRule) -> pb::JwtProvider {
    use pb::jwt_provider::{ClaimToHeader, FromHeader, JwksSource};
    pb::JwtProvider {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        jwks_source: match (&r.jwks, &r.jwks_uri) {
            (Some(inline), _) => Some(JwksSource::Jwks(inline.clone())),
            (None, Some(uri)) => Some(JwksSource::JwksUri(uri.clone())),
            (None, None) => None,
        },
        from_headers: r
            .from_headers
            .iter()
            .map(|h| FromHeader {
                name: h.name.clone(),
                prefix: h.prefix.clone().unwrap_or_default(),
            })
            .collect(),
        from_params: r.from_params.clone(),
        from_cookies: r.from_cookies.clone(),
        output_payload_to_header: r.output_payload_to_header.clone().unwrap_or_default(),
        forward_original_token: r.forward_original_token,
        output_claim_to_headers: r
            .output_claim_to_headers
            .iter()
            .map(|c| ClaimToHeader {
                header: c.header.clone(),
                claim: c.claim.clone(),
            })
            .collect(),
        jwks_fetch_timeout: r
            .timeout
            .as_deref()
            .and_then(super::routes::parse_duration)
            .map(|d| prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }),
    }
}

/// Where a policy of namespace `pns` applies: per waypoint, all its traffic (`None`) or
/// these Services — by its `targets`, else by a label `selector` (the fronted Services in
/// `pns` selecting a pod that carries the labels: RequestAuthentication only), else
/// namespace-wide (root namespace: every fronted Service). What cannot apply goes to
/// `notes`.
#[allow(clippy::too_many_arguments)]
fn placement(
    model: &Model,
    mesh: &MeshConfig,
    pns: &String,
    targets: &[&super::istio::PolicyTargetReference],
    selector: Option<&BTreeMap<String, String>>,
    fronted: &BTreeMap<Key, Vec<(String, String)>>,
    waypoints: &[Key],
    notes: &mut Vec<String>,
) -> BTreeMap<Key, Option<Vec<(String, String)>>> {
    // Per waypoint: all its traffic (None) or these Services.
    let mut applies: BTreeMap<Key, Option<Vec<(String, String)>>> = BTreeMap::new();
    if let Some(labels) = selector {
        for (gw, services) in fronted {
            let mine: Vec<_> = services
                .iter()
                .filter(|(ns, name)| ns == pns && model.service_selects_pod_with(ns, name, labels))
                .cloned()
                .collect();
            if !mine.is_empty() {
                applies.insert(gw.clone(), Some(mine));
            }
        }
        if applies.is_empty() {
            notes.push("spec.selector: no waypoint fronts a Service of the selected workloads: nothing checks this policy's tokens".into());
        }
    } else if targets.is_empty() {
        let global = *pns == mesh.root_namespace;
        for (gw, services) in fronted {
            let mine: Vec<_> = services
                .iter()
                .filter(|(ns, _)| global || ns == pns)
                .cloned()
                .collect();
            if !mine.is_empty() {
                applies.insert(gw.clone(), Some(mine));
            }
        }
    } else {
        for (i, t) in targets.iter().enumerate() {
            let tns = t.namespace.clone().unwrap_or_else(|| pns.clone());
            match (t.group.as_str(), t.kind.as_str()) {
                    ("gateway.networking.k8s.io", "Gateway") => {
                        let key = (tns.clone(), t.name.clone());
                        if model.gateway(&tns, &t.name).is_some_and(|g| g.is_waypoint()) {
                            applies.insert(key, None);
                        } else {
                            notes.push(format!(
                                "spec.targetRefs[{i}]: Gateway {tns}/{} is not a waypoint (class istio-waypoint): nothing here enforces this policy for it",
                                t.name
                            ));
                        }
                    }
                    ("gateway.networking.k8s.io", "GatewayClass") => {
                        if *pns == mesh.root_namespace && t.name == super::gateway::WAYPOINT_CLASS
                        {
                            for gw in waypoints {
                                applies.insert(gw.clone(), None);
                            }
                        } else {
                            notes.push(format!(
                                "spec.targetRefs[{i}]: only the {} GatewayClass, from the root namespace {}, is enforced by waypoints",
                                super::gateway::WAYPOINT_CLASS,
                                mesh.root_namespace
                            ));
                        }
                    }
                    ("", "Service") => {
                        let labels = model.service_labels(&tns, &t.name);
                        let gw = labels
                            .as_ref()
                            .and_then(|l| model.waypoint_key_of(&tns, l, "service"));
                        match gw {
                            Some(gw) => {
                                let entry = applies.entry(gw).or_insert_with(|| Some(Vec::new()));
                                if let Some(list) = entry {
                                    list.push((tns.clone(), t.name.clone()));
                                }
                            }
                            None => notes.push(format!(
                                "spec.targetRefs[{i}]: Service {tns}/{} {}: nothing enforces this policy for it",
                                t.name,
                                if labels.is_none() {
                                    "does not exist"
                                } else {
                                    "has no waypoint"
                                }
                            )),
                        }
                    }
                    (g, k) => notes.push(format!(
                        "spec.targetRefs[{i}]: a {k} of group {g:?} is not something a Trellis waypoint serves"
                    )),
                }
        }
    }
    applies
}

/// The policy's rules as the waypoint's, and what could not be translated as written; an
/// error for each value that does not parse.
fn translate_rules(
    policy: &AuthorizationPolicy,
) -> Result<(Vec<pb::Rule>, Vec<String>), Vec<String>> {
    let deny_like = !matches!(policy.spec.action, Action::Allow | Action::Audit);
    let mut notes = Vec::new();
    let mut errors = Vec::new();
    let mut rules = Vec::new();
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        let unknown: Vec<&str> = rule
            .when
            .iter()
            .map(|c| c.key.as_str())
            .filter(|k| k.starts_with("experimental.envoy.filters."))
            .collect();
        if !unknown.is_empty() {
            notes.push(format!(
                "spec.rules[{i}].when: {} cannot be evaluated by the waypoint; the rule {}",
                unknown.join(", "),
                if deny_like {
                    "matches every request (this policy denies at least what was written)"
                } else {
                    "matches no request (this policy allows no more than written)"
                }
            ));
            if deny_like {
                rules.push(pb::Rule::default());
            }
            continue;
        }
        let at = format!("spec.rules[{i}]");
        rules.push(pb::Rule {
            from: rule
                .from
                .iter()
                .enumerate()
                .map(|(j, f)| source(&f.source, &format!("{at}.from[{j}].source"), &mut errors))
                .collect(),
            to: rule
                .to
                .iter()
                .enumerate()
                .map(|(j, t)| {
                    operation(
                        &t.operation,
                        &format!("{at}.to[{j}].operation"),
                        &mut errors,
                    )
                })
                .collect(),
            when: rule.when.iter().map(condition).collect(),
        });
    }
    if errors.is_empty() {
        Ok((rules, notes))
    } else {
        Err(errors)
    }
}

fn source(s: &Source, at: &str, errors: &mut Vec<String>) -> pb::Source {
    let mut cidrs = |v: &[String], field: &str| cidrs(v, &format!("{at}.{field}"), errors);
    pb::Source {
        principals: strings(&s.principals, false),
        not_principals: strings(&s.not_principals, false),
        request_principals: strings(&s.request_principals, false),
        not_request_principals: strings(&s.not_request_principals, false),
        namespaces: strings(&s.namespaces, false),
        not_namespaces: strings(&s.not_namespaces, false),
        ip_blocks: cidrs(&s.ip_blocks, "ipBlocks"),
        not_ip_blocks: cidrs(&s.not_ip_blocks, "notIpBlocks"),
        remote_ip_blocks: cidrs(&s.remote_ip_blocks, "remoteIpBlocks"),
        not_remote_ip_blocks: cidrs(&s.not_remote_ip_blocks, "notRemoteIpBlocks"),
        service_accounts: s.service_accounts.clone(),
        not_service_accounts: s.not_service_accounts.clone(),
    }
}

fn operation(o: &Operation, at: &str, errors: &mut Vec<String>) -> pb::Operation {
    let mut ports = |v: &[String], field: &str| {
        v.iter()
            .enumerate()
            .filter_map(|(k, p)| match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(u32::from(n)),
                _ => {
                    errors.push(format!("{at}.{field}[{k}]: {p:?} is not a port number"));
                    None
                }
            })
            .collect()
    };
    pb::Operation {
        hosts: strings(&o.hosts, true),
        not_hosts: strings(&o.not_hosts, true),
        ports: ports(&o.ports, "ports"),
        not_ports: ports(&o.not_ports, "notPorts"),
        methods: strings(&o.methods, false),
        not_methods: strings(&o.not_methods, false),
        paths: o.paths.iter().map(|p| path_match(p)).collect(),
        not_paths: o.not_paths.iter().map(|p| path_match(p)).collect(),
    }
}

fn condition(c: &Condition) -> pb::Condition {
    pb::Condition {
        key: c.key.clone(),
        values: strings(&c.values, false),
        not_values: strings(&c.not_values, false),
    }
}

/// Istio's string matching: `*` any value (present), `*x` suffix, `x*` prefix, else exact.
pub fn string_match(v: &str, ignore_case: bool) -> pb::StringMatch {
    use pb::string_match::Kind;
    let kind = if v == "*" {
        Kind::Present(())
    } else if let Some(rest) = v.strip_prefix('*') {
        Kind::Suffix(rest.to_string())
    } else if let Some(rest) = v.strip_suffix('*') {
        Kind::Prefix(rest.to_string())
    } else {
        Kind::Exact(v.to_string())
    };
    pb::StringMatch {
        kind: Some(kind),
        ignore_case,
    }
}

fn strings(values: &[String], ignore_case: bool) -> Vec<pb::StringMatch> {
    values
        .iter()
        .map(|v| string_match(v, ignore_case))
        .collect()
}

/// A path value: with Istio's templates (`{*}` one segment, `{**}` the rest) an anchored
/// regular expression, else [`string_match`].
fn path_match(v: &str) -> pb::StringMatch {
    if !v.contains('{') {
        return string_match(v, false);
    }
    let mut re = String::new();
    for (i, seg) in v.split('/').enumerate() {
        if i > 0 {
            re.push('/');
        }
        match seg {
            "{*}" => re.push_str("[^/]+"),
            "{**}" => re.push_str(".+"),
            s => escape_regex(s, &mut re),
        }
    }
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Regex(re)),
        ignore_case: false,
    }
}

/// Appends `s` to `re` with every regular-expression metacharacter escaped.
fn escape_regex(s: &str, re: &mut String) {
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            re.push('\\');
        }
        re.push(c);
    }
}

fn cidrs(values: &[String], at: &str, errors: &mut Vec<String>) -> Vec<pb::CidrRange> {
    values
        .iter()
        .enumerate()
        .filter_map(|(k, v)| match cidr(v) {
            Some(c) => Some(c),
            None => {
                errors.push(format!("{at}[{k}]: {v:?} is not an IP address or CIDR"));
                None
            }
        })
        .collect()
}

fn cidr(v: &str) -> Option<pb::CidrRange> {
    super::authz::parse_cidr(v).map(|(address, prefix_len)| pb::CidrRange {
        address,
        prefix_len,
    })
}
