//! The `gateway.networking.k8s.io` v1 objects Trellis reads (`Gateway`, `HTTPRoute`,
//! `GRPCRoute`), as typed structs with the Gateway API's field names. Values the API limits
//! to a set (match types, methods, filter types) are enums, so a typo is an error naming
//! the field; unknown fields are warnings, as for every other kind.
//!
//! `status` is read too: a Gateway's `status.addresses` is where a deployed waypoint is
//! reached. Other status fields are accepted and ignored (they are written by controllers).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// The `GatewayClass` of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// `Gateway`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gateway {
    /// Object metadata.
    pub metadata: ObjectMeta,
    /// The gateway.
    pub spec: GatewaySpec,
    /// What the controller reported.
    #[serde(default)]
    pub status: Option<GatewayStatus>,
}

/// `spec:` of a `Gateway`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// The class: `istio-waypoint` makes it a waypoint.
    pub gateway_class_name: String,
    /// Listeners (a waypoint has one HBONE listener on 15008).
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Requested addresses.
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
    /// Labels and annotations for what the controller creates.
    #[serde(default)]
    pub infrastructure: Option<Infrastructure>,
}

/// `spec.infrastructure`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Infrastructure {
    /// Labels for created resources.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations for created resources.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Implementation-specific parameters.
    #[serde(default)]
    pub parameters_ref: Option<LocalReference>,
}

/// A reference to an object in the same namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalReference {
    /// API group.
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Name.
    pub name: String,
}

/// One listener.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Name, unique in the gateway.
    pub name: String,
    /// Hostname the listener serves.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Port.
    pub port: u16,
    /// `HTTP`, `HTTPS`, `TLS`, `TCP`, `UDP`, or `HBONE` (Istio's, for waypoints).
    pub protocol: String,
    /// TLS settings.
    #[serde(default)]
    pub tls: Option<serde_json::Value>,
    /// Which routes may attach.
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

/// `allowedRoutes` of a listener.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AllowedRoutes {
    /// Namespaces routes may come from.
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
    /// Route kinds.
    #[serde(default)]
    pub kinds: Vec<RouteGroupKind>,
}

/// `allowedRoutes.namespaces`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteNamespaces {
    /// `Same` (default), `All`, `Selector`.
    #[serde(default)]
    pub from: Option<FromNamespaces>,
    /// Label selector when `from: Selector`.
    #[serde(default)]
    pub selector: Option<serde_json::Value>,
}

/// Where routes may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromNamespaces {
    /// Every namespace.
    All,
    /// Namespaces matching the selector.
    Selector,
    /// The gateway's namespace.
    Same,
}

/// A route kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteGroupKind {
    /// API group.
    #[serde(default)]
    pub group: Option<String>,
    /// Kind.
    pub kind: String,
}

/// An address of a gateway (requested in spec, reported in status).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayAddress {
    /// `IPAddress` (default) or `Hostname`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    /// The address.
    pub value: String,
}

/// `status:` of a `Gateway`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    /// Where the gateway is reached.
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
    /// Conditions (ignored).
    #[serde(default)]
    pub conditions: Vec<serde_json::Value>,
    /// Listener status (ignored).
    #[serde(default)]
    pub listeners: Vec<serde_json::Value>,
}

/// A `parentRefs` entry: what a route attaches to (a Gateway, or a Service for mesh
/// routes served by the service's waypoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// API group (`gateway.networking.k8s.io` when absent; `""` for a Service).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind (`Gateway` when absent).
    #[serde(default)]
    pub kind: Option<String>,
    /// Namespace (the route's when absent).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// Listener of a Gateway.
    #[serde(default)]
    pub section_name: Option<String>,
    /// Port of the parent.
    #[serde(default)]
    pub port: Option<u16>,
}

impl ParentReference {
    /// Whether the parent is a core `Service` (a mesh route).
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service") && self.group.as_deref().unwrap_or("").is_empty()
    }
}

/// `HTTPRoute`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpRoute {
    /// Object metadata.
    pub metadata: ObjectMeta,
    /// The route.
    pub spec: HttpRouteSpec,
    /// Written by controllers; ignored.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

/// `spec:` of an `HTTPRoute`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// What it attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Hostnames it serves.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules, first match wins (after the API's precedence ordering).
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// One rule of an `HTTPRoute`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Name of the rule.
    #[serde(default)]
    pub name: Option<String>,
    /// Any of these (none: every request).
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Applied in order.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Where requests go.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Request and backend-request timeouts (Gateway API durations, e.g. `10s`, `500ms`).
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retries (experimental channel).
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
}

/// `timeouts:` of a rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// Whole request, client to response.
    #[serde(default)]
    pub request: Option<String>,
    /// One attempt to the backend.
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// `retry:` of a rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRouteRetry {
    /// Status codes that are retried.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Attempts after the first.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Back-off between attempts.
    #[serde(default)]
    pub backoff: Option<String>,
}

