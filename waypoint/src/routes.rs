//! The route table of one service port, compiled from its `trellis.waypoint.v1.Route` once
//! per configuration version: matching a request walks the rules in order (the control
//! plane sorted them by the Gateway API's precedence) and allocates nothing.
//!
//! A route that does not compile (a regular expression that does not parse, say) is kept
//! as an error: every request to that port is answered 500 rather than routed by the
//! rules that happen to remain (which could send it somewhere its author did not mean).

use std::time::Duration;

use http::{HeaderMap, Method};
use regex::Regex;
use trellis_proto::trellis::waypoint::v1 as pb;

pub use pb::route::AppProtocol;

/// One service port's compiled routing.
#[derive(Debug)]
pub struct Table {
    /// The route's name (`namespace/hostname:port`).
    pub name: String,
    /// The service it is for (`namespace/hostname`).
    pub service: String,
    /// The service port.
    pub port: u16,
    /// Its protocol.
    pub protocol: AppProtocol,
    /// Rules, first match wins.
    pub rules: Vec<Rule>,
    /// Why the route could not be compiled (every request answers 500).
    pub error: Option<String>,
    /// Why every connection to this port is refused (403): a policy attached here that
    /// this waypoint cannot enforce yet.
    pub refused: Option<String>,
    /// Retry budget, limits and outlier detection of requests to this service port itself
    /// (no rule, or a rule's backend that is this service).
    pub state: std::sync::Arc<crate::resilience::BackendState>,
    /// Retries of requests no rule matched (Istio's default).
    pub default_retry: Option<crate::retry::Retry>,
    /// The Service port's token bucket (a LocalTrafficPolicy on the Service).
    pub rate_limit: Option<std::sync::Arc<crate::local::Bucket>>,
    /// The Service port's delays and aborts.
    pub fault: Option<crate::local::Fault>,
}

/// One rule (one match).
#[derive(Debug)]
pub struct Rule {
    /// Stable id for logs and metrics (`namespace/route/index`).
    pub name: String,
    matcher: Matcher,
    /// Filters, in order.
    pub filters: Vec<Filter>,
    /// Weighted backends.
    pub backends: Vec<Backend>,
    total_weight: u64,
    /// Whole-request deadline.
    pub request_timeout: Option<Duration>,
    /// Per-attempt deadline.
    pub backend_timeout: Option<Duration>,
    /// Retries (the rule's, or Istio's default when it sets none; `None`: off).
    pub retry: Option<crate::retry::Retry>,
    /// The rule's own token bucket (shared by every match of the rule).
    pub rate_limit: Option<std::sync::Arc<crate::local::Bucket>>,
    /// The rule's own delays and aborts.
    pub fault: Option<crate::local::Fault>,
}

#[derive(Debug)]
struct Matcher {
    path: PathMatch,
    method: Option<Method>,
    headers: Vec<(http::HeaderName, ValueMatch, bool)>,
    query: Vec<(String, ValueMatch)>,
    grpc: Option<GrpcMatch>,
}

#[derive(Debug)]
enum PathMatch {
    Any,
    Exact(String),
    /// Without its trailing `/`; empty matches every path.
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatch {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Regex(Regex),
    Present,
}

#[derive(Debug)]
struct GrpcMatch {
    service: Option<NameMatch>,
    method: Option<NameMatch>,
}

#[derive(Debug)]
enum NameMatch {
    Exact(String),
    Regex(Regex),
}

/// A header change.
#[derive(Debug, Clone, Default)]
pub struct HeaderMod {
    /// Replace or create.
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Append.
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Remove.
    pub remove: Vec<http::HeaderName>,
}

impl HeaderMod {
    /// Applies the change to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            headers.append(k.clone(), v.clone());
        }
        for k in &self.remove {
            headers.remove(k);
        }
    }
}

/// A path change.
#[derive(Debug, Clone)]
pub enum PathMod {
    /// The whole path.
    Full(String),
    /// The part the rule's prefix matched.
    Prefix(String),
}

