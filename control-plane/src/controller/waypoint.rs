//! Waypoints on Kubernetes (pure: a waypoint `Gateway` in, what the control plane applies
//! for it out).
//!
//! A `Gateway` of class `istio-waypoint` gets a ServiceAccount, a Service and a Deployment
//! of the same name in its namespace, each owned by the Gateway (an `ownerReference` with
//! `controller: true`), so Kubernetes' garbage collector deletes them with the Gateway.
//! Image, resources and where the control plane is come from the chart's values (the
//! [`WaypointTemplate`], a file the chart mounts). The Gateway's status says it is
//! `Accepted`, `Programmed` once the Deployment has a ready pod, and gives the Service's
//! cluster IP in `status.addresses` — where ztunnels send the waypoint's traffic.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

use super::apply::Target;
use crate::config::gateway::Gateway;

/// The label every object made for a waypoint carries (Istio's key; the value names the
/// controller). Managed Deployments are found by it.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// This controller's value of [`MANAGED_LABEL`].
pub const MANAGED_BY: &str = "trellis.dev-waypoint-controller";
/// The Gateway API's label naming the Gateway of generated objects.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The HBONE port waypoints listen on.
pub const HBONE_PORT: u16 = 15008;
/// The waypoint's readiness port.
pub const STATUS_PORT: u16 = 15021;

/// What every waypoint Deployment is made from (the chart's `waypoint` values, rendered to
/// a file the control plane reads at start).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointTemplate {
    /// Container image (the Trellis image: it holds `trellis-waypoint`).
    pub image: String,
    /// Pull policy.
    #[serde(default = "if_not_present")]
    pub image_pull_policy: String,
    /// Pull secrets (`{name: ...}` references, as in a pod spec).
    #[serde(default)]
    pub image_pull_secrets: Vec<Value>,
    /// Container resources (Kubernetes' `resources` object).
    #[serde(default)]
    pub resources: Value,
    /// Host name of the control plane's Service (xDS and CA on 15012).
    pub control_plane: String,
    /// Trust domain of the mesh.
    pub trust_domain: String,
    /// `RUST_LOG` of waypoints.
    #[serde(default = "info")]
    pub log_level: String,
    /// Audience of the projected token waypoints authenticate with.
    #[serde(default = "token_audience")]
    pub token_audience: String,
    /// Regular expressions masked in the waypoints' logs (from the mesh config's
    /// `accessLogMasking.regexes`, filled in at start).
    #[serde(default)]
    pub mask_regexes: Vec<String>,
    /// Audit every allow too (the mesh config's `auditLog.allows`, filled in at start).
    #[serde(default)]
    pub audit_allows: bool,
    /// The OTLP collector (`host:port`) and sampling percentage (the mesh config's
    /// `defaultProviders.tracing`, filled in at start).
    #[serde(skip)]
    pub tracing: Option<(String, f64)>,
}

fn if_not_present() -> String {
    "IfNotPresent".into()
}
fn info() -> String {
    "info".into()
}
fn token_audience() -> String {
    "trellis-ca".into()
}

impl WaypointTemplate {
    /// Reads the template from YAML; errors name the field.
    pub fn parse(source: &str, yaml: &str) -> Result<WaypointTemplate, String> {
        let de = serde_yaml_ng::Deserializer::from_str(yaml);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            format!("{source}: field {field}: {}", e.into_inner())
        })
    }
}

