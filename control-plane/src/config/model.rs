//! The model: the objects currently known, from whichever source, and what they mean for
//! the mesh: which pods are enrolled, and the `istio.workload.Address` resources (workloads
//! and services) ztunnel receives.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use trellis_proto::istio::workload as wl;

use trellis_proto::istio::security as sec;

use super::gateway::{Gateway, GrpcRoute, HttpRoute, ReferenceGrant};
use super::istio::{
    AuthorizationPolicy, MtlsMode, PeerAuthentication, RequestAuthentication, WorkloadSelector,
};
use super::load::{Object, ObjectRef};

/// Name of the shared policy that denies connections without a peer identity (the
/// STRICT mode of PeerAuthentication), in the root namespace; Istio's name.
pub const STATIC_STRICT: &str = "istio_converted_static_strict";

/// The enrollment label (namespace or pod).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// Binds a namespace, service or pod to a waypoint (a `Gateway` of class
/// `istio-waypoint`) by name; `none` opts out of the namespace's waypoint.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";

/// The namespace of the waypoint named by [`USE_WAYPOINT`], when it is not the object's.
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";

/// On a waypoint `Gateway`: which traffic it takes, `service` (default), `workload`, `all`
/// or `none`.
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";

/// Label of the pods and Service that implement a Gateway (set by whoever deploys it).
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";

/// Port of a waypoint's HBONE listener.
pub const HBONE_PORT: u32 = 15008;

/// Mesh-wide settings (the `--mesh-config` file; Istio's MeshConfig field names where
/// Istio has them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshConfig {
    /// Trust domain of identities.
    pub trust_domain: String,
    /// Namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    /// Cluster id, part of workload uids.
    pub cluster_id: String,
    /// DNS suffix of service hostnames.
    pub domain_suffix: String,
    /// External authorizers CUSTOM AuthorizationPolicies name (`provider.name`).
    pub extension_providers: Vec<ExtensionProvider>,
    /// The SP 800-204B secure default posture (a Trellis field; docs/security.md):
    /// mutual TLS required unless a PeerAuthentication says otherwise, a token required
    /// wherever a RequestAuthentication applies, and calls allowed only from the
    /// destination's own namespace (and its waypoints) unless an ALLOW policy allows more.
    pub secure_default: bool,
    /// What the waypoints' access and audit logs must never show (a Trellis field).
    pub access_log_masking: LogMasking,
    /// The waypoints' audit log (a Trellis field).
    pub audit_log: AuditLog,
    /// Providers used when no Telemetry resource says otherwise (Istio's field; Trellis
    /// reads `tracing`).
    pub default_providers: DefaultProviders,
    /// Proxy defaults (Istio's `defaultConfig`; Trellis reads `tracing.sampling`).
    pub default_config: ProxyDefaults,
}

/// `defaultProviders`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DefaultProviders {
    /// The tracing providers (`extensionProviders` names; the first is used).
    pub tracing: Vec<String>,
}

/// `defaultConfig` (Istio's ProxyConfig), the part Trellis reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyDefaults {
    /// Tracing.
    pub tracing: TracingDefaults,
}

/// `defaultConfig.tracing`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TracingDefaults {
    /// Share of new traces sampled, percent (Istio's default 1).
    pub sampling: Option<serde_json::Number>,
}

/// An `opentelemetry` extension provider: an OTLP/gRPC collector.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OpenTelemetryProvider {
    /// The collector's Service (`name.namespace.svc.<suffix>`).
    pub service: String,
    /// Its OTLP/gRPC port (4317).
    pub port: u16,
}

impl MeshConfig {
    /// Where the waypoints export spans (`host:port`) and the sampling percentage, from
    /// `defaultProviders.tracing` and `defaultConfig.tracing.sampling`; `None` when no
    /// tracing provider is set. A provider that is not an `opentelemetry` one, or a
    /// sampling outside 0–100, is an error naming the field.
    pub fn tracing(&self) -> Result<Option<(String, f64)>, (String, String)> {
        let Some(name) = self.default_providers.tracing.first() else {
            return Ok(None);
        };
        let provider = self
            .extension_providers
            .iter()
            .find(|p| &p.name == name)
            .ok_or_else(|| {
                (
                    "defaultProviders.tracing".to_string(),
                    format!("{name:?} is not one of extensionProviders"),
                )
            })?;
        let otel = provider.opentelemetry.as_ref().ok_or_else(|| {
            (
                "defaultProviders.tracing".to_string(),
                format!(
                    "{name:?} is not an opentelemetry provider (the only kind waypoints export to)"
                ),
            )
        })?;
        if otel.service.is_empty() || otel.port == 0 {
            return Err((
                format!("extensionProviders[{name}].opentelemetry"),
                "service and port are required".to_string(),
            ));
        }
        let sampling = match &self.default_config.tracing.sampling {
            None => 1.0,
            Some(n) => n
                .as_f64()
                .filter(|p| (0.0..=100.0).contains(p))
                .ok_or_else(|| {
                    (
                        "defaultConfig.tracing.sampling".to_string(),
                        format!("{n} is not a percentage (0 to 100)"),
                    )
                })?,
        };
        Ok(Some((format!("{}:{}", otel.service, otel.port), sampling)))
    }
}

/// `auditLog`: what the waypoints' audit lines cover beyond denies, AUDIT-policy matches
/// and dry-run decisions (always logged).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuditLog {
    /// A line for every allowed request and connection too.
    pub allows: bool,
}

/// `accessLogMasking`: values replaced by `****` in the waypoints' log lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LogMasking {
    /// Regular expressions (RE2 syntax), e.g. card numbers `\\b[0-9]{13,16}\\b`.
    pub regexes: Vec<String>,
}

/// An `extensionProviders` entry (Istio's MeshConfig): an external authorizer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExtensionProvider {
    /// The name policies use.
    pub name: String,
    /// Envoy's HTTP `ext_authz`.
    pub envoy_ext_authz_http: Option<ExtAuthzHttp>,
    /// Envoy's gRPC `ext_authz` (`envoy.service.auth.v3.Authorization/Check`).
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpc>,
    /// An OTLP/gRPC trace collector.
    pub opentelemetry: Option<OpenTelemetryProvider>,
}

