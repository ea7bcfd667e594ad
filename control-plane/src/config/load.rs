//! Reading manifests: multi-document YAML into typed objects.
//!
//! Each document is judged alone: a broken one is an error that names the file, the object
//! (kind namespace/name, or the document's position when it has none), the field and the
//! reason; the other documents of the file still load. Fields Trellis does not know are
//! warnings (the object loads without them), except in security policies, where they are
//! errors (a misspelt field changes what a policy matches); a field of the wrong type is an
//! error. Kinds
//! Trellis does not read (Deployments and the like) are skipped with a note.

use std::fmt;
use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::gateway::{Gateway, GrpcRoute, HttpRoute, ReferenceGrant};
use super::istio::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};

/// An object Trellis reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    ServiceAccount(Box<ServiceAccount>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    PeerAuthentication(Box<PeerAuthentication>),
    RequestAuthentication(Box<RequestAuthentication>),
    Gateway(Box<Gateway>),
    HttpRoute(Box<HttpRoute>),
    GrpcRoute(Box<GrpcRoute>),
    ReferenceGrant(Box<ReferenceGrant>),
    DestinationRule(Box<super::destination::DestinationRule>),
    LocalTrafficPolicy(Box<super::local_traffic::LocalTrafficPolicy>),
    /// A Node: only its labels are kept (locality); its spec and status are large and
    /// change often.
    Node(Box<NodeLabels>),
    EndpointSlice(Box<EndpointSlice>),
}

/// What Trellis keeps of a `Node`: its name and labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeLabels {
    /// Node name.
    pub name: String,
    /// Its labels (topology among them).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Which object, for messages: `AuthorizationPolicy foo/httpbin`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// The kind.
    pub kind: String,
    /// The namespace (empty for cluster-scoped objects).
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One document that loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Which object.
    pub id: ObjectRef,
    /// The object.
    pub object: Object,
    /// Unknown fields, as `file: object: field: reason` lines.
    pub warnings: Vec<String>,
}

/// A document that did not load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {object}: {field}: {reason}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The object (`Kind ns/name`), or `document N` (1-based) when it cannot be named.
    pub object: String,
    /// The field path (`spec.rules[0].from`), or `-` for the document as a whole.
    pub field: String,
    /// What is wrong.
    pub reason: String,
    /// The object, when the document names one (so its last good version can be kept).
    pub id: Option<ObjectRef>,
}

/// What one document turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    /// An object Trellis reads.
    Loaded(Loaded),
    /// A kind Trellis does not read (with a note saying so).
    Skipped(String),
    /// A broken document.
    Invalid(ConfigError),
}

/// Parses every document of `text`, read from `file`.
pub fn parse_file(file: &Path, text: &str) -> Vec<Document> {
    let file_name = file.display().to_string();
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let position = format!("document {}", i + 1);
        let err = |object: &str, field: &str, reason: String| {
            Document::Invalid(ConfigError {
                file: file_name.clone(),
                object: object.to_string(),
                field: field.to_string(),
                reason,
                id: None,
            })
        };
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                out.push(err(&position, "-", format!("not valid YAML: {e}")));
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue; // an empty document (`---` at the end of a file)
        }
        out.push(parse_document(&file_name, &position, value));
    }
    out
}

/// Parses one object read from the Kubernetes API (JSON), exactly as a manifest of a file
/// named `source`: the same kinds, checks, errors and warnings as the directory source. The
/// server-maintained `metadata.managedFields` and `resourceVersion` and the status of the
/// security policies (Trellis's own output) are dropped first.
pub fn parse_object(source: &str, mut json: serde_json::Value) -> Document {
    if let Some(meta) = json.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
        // Changes with every write, status included; nothing in the model reads it.
        meta.remove("resourceVersion");
    }
    // A security policy's status is dropped in `parse_document`; a Gateway's stays: it
    // carries the waypoint's address.
    match serde_yaml_ng::to_value(&json) {
        Ok(value) => parse_document(source, "object", value),
        Err(e) => Document::Invalid(ConfigError {
            file: source.to_string(),
            object: "object".into(),
            field: "-".into(),
            reason: format!("cannot read the object: {e}"),
            id: None,
        }),
    }
}

/// Why a security policy with an unknown field is refused.
const UNKNOWN_SECURITY_FIELD: &str = "unknown field: a misspelt field would change what this security policy matches, so the policy is rejected (its last good version, if any, stays in force)";