/// The targets and apply configurations of a waypoint's ServiceAccount, Service and
/// Deployment (in that order), or why the Gateway cannot have them.
pub fn objects(gw: &Gateway, t: &WaypointTemplate) -> Result<Vec<(Target, Value)>, String> {
    let (ns, name) = names(gw);
    if !is_dns_label(&name) {
        return Err(format!(
            "the name {name:?} is not a DNS-1035 label (a lowercase letter, then lowercase letters, digits and '-', at most 63 characters): the waypoint's Service cannot have it"
        ));
    }
    let infra = gw.spec.infrastructure.clone().unwrap_or_default();
    let mut labels: BTreeMap<String, String> = infra.labels.clone();
    labels.insert(GATEWAY_NAME_LABEL.into(), name.clone());
    labels.insert(MANAGED_LABEL.into(), MANAGED_BY.into());
    let owner = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": name,
        "uid": gw.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    });
    let metadata = json!({
        "name": name,
        "namespace": ns,
        "labels": labels,
        "annotations": infra.annotations,
        "ownerReferences": [owner],
    });
    let target = |api_version, kind, plural| Target {
        api_version,
        kind,
        plural,
        namespace: ns.clone(),
        name: name.clone(),
        status: false,
    };

    let service_account = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata,
    });

    let mut ports: Vec<Value> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    // Port names are ours (a Service port name is at most 15 characters, no dots; listener
    // names may be longer): `mesh` for HBONE, else `port-N`.
    for l in &gw.spec.listeners {
        if seen.insert(l.port) {
            let port_name = if l.port == HBONE_PORT {
                "mesh".to_string()
            } else {
                format!("port-{}", l.port)
            };
            ports.push(
                json!({"name": port_name, "port": l.port, "targetPort": l.port, "protocol": "TCP"}),
            );
        }
    }
    if seen.insert(HBONE_PORT) {
        ports.push(json!({"name": "mesh", "port": HBONE_PORT, "targetPort": HBONE_PORT, "protocol": "TCP"}));
    }
    if seen.insert(STATUS_PORT) {
        ports.push(json!({"name": "status-port", "port": STATUS_PORT, "targetPort": STATUS_PORT, "protocol": "TCP"}));
    }
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME_LABEL: name},
            "ports": ports,
        },
    });

    // The waypoint's own pods are never captured (their traffic is HBONE already).
    let mut pod_labels = labels.clone();
    pod_labels.insert("istio.io/dataplane-mode".into(), "none".into());
    pod_labels.insert("service.istio.io/canonical-name".into(), name.clone());
    let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let env = |name: &str, mut v: Value| {
        v["name"] = Value::from(name);
        v
    };
    let mut args = vec![
        format!("--control-plane=https://{}:15012", t.control_plane),
        format!("--control-plane-name={}", t.control_plane),
        "--ca-roots=/var/run/secrets/trellis/root-cert.pem".to_string(),
        "--credential-file=/var/run/secrets/tokens/trellis-token".to_string(),
        format!("--trust-domain={}", t.trust_domain),
        format!("--gateway={ns}/{name}"),
        "--metrics-addr=0.0.0.0:15020".to_string(),
        format!("--readiness-addr=0.0.0.0:{STATUS_PORT}"),
        "--log-format=json".to_string(),
    ];
    args.extend(t.mask_regexes.iter().map(|r| format!("--mask-regex={r}")));
    if t.audit_allows {
        args.push("--audit-allows".to_string());
    }
    if let Some((endpoint, sampling)) = &t.tracing {
        args.push(format!("--tracing-endpoint={endpoint}"));
        args.push(format!("--tracing-sampling={sampling}"));
    }
    let container = json!({
        "name": "waypoint",
        "image": t.image,
        "imagePullPolicy": t.image_pull_policy,
        "command": ["trellis-waypoint"],
        "args": args,
        "env": [
            {"name": "RUST_LOG", "value": t.log_level},
            env("POD_NAME", field("metadata.name")),
            env("POD_NAMESPACE", field("metadata.namespace")),
            env("INSTANCE_IP", field("status.podIP")),
            env("SERVICE_ACCOUNT", field("spec.serviceAccountName")),
            env("NODE_NAME", field("spec.nodeName")),
        ],
        "ports": [
            {"name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "http-metrics", "containerPort": 15020, "protocol": "TCP"},
            {"name": "http-ready", "containerPort": STATUS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": STATUS_PORT},
            "periodSeconds": 5,
        },
        "resources": if t.resources.is_null() { json!({}) } else { t.resources.clone() },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
            {"name": "ca-root", "mountPath": "/var/run/secrets/trellis", "readOnly": true},
        ],
    });
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": infra.annotations},
                "spec": {
                    "serviceAccountName": name,
                    "imagePullSecrets": t.image_pull_secrets,
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [
                        // Its identity to the control plane: a token bound to this pod.
                        {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": t.token_audience,
                            "expirationSeconds": 3600,
                            "path": "trellis-token",
                        }}]}},
                        {"name": "ca-root", "configMap": {"name": super::TRUST_BUNDLE_CONFIG_MAP}},
                    ],
                },
            },
        },
    });
    Ok(vec![
        (
            target("v1", "ServiceAccount", "serviceaccounts"),
            service_account,
        ),
        (target("v1", "Service", "services"), service),
        (target("apps/v1", "Deployment", "deployments"), deployment),
    ])
}