/// `envoyExtAuthzHttp`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExtAuthzHttp {
    /// The authorizer's Service (`name.namespace.svc.<suffix>`).
    pub service: String,
    /// Its port.
    pub port: u16,
    /// Prepended to the request's path in the check.
    pub path_prefix: String,
    /// How long a check may take (`1s`; default 600 s, as Istio).
    pub timeout: Option<String>,
    /// Allow the request when the authorizer cannot be reached.
    pub fail_open: bool,
    /// Request headers sent in the check (beyond Host, Method, Path, Authorization).
    pub include_request_headers_in_check: Vec<String>,
    /// Headers of an allowing answer copied to the request going upstream.
    pub headers_to_upstream_on_allow: Vec<String>,
    /// Headers of a denying answer copied to the response to the client.
    pub headers_to_downstream_on_deny: Vec<String>,
}

/// `envoyExtAuthzGrpc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExtAuthzGrpc {
    /// The authorizer's Service.
    pub service: String,
    /// Its port.
    pub port: u16,
    /// How long a check may take.
    pub timeout: Option<String>,
    /// Allow the request when the authorizer cannot be reached.
    pub fail_open: bool,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            cluster_id: "Kubernetes".into(),
            domain_suffix: "cluster.local".into(),
            extension_providers: Vec::new(),
            secure_default: false,
            access_log_masking: LogMasking::default(),
            audit_log: AuditLog::default(),
            default_providers: DefaultProviders::default(),
            default_config: ProxyDefaults::default(),
        }
    }
}

type Key = (String, String);

/// Everything known now. Objects are replaced whole on update.
#[derive(Debug, Default, Clone)]
pub struct Model {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<Key, Pod>,
    services: BTreeMap<Key, Service>,
    service_accounts: BTreeMap<Key, ServiceAccount>,
    authorization_policies: BTreeMap<Key, AuthorizationPolicy>,
    peer_authentications: BTreeMap<Key, PeerAuthentication>,
    request_authentications: BTreeMap<Key, RequestAuthentication>,
    gateways: BTreeMap<Key, Gateway>,
    http_routes: BTreeMap<Key, HttpRoute>,
    grpc_routes: BTreeMap<Key, GrpcRoute>,
    reference_grants: BTreeMap<Key, ReferenceGrant>,
    destination_rules: BTreeMap<Key, super::destination::DestinationRule>,
    local_traffic_policies: BTreeMap<Key, super::local_traffic::LocalTrafficPolicy>,
    /// Node labels by node name (workloads' locality).
    nodes: BTreeMap<String, BTreeMap<String, String>>,
    /// EndpointSlices: endpoints of Services not backed by pods.
    endpoint_slices: BTreeMap<Key, EndpointSlice>,
    /// A change reached across namespaces (a waypoint moved): every namespace is dirty.
    dirty_all: bool,
    /// Namespaces whose objects changed since [`Model::take_dirty`] was last called.
    dirty: std::collections::BTreeSet<String>,
}

fn key(id: &ObjectRef) -> Key {
    (id.namespace.clone(), id.name.clone())
}

impl Model {
    /// Adds or replaces an object.
    pub fn apply(&mut self, id: &ObjectRef, object: Object) {
        if let Object::Node(n) = object {
            // Only the locality labels matter, and only to the pods on that node.
            let before = self.nodes.insert(n.name.clone(), n.labels.clone());
            if before.as_ref().map(locality_labels) != Some(locality_labels(&n.labels)) {
                self.touch_node(&n.name);
            }
            return;
        }
        self.touch(id);
        let k = key(id);
        match object {
            Object::Node(_) => {}
            Object::EndpointSlice(o) => {
                self.endpoint_slices.insert(k, *o);
            }
            Object::Namespace(o) => {
                self.namespaces.insert(id.name.clone(), *o);
            }
            Object::Pod(o) => {
                self.pods.insert(k, *o);
            }
            Object::Service(o) => {
                self.services.insert(k, *o);
            }
            Object::ServiceAccount(o) => {
                self.service_accounts.insert(k, *o);
            }
            Object::AuthorizationPolicy(o) => {
                self.authorization_policies.insert(k, *o);
            }
            Object::PeerAuthentication(o) => {
                self.peer_authentications.insert(k, *o);
            }
            Object::RequestAuthentication(o) => {
                self.request_authentications.insert(k, *o);
            }
            Object::Gateway(o) => {
                self.gateways.insert(k, *o);
            }
            Object::HttpRoute(o) => {
                self.http_routes.insert(k, *o);
            }
            Object::GrpcRoute(o) => {
                self.grpc_routes.insert(k, *o);
            }
            Object::ReferenceGrant(o) => {
                self.reference_grants.insert(k, *o);
            }
            Object::DestinationRule(o) => {
                self.destination_rules.insert(k, *o);
            }
            Object::LocalTrafficPolicy(o) => {
                self.local_traffic_policies.insert(k, *o);
            }
        }
    }

    /// Whether the model already holds exactly `object` as `id` (applying it would change
    /// nothing).
    pub fn holds(&self, id: &ObjectRef, object: &Object) -> bool {
        let k = key(id);
        match object {
            Object::Namespace(o) => self.namespaces.get(&id.name) == Some(o),
            Object::Pod(o) => self.pods.get(&k) == Some(o),
            Object::Service(o) => self.services.get(&k) == Some(o),
            Object::ServiceAccount(o) => self.service_accounts.get(&k) == Some(o),
            Object::AuthorizationPolicy(o) => self.authorization_policies.get(&k) == Some(o),
            Object::PeerAuthentication(o) => self.peer_authentications.get(&k) == Some(o),
            Object::RequestAuthentication(o) => self.request_authentications.get(&k) == Some(o),
            Object::Gateway(o) => self.gateways.get(&k) == Some(o),
            Object::HttpRoute(o) => self.http_routes.get(&k) == Some(o),
            Object::GrpcRoute(o) => self.grpc_routes.get(&k) == Some(o),
            Object::ReferenceGrant(o) => self.reference_grants.get(&k) == Some(o),
            Object::DestinationRule(o) => self.destination_rules.get(&k) == Some(o),
            Object::LocalTrafficPolicy(o) => self.local_traffic_policies.get(&k) == Some(o),
            Object::Node(n) => self.nodes.get(&n.name) == Some(&n.labels),
            Object::EndpointSlice(o) => self.endpoint_slices.get(&k) == Some(o),
        }
    }

