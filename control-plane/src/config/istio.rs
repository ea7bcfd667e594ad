//! The `security.istio.io` objects users write (v1 and v1beta1 share one schema), as typed
//! structs. Field names follow Istio's API exactly; an unknown field, a wrong type, or what
//! Istio's validation refuses (`AuthorizationPolicy::validate`) rejects the object.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// `selector:` of a policy: the workloads it applies to, by labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a pod must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `targetRef(s):` of a policy: the Gateway API way to attach it to a resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    /// API group of the target (`""` for core, `gateway.networking.k8s.io` for Gateway).
    #[serde(default)]
    pub group: String,
    /// Kind of the target: `Service`, `Gateway`, `ServiceEntry`, `GatewayClass`.
    pub kind: String,
    /// Name of the target.
    pub name: String,
    /// Namespace of the target (defaults to the policy's).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// `AuthorizationPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    /// Object metadata.
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

/// The action of an authorization policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Allow the requests that match (and, once any ALLOW policy applies, deny the rest).
    #[default]
    Allow,
    /// Deny the requests that match.
    Deny,
    /// Log matches without enforcing (waypoint only).
    Audit,
    /// Delegate the decision to an external authorizer (waypoint only).
    Custom,
}

/// `spec:` of an `AuthorizationPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads it applies to (none: every workload in scope).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// A single target (older API).
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    /// Targets.
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    /// ALLOW (default), DENY, AUDIT, CUSTOM.
    #[serde(default)]
    pub action: Action,
    /// The external authorizer of a CUSTOM policy.
    #[serde(default)]
    pub provider: Option<Provider>,
    /// Rules; a policy with no rules matches nothing (an ALLOW then denies everything in
    /// scope), a rule with no fields matches everything.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// `provider:` of a CUSTOM policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provider {
    /// Name of an extension provider in the mesh config.
    pub name: String,
}

/// One rule: from (sources), to (operations), when (conditions); all present parts must
/// match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Any of these sources.
    #[serde(default)]
    pub from: Vec<From>,
    /// Any of these operations.
    #[serde(default)]
    pub to: Vec<To>,
    /// All of these conditions.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `- source:` entry of `from`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct From {
    /// The source.
    #[serde(default)]
    pub source: Source,
}

/// `- operation:` entry of `to`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct To {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
}

/// Who sends the request. Every present field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities (`<trust-domain>/ns/<ns>/sa/<sa>`), `*` prefix/suffix wildcards.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// End-user identities from JWTs (`<iss>/<sub>`): L7 only.
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Peer service accounts (`<ns>/<sa>`).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// Peer IPs or CIDRs.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs (X-Forwarded-For): L7 only.
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

/// What the request does. Every present field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// HTTP hosts: L7 only.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Destination ports (strings in the API).
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// HTTP methods: L7 only.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// HTTP paths: L7 only.
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// A `when:` condition on a request attribute.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Attribute name, e.g. `source.ip`, `request.headers[x-token]`.
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// The `when` keys Istio documents (exact, or a prefix ending in `[` closed by `]`, or the
/// `experimental.envoy.filters.` family).
const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

fn known_condition_key(key: &str) -> bool {
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|inner| !inner.is_empty())
    };
    CONDITION_KEYS.contains(&key)
        || bracketed("request.headers[")
        || bracketed("request.auth.claims[")
        || key.starts_with("experimental.envoy.filters.")
}

impl AuthorizationPolicy {
    /// What Istio's validation refuses beyond the schema: an empty `source` or `operation`
    /// (all its fields missing or misspelt: it would match everything, so a typo would make
    /// an ALLOW allow everyone), a `when` condition without a key or values, or with a key
    /// Istio does not know. Returns (field, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            for (j, f) in rule.from.iter().enumerate() {
                if f.source == Source::default() {
                    return Err((
                        format!("{at}.from[{j}].source"),
                        "must not be empty: a source without fields would match every peer".into(),
                    ));
                }
            }
            for (j, t) in rule.to.iter().enumerate() {
                if t.operation == Operation::default() {
                    return Err((
                        format!("{at}.to[{j}].operation"),
                        "must not be empty: an operation without fields would match every request"
                            .into(),
                    ));
                }
            }
            for (j, c) in rule.when.iter().enumerate() {
                let at = format!("{at}.when[{j}]");
                if c.key.is_empty() {
                    return Err((format!("{at}.key"), "is required".into()));
                }
                if !known_condition_key(&c.key) {
                    return Err((
                        format!("{at}.key"),
                        format!(
                            "unknown attribute {:?}: see Istio's authorization policy conditions for the keys",
                            c.key
                        ),
                    ));
                }
                if c.values.is_empty() && c.not_values.is_empty() {
                    return Err((at, "one of values or notValues is required".into()));
                }
            }
        }
        Ok(())
    }
}

/// `PeerAuthentication`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerAuthentication {
    /// Object metadata.
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

/// mTLS mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope.
    #[default]
    Unset,
    /// Plaintext (ambient: no effect on HBONE, which is always mTLS).
    Disable,
    /// mTLS and plaintext both accepted.
    Permissive,
    /// Only mTLS accepted.
    Strict,
}

/// `mtls:` block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mtls {
    /// The mode.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// `spec:` of a `PeerAuthentication`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to (none: the namespace, or the mesh in the root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// The mode for all ports.
    #[serde(default)]
    pub mtls: Option<Mtls>,
    /// Per-port modes (only with a selector). Keys are ports written as numbers in YAML,
    /// but always strings in JSON (what the Kubernetes API returns): both are read.
    #[serde(default, deserialize_with = "port_keys")]
    pub port_level_mtls: BTreeMap<u32, Mtls>,
}

/// A port as a map key: a number, or a string holding one.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct PortKey(u32);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PortKey, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number (1-65535)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortKey, E> {
                u32::try_from(v)
                    .ok()
                    .filter(|p| (1..=65535).contains(p))
                    .map(PortKey)
                    .ok_or_else(|| E::custom(format!("{v} is not a port number (1-65535)")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortKey, E> {
                self.visit_u64(
                    u64::try_from(v)
                        .map_err(|_| E::custom(format!("{v} is not a port number (1-65535)")))?,
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortKey, E> {
                self.visit_u64(
                    v.parse()
                        .map_err(|_| E::custom(format!("{v:?} is not a port number (1-65535)")))?,
                )
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn port_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, Mtls>, D::Error> {
    let m = BTreeMap::<PortKey, Mtls>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k.0, v)).collect())
}

/// `RequestAuthentication`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestAuthentication {
    /// Object metadata.
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: RequestAuthenticationSpec,
}

/// `spec:` of a `RequestAuthentication`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// Workloads it applies to.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// A single target.
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    /// Targets.
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Accepted token issuers.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

/// One accepted JWT issuer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// `iss` the token must carry.
    pub issuer: String,
    /// Accepted `aud` values (empty: any).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where the signing keys are fetched.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Inline JWKS.
    #[serde(default)]
    pub jwks: Option<String>,
    /// Headers the token is read from.
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters the token is read from.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Cookies the token is read from.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// Header that receives the verified payload.
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the forwarded request.
    #[serde(default)]
    pub forward_original_token: bool,
    /// Claims copied to headers.
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Timeout of JWKS fetches (a duration such as `5s`).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// A header a token is read from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtHeader {
    /// Header name.
    pub name: String,
    /// Prefix to strip (e.g. `Bearer `).
    #[serde(default)]
    pub prefix: Option<String>,
}

/// A claim copied to a request header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimToHeader {
    /// Header name.
    pub header: String,
    /// Claim name.
    pub claim: String,
}