fn parse_document(file: &str, position: &str, mut value: Value) -> Document {
    let invalid = |object: String, field: &str, reason: String| {
        Document::Invalid(ConfigError {
            file: file.to_string(),
            object,
            field: field.to_string(),
            reason,
            id: None,
        })
    };
    let Some(map) = value.as_mapping() else {
        return invalid(
            position.into(),
            "-",
            "a manifest must be a mapping with apiVersion, kind and metadata".into(),
        );
    };
    let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_string);
    let (Some(api_version), Some(kind)) = (text("apiVersion"), text("kind")) else {
        return invalid(
            position.into(),
            "apiVersion",
            "apiVersion and kind are required strings".into(),
        );
    };
    let meta = map.get("metadata");
    let meta_text = |key: &str| {
        meta.and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let id = ObjectRef {
        kind: kind.clone(),
        namespace: meta_text("namespace"),
        name: meta_text("name"),
    };
    let object_name = if id.name.is_empty() {
        format!("{kind} ({position})")
    } else {
        id.to_string()
    };
    if id.name.is_empty() {
        return invalid(object_name, "metadata.name", "is required".into());
    }
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    let version = api_version.rsplit('/').next().unwrap_or_default();
    let mut warnings = Vec::new();
    let result = match (group, version, kind.as_str()) {
        ("", "v1", "Namespace") => {
            typed(value, &mut warnings).map(|o| Object::Namespace(Box::new(o)))
        }
        ("", "v1", "Pod") => typed(value, &mut warnings).map(|o| Object::Pod(Box::new(o))),
        ("", "v1", "Service") => typed(value, &mut warnings).map(|o| Object::Service(Box::new(o))),
        ("", "v1", "ServiceAccount") => {
            typed(value, &mut warnings).map(|o| Object::ServiceAccount(Box::new(o)))
        }
        ("", "v1", "Node") => typed::<Node>(value, &mut warnings).map(|n| {
            Object::Node(Box::new(NodeLabels {
                name: n.metadata.name.unwrap_or_default(),
                labels: n.metadata.labels.unwrap_or_default(),
            }))
        }),
        ("discovery.k8s.io", "v1", "EndpointSlice") => {
            typed(value, &mut warnings).map(|o| Object::EndpointSlice(Box::new(o)))
        }
        (
            "security.istio.io",
            "v1" | "v1beta1",
            k @ ("AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication"),
        ) => {
            // Our CRD structs hold metadata and spec; apiVersion and kind were read above.
            if let Some(m) = value.as_mapping_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            // The status is the control plane's own (read back from the API), not input; from
            // either source.
            if let Some(m) = value.as_mapping_mut() {
                m.remove("status");
            }
            let object = match k {
                "AuthorizationPolicy" => typed::<AuthorizationPolicy>(value, &mut warnings)
                    .and_then(|p| {
                        p.validate()?;
                        Ok(Object::AuthorizationPolicy(Box::new(p)))
                    }),
                "PeerAuthentication" => {
                    typed(value, &mut warnings).map(|o| Object::PeerAuthentication(Box::new(o)))
                }
                _ => {
                    typed(value, &mut warnings).map(|o| Object::RequestAuthentication(Box::new(o)))
                }
            };
            // A misspelt field of a security policy changes what it matches (a `source`
            // whose only field is misspelt matches everyone): refused, as the API server's
            // schema validation refuses it; the last good version stays in force. Named
            // before any other reason: it is usually the cause.
            match warnings.first() {
                Some(field) => Err((field.clone(), UNKNOWN_SECURITY_FIELD.to_string())),
                None => object,
            }
        }
        (
            "gateway.networking.k8s.io",
            "v1" | "v1beta1",
            k @ ("Gateway" | "HTTPRoute" | "GRPCRoute" | "ReferenceGrant"),
        ) => {
            if let Some(m) = value.as_mapping_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            match k {
                "Gateway" => typed::<Gateway>(value, &mut warnings)
                    .and_then(|g| g.validate().map(|()| Object::Gateway(Box::new(g)))),
                "HTTPRoute" => typed::<HttpRoute>(value, &mut warnings)
                    .and_then(|r| r.validate().map(|()| Object::HttpRoute(Box::new(r)))),
                "ReferenceGrant" => typed::<ReferenceGrant>(value, &mut warnings)
                    .map(|g| Object::ReferenceGrant(Box::new(g))),
                _ => typed::<GrpcRoute>(value, &mut warnings)
                    .and_then(|r| r.validate().map(|()| Object::GrpcRoute(Box::new(r)))),
            }
        }
        ("networking.istio.io", "v1" | "v1beta1" | "v1alpha3", "DestinationRule") => {
            if let Some(m) = value.as_mapping_mut() {
                m.remove("apiVersion");
                m.remove("kind");
                m.remove("status");
            }
            typed::<super::destination::DestinationRule>(value, &mut warnings)
                .map(|d| Object::DestinationRule(Box::new(d)))
        }
        ("trellis.dev", "v1alpha1", "LocalTrafficPolicy") => {
            if let Some(m) = value.as_mapping_mut() {
                m.remove("apiVersion");
                m.remove("kind");
                m.remove("status");
            }
            typed::<super::local_traffic::LocalTrafficPolicy>(value, &mut warnings)
                .map(|d| Object::LocalTrafficPolicy(Box::new(d)))
        }
        _ => {
            return Document::Skipped(format!(
                "{file}: {object_name}: apiVersion {api_version} kind {kind} is not read by Trellis; skipped"
            ));
        }
    };
    match result {
        Ok(object) => Document::Loaded(Loaded {
            warnings: warnings
                .into_iter()
                .map(|field| format!("{file}: {object_name}: {field}: unknown field, ignored"))
                .collect(),
            id,
            object,
        }),
        Err((field, reason)) => Document::Invalid(ConfigError {
            file: file.to_string(),
            object: object_name,
            field,
            reason,
            id: Some(id),
        }),
    }
}