    /// Removes an object; removing an unknown object is not an error.
    pub fn delete(&mut self, id: &ObjectRef) {
        if id.kind == "Node" {
            if self.nodes.remove(&id.name).is_some() {
                self.touch_node(&id.name);
            }
            return;
        }
        self.touch(id);
        let k = key(id);
        match id.kind.as_str() {
            "EndpointSlice" => {
                self.endpoint_slices.remove(&k);
            }
            "Namespace" => {
                self.namespaces.remove(&id.name);
            }
            "Pod" => {
                self.pods.remove(&k);
            }
            "Service" => {
                self.services.remove(&k);
            }
            "ServiceAccount" => {
                self.service_accounts.remove(&k);
            }
            "AuthorizationPolicy" => {
                self.authorization_policies.remove(&k);
            }
            "PeerAuthentication" => {
                self.peer_authentications.remove(&k);
            }
            "RequestAuthentication" => {
                self.request_authentications.remove(&k);
            }
            "Gateway" => {
                self.gateways.remove(&k);
            }
            "HTTPRoute" => {
                self.http_routes.remove(&k);
            }
            "GRPCRoute" => {
                self.grpc_routes.remove(&k);
            }
            "ReferenceGrant" => {
                self.reference_grants.remove(&k);
            }
            "DestinationRule" => {
                self.destination_rules.remove(&k);
            }
            "LocalTrafficPolicy" => {
                self.local_traffic_policies.remove(&k);
            }
            _ => {}
        }
    }

    fn touch(&mut self, id: &ObjectRef) {
        let ns = if id.kind == "Namespace" {
            &id.name
        } else {
            &id.namespace
        };
        // Objects in other namespaces may use a waypoint: a change to a Gateway, or to the
        // Service that fronts one, can change their resources.
        if id.kind == "Gateway" || (id.kind == "Service" && self.gateways.contains_key(&key(id))) {
            self.dirty_all = true;
        }
        self.dirty.insert(ns.clone());
    }

    /// Marks the namespaces of the pods on `node` changed.
    fn touch_node(&mut self, node: &str) {
        let namespaces: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .map(|((ns, _), _)| ns.clone())
            .collect();
        self.dirty.extend(namespaces);
    }

    /// The namespaces touched by changes since the last call (and forgets them).
    pub fn take_dirty(&mut self) -> std::collections::BTreeSet<String> {
        let mut dirty = std::mem::take(&mut self.dirty);
        if std::mem::take(&mut self.dirty_all) {
            dirty.extend(self.namespaces_in_use());
        }
        dirty
    }

    /// The Gateways, by (namespace, name).
    pub fn gateways(&self) -> impl Iterator<Item = (&Key, &Gateway)> {
        self.gateways.iter()
    }

    /// The Services, by (namespace, name).
    pub fn service_objects(&self) -> impl Iterator<Item = (&Key, &Service)> {
        self.services.iter()
    }

    /// The HTTPRoutes, by (namespace, name).
    pub fn http_routes(&self) -> impl Iterator<Item = (&Key, &HttpRoute)> {
        self.http_routes.iter()
    }

    /// Whether a `from_kind` (`HTTPRoute`, `GRPCRoute`) of namespace `from_ns` may use
    /// Service `to_ns/name` as a backend: always in its own namespace, elsewhere only when
    /// a ReferenceGrant of `to_ns` allows it.
    pub fn backend_allowed(&self, from_kind: &str, from_ns: &str, to_ns: &str, name: &str) -> bool {
        from_ns == to_ns
            || in_namespace(&self.reference_grants, to_ns)
                .any(|(_, g)| g.allows_service(from_kind, from_ns, name))
    }

    /// The GRPCRoutes, by (namespace, name).
    pub fn grpc_routes(&self) -> impl Iterator<Item = (&Key, &GrpcRoute)> {
        self.grpc_routes.iter()
    }

    /// The waypoint that fronts an object of namespace `ns` with `labels`, for traffic
    /// `kind` (`service` or `workload`): the object's own `istio.io/use-waypoint` label, else
    /// its namespace's; `none` opts out. The named Gateway must exist, be of class
    /// `istio-waypoint`, and take that kind of traffic (its `istio.io/waypoint-for`);
    /// otherwise there is no waypoint. The pods and Service implementing a waypoint never
    /// get one. Returns the Gateway's (namespace, name).
    pub fn waypoint_key_of(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
        kind: &str,
    ) -> Option<Key> {
        if let Some(gw) = labels.get(GATEWAY_NAME)
            && self
                .gateways
                .get(&(ns.to_string(), gw.clone()))
                .is_some_and(Gateway::is_waypoint)
        {
            return None;
        }
        let ns_labels = self
            .namespaces
            .get(ns)
            .and_then(|n| n.metadata.labels.as_ref());
        let (name, gw_ns) = match labels.get(USE_WAYPOINT) {
            Some(name) => (name, labels.get(USE_WAYPOINT_NAMESPACE)),
            None => {
                let l = ns_labels?;
                (l.get(USE_WAYPOINT)?, l.get(USE_WAYPOINT_NAMESPACE))
            }
        };
        if name == "none" {
            return None;
        }
        let gw_ns = gw_ns.map_or(ns, String::as_str);
        let gw_key = (gw_ns.to_string(), name.clone());
        let gw = self.gateways.get(&gw_key).filter(|g| g.is_waypoint())?;
        let takes = label(&gw.metadata.labels, WAYPOINT_FOR).unwrap_or("service");
        if !(takes == kind || takes == "all") {
            return None;
        }
        Some(gw_key)
    }

