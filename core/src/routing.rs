//! Where a connection goes: the decision ztunnel makes for each captured outbound
//! connection, and the endpoint choice a waypoint makes for each request, from the control
//! plane's data (the xDS [`Store`]).
//!
//! A service bound to a waypoint goes to the waypoint; a waypoint itself sends to an
//! endpoint of the service it routed to ([`to_endpoint`]), never back to a waypoint.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use trellis_proto::istio::workload::gateway_address::Destination;
use trellis_proto::istio::workload::{
    GatewayAddress, Service, TunnelProtocol, Workload, WorkloadStatus,
};

use crate::SpiffeId;
use crate::xds::Store;

/// Port of the HBONE listener in every enrolled pod (and of a waypoint).
pub const HBONE_PORT: u16 = 15008;

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

/// How an endpoint is chosen among several: by default two at random, the one with fewer
/// open connections from this proxy ("power of two choices": close to least-loaded, without
/// every proxy herding onto the same idle endpoint — Envoy's LEAST_REQUEST); a waypoint's
/// DestinationRule may ask for another [`Mode`].
pub struct Pick<'a> {
    /// A fresh random number for this connection.
    pub random: u64,
    /// Open connections from this ztunnel to an address.
    pub load: &'a dyn Fn(IpAddr) -> usize,
    /// Endpoints to pass over while others are ready (a waypoint's outlier ejections).
    pub skip: Option<&'a dyn Fn(IpAddr) -> bool>,
    /// The policy.
    pub mode: Mode<'a>,
}

/// A load-balancing policy (a DestinationRule's `loadBalancer`).
#[derive(Debug, Clone, Copy, Default)]
pub enum Mode<'a> {
    /// The less loaded of two random endpoints (LEAST_REQUEST).
    #[default]
    TwoChoices,
    /// One at random (RANDOM).
    Random,
    /// In turn, by uid order, from this counter (ROUND_ROBIN).
    RoundRobin(&'a std::sync::atomic::AtomicUsize),
    /// Rendezvous hashing of this key over the endpoints' uids (consistentHash): the
    /// same key goes to the same endpoint while it is there, and when endpoints come or
    /// go only the keys of those endpoints move.
    Hash(u64),
}

/// A 64-bit mix (SplitMix64's finaliser).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of `bytes` (FNV-1a, then mixed): the same on every proxy and run.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

impl Pick<'_> {
    fn choose<'w>(&self, among: &[&'w Workload]) -> &'w Workload {
        let n = among.len() as u64;
        let a = (self.random % n) as usize;
        if n < 2 {
            return among[a];
        }
        match self.mode {
            Mode::TwoChoices => {}
            Mode::Random => return among[a],
            Mode::RoundRobin(counter) => {
                let mut sorted: Vec<&'w Workload> = among.to_vec();
                sorted.sort_by(|x, y| x.uid.cmp(&y.uid));
                let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return sorted[i % sorted.len()];
            }
            Mode::Hash(key) => {
                return among
                    .iter()
                    .copied()
                    .max_by_key(|w| (mix(key ^ stable_hash(w.uid.as_bytes())), &w.uid))
                    .unwrap_or(among[a]);
            }
        }
        // A second, different candidate from the other half of the random bits.
        let b = ((a as u64 + 1 + (self.random >> 32) % (n - 1)) % n) as usize;
        let load = |w: &Workload| first_ip(w).map_or(usize::MAX, |ip| (self.load)(ip));
        if load(among[b]) < load(among[a]) {
            among[b]
        } else {
            among[a]
        }
    }
}

/// Open outbound connections of this ztunnel per peer address (the load [`Pick`] compares).
#[derive(Debug, Default)]
pub struct Loads(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

impl Loads {
    /// Open connections to `ip`.
    pub fn get(&self, ip: IpAddr) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }

    /// Counts a connection to `ip` until the guard is dropped.
    pub fn hold(self: &Arc<Self>, ip: IpAddr) -> LoadGuard {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ip)
            .or_default() += 1;
        LoadGuard {
            loads: self.clone(),
            ip,
        }
    }
}