/// One `matches` entry: all its parts must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// The path.
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    /// Headers.
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    /// Query parameters.
    #[serde(default)]
    pub query_params: Vec<HttpHeaderMatch>,
    /// The method.
    #[serde(default)]
    pub method: Option<HttpMethod>,
}

/// A path match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpPathMatch {
    /// `PathPrefix` when absent.
    #[serde(default, rename = "type")]
    pub type_: Option<PathMatchType>,
    /// The value (`/` when absent).
    #[serde(default)]
    pub value: Option<String>,
}

/// How a path is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    /// The whole path.
    Exact,
    /// By `/`-separated segments.
    PathPrefix,
    /// A regular expression.
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpHeaderMatch {
    /// `Exact` when absent.
    #[serde(default, rename = "type")]
    pub type_: Option<ValueMatchType>,
    /// Header or parameter name.
    pub name: String,
    /// The value.
    pub value: String,
}

/// How a value is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    /// The whole value.
    Exact,
    /// A regular expression.
    RegularExpression,
}

/// HTTP methods a route may match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

/// A filter of a rule or backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    /// Which filter; its settings are in the field of the same name.
    #[serde(rename = "type")]
    pub type_: FilterType,
    /// Headers of the request.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// Headers of the response.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// Copy requests to another backend.
    #[serde(default)]
    pub request_mirror: Option<RequestMirror>,
    /// Answer with a redirect.
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    /// Rewrite host or path.
    #[serde(default)]
    pub url_rewrite: Option<UrlRewrite>,
    /// Implementation-specific filter.
    #[serde(default)]
    pub extension_ref: Option<LocalReference>,
}

/// Filter types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestMirror,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    ExtensionRef,
}

/// Header changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderModifier {
    /// Replace or add.
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    /// Append.
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    /// Remove by name.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header and its value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// `requestMirror`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    /// Where copies go.
    pub backend_ref: BackendRef,
    /// Share of requests mirrored, in percent.
    #[serde(default)]
    pub percent: Option<u32>,
}

/// `requestRedirect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path change.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// Port.
    #[serde(default)]
    pub port: Option<u16>,
    /// 301 or 302 (default).
    #[serde(default)]
    pub status_code: Option<u16>,
}

/// `urlRewrite`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlRewrite {
    /// New host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path change.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// A path change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub type_: PathModifierType,
    /// For `ReplaceFullPath`.
    #[serde(default)]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch`.
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// Path change types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

/// A backend: a Service and port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRef {
    /// API group (`""`, core, when absent).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind (`Service` when absent).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (the route's when absent).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Port (required for a Service).
    #[serde(default)]
    pub port: Option<u16>,
}

/// A backend with its weight and filters (the fields of [`BackendRef`] inline, as the API
/// writes them; spelled out rather than flattened so unknown fields are still reported).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpBackendRef {
    /// API group (`""`, core, when absent).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind (`Service` when absent).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (the route's when absent).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Port (required for a Service).
    #[serde(default)]
    pub port: Option<u16>,
    /// Relative share of requests (1 when absent).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Filters for this backend only.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

/// `GRPCRoute`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpcRoute {
    /// Object metadata.
    pub metadata: ObjectMeta,
    /// The route.
    pub spec: GrpcRouteSpec,
    /// Written by controllers; ignored.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

/// `spec:` of a `GRPCRoute`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    /// What it attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Hostnames it serves.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// One rule of a `GRPCRoute`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    /// Name of the rule.
    #[serde(default)]
    pub name: Option<String>,
    /// Any of these (none: every call).
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// Applied in order (same filter kinds as HTTP, without redirects and rewrites).
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Where calls go.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
}

/// One `matches` entry of a `GRPCRoute`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpcRouteMatch {
    /// The method.
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    /// Metadata (headers).
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
}

/// A gRPC method match; at least one of service and method.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcMethodMatch {
    /// `Exact` when absent.
    #[serde(default, rename = "type")]
    pub type_: Option<ValueMatchType>,
    /// Fully qualified service, `pkg.Service`.
    #[serde(default)]
    pub service: Option<String>,
    /// Method name.
    #[serde(default)]
    pub method: Option<String>,
}

/// `ReferenceGrant` (`gateway.networking.k8s.io/v1beta1`): lets objects of other
/// namespaces refer to objects of this one (a route's cross-namespace backend).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReferenceGrant {
    /// Object metadata.
    pub metadata: ObjectMeta,
    /// Who may refer to what.
    pub spec: ReferenceGrantSpec,
}

/// `spec:` of a `ReferenceGrant`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceGrantSpec {
    /// The referring kinds, by namespace.
    pub from: Vec<ReferenceGrantFrom>,
    /// What they may refer to in this namespace.
    pub to: Vec<ReferenceGrantTo>,
}

/// One `from` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceGrantFrom {
    /// API group of the referring kind.
    pub group: String,
    /// The referring kind (`HTTPRoute`, `GRPCRoute`).
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
}

/// One `to` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceGrantTo {
    /// API group of the kind referred to (`""` for a Service).
    pub group: String,
    /// The kind referred to.
    pub kind: String,
    /// One object by name; every object of the kind when absent.
    #[serde(default)]
    pub name: Option<String>,
}