    /// The waypoint that fronts an object (see [`Self::waypoint_key_of`]), as the address
    /// the data plane reaches it at.
    pub fn waypoint_of(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
        kind: &str,
        mesh: &MeshConfig,
    ) -> Option<wl::GatewayAddress> {
        let gw_key = self.waypoint_key_of(ns, labels, kind)?;
        let (gw_ns, name) = (gw_key.0.as_str(), gw_key.1.as_str());
        let gw = self.gateways.get(&gw_key)?;
        let reported = gw
            .status
            .iter()
            .flat_map(|s| s.addresses.iter())
            .chain(gw.spec.addresses.iter())
            .next();
        let destination = match reported {
            Some(a) if a.type_.as_deref().is_none_or(|t| t == "IPAddress") => a
                .value
                .parse::<IpAddr>()
                .ok()
                .map(|ip| wl::gateway_address::Destination::Address(network_address(ip))),
            Some(a) => Some(wl::gateway_address::Destination::Hostname(
                wl::NamespacedHostname {
                    namespace: gw_ns.to_string(),
                    hostname: a.value.clone(),
                },
            )),
            None => None,
        };
        // Not reported: the waypoint's Service (named after the Gateway) by its VIP, else by
        // hostname for the data plane to resolve.
        let destination = destination.or_else(|| {
            self.services
                .get(&gw_key)
                .and_then(|svc| service_ips(svc).first().copied())
                .map(|ip| wl::gateway_address::Destination::Address(network_address(ip)))
        });
        let destination = destination.unwrap_or_else(|| {
            wl::gateway_address::Destination::Hostname(wl::NamespacedHostname {
                namespace: gw_ns.to_string(),
                hostname: hostname(name, gw_ns, mesh),
            })
        });
        Some(wl::GatewayAddress {
            destination: Some(destination),
            hbone_mtls_port: HBONE_PORT,
        })
    }

    /// The Gateway `ns/name`.
    pub fn gateway(&self, ns: &str, name: &str) -> Option<&Gateway> {
        self.gateways.get(&(ns.to_string(), name.to_string()))
    }

    /// The resource names a proxy needs to reach Service `ns/name`: its address and the
    /// pods behind it (for a waypoint's view).
    pub fn service_view(&self, ns: &str, name: &str, mesh: &MeshConfig) -> Vec<String> {
        let Some(svc) = self.services.get(&(ns.to_string(), name.to_string())) else {
            return Vec::new();
        };
        let mut out = vec![format!("{ns}/{}", hostname(name, ns, mesh))];
        for ((pns, pname), pod) in in_namespace(&self.pods, ns) {
            let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
            if selects(svc, &pod_labels) {
                out.push(format!("{}//Pod/{pns}/{pname}", mesh.cluster_id));
            }
        }
        out
    }

    /// Whether Service `ns/name` selects a pod carrying every label of `labels`.
    pub fn service_selects_pod_with(
        &self,
        ns: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        let Some(svc) = self.services.get(&(ns.to_string(), name.to_string())) else {
            return false;
        };
        in_namespace(&self.pods, ns).any(|(_, pod)| {
            let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
            selects(svc, &pod_labels) && labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
        })
    }