/// A filter.
#[derive(Debug, Clone)]
pub enum Filter {
    /// Request headers.
    RequestHeaders(HeaderMod),
    /// Response headers.
    ResponseHeaders(HeaderMod),
    /// Answer with a redirect.
    Redirect {
        /// New scheme.
        scheme: Option<String>,
        /// New host.
        hostname: Option<String>,
        /// New port.
        port: Option<u16>,
        /// New path.
        path: Option<PathMod>,
        /// Status (302 when unset).
        status: u16,
    },
    /// Rewrite host and path.
    Rewrite {
        /// New host.
        hostname: Option<String>,
        /// New path.
        path: Option<PathMod>,
    },
    /// Copy the request to another service (its response is dropped).
    Mirror {
        /// `namespace/hostname` and port; `None` when the backend is unusable.
        target: Option<(String, u16)>,
        /// Share of requests, 0–100.
        percent: f64,
    },
}

/// A weighted backend.
#[derive(Debug)]
pub struct Backend {
    /// `namespace/hostname` and port; `None` when it cannot be used (its share is 500).
    pub target: Option<(String, u16)>,
    /// Relative weight.
    pub weight: u32,
    /// Filters when this backend is picked.
    pub filters: Vec<Filter>,
    /// Retry budget, limits and outlier detection of this backend (one per backend
    /// service and port in a route).
    pub state: std::sync::Arc<crate::resilience::BackendState>,
}

/// What a request is matched on.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path, without the query.
    pub path: &'a str,
    /// The query string (after `?`), if any.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a HeaderMap,
}

impl Table {
    /// Compiles `route`.
    pub fn compile(route: &pb::Route) -> Table {
        Table::compile_after(route, None)
    }

    /// Compiles `route`, the new version of `previous`: the state that outlives a push —
    /// token buckets (by rule name), retry budgets, limits and ejections (by backend
    /// service and port) — is carried over where its settings did not change.
    pub fn compile_after(route: &pb::Route, previous: Option<&Table>) -> Table {
        let service = route
            .service
            .as_ref()
            .map(|s| format!("{}/{}", s.namespace, s.hostname))
            .unwrap_or_default();
        let port = route
            .service
            .as_ref()
            .and_then(|s| u16::try_from(s.port).ok())
            .unwrap_or(0);
        let mut table = Table {
            name: route.name.clone(),
            service,
            port,
            protocol: route.protocol(),
            rules: Vec::with_capacity(route.rules.len()),
            error: None,
            refused: (!route.refused.is_empty()).then(|| route.refused.clone()),
            state: std::sync::Arc::new(crate::resilience::BackendState::new(
                route.traffic_policy.as_ref(),
            )),
            default_retry: Some(crate::retry::Retry::istio_default()),
            rate_limit: None,
            fault: route.fault.as_ref().and_then(crate::local::Fault::new),
        };
        let old_bucket = |name: &str, config: &pb::LocalRateLimit| {
            let p = previous?;
            std::iter::once((p.name.as_str(), p.rate_limit.as_ref()))
                .chain(
                    p.rules
                        .iter()
                        .map(|r| (r.name.as_str(), r.rate_limit.as_ref())),
                )
                .find_map(|(n, b)| b.filter(|b| n == name && b.config == *config))
                .cloned()
        };
        let bucket = |name: &str, config: Option<&pb::LocalRateLimit>| {
            let config = config?;
            old_bucket(name, config)
                .or_else(|| crate::local::Bucket::new(config).map(std::sync::Arc::new))
        };
        table.rate_limit = bucket(&table.name, route.rate_limit.as_ref());
        // States of the previous version, by backend service and port.
        let mut old_states = std::collections::HashMap::new();
        if let Some(p) = previous {
            old_states.insert((p.service.clone(), p.port), p.state.clone());
            for r in &p.rules {
                for b in &r.backends {
                    if let Some(t) = &b.target {
                        old_states.insert(t.clone(), b.state.clone());
                    }
                }
            }
        }
        let carry = |key: &(String, u16),
                     state: std::sync::Arc<crate::resilience::BackendState>| {
            match old_states.get(key) {
                Some(old) if old.policy == state.policy => old.clone(),
                _ => state,
            }
        };
        table.state = carry(&(table.service.clone(), table.port), table.state.clone());
        // One state per backend service and port.
        let mut budgets = std::collections::HashMap::new();
        budgets.insert(
            (table.service.clone(), table.port),
            std::sync::Arc::clone(&table.state),
        );
        for r in &route.rules {
            match compile_rule(r) {
                Ok(mut rule) => {
                    for b in &mut rule.backends {
                        if let Some(t) = &b.target {
                            b.state = std::sync::Arc::clone(
                                budgets
                                    .entry(t.clone())
                                    .or_insert_with(|| carry(t, b.state.clone())),
                            );
                        }
                    }
                    // Every match of a rule shares its bucket.
                    rule.rate_limit = table
                        .rules
                        .iter()
                        .find(|o| o.name == rule.name)
                        .and_then(|o| o.rate_limit.clone())
                        .filter(|b| r.rate_limit.as_ref() == Some(&b.config))
                        .or_else(|| bucket(&rule.name, r.rate_limit.as_ref()));
                    table.rules.push(rule)
                }
                Err(e) => {
                    table.error = Some(format!("rule {}: {e}", r.name));
                    table.rules.clear();
                    break;
                }
            }
        }
        table
    }