/// One open connection to an address; see [`Loads::hold`].
#[derive(Debug)]
pub struct LoadGuard {
    loads: Arc<Loads>,
    ip: IpAddr,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        let mut m = self.loads.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

fn identity_of(trust_domain: &str, w: &Workload) -> Option<SpiffeId> {
    let td = if w.trust_domain.is_empty() {
        trust_domain
    } else {
        &w.trust_domain
    };
    SpiffeId::new(td, &w.namespace, &w.service_account).ok()
}

/// Where `dst` goes:
/// - a mesh workload → HBONE to it (`:authority` = `dst`), or to its waypoint if it has one
///   for workload traffic;
/// - a service VIP → to the service's waypoint if it has one (`:authority` = the VIP and
///   port, as Istio's waypoints expect), else a ready endpoint chosen by `pick`, then
///   HBONE or TCP as that endpoint speaks;
/// - anything else passes through.
///
/// A waypoint that cannot be resolved refuses the connection: traffic is never sent around
/// the L7 policy a waypoint enforces (fail closed).
pub fn decide(store: &Store, trust_domain: &str, dst: SocketAddr, pick: &Pick<'_>) -> Route {
    if let Some(w) = store.workload_by_ip(dst.ip()) {
        if let Some(gw) = &w.waypoint {
            return via_waypoint(
                store,
                trust_domain,
                gw,
                dst,
                pick,
                &format!("workload {}", w.uid),
            );
        }
        return to_workload(trust_domain, w, dst);
    }
    let Some(svc) = store.service_by_vip(dst.ip()) else {
        return Route::Passthrough(dst);
    };
    let key = format!("{}/{}", svc.namespace, svc.hostname);
    if let Some(gw) = &svc.waypoint {
        return via_waypoint(
            store,
            trust_domain,
            gw,
            dst,
            pick,
            &format!("service {key}"),
        );
    }
    match pick_endpoint(store, svc, dst.port(), pick) {
        Ok((w, target)) => to_workload(trust_domain, w, target),
        Err(why) => Route::Refuse(why),
    }
}

/// A ready endpoint of `svc` for its port `port`, and the address to reach it at.
fn pick_endpoint<'a>(
    store: &'a Store,
    svc: &Service,
    port: u16,
    pick: &Pick<'_>,
) -> Result<(&'a Workload, SocketAddr), String> {
    let key = format!("{}/{}", svc.namespace, svc.hostname);
    let Some(sp) = svc.ports.iter().find(|p| p.service_port == u32::from(port)) else {
        return Err(format!("service {key} has no port {port}"));
    };
    let mut endpoints = endpoints(store, &key);
    if endpoints.is_empty() {
        return Err(format!("service {key} has no ready endpoint"));
    }
    if let Some(skip) = pick.skip {
        // Passed over only while another endpoint is left (never none at all).
        let kept: Vec<&Workload> = endpoints
            .iter()
            .copied()
            .filter(|w| !first_ip(w).is_some_and(skip))
            .collect();
        if !kept.is_empty() {
            endpoints = kept;
        }
    }
    let w = pick.choose(&endpoints);
    let target_port = w
        .services
        .get(&key)
        .and_then(|pl| pl.ports.iter().find(|p| p.service_port == sp.service_port))
        .map(|p| p.target_port)
        .filter(|p| *p != 0)
        .unwrap_or(if sp.target_port != 0 {
            sp.target_port
        } else {
            sp.service_port
        });
    let Some(ip) = first_ip(w) else {
        return Err(format!("endpoint {} has no address", w.uid));
    };
    Ok((
        w,
        SocketAddr::new(ip, u16::try_from(target_port).unwrap_or(port)),
    ))
}