    /// The labels of namespace `ns` (none when it is not known).
    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(ns)
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default()
    }

    /// The labels of Service `ns/name`, if it exists.
    pub fn service_labels(&self, ns: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let svc = self.services.get(&(ns.to_string(), name.to_string()))?;
        Some(svc.metadata.labels.clone().unwrap_or_default())
    }

    /// The metadata of a security policy or Gateway (what status writes refer to).
    pub fn metadata(
        &self,
        id: &ObjectRef,
    ) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta> {
        let k = key(id);
        match id.kind.as_str() {
            "AuthorizationPolicy" => Some(&self.authorization_policies.get(&k)?.metadata),
            "PeerAuthentication" => Some(&self.peer_authentications.get(&k)?.metadata),
            "RequestAuthentication" => Some(&self.request_authentications.get(&k)?.metadata),
            "Gateway" => Some(&self.gateways.get(&k)?.metadata),
            "DestinationRule" => Some(&self.destination_rules.get(&k)?.metadata),
            "LocalTrafficPolicy" => Some(&self.local_traffic_policies.get(&k)?.metadata),
            _ => None,
        }
    }

    /// `metadata.generation` of a security policy or Gateway.
    pub fn generation(&self, id: &ObjectRef) -> Option<i64> {
        self.metadata(id)?.generation
    }

    /// The first cluster IP of Service `ns/name`, once assigned.
    pub fn service_vip(&self, ns: &str, name: &str) -> Option<IpAddr> {
        let svc = self.services.get(&(ns.to_string(), name.to_string()))?;
        service_ips(svc).first().copied()
    }

    /// Namespaces with mesh workloads: labelled `istio.io/dataplane-mode=ambient`, or
    /// holding an enrolled pod.
    pub fn enrolled_namespaces(&self) -> std::collections::BTreeSet<String> {
        let labelled = self
            .namespaces
            .iter()
            .filter(|(_, n)| label(&n.metadata.labels, DATAPLANE_MODE) == Some("ambient"))
            .map(|(name, _)| name.clone());
        let with_pods = self
            .pods
            .iter()
            .filter(|(_, p)| self.is_enrolled(p))
            .map(|((ns, _), _)| ns.clone());
        labelled.chain(with_pods).collect()
    }

    /// Every namespace that holds pods, services or policies.
    pub fn namespaces_in_use(&self) -> std::collections::BTreeSet<String> {
        self.pods
            .keys()
            .chain(self.services.keys())
            .chain(self.authorization_policies.keys())
            .chain(self.peer_authentications.keys())
            .chain(self.request_authentications.keys())
            .chain(self.destination_rules.keys())
            .chain(self.local_traffic_policies.keys())
            .map(|(ns, _)| ns.clone())
            .collect()
    }

    /// The authorization policies of namespace `ns`.
    pub fn authorization_policies_in<'a>(
        &'a self,
        ns: &str,
    ) -> impl Iterator<Item = (&'a Key, &'a AuthorizationPolicy)> + 'a {
        in_namespace(&self.authorization_policies, ns)
    }

    /// The PeerAuthentications of namespace `ns`.
    pub fn peer_authentications_in<'a>(
        &'a self,
        ns: &str,
    ) -> impl Iterator<Item = (&'a Key, &'a PeerAuthentication)> + 'a {
        in_namespace(&self.peer_authentications, ns)
    }

    /// Every DestinationRule.
    pub fn destination_rules(
        &self,
    ) -> impl Iterator<Item = (&Key, &super::destination::DestinationRule)> {
        self.destination_rules.iter()
    }

    /// Every LocalTrafficPolicy.
    pub fn local_traffic_policies(
        &self,
    ) -> impl Iterator<Item = (&Key, &super::local_traffic::LocalTrafficPolicy)> {
        self.local_traffic_policies.iter()
    }

    /// The RequestAuthentications of namespace `ns`.
    pub fn request_authentications(&self) -> impl Iterator<Item = (&Key, &RequestAuthentication)> {
        self.request_authentications.iter()
    }

    /// The RequestAuthentications of namespace `ns`.
    pub fn request_authentications_in<'a>(
        &'a self,
        ns: &str,
    ) -> impl Iterator<Item = (&'a Key, &'a RequestAuthentication)> + 'a {
        in_namespace(&self.request_authentications, ns)
    }

    /// The workloads of the pods in namespace `ns`.
    pub fn workloads_in(&self, ns: &str, mesh: &MeshConfig) -> Vec<wl::Workload> {
        in_namespace(&self.pods, ns)
            .filter_map(|(_, pod)| self.workload(pod, mesh))
            .chain(
                in_namespace(&self.endpoint_slices, ns)
                    .flat_map(|(_, slice)| self.endpoint_workloads(slice, mesh)),
            )
            .collect()
    }

    /// Workloads for the endpoints of an EndpointSlice that are not pods (a Service
    /// without a selector, endpoints managed by hand or by another controller): plain TCP
    /// destinations (never HBONE: nothing says they are in the mesh), one per address,
    /// carrying the Service's ports. Endpoints pointing at a pod are skipped: the pod is a
    /// workload already.
    fn endpoint_workloads(&self, slice: &EndpointSlice, mesh: &MeshConfig) -> Vec<wl::Workload> {
        let ns = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let slice_name = slice.metadata.name.clone().unwrap_or_default();
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            return Vec::new();
        }
        let Some(svc_name) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            return Vec::new();
        };
        let Some(svc) = self.services.get(&(ns.clone(), svc_name.clone())) else {
            return Vec::new();
        };
        // Service port → the slice's port of the same name.
        let slice_ports = slice.ports.clone().unwrap_or_default();
        let ports: Vec<wl::Port> = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
            .filter_map(|p| {
                let target = slice_ports
                    .iter()
                    .find(|sp| sp.name.as_deref().unwrap_or("") == p.name.as_deref().unwrap_or(""))?
                    .port?;
                Some(wl::Port {
                    service_port: u32::try_from(p.port).ok()?,
                    target_port: u32::try_from(target).ok()?,
                })
            })
            .collect();
        let service_key = format!("{ns}/{}", hostname(svc_name, &ns, mesh));
        let mut out = Vec::new();
        for ep in &slice.endpoints {
            if ep.target_ref.as_ref().and_then(|t| t.kind.as_deref()) == Some("Pod") {
                continue;
            }
            let ready = ep.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            let node = ep.node_name.clone().unwrap_or_default();
            let mut locality = self.locality(&node);
            if let Some(zone) = &ep.zone {
                locality.get_or_insert_with(Default::default).zone = zone.clone();
            }
            for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                out.push(wl::Workload {
                    uid: format!(
                        "{}/discovery.k8s.io/EndpointSlice/{ns}/{slice_name}/{ip}",
                        mesh.cluster_id
                    ),
                    name: slice_name.clone(),
                    namespace: ns.clone(),
                    addresses: vec![ip_bytes(ip)],
                    tunnel_protocol: wl::TunnelProtocol::None as i32,
                    trust_domain: mesh.trust_domain.clone(),
                    node: node.clone(),
                    canonical_name: svc_name.clone(),
                    canonical_revision: "latest".into(),
                    workload_type: wl::WorkloadType::Pod as i32,
                    workload_name: svc_name.clone(),
                    services: [(
                        service_key.clone(),
                        wl::PortList {
                            ports: ports.clone(),
                        },
                    )]
                    .into(),
                    status: if ready {
                        wl::WorkloadStatus::Healthy as i32
                    } else {
                        wl::WorkloadStatus::Unhealthy as i32
                    },
                    cluster_id: mesh.cluster_id.clone(),
                    locality: locality.clone(),
                    ..Default::default()
                });
            }
        }
        out
    }

    /// The locality of `node` from its topology labels (`None` when it has none).
    fn locality(&self, node: &str) -> Option<wl::Locality> {
        let labels = self.nodes.get(node)?;
        let [region, zone, subzone] = locality_labels(labels);
        if region.is_none() && zone.is_none() && subzone.is_none() {
            return None;
        }
        Some(wl::Locality {
            region: region.unwrap_or_default(),
            zone: zone.unwrap_or_default(),
            subzone: subzone.unwrap_or_default(),
        })
    }

    /// The services of namespace `ns`.
    pub fn services_in(&self, ns: &str, mesh: &MeshConfig) -> Vec<wl::Service> {
        in_namespace(&self.services, ns)
            .map(|((ns, name), svc)| self.service(ns, name, svc, mesh))
            .collect()
    }

    /// The authorization policies, by (namespace, name).
    pub fn authorization_policies(&self) -> impl Iterator<Item = (&Key, &AuthorizationPolicy)> {
        self.authorization_policies.iter()
    }

    /// What each waypoint Gateway (namespace, name) may read, by resource name: the
    /// Services it fronts and the pods behind them, the pods bound to it directly
    /// (workload-addressed traffic), the Services its routes send to and their pods, its own
    /// Service, and its Route resources. A waypoint does not read the rest of the mesh.
    pub fn waypoint_views(
        &self,
        mesh: &MeshConfig,
    ) -> BTreeMap<Key, std::collections::BTreeSet<String>> {
        let mut views: BTreeMap<Key, std::collections::BTreeSet<String>> = BTreeMap::new();
        let pod_uid = |ns: &str, name: &str| format!("{}//Pod/{ns}/{name}", mesh.cluster_id);
        for ((ns, name), svc) in &self.services {
            let labels = svc.metadata.labels.clone().unwrap_or_default();
            let Some(gw) = self.waypoint_key_of(ns, &labels, "service") else {
                continue;
            };
            let view = views.entry(gw).or_default();
            view.insert(format!("{ns}/{}", hostname(name, ns, mesh)));
            for ((pns, pname), pod) in in_namespace(&self.pods, ns) {
                let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
                if selects(svc, &pod_labels) {
                    view.insert(pod_uid(pns, pname));
                }
            }
        }
        for ((ns, name), pod) in &self.pods {
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            if let Some(gw) = self.waypoint_key_of(ns, &labels, "workload") {
                views.entry(gw).or_default().insert(pod_uid(ns, name));
            }
        }
        // The Services its routes send to, and their pods.
        for (gw, backends) in super::routes::route_backends(self, mesh) {
            let view = views.entry(gw).or_default();
            for (bns, bname) in backends {
                let Some(svc) = self.services.get(&(bns.clone(), bname.clone())) else {
                    continue;
                };
                view.insert(format!("{bns}/{}", hostname(&bname, &bns, mesh)));
                for ((pns, pname), pod) in in_namespace(&self.pods, &bns) {
                    let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
                    if selects(svc, &pod_labels) {
                        view.insert(pod_uid(pns, pname));
                    }
                }
            }
        }
        // Its own Service (named after the Gateway): how workloads bound to it name it.
        for (gw, view) in views.iter_mut() {
            if self.services.contains_key(gw) {
                view.insert(format!("{}/{}", gw.0, hostname(&gw.1, &gw.0, mesh)));
            }
        }
        // Its Route resources (one per port of each Service it fronts).
        for ((ns, name), svc) in &self.services {
            let labels = svc.metadata.labels.clone().unwrap_or_default();
            let Some(gw) = self.waypoint_key_of(ns, &labels, "service") else {
                continue;
            };
            let view = views.entry(gw).or_default();
            let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
            for port in ports.into_iter().flatten() {
                view.insert(format!("{ns}/{}:{}", hostname(name, ns, mesh), port.port));
            }
        }
        views
    }

    /// Whether a pod is in the mesh: it or its namespace says
    /// `istio.io/dataplane-mode=ambient` and the pod does not say `none`; host-network
    /// pods never are (their traffic cannot be captured without capturing the node's).
    pub fn is_enrolled(&self, pod: &Pod) -> bool {
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return false;
        }
        let pod_mode = label(&pod.metadata.labels, DATAPLANE_MODE);
        match pod_mode {
            Some("ambient") => true,
            Some("none") => false,
            _ => {
                let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
                self.namespaces
                    .get(ns)
                    .and_then(|n| label(&n.metadata.labels, DATAPLANE_MODE))
                    == Some("ambient")
            }
        }
    }

    /// The identities of the enrolled pods, by the node they are scheduled on: what each
    /// node's ztunnel may obtain certificates for. A pod whose namespace or service account
    /// does not make a valid identity is left out (and logged).
    pub fn identities_by_node(
        &self,
        mesh: &MeshConfig,
    ) -> BTreeMap<String, std::collections::BTreeSet<trellis_core::SpiffeId>> {
        let mut out: BTreeMap<String, std::collections::BTreeSet<_>> = BTreeMap::new();
        for ((ns, name), pod) in &self.pods {
            let Some(spec) = pod.spec.as_ref() else {
                continue;
            };
            let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            if !self.is_enrolled(pod) {
                continue;
            }
            let sa = spec.service_account_name.as_deref().unwrap_or("default");
            match trellis_core::SpiffeId::new(&mesh.trust_domain, ns, sa) {
                Ok(id) => {
                    out.entry(node.to_string()).or_default().insert(id);
                }
                Err(e) => {
                    tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "no identity for this pod")
                }
            }
        }
        out
    }

    /// One `Workload` per pod that has an IP or is scheduled to a node: enrolled pods speak
    /// HBONE, others plain TCP.
    pub fn workloads(&self, mesh: &MeshConfig) -> Vec<wl::Workload> {
        self.pods
            .values()
            .filter_map(|pod| self.workload(pod, mesh))
            .chain(
                self.endpoint_slices
                    .values()
                    .flat_map(|slice| self.endpoint_workloads(slice, mesh)),
            )
            .collect()
    }

    fn workload(&self, pod: &Pod, mesh: &MeshConfig) -> Option<wl::Workload> {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone()?;
        let addresses = pod_ips(pod);
        let spec = pod.spec.as_ref();
        // A pod scheduled to a node but without an address yet (its sandbox is being set
        // up: the CNI ADD runs now) is published too, address-less and never a ready
        // endpoint: its node's agent decides its enrollment at ADD from it, so the pod is
        // captured from its first packet. An unscheduled pod is nobody's concern yet.
        let scheduled = spec
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| !n.is_empty());
        if addresses.is_empty() && !scheduled {
            return None;
        }
        let ready = !addresses.is_empty() && pod_ready(pod);
        let host_network = spec.and_then(|s| s.host_network) == Some(true);
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let enrolled = self.is_enrolled(pod);
        let mut services = std::collections::HashMap::new();
        for ((sns, sname), svc) in in_namespace(&self.services, &ns) {
            if !selects(svc, &labels) {
                continue;
            }
            let ports = service_ports(svc, Some(pod));
            services.insert(
                format!("{sns}/{}", hostname(sname, sns, mesh)),
                wl::PortList { ports },
            );
        }
        let in_scope = in_namespace(&self.authorization_policies, &ns);
        let mesh_wide = if ns == mesh.root_namespace {
            None
        } else {
            Some(in_namespace(
                &self.authorization_policies,
                &mesh.root_namespace,
            ))
        };
        let authorization_policies = mesh_wide
            .into_iter()
            .flatten()
            .chain(in_scope)
            .filter(|(_, p)| {
                p.spec.target_ref.is_none()
                    && p.spec.target_refs.is_empty()
                    && p.spec
                        .selector
                        .as_ref()
                        .is_some_and(|s| matches_selector(s, &labels))
            })
            .map(|((pns, pname), _)| format!("{pns}/{pname}"))
            .collect::<Vec<_>>();
        let mut authorization_policies = authorization_policies;
        if enrolled {
            let mtls = self.effective_mtls(&ns, &labels, mesh);
            if let Some(key) = mtls.policy_key(mesh) {
                authorization_policies.push(key);
            }
        }
        let waypoint = if enrolled {
            self.waypoint_of(&ns, &labels, "workload", mesh)
        } else {
            None
        };
        Some(wl::Workload {
            uid: format!("{}//Pod/{ns}/{name}", mesh.cluster_id),
            waypoint,
            name: name.clone(),
            namespace: ns,
            addresses,
            tunnel_protocol: if enrolled {
                wl::TunnelProtocol::Hbone as i32
            } else {
                wl::TunnelProtocol::None as i32
            },
            trust_domain: mesh.trust_domain.clone(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            canonical_name: first_label(
                &labels,
                &[
                    "service.istio.io/canonical-name",
                    "app.kubernetes.io/name",
                    "app",
                ],
            )
            .unwrap_or(&name)
            .to_string(),
            canonical_revision: first_label(
                &labels,
                &[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ],
            )
            .unwrap_or("latest")
            .to_string(),
            workload_type: wl::WorkloadType::Pod as i32,
            workload_name: workload_name(pod, &name),
            services,
            authorization_policies,
            status: if ready {
                wl::WorkloadStatus::Healthy as i32
            } else {
                wl::WorkloadStatus::Unhealthy as i32
            },
            cluster_id: mesh.cluster_id.clone(),
            network_mode: if host_network {
                wl::NetworkMode::HostNetwork as i32
            } else {
                wl::NetworkMode::Standard as i32
            },
            locality: spec
                .and_then(|s| s.node_name.as_deref())
                .and_then(|n| self.locality(n)),
            ..Default::default()
        })
    }

    /// The mTLS mode in force for a workload: mesh < namespace < workload < port, the
    /// oldest PeerAuthentication winning a tie at one level; PERMISSIVE when nothing says.
    pub fn effective_mtls(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
        mesh: &MeshConfig,
    ) -> EffectiveMtls {
        let level = |in_ns: &str, with_selector: bool| {
            oldest(
                in_namespace(&self.peer_authentications, in_ns)
                    .filter(|(_, pa)| match (&pa.spec.selector, with_selector) {
                        (None, false) => true,
                        (Some(sel), true) => {
                            !sel.match_labels.is_empty() && matches_selector(sel, labels)
                        }
                        _ => false,
                    })
                    .collect(),
            )
        };
        let mode_of = |pa: Option<(&Key, &PeerAuthentication)>| {
            pa.and_then(|(_, p)| p.spec.mtls)
                .map(|m| m.mode)
                .unwrap_or_default()
        };
        let mut mode = if mesh.secure_default {
            MtlsMode::Strict
        } else {
            MtlsMode::Permissive
        };
        for m in [
            mode_of(level(&mesh.root_namespace, false)),
            mode_of(level(ns, false)),
        ] {
            if m != MtlsMode::Unset {
                mode = m;
            }
        }
        let workload_pa = level(ns, true);
        let w = mode_of(workload_pa);
        if w != MtlsMode::Unset {
            mode = w;
        }
        let mut ports = BTreeMap::new();
        if let Some((key, pa)) = workload_pa {
            for (port, m) in &pa.spec.port_level_mtls {
                if m.mode != MtlsMode::Unset && strict(m.mode) != strict(mode) {
                    ports.insert(*port, strict(m.mode));
                }
            }
            if !ports.is_empty() {
                return EffectiveMtls {
                    strict: strict(mode),
                    port_exceptions: ports,
                    from: Some(key.clone()),
                };
            }
        }
        EffectiveMtls {
            strict: strict(mode),
            port_exceptions: ports,
            from: None,
        }
    }

    /// The L4 policies PeerAuthentication turns into: the shared STRICT policy, and one per
    /// workload-level PeerAuthentication with port exceptions that some workload uses.
    pub fn peer_authentication_policies(&self, mesh: &MeshConfig) -> Vec<sec::Authorization> {
        let mut out = BTreeMap::new();
        for pod in self.pods.values().filter(|p| self.is_enrolled(p)) {
            let ns = pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            let mtls = self.effective_mtls(&ns, &labels, mesh);
            if let Some(key) = mtls.policy_key(mesh) {
                out.entry(key).or_insert_with(|| mtls.policy(mesh));
            }
        }
        out.into_values().collect()
    }

    /// One `Service` per Kubernetes Service.
    pub fn services(&self, mesh: &MeshConfig) -> Vec<wl::Service> {
        self.services
            .iter()
            .map(|((ns, name), svc)| self.service(ns, name, svc, mesh))
            .collect()
    }
}

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref().and_then(|l| l.get(key)).map(String::as_str)
}