/// Reads the mesh config file: a YAML mapping with `trustDomain`, `rootNamespace`,
/// `clusterId` and `domainSuffix`, each optional (defaults: `cluster.local`, `istio-system`,
/// `Kubernetes`, `cluster.local`). Unknown keys come back as warnings; a value that is not a
/// valid trust domain or namespace name is an error naming the field.
pub fn parse_mesh_config(
    file: &Path,
    text: &str,
) -> Result<(super::model::MeshConfig, Vec<String>), Box<ConfigError>> {
    let file_name = file.display().to_string();
    let err = |field: &str, reason: String| {
        Box::new(ConfigError {
            file: file_name.clone(),
            object: "mesh config".into(),
            field: field.into(),
            reason,
            id: None,
        })
    };
    let value: Value =
        serde_yaml_ng::from_str(text).map_err(|e| err("-", format!("not valid YAML: {e}")))?;
    let value = if value.is_null() {
        Value::Mapping(Default::default())
    } else {
        value
    };
    let mut warnings = Vec::new();
    let mesh: super::model::MeshConfig =
        typed(value, &mut warnings).map_err(|(field, reason)| err(&field, reason))?;
    let dns_name = |v: &str, max: usize, dots: bool| {
        !v.is_empty()
            && v.len() <= max
            && v.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
            && (dots || !v.contains('.'))
    };
    if !dns_name(&mesh.trust_domain, 255, true) {
        return Err(err(
            "trustDomain",
            format!(
                "{:?} is not a trust domain (lowercase letters, digits, '-' and '.')",
                mesh.trust_domain
            ),
        ));
    }
    if !dns_name(&mesh.root_namespace, 63, false) {
        return Err(err(
            "rootNamespace",
            format!("{:?} is not a namespace name", mesh.root_namespace),
        ));
    }
    if !dns_name(&mesh.domain_suffix, 253, true) {
        return Err(err(
            "domainSuffix",
            format!("{:?} is not a DNS suffix", mesh.domain_suffix),
        ));
    }
    if mesh.cluster_id.is_empty() || mesh.cluster_id.contains('/') {
        return Err(err(
            "clusterId",
            format!("{:?} must be non-empty and contain no '/'", mesh.cluster_id),
        ));
    }
    mesh.tracing()
        .map_err(|(field, reason)| err(&field, reason))?;
    let warnings = warnings
        .into_iter()
        .map(|field| format!("{file_name}: mesh config: {field}: unknown field, ignored"))
        .collect();
    Ok((mesh, warnings))
}

/// Deserializes `value` into `T`, collecting unknown fields into `warnings`; an error comes
/// back as (field path, reason).
fn typed<T: DeserializeOwned>(
    value: Value,
    warnings: &mut Vec<String>,
) -> Result<T, (String, String)> {
    let mut unknown = Vec::new();
    let mut track = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(value, &mut track);
    let result = serde_path_to_error::deserialize(de);
    warnings.extend(unknown.iter().map(|p| clean_path(p)));
    result.map_err(|e| {
        let path = clean_path(&e.path().to_string());
        let field = if path.is_empty() {
            "-".to_string()
        } else {
            path
        };
        (field, e.into_inner().to_string())
    })
}

/// A field path as users write it: the adapters mark `Option` layers with `?` segments and
/// the root with `.`; neither means anything to the person fixing the file.
fn clean_path(path: &str) -> String {
    path.split('.')
        .filter(|seg| !seg.is_empty() && *seg != "?")
        .collect::<Vec<_>>()
        .join(".")
}
