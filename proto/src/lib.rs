//! Every protocol Trellis speaks, as protobuf messages and gRPC services generated at build
//! time from the `.proto` files in `proto/` (see `PROTOCOLS.md` for what each must stay
//! wire-compatible with).
//!
//! - [`istio::workload`] and [`istio::security`]: the workload-discovery (`Address`) and L4
//!   policy (`Authorization`) xDS resources, wire-compatible with Istio's ztunnel.
//! - [`envoy::service::discovery::v3`]: the delta xDS stream (`DeltaAggregatedResources`).
//! - [`istio::v1::auth`]: the certificate service (`IstioCertificateService/CreateCertificate`).
//! - [`istio::workload::zds`]: node agent ↔ ztunnel pod hand-off messages.
//! - [`trellis::waypoint::v1`]: Trellis's own waypoint L7 resources.
//!
//! This crate holds definitions only: no I/O, no policy logic.

#![allow(missing_docs, unreachable_pub)]
#![allow(clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/trellis_protos.rs"));

/// Trellis's conventions on the delta xDS stream.
pub mod delta {
    /// `system_version_info` of a response that is one part of a larger delta: more parts
    /// follow (each after the previous one's ACK). A client counts itself synced only after
    /// a response without it. The field is for debugging in Envoy's API, so other clients
    /// (Istio's ztunnel) are unaffected.
    pub const MORE_FOLLOWS: &str = "more-follows";
}

/// Type URLs of the xDS resources, as they appear in `type_url` fields and `Any` values.
pub mod type_url {
    /// Workloads and services for ztunnel (`istio.workload.Address`).
    pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
    /// L4 authorization policies for ztunnel (`istio.security.Authorization`).
    pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
    /// Waypoint routes.
    pub const WAYPOINT_ROUTE: &str = "type.googleapis.com/trellis.waypoint.v1.Route";
    /// Waypoint L7 authorization policies.
    pub const WAYPOINT_L7_POLICY: &str = "type.googleapis.com/trellis.waypoint.v1.L7Policy";
    /// Waypoint end-user authentication (JWT) configuration.
    pub const WAYPOINT_REQUEST_AUTHENTICATION: &str =
        "type.googleapis.com/trellis.waypoint.v1.RequestAuthentication";
}

/// gRPC method paths, for routing and for logs.
pub mod grpc_path {
    /// The delta xDS stream.
    pub const DELTA_AGGREGATED_RESOURCES: &str =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
    /// Certificate signing.
    pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
}