fn first_label<'a>(labels: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| labels.get(*k)).map(String::as_str)
}

fn hostname(name: &str, ns: &str, mesh: &MeshConfig) -> String {
    format!("{name}.{ns}.svc.{}", mesh.domain_suffix)
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A node's region, zone and subzone labels (Kubernetes' topology labels; Istio's for the
/// subzone).
fn locality_labels(labels: &BTreeMap<String, String>) -> [Option<String>; 3] {
    [
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
        "topology.istio.io/subzone",
    ]
    .map(|k| labels.get(k).cloned())
}

fn pod_ips(pod: &Pod) -> Vec<Vec<u8>> {
    let status = pod.status.as_ref();
    let mut ips: Vec<String> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().map(|p| p.ip.clone()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.clone())
    {
        ips.push(ip);
    }
    ips.iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(ip_bytes)
        .collect()
}

fn pod_ready(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    // A pod with no conditions reported yet (a manifest written by hand) counts as ready
    // when it is running or its phase is unknown: the directory source has no kubelet.
    match &status.conditions {
        Some(conds) if !conds.is_empty() => conds
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        _ => matches!(status.phase.as_deref(), None | Some("Running")),
    }
}

/// The owning workload's name: a Deployment's pods are owned by a ReplicaSet named
/// `<deployment>-<hash>`.
fn workload_name(pod: &Pod, name: &str) -> String {
    let owner = pod
        .metadata
        .owner_references
        .as_ref()
        .and_then(|o| o.iter().find(|r| r.controller == Some(true)).or(o.first()));
    match owner {
        Some(o) if o.kind == "ReplicaSet" => o
            .name
            .rsplit_once('-')
            .map_or(o.name.clone(), |(base, _)| base.to_string()),
        Some(o) => o.name.clone(),
        None => name.to_string(),
    }
}

fn selects(svc: &Service, labels: &BTreeMap<String, String>) -> bool {
    let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
    match selector {
        // A Service without a selector has its endpoints managed elsewhere.
        None => false,
        Some(sel) if sel.is_empty() => false,
        Some(sel) => sel.iter().all(|(k, v)| labels.get(k) == Some(v)),
    }
}

fn matches_selector(sel: &WorkloadSelector, labels: &BTreeMap<String, String>) -> bool {
    sel.match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// Service ports with their target ports; a named target port is resolved against `pod`'s
/// container ports (0 when there is no pod or no such port: "same as the service port").
fn service_ports(svc: &Service, pod: Option<&Pod>) -> Vec<wl::Port> {
    let Some(ports) = svc.spec.as_ref().and_then(|s| s.ports.as_ref()) else {
        return Vec::new();
    };
    ports
        .iter()
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .map(|p| {
            let service_port = u32::try_from(p.port).unwrap_or(0);
            let target_port = match &p.target_port {
                None => service_port,
                Some(IntOrString::Int(n)) => u32::try_from(*n).unwrap_or(0),
                Some(IntOrString::String(name)) => pod
                    .and_then(|pod| pod.spec.as_ref())
                    .into_iter()
                    .flat_map(|s| s.containers.iter())
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                    .and_then(|cp| u32::try_from(cp.container_port).ok())
                    .unwrap_or(0),
            };
            wl::Port {
                service_port,
                target_port,
            }
        })
        .collect()
}

/// The oldest of several PeerAuthentications at one level (Istio's tie rule); objects
/// without a creation time (hand-written manifests) count as newest, then by name.
fn oldest<'a>(
    candidates: Vec<(&'a Key, &'a PeerAuthentication)>,
) -> Option<(&'a Key, &'a PeerAuthentication)> {
    candidates.into_iter().min_by(|(ka, a), (kb, b)| {
        let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (ta.is_none(), ta, *ka).cmp(&(tb.is_none(), tb, *kb))
    })
}

fn strict(mode: MtlsMode) -> bool {
    // In ambient mode HBONE is always mTLS: DISABLE only means plaintext is accepted too.
    mode == MtlsMode::Strict
}

/// The mTLS requirement of one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveMtls {
    /// Whether connections without a peer identity are refused (on ports not excepted).
    pub strict: bool,
    /// Ports whose requirement differs: `true` = strict there.
    pub port_exceptions: BTreeMap<u32, bool>,
    /// The workload PeerAuthentication that set the exceptions.
    pub from: Option<Key>,
}

