//! AuthorizationPolicy at the waypoint: the `trellis.waypoint.v1.L7Policy` resources the
//! control plane sends, compiled once per configuration generation and evaluated for every
//! request (and, with connection attributes only, for every TCP connection).
//!
//! Istio's order: CUSTOM (a match is reported in [`Decision::custom`]: the proxy asks the
//! policy's external authorizer, and denies when its provider is unknown), then DENY (any
//! match denies), then ALLOW (when any ALLOW policy applies, one must match, else denied). AUDIT matches are
//! logged. A dry-run policy (`istio.io/dry-run`) is evaluated and its would-be decision
//! logged, never enforced.
//!
//! Matching follows Istio: fields of a source or operation are AND-ed, the values of a
//! field OR-ed, a `not` field excludes; an attribute that is absent matches no value (and
//! so every `not` field). For a TCP connection (no request), a rule's HTTP fields count as
//! matching in DENY and CUSTOM policies and as not matching in ALLOW and AUDIT ones: a
//! policy never allows more than written, and denies at least what was written.

use std::net::IpAddr;

use http::HeaderMap;
use trellis_proto::trellis::waypoint::v1 as pb;
use trellis_proto::trellis::waypoint::v1::l7_policy::Action;
use trellis_proto::trellis::waypoint::v1::policy_target::Scope;

/// The Services a policy target names: `Some(None)` for all of the waypoint's traffic,
/// `Some(Some(list))` for these (namespace, hostname); `None` for a scope not known.
pub fn target_services(t: &pb::PolicyTarget) -> Option<Option<Vec<(String, String)>>> {
    match Scope::try_from(t.scope).ok()? {
        Scope::Waypoint => Some(None),
        Scope::Services => Some(Some(
            t.services
                .iter()
                .map(|s| (s.namespace.clone(), s.hostname.clone()))
                .collect(),
        )),
        Scope::Unspecified => None,
    }
}

/// Whether a target's Services (`None`: all) cover the Service a request is addressed to
/// (none for workload-addressed traffic).
pub fn covers(services: Option<&[(String, String)]>, service: Option<(&str, &str)>) -> bool {
    match (services, service) {
        (None, _) => true,
        (Some(list), Some((ns, host))) => list.iter().any(|(n, h)| n == ns && h == host),
        (Some(_), None) => false,
    }
}

/// What a request (or connection) is, for policy.
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a> {
    /// The peer's identity without `spiffe://` (`<td>/ns/<ns>/sa/<sa>`).
    pub principal: Option<&'a str>,
    /// The peer's namespace and service account.
    pub namespace: Option<&'a str>,
    /// `<ns>/<sa>` of the peer.
    pub service_account: Option<&'a str>,
    /// The HBONE peer's address.
    pub source_ip: IpAddr,
    /// The original client (X-Forwarded-For past the trusted proxies), else the peer.
    pub remote_ip: IpAddr,
    /// What the client asked for (service VIP or workload address) and its port.
    pub destination_ip: IpAddr,
    /// Destination port.
    pub destination_port: u16,
    /// The service addressed (`namespace`, `hostname`), none for workload traffic.
    pub service: Option<(&'a str, &'a str)>,
    /// The request; none for a TCP connection.
    pub http: Option<Http<'a>>,
    /// The end user of a verified token: `<iss>/<sub>` and the claims.
    pub request_auth: Option<(&'a str, &'a serde_json::Value)>,
}

/// The request's attributes.
#[derive(Debug, Clone, Copy)]
pub struct Http<'a> {
    /// Method.
    pub method: &'a str,
    /// Path without query, normalized ([`normalize_path`]).
    pub path: &'a str,
    /// Host / `:authority`.
    pub host: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
}

/// What policy decided for one request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Denied: by which policy (`namespace/name`), and whether by a CUSTOM one.
    pub denied: Option<(String, bool)>,
    /// The ALLOW policy that allowed it, when ALLOW policies applied.
    pub allowed_by: Option<std::sync::Arc<str>>,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
    /// Dry-run policies and what they would have decided (`true`: deny).
    pub dry_run: Vec<(String, bool)>,
    /// A CUSTOM policy matched: its name and external authorizer (none: the provider is
    /// unknown — denied), to be asked before the DENY and ALLOW decision stands.
    pub custom: Option<(String, Option<std::sync::Arc<pb::ExtAuthz>>)>,
}

/// The compiled policies of one configuration generation.
#[derive(Debug, Default)]
pub struct Policies {
    list: Vec<Policy>,
    /// Which rules a request's path can let match (see [`PathIndex`]).
    paths: PathIndex,
}

/// An index of the rules by the literal text their `paths` start with. A rule whose every
/// operation names paths that each begin with a known literal (an exact path, a prefix,
/// a regular expression's or template's literal start) can match only a path beginning
/// with one of them; a request walks the trie of those literals once along its path and
/// evaluates only the rules it reached, plus those the index cannot restrict.
#[derive(Debug, Default)]
struct PathIndex {
    /// Trie nodes; the root is node 0 (when there is any).
    nodes: Vec<PathNode>,
    /// The rules (bit per rule id) any path may let match.
    always: Vec<u64>,
}

#[derive(Debug, Default)]
struct PathNode {
    /// Children by next byte, sorted.
    children: Vec<(u8, u32)>,
    /// Rules whose literal ends here.
    rules: Vec<u32>,
}

impl PathIndex {
    /// The literals a rule's paths all begin with, or `None` when some path of it can
    /// match without one (no `to`, an operation without paths, suffixes, case folding,
    /// presence, an expression without a literal start).
    fn literals(rule: &Rule) -> Option<Vec<&str>> {
        if rule.to.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        for op in &rule.to {
            if op.paths.is_empty() {
                return None;
            }
            for p in &op.paths {
                match p {
                    Str::Exact(s, false) | Str::Prefix(s, false) if !s.is_empty() => {
                        out.push(s.as_str())
                    }
                    Str::Regex(_, lit) if !lit.is_empty() => out.push(lit.as_str()),
                    _ => return None,
                }
            }
        }
        Some(out)
    }

    fn build(list: &[Policy]) -> PathIndex {
        let total = list.iter().map(|p| p.rules.len()).sum::<usize>();
        let mut ix = PathIndex {
            nodes: vec![PathNode::default()],
            always: vec![0; total.div_ceil(64)],
        };
        for r in list.iter().flat_map(|p| &p.rules) {
            match PathIndex::literals(r) {
                None => ix.always[r.id as usize / 64] |= 1 << (r.id % 64),
                Some(lits) => {
                    for lit in lits {
                        let mut at = 0usize;
                        for b in lit.bytes() {
                            let children = &ix.nodes[at].children;
                            at = match children.binary_search_by_key(&b, |c| c.0) {
                                Ok(i) => children[i].1 as usize,
                                Err(i) => {
                                    let next = ix.nodes.len();
                                    ix.nodes[at].children.insert(i, (b, next as u32));
                                    ix.nodes.push(PathNode::default());
                                    next
                                }
                            };
                        }
                        if ix.nodes[at].rules.last() != Some(&r.id) {
                            ix.nodes[at].rules.push(r.id);
                        }
                    }
                }
            }
        }
        ix
    }