    /// The first rule matching `req`, with the prefix its path matched (for
    /// `ReplacePrefixMatch`); `None` when no rule matches (the request then goes to the
    /// service it was addressed to).
    pub fn find(&self, req: &RequestView<'_>) -> Option<(&Rule, &str)> {
        self.rules
            .iter()
            .find_map(|r| r.matcher.matches(req).map(|prefix| (r, prefix)))
    }
}

impl Rule {
    /// The backend for a request, by weight, from `random`; `None` when no backend has a
    /// weight (the request is answered 500).
    pub fn pick(&self, random: u64) -> Option<&Backend> {
        if self.total_weight == 0 {
            return None;
        }
        let mut at = random % self.total_weight;
        for b in &self.backends {
            let w = u64::from(b.weight);
            if at < w {
                return Some(b);
            }
            at -= w;
        }
        None
    }
}

impl Matcher {
    /// `Some(matched prefix)` when `req` matches.
    fn matches<'m>(&'m self, req: &RequestView<'_>) -> Option<&'m str> {
        let prefix = match &self.path {
            PathMatch::Any => "",
            PathMatch::Exact(p) => {
                if req.path != p {
                    return None;
                }
                ""
            }
            PathMatch::Prefix(p) => {
                let ok = p.is_empty()
                    || (req.path.starts_with(p.as_str())
                        && matches!(req.path.as_bytes().get(p.len()), None | Some(b'/')));
                if !ok {
                    return None;
                }
                p.as_str()
            }
            PathMatch::Regex(r) => {
                if !r.is_match(req.path) {
                    return None;
                }
                ""
            }
        };
        if let Some(m) = &self.method
            && m != req.method
        {
            return None;
        }
        for (name, value, invert) in &self.headers {
            let any = req
                .headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| value.matches(v)));
            if any == *invert {
                return None;
            }
        }
        for (name, value) in &self.query {
            let found = query_value(req.query, name);
            if !found.is_some_and(|v| value.matches(&v)) {
                return None;
            }
        }
        if let Some(g) = &self.grpc {
            let (service, method) = grpc_parts(req.path)?;
            if let Some(s) = &g.service
                && !s.matches(service)
            {
                return None;
            }
            if let Some(m) = &g.method
                && !m.matches(method)
            {
                return None;
            }
        }
        Some(prefix)
    }
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e, false) => v == e,
            ValueMatch::Exact(e, true) => v.eq_ignore_ascii_case(e),
            ValueMatch::Prefix(p, icase) => v.get(..p.len()).is_some_and(|h| {
                if *icase {
                    h.eq_ignore_ascii_case(p)
                } else {
                    h == p
                }
            }),
            ValueMatch::Suffix(s, icase) => v
                .len()
                .checked_sub(s.len())
                .and_then(|i| v.get(i..))
                .is_some_and(|t| {
                    if *icase {
                        t.eq_ignore_ascii_case(s)
                    } else {
                        t == s
                    }
                }),
            ValueMatch::Regex(r) => r.is_match(v),
            ValueMatch::Present => true,
        }
    }
}