/// HBONE to the waypoint `gw` of `what`, asking it for `dst` (the address the client
/// used). The waypoint is named by address (a waypoint pod, or its Service's VIP) or by
/// hostname (its Service); a Service resolves to one of its ready pods.
fn via_waypoint(
    store: &Store,
    trust_domain: &str,
    gw: &GatewayAddress,
    dst: SocketAddr,
    pick: &Pick<'_>,
    what: &str,
) -> Route {
    let refuse = |why: String| {
        Route::Refuse(format!(
            "{what} is bound to a waypoint, but {why}; refusing rather than bypass it"
        ))
    };
    let port = match u16::try_from(gw.hbone_mtls_port) {
        Ok(0) | Err(_) => HBONE_PORT,
        Ok(p) => p,
    };
    let waypoint = match &gw.destination {
        Some(Destination::Address(a)) => {
            let Some(ip) = ip_of(&a.address) else {
                return refuse("its address is malformed".into());
            };
            if let Some(w) = store.workload_by_ip(ip) {
                Some(w)
            } else if let Some(svc) = store.service_by_vip(ip) {
                match pick_waypoint_pod(store, svc, pick) {
                    Ok(w) => Some(w),
                    Err(why) => return refuse(why),
                }
            } else {
                return refuse(format!(
                    "its address {ip} is not a known workload or service"
                ));
            }
        }
        Some(Destination::Hostname(h)) => {
            let key = format!("{}/{}", h.namespace, h.hostname);
            let Some(svc) = store.service(&key) else {
                return refuse(format!("its service {key} is not known"));
            };
            match pick_waypoint_pod(store, svc, pick) {
                Ok(w) => Some(w),
                Err(why) => return refuse(why),
            }
        }
        None => None,
    };
    let Some(w) = waypoint else {
        return refuse("the waypoint has no address".into());
    };
    let Some(ip) = first_ip(w) else {
        return refuse(format!("waypoint pod {} has no address", w.uid));
    };
    match identity_of(trust_domain, w) {
        Some(identity) => Route::Hbone {
            target: dst,
            via: SocketAddr::new(ip, port),
            identity,
        },
        None => refuse(format!("waypoint pod {} has no valid identity", w.uid)),
    }
}

/// A ready pod of a waypoint's Service (any port: the waypoint takes HBONE on its own).
fn pick_waypoint_pod<'a>(
    store: &'a Store,
    svc: &Service,
    pick: &Pick<'_>,
) -> Result<&'a Workload, String> {
    let key = format!("{}/{}", svc.namespace, svc.hostname);
    let pods = endpoints(store, &key);
    if pods.is_empty() {
        return Err(format!("its service {key} has no ready pod"));
    }
    Ok(pick.choose(&pods))
}

fn to_workload(trust_domain: &str, w: &Workload, target: SocketAddr) -> Route {
    if w.tunnel_protocol != TunnelProtocol::Hbone as i32 {
        return Route::Passthrough(target);
    }
    match identity_of(trust_domain, w) {
        Some(identity) => Route::Hbone {
            target,
            via: SocketAddr::new(target.ip(), HBONE_PORT),
            identity,
        },
        None => Route::Refuse(format!("workload {} has no valid identity", w.uid)),
    }
}

fn ip_of(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

fn first_ip(w: &Workload) -> Option<IpAddr> {
    w.addresses.iter().find_map(|a| ip_of(a))
}

/// The healthy workloads behind service `key` (`namespace/hostname`).
fn endpoints<'a>(store: &'a Store, key: &str) -> Vec<&'a Workload> {
    store
        .endpoints(key)
        .filter(|w| w.status == WorkloadStatus::Healthy as i32)
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

/// Where a connection to workload `w` at `target` goes: HBONE to it when it is in the mesh,
/// plain TCP when not.
pub fn workload_route(trust_domain: &str, w: &Workload, target: SocketAddr) -> Route {
    to_workload(trust_domain, w, target)
}

/// The identity of a workload, in `trust_domain` unless it names its own.
pub fn workload_identity(trust_domain: &str, w: &Workload) -> Option<SpiffeId> {
    identity_of(trust_domain, w)
}

