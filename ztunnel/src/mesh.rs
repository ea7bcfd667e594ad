//! What every pod's proxy shares: the control plane's data (xDS store), the certificates of
//! the pods this node serves, the trust bundle; and the outbound decision made from them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use trellis_core::SpiffeId;
use trellis_core::cert::{CertManager, GrpcCaClient};
use trellis_core::tls::TrustBundle;
use trellis_core::xds::{Store, XdsClient};
use trellis_proto::istio::workload::{TunnelProtocol, Workload, WorkloadStatus};

/// Port of the HBONE listener in every enrolled pod.
pub const HBONE_PORT: u16 = 15008;

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
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").finish_non_exhaustive()
    }
}

/// Where a captured outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// HBONE to a mesh workload: `target` is what the CONNECT asks for, `via` the peer's
    /// HBONE address, `identity` what its certificate must say.
    Hbone {
        /// The CONNECT authority (`pod-ip:port`).
        target: SocketAddr,
        /// The peer's HBONE address.
        via: SocketAddr,
        /// The peer's identity.
        identity: SpiffeId,
    },
    /// Plain TCP to `SocketAddr` (outside the mesh, or a pod that is not enrolled).
    Passthrough(SocketAddr),
    /// Refused, with the reason (fail closed).
    Refuse(String),
}

impl Mesh {
    /// The identity of a workload.
    pub fn identity_of(&self, w: &Workload) -> Option<SpiffeId> {
        let td = if w.trust_domain.is_empty() {
            &self.trust_domain
        } else {
            &w.trust_domain
        };
        SpiffeId::new(td, &w.namespace, &w.service_account).ok()
    }

    /// Decides where `dst` goes: a mesh workload → HBONE to it; a service VIP → an endpoint
    /// (then HBONE or TCP as that endpoint speaks); a service behind a waypoint is refused
    /// until waypoints are served (never sent around its L7 policy); anything else passes
    /// through.
    pub fn route(&self, dst: SocketAddr, pick: u64) -> Route {
        let store = self.xds.store();
        if let Some(w) = store.workload_by_ip(dst.ip()) {
            return self.to_workload(w, dst);
        }
        if let Some(svc) = store.service_by_vip(dst.ip()) {
            if svc.waypoint.is_some() {
                return Route::Refuse(format!(
                    "service {}/{} is bound to a waypoint, which this ztunnel cannot reach yet",
                    svc.namespace, svc.hostname
                ));
            }
            let key = format!("{}/{}", svc.namespace, svc.hostname);
            let Some(port) = svc
                .ports
                .iter()
                .find(|p| p.service_port == u32::from(dst.port()))
            else {
                return Route::Refuse(format!("service {key} has no port {}", dst.port()));
            };
            let endpoints = endpoints(&store, &key);
            if endpoints.is_empty() {
                return Route::Refuse(format!("service {key} has no ready endpoint"));
            }
            // A uniformly random ready endpoint (`pick` is random per connection): no
            // per-endpoint load is tracked yet, so "random of two, least loaded" would have
            // nothing to compare.
            let w = endpoints[(pick % endpoints.len() as u64) as usize];
            let target_port = w
                .services
                .get(&key)
                .and_then(|pl| {
                    pl.ports
                        .iter()
                        .find(|p| p.service_port == port.service_port)
                })
                .map(|p| p.target_port)
                .filter(|p| *p != 0)
                .unwrap_or(if port.target_port != 0 {
                    port.target_port
                } else {
                    port.service_port
                });
            let Some(ip) = first_ip(w) else {
                return Route::Refuse(format!("endpoint {} has no address", w.uid));
            };
            let target = SocketAddr::new(ip, u16::try_from(target_port).unwrap_or(dst.port()));
            return self.to_workload(w, target);
        }
        Route::Passthrough(dst)
    }

    fn to_workload(&self, w: &Workload, target: SocketAddr) -> Route {
        if w.tunnel_protocol != TunnelProtocol::Hbone as i32 {
            return Route::Passthrough(target);
        }
        match self.identity_of(w) {
            Some(identity) => Route::Hbone {
                target,
                via: SocketAddr::new(target.ip(), HBONE_PORT),
                identity,
            },
            None => Route::Refuse(format!("workload {} has no valid identity", w.uid)),
        }
    }
}

fn first_ip(w: &Workload) -> Option<IpAddr> {
    w.addresses.iter().find_map(|a| match a.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(a.as_slice()).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(a.as_slice()).ok()?)),
        _ => None,
    })
}

/// The healthy workloads behind service `key` (`namespace/hostname`).
fn endpoints<'a>(store: &'a Store, key: &str) -> Vec<&'a Workload> {
    store
        .workloads()
        .filter(|w| w.services.contains_key(key) && w.status == WorkloadStatus::Healthy as i32)
        .collect()
}

/// A random number per call, cheap (no system call): SipHash with a per-thread random key
/// over a counter.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static KEY: std::collections::hash_map::RandomState = std::collections::hash_map::RandomState::new();
    }
    KEY.with(|k| {
        let mut h = k.build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.finish()
    })
}