impl EffectiveMtls {
    /// The policy the workload references, as `namespace/name`, if any.
    pub fn policy_key(&self, mesh: &MeshConfig) -> Option<String> {
        match &self.from {
            Some((ns, name)) => Some(format!("{ns}/converted_peer_authentication_{name}")),
            None if self.strict => Some(format!("{}/{STATIC_STRICT}", mesh.root_namespace)),
            None => None,
        }
    }

    /// The policy itself: DENY connections that carry no peer identity.
    pub fn policy(&self, mesh: &MeshConfig) -> sec::Authorization {
        let no_identity = sec::StringMatch {
            match_type: Some(sec::string_match::MatchType::Presence(())),
        };
        let mut m = sec::Match {
            not_principals: vec![no_identity],
            ..Default::default()
        };
        let (namespace, name) = match &self.from {
            Some((ns, name)) => {
                let exceptions: Vec<u32> = self.port_exceptions.keys().copied().collect();
                if self.strict {
                    m.not_destination_ports = exceptions; // permissive there
                } else {
                    m.destination_ports = exceptions; // strict only there
                }
                (ns.clone(), format!("converted_peer_authentication_{name}"))
            }
            None => (mesh.root_namespace.clone(), STATIC_STRICT.to_string()),
        };
        sec::Authorization {
            name,
            namespace,
            scope: sec::Scope::WorkloadSelector as i32,
            action: sec::Action::Deny as i32,
            rules: vec![sec::Rule {
                clauses: vec![sec::Clause { matches: vec![m] }],
            }],
            dry_run: false,
        }
    }
}