    /// Sets in `out` the bits of the rules `path` may let match.
    fn candidates(&self, path: &str, out: &mut Vec<u64>) {
        out.clear();
        out.extend_from_slice(&self.always);
        let mut at = 0usize;
        for b in path.bytes() {
            let node = &self.nodes[at];
            match node.children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => at = node.children[i].1 as usize,
                Err(_) => return,
            }
            for &id in &self.nodes[at].rules {
                out[id as usize / 64] |= 1 << (id % 64);
            }
        }
    }
}

thread_local! {
    /// The candidate rules of the request being decided (reused: no allocation per request).
    static CANDIDATES: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether any bit of `[start, end)` is set in `bits`.
fn any_in(bits: &[u64], start: u32, end: u32) -> bool {
    let (mut i, end) = (start as usize, end as usize);
    while i < end {
        let (w, off) = (i / 64, i % 64);
        let n = (64 - off).min(end - i);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << off
        };
        if bits[w] & mask != 0 {
            return true;
        }
        i += n;
    }
    false
}

#[derive(Debug)]
struct Policy {
    name: std::sync::Arc<str>,
    action: Action,
    dry_run: bool,
    /// `None`: every request through this waypoint; else these (namespace, hostname).
    services: Option<Vec<(String, String)>>,
    rules: Vec<Rule>,
    /// CUSTOM: the external authorizer.
    ext_authz: Option<std::sync::Arc<pb::ExtAuthz>>,
    /// The union of its rules' [`Rule::ns_mask`].
    ns_mask: u64,
    /// The id of its first rule (its rules' ids are consecutive).
    first_rule: u32,
}

#[derive(Debug, Default)]
struct Rule {
    /// Its position among all the rules of all the policies (for [`PathIndex`]).
    id: u32,
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
    /// The peer namespaces this rule can match, as bits of [`ns_bit`] (all ones: any). A
    /// request whose namespace's bit is not set is skipped without evaluating the rule.
    ns_mask: u64,
}

/// A namespace's bit in the masks that let evaluation skip rules and policies (FNV-1a).
fn ns_bit(ns: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ns.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    1 << (h & 63)
}

/// The namespace a principal value pins (`<td>/ns/<ns>/sa/<sa>` exact, or a prefix that
/// spells the namespace out whole), if it does.
fn principal_ns(m: &Str) -> Option<&str> {
    let v = match m {
        Str::Exact(v, false) | Str::Prefix(v, false) => v.as_str(),
        _ => return None,
    };
    let rest = &v[v.find("/ns/")? + 4..];
    let end = rest.find('/')?;
    Some(&rest[..end])
}

/// The mask of namespaces a source can match: those its `namespaces` and `principals`
/// pin (both must hold), all when neither pins them.
fn source_mask(s: &Source) -> u64 {
    let field = |values: &[Str], pin: &dyn Fn(&Str) -> Option<&str>| -> u64 {
        if values.is_empty() {
            return u64::MAX;
        }
        let mut mask = 0;
        for v in values {
            match pin(v) {
                Some(ns) => mask |= ns_bit(ns),
                None => return u64::MAX,
            }
        }
        mask
    };
    let namespaces = field(&s.namespaces, &|m| match m {
        Str::Exact(v, false) => Some(v.as_str()),
        _ => None,
    });
    let principals = field(&s.principals, &principal_ns);
    let accounts = if s.service_accounts.is_empty() {
        u64::MAX
    } else {
        s.service_accounts
            .iter()
            .map(|sa| sa.split_once('/').map_or(u64::MAX, |(ns, _)| ns_bit(ns)))
            .fold(0, |a, b| a | b)
    };
    namespaces & principals & accounts
}

#[derive(Debug, Default)]
struct Source {
    principals: Vec<Str>,
    not_principals: Vec<Str>,
    request_principals: Vec<Str>,
    not_request_principals: Vec<Str>,
    namespaces: Vec<Str>,
    not_namespaces: Vec<Str>,
    service_accounts: Vec<String>,
    not_service_accounts: Vec<String>,
    ip_blocks: Vec<Cidr>,
    not_ip_blocks: Vec<Cidr>,
    remote_ip_blocks: Vec<Cidr>,
    not_remote_ip_blocks: Vec<Cidr>,
}

#[derive(Debug, Default)]
struct Operation {
    hosts: Vec<Str>,
    not_hosts: Vec<Str>,
    ports: Vec<u32>,
    not_ports: Vec<u32>,
    methods: Vec<Str>,
    not_methods: Vec<Str>,
    paths: Vec<Str>,
    not_paths: Vec<Str>,
}

#[derive(Debug)]
struct Condition {
    key: Key,
    values: Vec<Str>,
    not_values: Vec<Str>,
    /// For IP keys, the values as CIDRs.
    cidrs: Vec<Cidr>,
    not_cidrs: Vec<Cidr>,
}

#[derive(Debug)]
enum Key {
    Header(http::HeaderName),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    Sni,
    /// `request.auth.principal`.
    AuthPrincipal,
    /// `request.auth.audiences` (the `aud` claim).
    AuthAudiences,
    /// `request.auth.presenter` (the `azp` claim).
    AuthPresenter,
    /// `request.auth.claims[a][b]...`: the claim path.
    AuthClaim(Vec<String>),
    /// Not evaluable here: the rule matches what the policy's action makes conservative.
    Unknown,
}

#[derive(Debug)]
enum Str {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    /// A regular expression, and the literal text every match starts with (checked
    /// first: most values are rejected without running the automaton).
    Regex(regex::Regex, String),
    Present,
    /// A matcher that did not compile: matches nothing.
    Never,
}