impl NameMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            NameMatch::Exact(e) => v == e,
            NameMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
fn grpc_parts(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// The (percent-decoded) value of query parameter `name`, the first if repeated.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes and `+` (as a space); malformed escapes are kept as written.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (
                    b.get(i + 1).and_then(|c| hex(*c)),
                    b.get(i + 2).and_then(|c| hex(*c)),
                ) {
                    (Some(h), Some(l)) => {
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn anchored(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("regular expression {pattern:?}: {e}"))
}

fn value_match(m: Option<&pb::StringMatch>) -> Result<ValueMatch, String> {
    use pb::string_match::Kind;
    let Some(m) = m else {
        return Ok(ValueMatch::Present);
    };
    Ok(match &m.kind {
        Some(Kind::Exact(e)) => ValueMatch::Exact(e.clone(), m.ignore_case),
        Some(Kind::Prefix(p)) => ValueMatch::Prefix(p.clone(), m.ignore_case),
        Some(Kind::Suffix(s)) => ValueMatch::Suffix(s.clone(), m.ignore_case),
        Some(Kind::Regex(r)) => ValueMatch::Regex(anchored(r)?),
        Some(Kind::Present(())) | None => ValueMatch::Present,
    })
}

fn header_name(n: &str) -> Result<http::HeaderName, String> {
    http::HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("invalid header name {n:?}"))
}

fn header_pairs(h: &[pb::Header]) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, String> {
    h.iter()
        .map(|h| {
            let v = http::HeaderValue::from_str(&h.value)
                .map_err(|_| format!("invalid value of header {:?}", h.name))?;
            Ok((header_name(&h.name)?, v))
        })
        .collect()
}

fn path_mod(p: Option<&pb::filter::PathModifier>) -> Option<PathMod> {
    use pb::filter::path_modifier::Kind;
    match p?.kind.as_ref()? {
        Kind::ReplaceFullPath(f) => Some(PathMod::Full(f.clone())),
        Kind::ReplacePrefixMatch(f) => Some(PathMod::Prefix(f.clone())),
    }
}

fn target_of(s: Option<&pb::ServiceRef>) -> Option<(String, u16)> {
    let s = s?;
    if s.hostname.is_empty() {
        return None;
    }
    Some((
        format!("{}/{}", s.namespace, s.hostname),
        u16::try_from(s.port).ok()?,
    ))
}

fn compile_filter(f: &pb::Filter) -> Result<Option<Filter>, String> {
    use pb::filter::Kind;
    let modifier = |h: &pb::filter::HeaderModifier| -> Result<HeaderMod, String> {
        Ok(HeaderMod {
            set: header_pairs(&h.set)?,
            add: header_pairs(&h.add)?,
            remove: h
                .remove
                .iter()
                .map(|n| header_name(n))
                .collect::<Result<_, _>>()?,
        })
    };
    Ok(Some(match f.kind.as_ref() {
        None => return Ok(None),
        Some(Kind::RequestHeaderModifier(h)) => Filter::RequestHeaders(modifier(h)?),
        Some(Kind::ResponseHeaderModifier(h)) => Filter::ResponseHeaders(modifier(h)?),
        Some(Kind::RequestRedirect(r)) => Filter::Redirect {
            scheme: (!r.scheme.is_empty()).then(|| r.scheme.clone()),
            hostname: (!r.hostname.is_empty()).then(|| r.hostname.clone()),
            port: u16::try_from(r.port).ok().filter(|p| *p != 0),
            path: path_mod(r.path.as_ref()),
            status: match r.status_code {
                0 => 302,
                c @ (301 | 302 | 303 | 307 | 308) => c as u16,
                c => {
                    return Err(format!(
                        "redirect status {c} is not 301, 302, 303, 307 or 308"
                    ));
                }
            },
        },
        Some(Kind::UrlRewrite(r)) => Filter::Rewrite {
            hostname: (!r.hostname.is_empty()).then(|| r.hostname.clone()),
            path: path_mod(r.path.as_ref()),
        },
        Some(Kind::RequestMirror(m)) => Filter::Mirror {
            target: target_of(m.backend.as_ref()),
            percent: m.percent.unwrap_or(100.0).clamp(0.0, 100.0),
        },
    }))
}