/// The entries of `map` (keyed by namespace, name) in namespace `ns`: a range lookup, so
/// per-pod translation costs what the pod's namespace holds, not what the mesh holds.
fn in_namespace<'a, V>(
    map: &'a BTreeMap<Key, V>,
    ns: &str,
) -> impl Iterator<Item = (&'a Key, &'a V)> + 'a {
    let ns = ns.to_string();
    map.range((ns.clone(), String::new())..)
        .take_while(move |((n, _), _)| *n == ns)
}

fn network_address(ip: IpAddr) -> wl::NetworkAddress {
    wl::NetworkAddress {
        network: String::new(),
        address: ip_bytes(ip),
    }
}

/// A Service's cluster IPs ("None", headless, gives none).
fn service_ips(svc: &Service) -> Vec<IpAddr> {
    let spec = svc.spec.as_ref();
    let mut ips: Vec<String> = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = spec.and_then(|s| s.cluster_ip.clone())
    {
        ips.push(ip);
    }
    ips.iter().filter_map(|ip| ip.parse().ok()).collect()
}

impl Model {
    /// The `Service` resource of one Kubernetes Service.
    fn service(&self, ns: &str, name: &str, svc: &Service, mesh: &MeshConfig) -> wl::Service {
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        wl::Service {
            name: name.to_string(),
            namespace: ns.to_string(),
            hostname: hostname(name, ns, mesh),
            addresses: service_ips(svc).into_iter().map(network_address).collect(),
            ports: service_ports(svc, None),
            waypoint: self.waypoint_of(ns, &labels, "service", mesh),
            ..Default::default()
        }
    }
}