/// The targets of what [`objects`] makes for Gateway `ns/name` (to delete them).
pub fn object_targets(ns: &str, name: &str) -> Vec<Target> {
    [
        ("v1", "ServiceAccount", "serviceaccounts"),
        ("v1", "Service", "services"),
        ("apps/v1", "Deployment", "deployments"),
    ]
    .into_iter()
    .map(|(api_version, kind, plural)| Target {
        api_version,
        kind,
        plural,
        namespace: ns.into(),
        name: name.into(),
        status: false,
    })
    .collect()
}

/// What the control plane knows of a waypoint's Deployment and Service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Ready replicas of the Deployment (`None`: no such Deployment yet).
    pub ready_replicas: Option<i32>,
    /// The Service's cluster IP, once assigned.
    pub service_ip: Option<String>,
}

/// The apply configuration of the Gateway's status. `problem` is why [`objects`] refused
/// the Gateway, if it did.
pub fn gateway_status(gw: &Gateway, observed: &Observed, problem: Option<&str>) -> (Target, Value) {
    let (ns, name) = names(gw);
    let generation = gw.metadata.generation;
    let condition = |kind: &str, ok: bool, reason: &str, message: &str| {
        let mut c = json!({
            "type": kind,
            "status": if ok { "True" } else { "False" },
            "reason": reason,
            "message": message,
        });
        if let Some(g) = generation {
            c["observedGeneration"] = Value::from(g);
        }
        c
    };
    let ready = observed.ready_replicas.unwrap_or(0) > 0;
    let conditions = match problem {
        Some(p) => vec![
            condition("Accepted", false, "Invalid", p),
            condition("Programmed", false, "Invalid", p),
        ],
        None => vec![
            condition(
                "Accepted",
                true,
                "Accepted",
                "Trellis manages this waypoint's Deployment, Service and ServiceAccount",
            ),
            if ready && observed.service_ip.is_some() {
                condition(
                    "Programmed",
                    true,
                    "Programmed",
                    "the waypoint has a ready pod",
                )
            } else {
                condition(
                    "Programmed",
                    false,
                    "Pending",
                    "waiting for the waypoint's Deployment to have a ready pod and its Service an address",
                )
            },
        ],
    };
    let mut conditions = conditions;
    if let Some(observed) = &gw.status {
        super::apply::carry_times(&mut conditions, &observed.conditions);
    }
    let mut status = json!({"conditions": conditions});
    if problem.is_none()
        && let Some(ip) = &observed.service_ip
    {
        status["addresses"] = json!([{"type": "IPAddress", "value": ip}]);
    }
    (
        Target {
            api_version: "gateway.networking.k8s.io/v1",
            kind: "Gateway",
            plural: "gateways",
            namespace: ns.clone(),
            name: name.clone(),
            status: true,
        },
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": with_uid(json!({"name": name, "namespace": ns}), gw.metadata.uid.as_deref()),
            "status": status,
        }),
    )
}

/// `metadata` with `uid` set when known: the API server then refuses the write if the
/// object under that name is another one (deleted and re-created meanwhile).
pub fn with_uid(mut metadata: Value, uid: Option<&str>) -> Value {
    if let Some(uid) = uid {
        metadata["uid"] = uid.into();
    }
    metadata
}

fn names(gw: &Gateway) -> (String, String) {
    (
        gw.metadata.namespace.clone().unwrap_or_default(),
        gw.metadata.name.clone().unwrap_or_default(),
    )
}

fn is_dns_label(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