/// Where a waypoint sends a request routed to service `key` (`namespace/hostname`) on its
/// port `port`: a ready endpoint chosen by `pick`, over HBONE or TCP as the endpoint
/// speaks — never the service's waypoint again.
pub fn to_endpoint(
    store: &Store,
    trust_domain: &str,
    key: &str,
    port: u16,
    pick: &Pick<'_>,
) -> Route {
    let Some(svc) = store.service(key) else {
        return Route::Refuse(format!("service {key} is not known"));
    };
    match pick_endpoint(store, svc, port, pick) {
        Ok((w, target)) => to_workload(trust_domain, w, target),
        Err(why) => Route::Refuse(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use trellis_proto::istio::workload::{
        Address, NamespacedHostname, NetworkAddress, Port, PortList, address,
    };

    fn pod(ns: &str, name: &str, sa: &str, ip: [u8; 4], services: &[(&str, u32, u32)]) -> Workload {
        let mut by_svc: HashMap<String, PortList> = HashMap::new();
        for (svc, sp, tp) in services {
            by_svc
                .entry((*svc).to_string())
                .or_default()
                .ports
                .push(Port {
                    service_port: *sp,
                    target_port: *tp,
                });
        }
        Workload {
            uid: format!("Kubernetes//Pod/{ns}/{name}"),
            name: name.into(),
            namespace: ns.into(),
            service_account: sa.into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: TunnelProtocol::Hbone as i32,
            status: WorkloadStatus::Healthy as i32,
            services: by_svc,
            ..Default::default()
        }
    }

    fn service(ns: &str, name: &str, vip: [u8; 4], ports: &[(u32, u32)]) -> Service {
        Service {
            name: name.into(),
            namespace: ns.into(),
            hostname: format!("{name}.{ns}.svc.cluster.local"),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vip.to_vec(),
            }],
            ports: ports
                .iter()
                .map(|(s, t)| Port {
                    service_port: *s,
                    target_port: *t,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn store(workloads: Vec<Workload>, services: Vec<Service>) -> Store {
        let mut all: Vec<(String, Address)> = workloads
            .into_iter()
            .map(|w| {
                (
                    w.uid.clone(),
                    Address {
                        r#type: Some(address::Type::Workload(w)),
                    },
                )
            })
            .collect();
        all.extend(services.into_iter().map(|s| {
            (
                format!("{}/{}", s.namespace, s.hostname),
                Address {
                    r#type: Some(address::Type::Service(s)),
                },
            )
        }));
        Store::from_addresses(all)
    }

    fn sa(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn no_load(_: IpAddr) -> usize {
        0
    }

    fn random(r: u64) -> Pick<'static> {
        Pick {
            random: r,
            load: &no_load,
            skip: None,
            mode: Mode::TwoChoices,
        }
    }

    const WEB: &str = "foo/web.foo.svc.cluster.local";
    const WP: &str = "foo/waypoint.foo.svc.cluster.local";

    /// foo/web (VIP 10.96.0.10:80 → 8080) backed by web-1; foo/waypoint (VIP 10.96.0.20)
    /// backed by the waypoint pod 10.0.0.9.
    fn mesh(web_waypoint: Option<GatewayAddress>) -> Store {
        mesh_with(web_waypoint, true)
    }

    /// [`mesh`], with or without the waypoint's pod.
    fn mesh_with(web_waypoint: Option<GatewayAddress>, waypoint_pod: bool) -> Store {
        let mut web = service("foo", "web", [10, 96, 0, 10], &[(80, 8080)]);
        web.waypoint = web_waypoint;
        let mut pods = vec![pod(
            "foo",
            "web-1",
            "web",
            [10, 0, 0, 5],
            &[(WEB, 80, 8080)],
        )];
        if waypoint_pod {
            pods.push(pod(
                "foo",
                "waypoint-1",
                "waypoint",
                [10, 0, 0, 9],
                &[(WP, 15008, 15008)],
            ));
        }
        store(
            pods,
            vec![
                web,
                service("foo", "waypoint", [10, 96, 0, 20], &[(15008, 15008)]),
            ],
        )
    }

    fn by_address(ip: [u8; 4]) -> Option<GatewayAddress> {
        Some(GatewayAddress {
            destination: Some(Destination::Address(NetworkAddress {
                network: String::new(),
                address: ip.to_vec(),
            })),
            hbone_mtls_port: 15008,
        })
    }

    #[test]
    fn a_workload_is_reached_over_hbone_at_its_own_address() {
        let s = mesh(None);
        assert_eq!(
            decide(&s, "cluster.local", addr("10.0.0.5:8080"), &random(0)),
            Route::Hbone {
                target: addr("10.0.0.5:8080"),
                via: addr("10.0.0.5:15008"),
                identity: sa("foo", "web"),
            }
        );
    }

    #[test]
    fn a_service_vip_goes_to_an_endpoint_on_its_target_port() {
        let s = mesh(None);
        assert_eq!(
            decide(&s, "cluster.local", addr("10.96.0.10:80"), &random(7)),
            Route::Hbone {
                target: addr("10.0.0.5:8080"),
                via: addr("10.0.0.5:15008"),
                identity: sa("foo", "web"),
            }
        );
        assert!(matches!(
            decide(&s, "cluster.local", addr("10.96.0.10:81"), &random(0)),
            Route::Refuse(why) if why.contains("no port 81")
        ));
    }

    #[test]
    fn a_service_with_a_waypoint_goes_to_the_waypoint_asking_for_the_vip() {
        let expected = Route::Hbone {
            target: addr("10.96.0.10:80"),
            via: addr("10.0.0.9:15008"),
            identity: sa("foo", "waypoint"),
        };
        // Named by its Service's VIP, by its pod's address, or by hostname.
        for gw in [
            by_address([10, 96, 0, 20]),
            by_address([10, 0, 0, 9]),
            Some(GatewayAddress {
                destination: Some(Destination::Hostname(NamespacedHostname {
                    namespace: "foo".into(),
                    hostname: "waypoint.foo.svc.cluster.local".into(),
                })),
                hbone_mtls_port: 15008,
            }),
        ] {
            let s = mesh(gw.clone());
            assert_eq!(
                decide(&s, "cluster.local", addr("10.96.0.10:80"), &random(3)),
                expected,
                "{gw:?}"
            );
        }
    }

    #[test]
    fn a_workload_with_a_waypoint_is_reached_through_it() {
        let mut web = pod("foo", "web-1", "web", [10, 0, 0, 5], &[]);
        web.waypoint = by_address([10, 96, 0, 20]);
        let s = store(
            vec![
                web,
                pod(
                    "foo",
                    "waypoint-1",
                    "waypoint",
                    [10, 0, 0, 9],
                    &[(WP, 15008, 15008)],
                ),
            ],
            vec![service(
                "foo",
                "waypoint",
                [10, 96, 0, 20],
                &[(15008, 15008)],
            )],
        );
        assert_eq!(
            decide(&s, "cluster.local", addr("10.0.0.5:8080"), &random(0)),
            Route::Hbone {
                target: addr("10.0.0.5:8080"),
                via: addr("10.0.0.9:15008"),
                identity: sa("foo", "waypoint"),
            }
        );
    }

    #[test]
    fn an_unreachable_waypoint_refuses_instead_of_bypassing_it() {
        for gw in [
            by_address([10, 96, 0, 99]),
            Some(GatewayAddress {
                destination: Some(Destination::Hostname(NamespacedHostname {
                    namespace: "foo".into(),
                    hostname: "nowhere.foo.svc.cluster.local".into(),
                })),
                hbone_mtls_port: 15008,
            }),
            Some(GatewayAddress {
                destination: None,
                hbone_mtls_port: 15008,
            }),
        ] {
            let s = mesh(gw.clone());
            assert!(
                matches!(
                    decide(&s, "cluster.local", addr("10.96.0.10:80"), &random(0)),
                    Route::Refuse(why) if why.contains("bound to a waypoint")
                ),
                "{gw:?}"
            );
        }
        // A waypoint Service without a ready pod refuses too.
        let s = mesh_with(by_address([10, 96, 0, 20]), false);
        assert!(matches!(
            decide(&s, "cluster.local", addr("10.96.0.10:80"), &random(0)),
            Route::Refuse(why) if why.contains("no ready pod")
        ));
    }

    #[test]
    fn unknown_and_unenrolled_destinations_pass_through() {
        let mut plain = pod("bar", "legacy", "default", [10, 0, 1, 7], &[]);
        plain.tunnel_protocol = TunnelProtocol::None as i32;
        let s = store(vec![plain], vec![]);
        assert_eq!(
            decide(&s, "cluster.local", addr("10.0.1.7:80"), &random(0)),
            Route::Passthrough(addr("10.0.1.7:80"))
        );
        assert_eq!(
            decide(&s, "cluster.local", addr("192.0.2.1:443"), &random(0)),
            Route::Passthrough(addr("192.0.2.1:443"))
        );
    }
}

#[cfg(test)]
mod pick_tests {
    use super::*;

    fn w(ip: [u8; 4]) -> Workload {
        Workload {
            addresses: vec![ip.to_vec()],
            ..Default::default()
        }
    }

    #[test]
    fn of_two_candidates_the_less_loaded_wins() {
        let (a, b) = (w([10, 0, 0, 1]), w([10, 0, 0, 2]));
        let busy = |ip: IpAddr| {
            if ip == IpAddr::from([10, 0, 0, 1]) {
                5
            } else {
                0
            }
        };
        // With two endpoints both are always candidates: the idle one is chosen whatever
        // the random number.
        for r in [0u64, 1, 2, 3, u64::MAX, 1 << 40] {
            let pick = Pick {
                random: r,
                load: &busy,
                skip: None,
                mode: Mode::TwoChoices,
            };
            assert_eq!(pick.choose(&[&a, &b]).addresses, b.addresses, "random {r}");
        }
        // Without load, the choice is spread over all endpoints.
        let all: Vec<Workload> = (1..=4).map(|i| w([10, 0, 0, i])).collect();
        let refs: Vec<&Workload> = all.iter().collect();
        let idle = |_: IpAddr| 0;
        let mut seen = std::collections::BTreeSet::new();
        for r in 0..64u64 {
            let pick = Pick {
                random: r.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                load: &idle,
                skip: None,
                mode: Mode::TwoChoices,
            };
            seen.insert(pick.choose(&refs).addresses.clone());
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn round_robin_takes_turns_and_hashing_keeps_a_key_on_its_endpoint() {
        let all: Vec<Workload> = (1..=4)
            .map(|i| {
                let mut x = w([10, 0, 0, i]);
                x.uid = format!("uid-{i}");
                x
            })
            .collect();
        let refs: Vec<&Workload> = all.iter().collect();
        let idle = |_: IpAddr| 0;
        let counter = std::sync::atomic::AtomicUsize::new(0);
        let turns: Vec<String> = (0..8u64)
            .map(|r| {
                Pick {
                    random: r * 7,
                    load: &idle,
                    skip: None,
                    mode: Mode::RoundRobin(&counter),
                }
                .choose(&refs)
                .uid
                .clone()
            })
            .collect();
        assert_eq!(
            turns,
            [
                "uid-1", "uid-2", "uid-3", "uid-4", "uid-1", "uid-2", "uid-3", "uid-4"
            ]
        );
        let hashed = |key: &str, among: &[&Workload], random: u64| {
            Pick {
                random,
                load: &idle,
                skip: None,
                mode: Mode::Hash(stable_hash(key.as_bytes())),
            }
            .choose(among)
            .uid
            .clone()
        };
        // The same key, whatever the random number: the same endpoint.
        for key in ["alice", "bob", "carol"] {
            let first = hashed(key, &refs, 1);
            assert!((0..20).all(|r| hashed(key, &refs, r) == first), "{key}");
        }
        // Keys spread; removing an endpoint moves only its own keys.
        let keys: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();
        let before: Vec<String> = keys.iter().map(|k| hashed(k, &refs, 0)).collect();
        let spread: std::collections::BTreeSet<&String> = before.iter().collect();
        assert_eq!(spread.len(), 4);
        let three: Vec<&Workload> = refs.iter().copied().filter(|w| w.uid != "uid-2").collect();
        for (k, b) in keys.iter().zip(&before) {
            let after = hashed(k, &three, 0);
            if b != "uid-2" {
                assert_eq!(&after, b, "{k} moved although its endpoint stayed");
            }
        }
        // RANDOM: any endpoint, by the random number.
        let seen: std::collections::BTreeSet<String> = (0..64u64)
            .map(|r| {
                Pick {
                    random: r.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    load: &idle,
                    skip: None,
                    mode: Mode::Random,
                }
                .choose(&refs)
                .uid
                .clone()
            })
            .collect();
        assert_eq!(seen.len(), 4);
    }
}