impl ReferenceGrant {
    /// Whether this grant (in the namespace of the object referred to) lets a `from_kind`
    /// of `from_ns` refer to Service `name`.
    pub fn allows_service(&self, from_kind: &str, from_ns: &str, name: &str) -> bool {
        self.spec.from.iter().any(|f| {
            f.group == "gateway.networking.k8s.io" && f.kind == from_kind && f.namespace == from_ns
        }) && self.spec.to.iter().any(|t| {
            t.group.is_empty() && t.kind == "Service" && t.name.as_deref().is_none_or(|n| n == name)
        })
    }
}

/// A problem in an object whose fields all parsed: (field path, reason).
pub type Invalid = (String, String);

fn check_filters(filters: &[HttpRouteFilter], at: &str, grpc: bool) -> Result<(), Invalid> {
    for (i, f) in filters.iter().enumerate() {
        let field = |name: &str| format!("{at}.filters[{i}].{name}");
        let (name, present) = match f.type_ {
            FilterType::RequestHeaderModifier => {
                ("requestHeaderModifier", f.request_header_modifier.is_some())
            }
            FilterType::ResponseHeaderModifier => (
                "responseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            FilterType::RequestMirror => ("requestMirror", f.request_mirror.is_some()),
            FilterType::RequestRedirect => ("requestRedirect", f.request_redirect.is_some()),
            FilterType::UrlRewrite => ("urlRewrite", f.url_rewrite.is_some()),
            FilterType::ExtensionRef => ("extensionRef", f.extension_ref.is_some()),
        };
        if !present {
            return Err((
                field(name),
                format!("is required for a filter of type {:?}", f.type_),
            ));
        }
        if grpc
            && matches!(
                f.type_,
                FilterType::RequestRedirect | FilterType::UrlRewrite
            )
        {
            return Err((
                field("type"),
                "GRPCRoute supports header modifiers, mirrors and extensions only".into(),
            ));
        }
        if let Some(r) = &f.request_redirect
            && let Some(code) = r.status_code
            && code != 301
            && code != 302
        {
            return Err((
                field("requestRedirect.statusCode"),
                format!("{code} is not 301 or 302"),
            ));
        }
    }
    Ok(())
}

fn check_backends(backends: &[HttpBackendRef], at: &str) -> Result<(), Invalid> {
    for (i, b) in backends.iter().enumerate() {
        let is_service = b.kind.as_deref().unwrap_or("Service") == "Service"
            && b.group.as_deref().unwrap_or("").is_empty();
        if is_service && b.port.is_none() {
            return Err((
                format!("{at}.backendRefs[{i}].port"),
                "is required when the backend is a Service".into(),
            ));
        }
        check_filters(&b.filters, &format!("{at}.backendRefs[{i}]"), false)?;
    }
    Ok(())
}

impl HttpRoute {
    /// Checks what the types alone cannot: a filter carries the settings of its type, a
    /// path match is absolute, a Service backend names a port.
    pub fn validate(&self) -> Result<(), Invalid> {
        for (r, rule) in self.spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{r}]");
            for (m, mat) in rule.matches.iter().enumerate() {
                if let Some(path) = &mat.path
                    && let Some(v) = &path.value
                    && path.type_ != Some(PathMatchType::RegularExpression)
                    && !v.starts_with('/')
                {
                    return Err((
                        format!("{at}.matches[{m}].path.value"),
                        format!("{v:?} must start with /"),
                    ));
                }
            }
            check_filters(&rule.filters, &at, false)?;
            check_backends(&rule.backend_refs, &at)?;
        }
        Ok(())
    }
}

impl GrpcRoute {
    /// Checks what the types alone cannot: a method match names a service or a method,
    /// filters carry their settings, a Service backend names a port.
    pub fn validate(&self) -> Result<(), Invalid> {
        for (r, rule) in self.spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{r}]");
            for (m, mat) in rule.matches.iter().enumerate() {
                if let Some(method) = &mat.method
                    && method.service.is_none()
                    && method.method.is_none()
                {
                    return Err((
                        format!("{at}.matches[{m}].method"),
                        "needs a service, a method, or both".into(),
                    ));
                }
            }
            check_filters(&rule.filters, &at, true)?;
            check_backends(&rule.backend_refs, &at)?;
        }
        Ok(())
    }
}

impl Gateway {
    /// Whether this Gateway is a waypoint.
    pub fn is_waypoint(&self) -> bool {
        self.spec.gateway_class_name == WAYPOINT_CLASS
    }

    /// Checks listeners: unique names, nonzero ports.
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut seen = std::collections::BTreeSet::new();
        for (i, l) in self.spec.listeners.iter().enumerate() {
            if !seen.insert(l.name.as_str()) {
                return Err((
                    format!("spec.listeners[{i}].name"),
                    format!("{:?} is used by an earlier listener", l.name),
                ));
            }
            if l.port == 0 {
                return Err((format!("spec.listeners[{i}].port"), "must not be 0".into()));
            }
        }
        Ok(())
    }
}