/// A proto duration as a `Duration`; zero, negative or absent: `None`.
pub(crate) fn duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    let d = d?;
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(secs, nanos)).filter(|d| !d.is_zero())
}

fn compile_rule(r: &pb::RouteRule) -> Result<Rule, String> {
    use pb::route_match::path::Kind;
    let m = r.matches.first().cloned().unwrap_or_default();
    if r.matches.len() > 1 {
        return Err("more than one match in a rule".into());
    }
    let path = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
        None => PathMatch::Any,
        Some(Kind::Exact(p)) => PathMatch::Exact(p.clone()),
        Some(Kind::Prefix(p)) => PathMatch::Prefix(p.trim_end_matches('/').to_string()),
        Some(Kind::Regex(p)) => PathMatch::Regex(anchored(p)?),
    };
    let method = if m.method.is_empty() {
        None
    } else {
        Some(
            Method::from_bytes(m.method.as_bytes())
                .map_err(|_| format!("invalid method {:?}", m.method))?,
        )
    };
    let headers = m
        .headers
        .iter()
        .map(|h| {
            Ok((
                header_name(&h.name)?,
                value_match(h.value.as_ref())?,
                h.invert,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let query = m
        .query_params
        .iter()
        .map(|q| Ok((q.name.clone(), value_match(q.value.as_ref())?)))
        .collect::<Result<Vec<_>, String>>()?;
    let grpc = match &m.grpc {
        None => None,
        Some(g) => {
            let name = |s: &str| -> Result<Option<NameMatch>, String> {
                Ok(match (s.is_empty(), g.regex) {
                    (true, _) => None,
                    (false, false) => Some(NameMatch::Exact(s.to_string())),
                    (false, true) => Some(NameMatch::Regex(anchored(s)?)),
                })
            };
            Some(GrpcMatch {
                service: name(&g.service)?,
                method: name(&g.method)?,
            })
        }
    };
    let filters = r
        .filters
        .iter()
        .map(compile_filter)
        .filter_map(Result::transpose)
        .collect::<Result<Vec<_>, String>>()?;
    let backends = r
        .backends
        .iter()
        .map(|b| {
            Ok(Backend {
                target: target_of(b.backend.as_ref()),
                weight: b.weight.unwrap_or(1),
                filters: b
                    .filters
                    .iter()
                    .map(compile_filter)
                    .filter_map(Result::transpose)
                    .collect::<Result<Vec<_>, String>>()?,
                state: std::sync::Arc::new(crate::resilience::BackendState::new(
                    b.traffic_policy.as_ref(),
                )),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let total_weight = backends.iter().map(|b| u64::from(b.weight)).sum();
    Ok(Rule {
        name: r.name.clone(),
        matcher: Matcher {
            path,
            method,
            headers,
            query,
            grpc,
        },
        filters,
        backends,
        total_weight,
        request_timeout: r
            .timeouts
            .as_ref()
            .and_then(|t| duration(t.request.as_ref())),
        backend_timeout: r
            .timeouts
            .as_ref()
            .and_then(|t| duration(t.backend_request.as_ref())),
        retry: match &r.retry {
            None => Some(crate::retry::Retry::istio_default()),
            Some(p) => crate::retry::Retry::compile(p),
        },
        rate_limit: None,
        fault: r.fault.as_ref().and_then(crate::local::Fault::new),
    })
}

/// The path after a rewrite or redirect: `path` as changed by `m`, with `prefix` the part
/// the rule's prefix match matched.
pub fn rewrite_path(path: &str, prefix: &str, m: &PathMod) -> String {
    match m {
        PathMod::Full(p) => p.clone(),
        PathMod::Prefix(new) => {
            let rest = path.get(prefix.len()..).unwrap_or("");
            let new = new.trim_end_matches('/');
            match (new.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_string(),
                (true, false) => rest.to_string(),
                (false, _) => format!("{new}{rest}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(method: &'a Method, path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        RequestView {
            method,
            path,
            query,
            headers,
        }
    }

    fn rule(name: &str, m: pb::RouteMatch) -> pb::RouteRule {
        pb::RouteRule {
            name: name.into(),
            matches: vec![m],
            backends: vec![pb::WeightedBackend {
                backend: Some(pb::ServiceRef {
                    namespace: "shop".into(),
                    hostname: format!("{name}.shop.svc.cluster.local"),
                    port: 80,
                }),
                weight: Some(1),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn prefix(p: &str) -> Option<pb::route_match::Path> {
        Some(pb::route_match::Path {
            kind: Some(pb::route_match::path::Kind::Prefix(p.into())),
        })
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let t = Table::compile(&pb::Route {
            rules: vec![rule(
                "a",
                pb::RouteMatch {
                    path: prefix("/a/"),
                    ..Default::default()
                },
            )],
            ..Default::default()
        });
        let h = HeaderMap::new();
        let get = Method::GET;
        for (path, want) in [
            ("/a", true),
            ("/a/", true),
            ("/a/b", true),
            ("/ab", false),
            ("/", false),
        ] {
            assert_eq!(t.find(&view(&get, path, &h)).is_some(), want, "{path}");
        }
    }

    #[test]
    fn headers_query_and_methods_must_all_match() {
        let m = pb::RouteMatch {
            path: prefix("/"),
            method: "POST".into(),
            headers: vec![pb::route_match::HeaderMatch {
                name: "x-version".into(),
                value: Some(pb::StringMatch {
                    kind: Some(pb::string_match::Kind::Exact("v2".into())),
                    ignore_case: false,
                }),
                invert: false,
            }],
            query_params: vec![pb::route_match::QueryParam {
                name: "q".into(),
                value: Some(pb::StringMatch {
                    kind: Some(pb::string_match::Kind::Regex("a+b".into())),
                    ignore_case: false,
                }),
            }],
            grpc: None,
        };
        let t = Table::compile(&pb::Route {
            rules: vec![rule("v2", m)],
            ..Default::default()
        });
        let mut h = HeaderMap::new();
        h.insert("x-version", "v2".parse().unwrap());
        let post = Method::POST;
        assert!(t.find(&view(&post, "/x?q=aab", &h)).is_some());
        assert!(
            t.find(&view(&post, "/x?q=aabc", &h)).is_none(),
            "regex is anchored"
        );
        assert!(t.find(&view(&Method::GET, "/x?q=aab", &h)).is_none());
        assert!(
            t.find(&view(&post, "/x?q=aab", &HeaderMap::new()))
                .is_none()
        );
    }

    #[test]
    fn grpc_methods_match_service_and_method() {
        let m = pb::RouteMatch {
            grpc: Some(pb::route_match::GrpcMethod {
                service: "echo.Echo".into(),
                method: String::new(),
                regex: false,
            }),
            ..Default::default()
        };
        let t = Table::compile(&pb::Route {
            rules: vec![rule("g", m)],
            ..Default::default()
        });
        let h = HeaderMap::new();
        let post = Method::POST;
        assert!(t.find(&view(&post, "/echo.Echo/Say", &h)).is_some());
        assert!(t.find(&view(&post, "/other.Echo/Say", &h)).is_none());
    }

    #[test]
    fn weights_split_and_zero_weights_get_nothing() {
        let mut r = rule("a", pb::RouteMatch::default());
        r.backends[0].weight = Some(90);
        let mut b = r.backends[0].clone();
        b.weight = Some(10);
        b.backend.as_mut().unwrap().hostname = "b.shop.svc.cluster.local".into();
        r.backends.push(b);
        let t = Table::compile(&pb::Route {
            rules: vec![r],
            ..Default::default()
        });
        let rule = &t.rules[0];
        let picks = (0..100u64)
            .filter(|i| rule.pick(*i).unwrap().weight == 10)
            .count();
        assert_eq!(picks, 10);
        let mut none = self::rule("n", pb::RouteMatch::default());
        none.backends[0].weight = Some(0);
        let t = Table::compile(&pb::Route {
            rules: vec![none],
            ..Default::default()
        });
        assert!(t.rules[0].pick(7).is_none());
    }

    #[test]
    fn a_bad_regex_fails_the_whole_route() {
        let m = pb::RouteMatch {
            path: Some(pb::route_match::Path {
                kind: Some(pb::route_match::path::Kind::Regex("(".into())),
            }),
            ..Default::default()
        };
        let t = Table::compile(&pb::Route {
            rules: vec![rule("ok", pb::RouteMatch::default()), rule("bad", m)],
            ..Default::default()
        });
        assert!(t.rules.is_empty());
        assert!(t.error.as_deref().unwrap().contains("bad"), "{:?}", t.error);
    }

    #[test]
    fn prefix_rewrites_keep_the_rest_of_the_path() {
        let p = PathMod::Prefix("/xyz".into());
        assert_eq!(rewrite_path("/foo/bar", "/foo", &p), "/xyz/bar");
        assert_eq!(rewrite_path("/foo", "/foo", &p), "/xyz");
        let root = PathMod::Prefix("/".into());
        assert_eq!(rewrite_path("/foo/bar", "/foo", &root), "/bar");
        assert_eq!(rewrite_path("/foo", "/foo", &root), "/");
        assert_eq!(rewrite_path("/a", "", &PathMod::Full("/b".into())), "/b");
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value(Some("a=1&b=x%20y+z"), "b").as_deref(),
            Some("x y z")
        );
        assert_eq!(query_value(Some("a"), "a").as_deref(), Some(""));
        assert_eq!(query_value(None, "a"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn buckets_and_backend_state_outlive_a_push_that_keeps_their_settings() {
        let limit = |tokens| pb::LocalRateLimit {
            max_tokens: tokens,
            tokens_per_fill: tokens,
            fill_interval: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            status_code: 429,
            response_headers: Vec::new(),
        };
        let route = |tokens| {
            let mut a = rule("a", pb::RouteMatch::default());
            a.rate_limit = Some(limit(tokens));
            let mut a2 = a.clone();
            a2.matches = vec![pb::RouteMatch {
                method: "POST".into(),
                ..Default::default()
            }];
            pb::Route {
                name: "shop/web.shop.svc.cluster.local:80".into(),
                rules: vec![a, a2],
                rate_limit: Some(limit(5)),
                ..Default::default()
            }
        };
        let first = Table::compile(&route(1));
        let (a, a2) = (&first.rules[0], &first.rules[1]);
        let bucket = a.rate_limit.as_ref().unwrap();
        assert!(
            std::sync::Arc::ptr_eq(bucket, a2.rate_limit.as_ref().unwrap()),
            "the matches of one rule share its bucket"
        );
        bucket.take(std::time::Instant::now()).unwrap();
        // The next version with the same settings: the spent token stays spent.
        let second = Table::compile_after(&route(1), Some(&first));
        assert!(std::sync::Arc::ptr_eq(
            bucket,
            second.rules[0].rate_limit.as_ref().unwrap()
        ));
        assert!(std::sync::Arc::ptr_eq(
            first.rate_limit.as_ref().unwrap(),
            second.rate_limit.as_ref().unwrap()
        ));
        assert!(std::sync::Arc::ptr_eq(
            &first.rules[0].backends[0].state,
            &second.rules[0].backends[0].state
        ));
        // New settings: a new, full bucket.
        let third = Table::compile_after(&route(2), Some(&second));
        let fresh = third.rules[0].rate_limit.as_ref().unwrap();
        assert!(!std::sync::Arc::ptr_eq(bucket, fresh));
        fresh.take(std::time::Instant::now()).unwrap();
        fresh.take(std::time::Instant::now()).unwrap();
    }
}
