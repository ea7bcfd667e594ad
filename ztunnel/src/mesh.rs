//! What every pod's proxy shares: the control plane's data (xDS store), the certificates of
//! the pods this node serves, the trust bundle; and the outbound decision made from them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use trellis_core::SpiffeId;
use trellis_core::cert::{CertManager, GrpcCaClient};
use trellis_core::tls::TrustBundle;
use trellis_core::xds::XdsClient;
use trellis_proto::istio::workload::Workload;

pub use trellis_core::routing::{HBONE_PORT, LoadGuard, Loads, Pick, Route, decide, random_u64};

/// Shared by all pods of the node.
pub struct Mesh {
    /// Workloads, services and policies.
    pub xds: XdsClient,
    /// Certificates of the identities served here.
    pub certs: CertManager<GrpcCaClient>,
    /// Roots peers are verified with.
    pub bundle: Arc<TrustBundle>,
    /// The mesh's trust domain (for workloads that do not name theirs).
    pub trust_domain: String,
    /// Open outbound connections per peer, for endpoint choice.
    pub loads: Arc<Loads>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").finish_non_exhaustive()
    }
}

impl Mesh {
    /// The identity of a workload.
    pub fn identity_of(&self, w: &Workload) -> Option<SpiffeId> {
        trellis_core::routing::workload_identity(&self.trust_domain, w)
    }

    /// Decides where `dst` goes (see [`decide`]) from the control plane's current data;
    /// `random` is a fresh random number for this connection.
    pub fn route(&self, dst: SocketAddr, random: u64) -> Route {
        let load = |ip: IpAddr| self.loads.get(ip);
        let pick = Pick {
            random,
            load: &load,
            skip: None,
            mode: trellis_core::routing::Mode::TwoChoices,
        };
        decide(&self.xds.store(), &self.trust_domain, dst, &pick)
    }
}