impl Str {
    fn compile(m: &pb::StringMatch) -> Str {
        use pb::string_match::Kind;
        let ic = m.ignore_case;
        let fold = |s: &str| {
            if ic {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        match &m.kind {
            Some(Kind::Exact(s)) => Str::Exact(fold(s), ic),
            Some(Kind::Prefix(s)) => Str::Prefix(fold(s), ic),
            Some(Kind::Suffix(s)) => Str::Suffix(fold(s), ic),
            Some(Kind::Regex(r)) => {
                let literal: String = if r.contains('|') {
                    String::new()
                } else {
                    r.chars()
                        .take_while(|c| !"\\.+*?()|[]{}^$".contains(*c))
                        .collect()
                };
                // A quantifier right after the literal applies to its last character.
                let literal = match r[literal.len()..].chars().next() {
                    Some('*' | '?' | '{') => {
                        let mut l = literal;
                        l.pop();
                        l
                    }
                    _ => literal,
                };
                regex::Regex::new(&format!("^(?:{r})$"))
                    .map(|re| Str::Regex(re, literal))
                    .unwrap_or(Str::Never)
            }
            Some(Kind::Present(())) => Str::Present,
            None => Str::Never,
        }
    }

    fn matches(&self, v: &str) -> bool {
        let eq = |a: &str, b: &str, ic: bool| {
            if ic {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        match self {
            Str::Exact(s, ic) => eq(v, s, *ic),
            Str::Prefix(s, ic) => {
                v.len() >= s.len() && v.is_char_boundary(s.len()) && eq(&v[..s.len()], s, *ic)
            }
            Str::Suffix(s, ic) => {
                v.len() >= s.len()
                    && v.is_char_boundary(v.len() - s.len())
                    && eq(&v[v.len() - s.len()..], s, *ic)
            }
            Str::Regex(r, literal) => v.starts_with(literal.as_str()) && r.is_match(v),
            Str::Present => true,
            Str::Never => false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    fn from_pb(c: &pb::CidrRange) -> Option<Cidr> {
        let addr = match c.address.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(&c.address[..]).ok()?),
            16 => IpAddr::from(<[u8; 16]>::try_from(&c.address[..]).ok()?),
            _ => return None,
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (c.prefix_len <= max).then_some(Cidr {
            addr,
            len: c.prefix_len as u8,
        })
    }

    fn parse(s: &str) -> Option<Cidr> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, Some(len.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        (len <= max).then_some(Cidr { addr: ip, len })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) if self.addr.is_ipv4() => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            other => other,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

fn strs(v: &[pb::StringMatch]) -> Vec<Str> {
    v.iter().map(Str::compile).collect()
}

fn cidrs(v: &[pb::CidrRange]) -> Vec<Cidr> {
    // A block that does not decode matches nothing (the control plane sends valid ones).
    v.iter().filter_map(Cidr::from_pb).collect()
}

fn key(k: &str) -> Key {
    let bracketed = |prefix: &str| {
        k.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(']'))
    };
    if let Some(h) = bracketed("request.headers[") {
        return http::HeaderName::from_bytes(h.as_bytes()).map_or(Key::Unknown, Key::Header);
    }
    match k {
        "source.ip" => Key::SourceIp,
        "remote.ip" => Key::RemoteIp,
        "source.namespace" => Key::SourceNamespace,
        "source.principal" => Key::SourcePrincipal,
        "destination.ip" => Key::DestinationIp,
        "destination.port" => Key::DestinationPort,
        "connection.sni" => Key::Sni,
        "request.auth.principal" => Key::AuthPrincipal,
        "request.auth.audiences" => Key::AuthAudiences,
        "request.auth.presenter" => Key::AuthPresenter,
        _ => match k.strip_prefix("request.auth.claims") {
            // `[a][b]`: nested claims, one bracket per level.
            Some(rest) if rest.starts_with('[') && rest.ends_with(']') => {
                let path: Vec<String> = rest[1..rest.len() - 1]
                    .split("][")
                    .map(str::to_string)
                    .collect();
                if path.iter().any(String::is_empty) {
                    Key::Unknown
                } else {
                    Key::AuthClaim(path)
                }
            }
            _ => Key::Unknown,
        },
    }
}

impl Policies {
    /// Compiles the policies of one configuration.
    pub fn compile<'a>(policies: impl Iterator<Item = &'a pb::L7Policy>) -> Policies {
        let mut list: Vec<Policy> = policies
            .filter_map(|p| {
                let action = Action::try_from(p.action).ok()?;
                let services = target_services(p.target.as_ref()?)?;
                let rules = p
                    .rules
                    .iter()
                    .map(|r| Rule {
                        id: 0,
                        ns_mask: 0,
                        from: r
                            .from
                            .iter()
                            .map(|s| Source {
                                principals: strs(&s.principals),
                                not_principals: strs(&s.not_principals),
                                request_principals: strs(&s.request_principals),
                                not_request_principals: strs(&s.not_request_principals),
                                namespaces: strs(&s.namespaces),
                                not_namespaces: strs(&s.not_namespaces),
                                service_accounts: s.service_accounts.clone(),
                                not_service_accounts: s.not_service_accounts.clone(),
                                ip_blocks: cidrs(&s.ip_blocks),
                                not_ip_blocks: cidrs(&s.not_ip_blocks),
                                remote_ip_blocks: cidrs(&s.remote_ip_blocks),
                                not_remote_ip_blocks: cidrs(&s.not_remote_ip_blocks),
                            })
                            .collect(),
                        to: r
                            .to
                            .iter()
                            .map(|o| Operation {
                                hosts: strs(&o.hosts),
                                not_hosts: strs(&o.not_hosts),
                                ports: o.ports.clone(),
                                not_ports: o.not_ports.clone(),
                                methods: strs(&o.methods),
                                not_methods: strs(&o.not_methods),
                                paths: strs(&o.paths),
                                not_paths: strs(&o.not_paths),
                            })
                            .collect(),
                        when: r
                            .when
                            .iter()
                            .map(|c| {
                                let key = key(&c.key);
                                let ip_key = matches!(
                                    key,
                                    Key::SourceIp | Key::RemoteIp | Key::DestinationIp
                                );
                                let as_cidrs = |v: &[pb::StringMatch]| -> Vec<Cidr> {
                                    if !ip_key {
                                        return Vec::new();
                                    }
                                    v.iter()
                                        .filter_map(|m| match &m.kind {
                                            Some(pb::string_match::Kind::Exact(s)) => {
                                                Cidr::parse(s)
                                            }
                                            _ => None,
                                        })
                                        .collect()
                                };
                                Condition {
                                    cidrs: as_cidrs(&c.values),
                                    not_cidrs: as_cidrs(&c.not_values),
                                    key,
                                    values: strs(&c.values),
                                    not_values: strs(&c.not_values),
                                }
                            })
                            .collect(),
                    })
                    .collect();
                let mut rules: Vec<Rule> = rules;
                for r in &mut rules {
                    r.ns_mask = if r.from.is_empty() {
                        u64::MAX
                    } else {
                        r.from.iter().map(source_mask).fold(0, |a, b| a | b)
                    };
                }
                let ns_mask = rules.iter().fold(0, |a, r| a | r.ns_mask);
                Some(Policy {
                    name: p.name.as_str().into(),
                    action,
                    dry_run: p.dry_run,
                    services,
                    rules,
                    ext_authz: p.ext_authz.clone().map(std::sync::Arc::new),
                    ns_mask,
                    first_rule: 0,
                })
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        let mut id = 0u32;
        for p in &mut list {
            p.first_rule = id;
            for r in &mut p.rules {
                r.id = id;
                id += 1;
            }
        }
        let paths = PathIndex::build(&list);
        Policies { list, paths }
    }

    /// Whether no policy applies to anything (the common case: nothing to evaluate).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Decides `a`.
    pub fn decide(&self, a: &Attrs<'_>) -> Decision {
        match a.http {
            // A request: only the rules its path may let match are evaluated.
            Some(h) if !self.list.is_empty() => CANDIDATES.with(|c| match c.try_borrow_mut() {
                Ok(mut bits) => {
                    self.paths.candidates(h.path, &mut bits);
                    self.decide_among(a, Some(&bits))
                }
                Err(_) => self.decide_among(a, None),
            }),
            // A connection: HTTP fields are conservative per action, so every rule is.
            _ => self.decide_among(a, None),
        }
    }

    /// Decides `a`, evaluating only the rules set in `candidates` (all when `None`).
    fn decide_among(&self, a: &Attrs<'_>, candidates: Option<&[u64]>) -> Decision {
        let may = |id: u32| candidates.is_none_or(|c| c[id as usize / 64] & (1 << (id % 64)) != 0);
        let mut d = Decision::default();
        let applies = |p: &Policy| covers(p.services.as_deref(), a.service);
        let mut any_allow = false;
        let bit = a.namespace.map_or(u64::MAX, ns_bit);
        let mut dry_allow: Option<bool> = None;
        for p in self.list.iter().filter(|p| applies(p)) {
            // Rules (and whole policies) that cannot match the peer's namespace are skipped
            // by their masks; without a peer identity every rule is evaluated.
            let matched = p.ns_mask & bit != 0
                && candidates
                    .is_none_or(|c| any_in(c, p.first_rule, p.first_rule + p.rules.len() as u32))
                && p.rules
                    .iter()
                    .any(|r| r.ns_mask & bit != 0 && may(r.id) && r.matches(a, p.action));
            if p.dry_run {
                match p.action {
                    Action::Allow => {
                        dry_allow = Some(dry_allow.unwrap_or(false) || matched);
                    }
                    Action::Deny | Action::Custom => d.dry_run.push((p.name.to_string(), matched)),
                    Action::Audit => {}
                }
                continue;
            }
            match p.action {
                Action::Custom if matched && d.custom.is_none() => {
                    d.custom = Some((p.name.to_string(), p.ext_authz.clone()));
                }
                Action::Deny if matched && d.denied.is_none() => {
                    d.denied = Some((p.name.to_string(), false));
                }
                Action::Allow => {
                    any_allow = true;
                    if matched && d.allowed_by.is_none() {
                        d.allowed_by = Some(p.name.clone());
                    }
                }
                Action::Audit if matched => d.audited.push(p.name.to_string()),
                _ => {}
            }
        }
        if let Some(any) = dry_allow {
            d.dry_run.push(("(dry-run ALLOW policies)".into(), !any));
        }
        if d.denied.is_none() && any_allow && d.allowed_by.is_none() {
            // (Named only on this path: an allowed request allocates nothing here.)
            let names: Vec<&str> = self
                .list
                .iter()
                .filter(|p| applies(p) && !p.dry_run && p.action == Action::Allow)
                .map(|p| &*p.name)
                .collect();
            d.denied = Some((
                format!("no ALLOW policy matched: {}", names.join(", ")),
                false,
            ));
        }
        if d.denied.is_some() {
            d.allowed_by = None;
        }
        d
    }
}

/// A field with values: any matches the attribute (absent: none does).
fn any_of(ms: &[Str], v: Option<&str>) -> bool {
    v.is_some_and(|v| ms.iter().any(|m| m.matches(v)))
}

impl Rule {
    fn matches(&self, a: &Attrs<'_>, action: Action) -> bool {
        // A request attribute a TCP connection does not have: conservative per action.
        let l7_default = matches!(action, Action::Deny | Action::Custom);
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a, l7_default)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a, l7_default)))
            && self.when.iter().all(|c| c.matches(a, l7_default))
    }
}

/// `field` matches (present field) and `not_field` does not.
fn field(values: &[Str], not_values: &[Str], v: Option<&str>) -> bool {
    (values.is_empty() || any_of(values, v)) && (not_values.is_empty() || !any_of(not_values, v))
}

fn cidr_field(values: &[Cidr], not_values: &[Cidr], ip: IpAddr) -> bool {
    (values.is_empty() || values.iter().any(|c| c.contains(ip)))
        && (not_values.is_empty() || !not_values.iter().any(|c| c.contains(ip)))
}

impl Source {
    fn matches(&self, a: &Attrs<'_>, l7_default: bool) -> bool {
        let sa = |list: &[String]| {
            a.service_account
                .is_some_and(|s| list.iter().any(|x| x == s))
        };
        let request_principals =
            if self.request_principals.is_empty() && self.not_request_principals.is_empty() {
                true
            } else if a.http.is_none() {
                l7_default
            } else {
                field(
                    &self.request_principals,
                    &self.not_request_principals,
                    a.request_auth.map(|(p, _)| p),
                )
            };
        let remote = if self.remote_ip_blocks.is_empty() && self.not_remote_ip_blocks.is_empty() {
            true
        } else if a.http.is_none() {
            l7_default
        } else {
            cidr_field(
                &self.remote_ip_blocks,
                &self.not_remote_ip_blocks,
                a.remote_ip,
            )
        };
        field(&self.principals, &self.not_principals, a.principal)
            && field(&self.namespaces, &self.not_namespaces, a.namespace)
            && (self.service_accounts.is_empty() || sa(&self.service_accounts))
            && (self.not_service_accounts.is_empty() || !sa(&self.not_service_accounts))
            && cidr_field(&self.ip_blocks, &self.not_ip_blocks, a.source_ip)
            && request_principals
            && remote
    }
}

impl Operation {
    fn matches(&self, a: &Attrs<'_>, l7_default: bool) -> bool {
        let port = u32::from(a.destination_port);
        let ports = (self.ports.is_empty() || self.ports.contains(&port))
            && (self.not_ports.is_empty() || !self.not_ports.contains(&port));
        if !ports {
            return false;
        }
        let Some(h) = &a.http else {
            let has_l7 = !(self.hosts.is_empty()
                && self.not_hosts.is_empty()
                && self.methods.is_empty()
                && self.not_methods.is_empty()
                && self.paths.is_empty()
                && self.not_paths.is_empty());
            return !has_l7 || l7_default;
        };
        // The cheap checks first; hosts match with or without the port.
        if !field(&self.methods, &self.not_methods, Some(h.method))
            || !field(&self.paths, &self.not_paths, Some(h.path))
        {
            return false;
        }
        if self.hosts.is_empty() && self.not_hosts.is_empty() {
            return true;
        }
        let bare = match h.host.rsplit_once(':') {
            Some((b, p))
                if !p.is_empty()
                    && p.bytes().all(|c| c.is_ascii_digit())
                    && (!b.contains(':') || b.ends_with(']')) =>
            {
                b
            }
            _ => h.host,
        };
        let host_ok = |list: &[Str]| any_of(list, Some(h.host)) || any_of(list, Some(bare));
        (self.hosts.is_empty() || host_ok(&self.hosts))
            && (self.not_hosts.is_empty() || !host_ok(&self.not_hosts))
    }
}

impl Condition {
    fn matches(&self, a: &Attrs<'_>, l7_default: bool) -> bool {
        let ip = |ip: IpAddr| {
            (self.cidrs.is_empty() || self.cidrs.iter().any(|c| c.contains(ip)))
                && (self.not_cidrs.is_empty() || !self.not_cidrs.iter().any(|c| c.contains(ip)))
        };
        match &self.key {
            Key::SourceIp => ip(a.source_ip),
            Key::DestinationIp => ip(a.destination_ip),
            Key::RemoteIp if a.http.is_none() => l7_default,
            Key::RemoteIp => ip(a.remote_ip),
            Key::SourceNamespace => field(&self.values, &self.not_values, a.namespace),
            Key::SourcePrincipal => field(&self.values, &self.not_values, a.principal),
            Key::DestinationPort => {
                let mut buf = [0u8; 5];
                let port = port_text(a.destination_port, &mut buf);
                field(&self.values, &self.not_values, Some(port))
            }
            // The tunnelled traffic is plaintext HTTP: no SNI.
            Key::Sni => field(&self.values, &self.not_values, None),
            Key::Header(_)
            | Key::AuthPrincipal
            | Key::AuthAudiences
            | Key::AuthPresenter
            | Key::AuthClaim(_)
                if a.http.is_none() =>
            {
                l7_default
            }
            Key::Header(name) => {
                let Some(h) = &a.http else { return l7_default };
                let mut values = h
                    .headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok());
                match (values.next(), values.next()) {
                    (None, _) => field(&self.values, &self.not_values, None),
                    (Some(one), None) => field(&self.values, &self.not_values, Some(one)),
                    // Several: matched as one, comma-joined (as Envoy does).
                    (Some(first), Some(second)) => {
                        let mut joined = format!("{first},{second}");
                        for v in values {
                            joined.push(',');
                            joined.push_str(v);
                        }
                        field(&self.values, &self.not_values, Some(&joined))
                    }
                }
            }
            Key::AuthPrincipal => field(
                &self.values,
                &self.not_values,
                a.request_auth.map(|(p, _)| p),
            ),
            Key::AuthAudiences => self.claim(a, &["aud"]),
            Key::AuthPresenter => self.claim(a, &["azp"]),
            Key::AuthClaim(path) => self.claim(a, path),
            Key::Unknown => l7_default,
        }
    }
}

impl Condition {
    /// A claim condition: a string claim is its value; a list of strings matches when one
    /// of them does (and a `not` value excludes when any does); absent matches no value.
    fn claim<S: AsRef<str>>(&self, a: &Attrs<'_>, path: &[S]) -> bool {
        let mut v = a.request_auth.map(|(_, claims)| claims);
        for p in path {
            v = v.and_then(|c| c.get(p.as_ref()));
        }
        use serde_json::Value;
        let values: Vec<&str> = match v {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let any = |ms: &[Str]| values.iter().any(|v| ms.iter().any(|m| m.matches(v)));
        (self.values.is_empty() || any(&self.values))
            && (self.not_values.is_empty() || !any(&self.not_values))
    }
}

/// A port as decimal text, written into `buf` (no allocation).
fn port_text(mut n: u16, buf: &mut [u8; 5]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// The path as policy sees it: RFC 3986 dot segments resolved, percent-encoded unreserved
/// characters decoded, and runs of `/` merged — so `/a/../admin`, `/%61dmin` and
/// `//admin` are all `/admin` to a rule about `/admin`. Returns `None` when nothing
/// changes (the common case allocates nothing).
pub fn normalize_path(path: &str) -> Option<String> {
    let needs =
        path.contains("//") || path.contains("/.") || path.contains('%') || !path.starts_with('/');
    if !needs {
        return None;
    }
    // Decode %XX of unreserved characters only.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            && (v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~'))
        {
            decoded.push(v as char);
            i += 3;
            continue;
        }
        let c = path[i..].chars().next().unwrap_or('\u{fffd}');
        decoded.push(c);
        i += c.len_utf8().max(1);
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut norm = String::with_capacity(decoded.len());
    for s in &out {
        norm.push('/');
        norm.push_str(s);
    }
    if norm.is_empty() || decoded.ends_with('/') && !norm.ends_with('/') {
        norm.push('/');
    }
    (norm != path).then_some(norm)
}

/// Policies by configuration generation, shared by the workers.
#[derive(Debug, Default)]
pub struct Cache {
    inner: std::sync::Mutex<Option<(u64, std::sync::Arc<Policies>)>>,
}

impl Cache {
    /// The policies of configuration `generation` (compiled once per generation).
    pub fn get(
        &self,
        generation: u64,
        compile: impl FnOnce() -> Policies,
    ) -> std::sync::Arc<Policies> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match &*g {
            Some((gen_, p)) if *gen_ == generation => p.clone(),
            _ => {
                let p = std::sync::Arc::new(compile());
                *g = Some((generation, p.clone()));
                p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::string_match::Kind;

    fn s(kind: Kind) -> pb::StringMatch {
        pb::StringMatch {
            kind: Some(kind),
            ignore_case: false,
        }
    }
    fn exact(v: &str) -> pb::StringMatch {
        s(Kind::Exact(v.into()))
    }

    fn policy(name: &str, action: Action, rules: Vec<pb::Rule>) -> pb::L7Policy {
        pb::L7Policy {
            name: name.into(),
            namespace: "shop".into(),
            target: Some(pb::PolicyTarget {
                scope: Scope::Waypoint as i32,
                services: Vec::new(),
            }),
            action: action as i32,
            rules,
            dry_run: false,
            provider: String::new(),
            ext_authz: None,
        }
    }

    fn from_ns(ns: &str) -> pb::Source {
        pb::Source {
            namespaces: vec![exact(ns)],
            ..Default::default()
        }
    }

    fn op_method(m: &str) -> pb::Operation {
        pb::Operation {
            methods: vec![exact(m)],
            ..Default::default()
        }
    }

    struct Req {
        ns: &'static str,
        method: &'static str,
        path: &'static str,
        headers: HeaderMap,
        tcp: bool,
    }

    fn req(ns: &'static str, method: &'static str, path: &'static str) -> Req {
        Req {
            ns,
            method,
            path,
            headers: HeaderMap::new(),
            tcp: false,
        }
    }

    fn decide(policies: &[pb::L7Policy], r: &Req) -> Decision {
        let principal = format!("cluster.local/ns/{}/sa/client", r.ns);
        let sa = format!("{}/client", r.ns);
        let ps = Policies::compile(policies.iter());
        let a = Attrs {
            principal: Some(&principal),
            namespace: Some(r.ns),
            service_account: Some(&sa),
            source_ip: "10.244.1.5".parse().unwrap(),
            remote_ip: "10.244.1.5".parse().unwrap(),
            destination_ip: "10.96.0.10".parse().unwrap(),
            destination_port: 80,
            service: Some(("shop", "web.shop.svc.cluster.local")),
            http: (!r.tcp).then_some(Http {
                method: r.method,
                path: r.path,
                host: "web.shop.svc.cluster.local:80",
                headers: &r.headers,
            }),
            request_auth: None,
        };
        ps.decide(&a)
    }

    fn denied(policies: &[pb::L7Policy], r: &Req) -> bool {
        decide(policies, r).denied.is_some()
    }

    #[test]
    fn the_seed_deny_of_post_from_dev_denies_exactly_that() {
        let deny = policy(
            "shop/httpbin",
            Action::Deny,
            vec![pb::Rule {
                from: vec![from_ns("dev")],
                to: vec![op_method("POST")],
                when: vec![],
            }],
        );
        let p = [deny];
        assert!(denied(&p, &req("dev", "POST", "/")));
        assert!(!denied(&p, &req("dev", "GET", "/")));
        assert!(!denied(&p, &req("prod", "POST", "/")));
        // A TCP connection from dev: the DENY's HTTP fields count as matching.
        let mut tcp = req("dev", "", "");
        tcp.tcp = true;
        assert!(denied(&p, &tcp));
        tcp.ns = "prod";
        assert!(!denied(&p, &tcp));
    }

    #[test]
    fn allow_policies_deny_what_none_matches_and_deny_wins() {
        let allow = policy(
            "shop/allow-get",
            Action::Allow,
            vec![pb::Rule {
                to: vec![op_method("GET")],
                ..Default::default()
            }],
        );
        let deny = policy(
            "shop/no-admin",
            Action::Deny,
            vec![pb::Rule {
                to: vec![pb::Operation {
                    paths: vec![s(Kind::Prefix("/admin".into()))],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        let p = [allow.clone(), deny];
        let d = decide(&p, &req("prod", "GET", "/x"));
        assert_eq!(d.denied, None);
        assert_eq!(d.allowed_by.as_deref(), Some("shop/allow-get"));
        assert!(denied(&p, &req("prod", "POST", "/x")), "no ALLOW matched");
        assert_eq!(
            decide(&p, &req("prod", "GET", "/admin/x")).denied,
            Some(("shop/no-admin".into(), false))
        );
        // An ALLOW policy with no rules denies everything; a TCP connection does not match
        // an ALLOW rule's HTTP fields.
        let none = policy("shop/nothing", Action::Allow, vec![]);
        assert!(denied(&[none], &req("prod", "GET", "/")));
        let mut tcp = req("prod", "", "");
        tcp.tcp = true;
        assert!(denied(&[allow], &tcp));
    }

    #[test]
    fn not_fields_templates_headers_ports_and_principals() {
        let rule = |r: pb::Rule| vec![policy("shop/p", Action::Deny, vec![r])];
        // notNamespaces: everyone but prod.
        let p = rule(pb::Rule {
            from: vec![pb::Source {
                not_namespaces: vec![exact("prod")],
                ..Default::default()
            }],
            ..Default::default()
        });
        assert!(denied(&p, &req("dev", "GET", "/")));
        assert!(!denied(&p, &req("prod", "GET", "/")));
        // Path template and suffix.
        let p = rule(pb::Rule {
            to: vec![pb::Operation {
                paths: vec![
                    s(Kind::Regex("/api/[^/]+/items".into())),
                    s(Kind::Suffix(".php".into())),
                ],
                ..Default::default()
            }],
            ..Default::default()
        });
        assert!(denied(&p, &req("dev", "GET", "/api/v1/items")));
        assert!(!denied(&p, &req("dev", "GET", "/api/v1/x/items")));
        assert!(denied(&p, &req("dev", "GET", "/x/index.php")));
        // A header condition, with not_values.
        let p = rule(pb::Rule {
            when: vec![pb::Condition {
                key: "request.headers[x-env]".into(),
                values: vec![],
                not_values: vec![exact("prod")],
            }],
            ..Default::default()
        });
        let mut r = req("dev", "GET", "/");
        assert!(denied(&p, &r), "an absent header is not prod");
        r.headers.insert("x-env", "prod".parse().unwrap());
        assert!(!denied(&p, &r));
        // Ports, hosts without the port, principals by prefix, service accounts.
        let p = rule(pb::Rule {
            from: vec![pb::Source {
                principals: vec![s(Kind::Prefix("cluster.local/ns/dev/".into()))],
                service_accounts: vec!["dev/client".into()],
                ..Default::default()
            }],
            to: vec![pb::Operation {
                ports: vec![80],
                hosts: vec![pb::StringMatch {
                    kind: Some(Kind::Exact("WEB.shop.svc.cluster.local".into())),
                    ignore_case: true,
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        assert!(denied(&p, &req("dev", "GET", "/")));
        assert!(!denied(&p, &req("prod", "GET", "/")));
        // requestPrincipals "*" without a verified token: denied.
        let allow = vec![policy(
            "shop/jwt",
            Action::Allow,
            vec![pb::Rule {
                from: vec![pb::Source {
                    request_principals: vec![s(Kind::Present(()))],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        )];
        assert!(denied(&allow, &req("dev", "GET", "/")));
        // destination.port and source.ip conditions.
        let p = rule(pb::Rule {
            when: vec![
                pb::Condition {
                    key: "destination.port".into(),
                    values: vec![exact("80")],
                    not_values: vec![],
                },
                pb::Condition {
                    key: "source.ip".into(),
                    values: vec![exact("10.244.0.0/16")],
                    not_values: vec![],
                },
            ],
            ..Default::default()
        });
        assert!(denied(&p, &req("dev", "GET", "/")));
    }

    #[test]
    fn custom_audit_dry_run_and_service_scope() {
        let mut custom = policy("shop/ext", Action::Custom, vec![pb::Rule::default()]);
        custom.provider = "ext-authz".into();
        let d = decide(&[custom], &req("dev", "GET", "/"));
        assert_eq!(d.denied, None, "the external authorizer decides");
        assert_eq!(d.custom.map(|c| c.0), Some("shop/ext".to_string()));
        let audit = policy("shop/audit", Action::Audit, vec![pb::Rule::default()]);
        let d = decide(&[audit], &req("dev", "GET", "/"));
        assert_eq!(
            (d.denied, d.audited),
            (None, vec!["shop/audit".to_string()])
        );
        let mut dry = policy("shop/dry", Action::Deny, vec![pb::Rule::default()]);
        dry.dry_run = true;
        let d = decide(&[dry], &req("dev", "GET", "/"));
        assert_eq!(d.denied, None);
        assert_eq!(d.dry_run, vec![("shop/dry".to_string(), true)]);
        let mut other = policy("shop/other-svc", Action::Deny, vec![pb::Rule::default()]);
        other.target = Some(pb::PolicyTarget {
            scope: Scope::Services as i32,
            services: vec![pb::ServiceRef {
                namespace: "shop".into(),
                hostname: "api.shop.svc.cluster.local".into(),
                port: 0,
            }],
        });
        assert!(
            !denied(&[other], &req("dev", "GET", "/")),
            "another Service's policy"
        );
    }

    #[test]
    fn paths_are_normalized_for_policy() {
        assert_eq!(normalize_path("/a/b"), None);
        assert_eq!(normalize_path("/a/../admin").as_deref(), Some("/admin"));
        assert_eq!(normalize_path("//admin").as_deref(), Some("/admin"));
        assert_eq!(normalize_path("/%61dmin").as_deref(), Some("/admin"));
        assert_eq!(normalize_path("/./admin/").as_deref(), Some("/admin/"));
        assert_eq!(normalize_path("/a%2Fb"), None, "reserved escapes stay");
        assert_eq!(normalize_path("/../..").as_deref(), Some("/"));
    }
}

/// Property tests: the compiled evaluator against a straightforward reference evaluation of
/// the same resources, on random policies and requests (a seeded generator: a failure
/// names its seed, and `AUTHZ_PROPERTY_CASES` sets how many run).
#[cfg(test)]
mod properties {
    use super::*;
    use pb::string_match::Kind;

    /// splitmix64.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len() as u64) as usize]
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    const NAMESPACES: &[&str] = &["a", "b", "c"];
    const ACCOUNTS: &[&str] = &["x", "y"];
    const METHODS: &[&str] = &["GET", "POST", "PUT"];
    const PATHS: &[&str] = &["/", "/api/v1", "/api/v2/items", "/admin", "/admin/x"];
    const ENVS: &[Option<&str>] = &[None, Some("prod"), Some("dev")];

    fn sm(kind: Kind) -> pb::StringMatch {
        pb::StringMatch {
            kind: Some(kind),
            ignore_case: false,
        }
    }

    fn some<T>(rng: &mut Rng, max: u64, mut f: impl FnMut(&mut Rng) -> T) -> Vec<T> {
        let n = rng.below(max + 1);
        (0..n).map(|_| f(rng)).collect()
    }

    fn principal(rng: &mut Rng) -> pb::StringMatch {
        let ns = rng.pick(NAMESPACES);
        match rng.below(3) {
            0 => sm(Kind::Exact(format!(
                "cluster.local/ns/{ns}/sa/{}",
                rng.pick(ACCOUNTS)
            ))),
            1 => sm(Kind::Prefix(format!("cluster.local/ns/{ns}/"))),
            _ => sm(Kind::Suffix(format!("/sa/{}", rng.pick(ACCOUNTS)))),
        }
    }

    fn path(rng: &mut Rng) -> pb::StringMatch {
        match rng.below(4) {
            0 => sm(Kind::Exact(rng.pick(PATHS).to_string())),
            1 => sm(Kind::Prefix(
                rng.pick(&["/api/", "/admin", "/"]).to_string(),
            )),
            2 => sm(Kind::Suffix(rng.pick(&["/items", "/x", "v1"]).to_string())),
            _ => sm(Kind::Regex(
                rng.pick(&["/api/[^/]+/items", "/admin(/.*)?"]).to_string(),
            )),
        }
    }

    fn policy(rng: &mut Rng, i: usize) -> pb::L7Policy {
        use pb::l7_policy::Action as A;
        let action = *rng.pick(&[A::Allow, A::Allow, A::Deny, A::Deny, A::Audit, A::Custom]);
        let rules = some(rng, 3, |rng| pb::Rule {
            from: some(rng, 2, |rng| pb::Source {
                principals: some(rng, 1, principal),
                not_principals: if rng.chance(20) {
                    vec![principal(rng)]
                } else {
                    vec![]
                },
                namespaces: some(rng, 2, |rng| {
                    sm(Kind::Exact(rng.pick(NAMESPACES).to_string()))
                }),
                not_namespaces: if rng.chance(20) {
                    vec![sm(Kind::Exact(rng.pick(NAMESPACES).to_string()))]
                } else {
                    vec![]
                },
                service_accounts: if rng.chance(20) {
                    vec![format!("{}/{}", rng.pick(NAMESPACES), rng.pick(ACCOUNTS))]
                } else {
                    vec![]
                },
                ..Default::default()
            }),
            to: some(rng, 2, |rng| pb::Operation {
                methods: some(rng, 2, |rng| sm(Kind::Exact(rng.pick(METHODS).to_string()))),
                not_methods: if rng.chance(15) {
                    vec![sm(Kind::Exact(rng.pick(METHODS).to_string()))]
                } else {
                    vec![]
                },
                paths: some(rng, 2, path),
                not_paths: if rng.chance(15) {
                    vec![path(rng)]
                } else {
                    vec![]
                },
                ports: if rng.chance(20) {
                    vec![*rng.pick(&[80, 9000])]
                } else {
                    vec![]
                },
                ..Default::default()
            }),
            when: some(rng, 1, |rng| match rng.below(3) {
                0 => pb::Condition {
                    key: "request.headers[x-env]".into(),
                    values: vec![sm(Kind::Exact(rng.pick(&["prod", "dev"]).to_string()))],
                    not_values: vec![],
                },
                1 => pb::Condition {
                    key: "source.namespace".into(),
                    values: vec![],
                    not_values: vec![sm(Kind::Exact(rng.pick(NAMESPACES).to_string()))],
                },
                _ => pb::Condition {
                    key: "destination.port".into(),
                    values: vec![sm(Kind::Exact("80".into()))],
                    not_values: vec![],
                },
            }),
        });
        pb::L7Policy {
            name: format!("p/{i}"),
            namespace: "p".into(),
            target: Some(if rng.chance(70) {
                pb::PolicyTarget {
                    scope: Scope::Waypoint as i32,
                    services: vec![],
                }
            } else {
                pb::PolicyTarget {
                    scope: Scope::Services as i32,
                    services: vec![pb::ServiceRef {
                        namespace: "shop".into(),
                        hostname: rng.pick(&["web", "api"]).to_string(),
                        port: 0,
                    }],
                }
            }),
            action: action as i32,
            rules,
            dry_run: rng.chance(10),
            provider: String::new(),
            ext_authz: None,
        }
    }

    /// The reference: Istio's semantics read straight off the resources.
    fn reference(policies: &[pb::L7Policy], r: &Req) -> (bool, bool) {
        fn matches(m: &pb::StringMatch, v: &str) -> bool {
            match m.kind.as_ref().unwrap() {
                Kind::Exact(e) => v == e,
                Kind::Prefix(p) => v.starts_with(p.as_str()),
                Kind::Suffix(s) => v.ends_with(s.as_str()),
                Kind::Regex(re) => regex::Regex::new(&format!("^(?:{re})$"))
                    .unwrap()
                    .is_match(v),
                Kind::Present(()) => true,
            }
        }
        let one = |ms: &[pb::StringMatch], v: Option<&str>| {
            ms.is_empty() || v.is_some_and(|v| ms.iter().any(|m| matches(m, v)))
        };
        let none = |ms: &[pb::StringMatch], v: Option<&str>| {
            ms.is_empty() || !v.is_some_and(|v| ms.iter().any(|m| matches(m, v)))
        };
        let principal = r.ns.map(|ns| format!("cluster.local/ns/{ns}/sa/{}", r.sa));
        let sa = r.ns.map(|ns| format!("{ns}/{}", r.sa));
        let rule_matches = |rule: &pb::Rule, deny_like: bool| {
            let from = rule.from.is_empty()
                || rule.from.iter().any(|s| {
                    one(&s.principals, principal.as_deref())
                        && none(&s.not_principals, principal.as_deref())
                        && one(&s.namespaces, r.ns)
                        && none(&s.not_namespaces, r.ns)
                        && (s.service_accounts.is_empty()
                            || sa.as_ref().is_some_and(|x| s.service_accounts.contains(x)))
                });
            let to = rule.to.is_empty()
                || rule.to.iter().any(|o| {
                    let port_ok = o.ports.is_empty() || o.ports.contains(&u32::from(r.port));
                    let http = !(o.methods.is_empty()
                        && o.not_methods.is_empty()
                        && o.paths.is_empty()
                        && o.not_paths.is_empty());
                    port_ok
                        && if r.tcp {
                            !http || deny_like
                        } else {
                            one(&o.methods, Some(r.method))
                                && none(&o.not_methods, Some(r.method))
                                && one(&o.paths, Some(r.path))
                                && none(&o.not_paths, Some(r.path))
                        }
                });
            let when = rule.when.iter().all(|c| match c.key.as_str() {
                "request.headers[x-env]" if r.tcp => deny_like,
                "request.headers[x-env]" => one(&c.values, r.env) && none(&c.not_values, r.env),
                "source.namespace" => one(&c.values, r.ns) && none(&c.not_values, r.ns),
                "destination.port" => {
                    let p = r.port.to_string();
                    one(&c.values, Some(&p)) && none(&c.not_values, Some(&p))
                }
                _ => unreachable!(),
            });
            from && to && when
        };
        use pb::l7_policy::Action as A;
        let (mut denied, mut custom, mut any_allow, mut allowed) = (false, false, false, false);
        for p in policies {
            let t = p.target.as_ref().unwrap();
            let applies = t.scope == Scope::Waypoint as i32
                || t.services
                    .iter()
                    .any(|s| s.namespace == "shop" && s.hostname == r.service);
            if !applies || p.dry_run {
                continue;
            }
            let action = A::try_from(p.action).unwrap();
            let deny_like = matches!(action, A::Deny | A::Custom);
            let m = p.rules.iter().any(|rule| rule_matches(rule, deny_like));
            match action {
                A::Deny => denied |= m,
                A::Custom => custom |= m,
                A::Allow => {
                    any_allow = true;
                    allowed |= m;
                }
                A::Audit => {}
            }
        }
        (denied || (any_allow && !allowed), custom)
    }

    #[derive(Debug)]
    struct Req {
        ns: Option<&'static str>,
        sa: &'static str,
        method: &'static str,
        path: &'static str,
        env: Option<&'static str>,
        port: u16,
        service: &'static str,
        tcp: bool,
    }

    #[test]
    // (`*rng.pick(..)`: without the deref the expected `&str` would make `T` unsized.)
    #[allow(clippy::explicit_auto_deref)]
    fn the_compiled_evaluator_agrees_with_the_reference() {
        let cases: u64 = std::env::var("AUTHZ_PROPERTY_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        for seed in 0..cases {
            let mut rng = Rng(seed);
            let n = rng.below(6) as usize;
            let policies: Vec<pb::L7Policy> = (0..n).map(|i| policy(&mut rng, i)).collect();
            let compiled = Policies::compile(policies.iter());
            for _ in 0..8 {
                let r = Req {
                    ns: if rng.chance(90) {
                        Some(*rng.pick(NAMESPACES))
                    } else {
                        None
                    },
                    sa: *rng.pick(ACCOUNTS),
                    method: *rng.pick(METHODS),
                    path: *rng.pick(PATHS),
                    env: *rng.pick(ENVS),
                    port: *rng.pick(&[80, 9000]),
                    service: *rng.pick(&["web", "api"]),
                    tcp: rng.chance(15),
                };
                let mut headers = HeaderMap::new();
                if let Some(e) = r.env {
                    headers.insert("x-env", e.parse().unwrap());
                }
                let principal = r.ns.map(|ns| format!("cluster.local/ns/{ns}/sa/{}", r.sa));
                let sa = r.ns.map(|ns| format!("{ns}/{}", r.sa));
                let a = Attrs {
                    principal: principal.as_deref(),
                    namespace: r.ns,
                    service_account: sa.as_deref(),
                    source_ip: "10.0.0.1".parse().unwrap(),
                    remote_ip: "10.0.0.1".parse().unwrap(),
                    destination_ip: "10.96.0.1".parse().unwrap(),
                    destination_port: r.port,
                    service: Some(("shop", r.service)),
                    http: (!r.tcp).then_some(Http {
                        method: r.method,
                        path: r.path,
                        host: "web",
                        headers: &headers,
                    }),
                    request_auth: None,
                };
                let d = compiled.decide(&a);
                let got = (d.denied.is_some(), d.custom.is_some());
                let want = reference(&policies, &r);
                assert_eq!(
                    got, want,
                    "seed {seed}: {r:?} against {policies:#?}: evaluator (denied, custom) {got:?}, reference {want:?}"
                );
            }
        }
    }
}
