//! ztunnel's settings, read once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The mark on every socket ztunnel opens in a pod: the capture rules let it pass, so
/// ztunnel's own connections are never redirected back to it (Istio's value).
pub const SOCKET_MARK: u32 = 0x539;

/// Port of the outbound capture listener in each pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the inbound (plaintext) capture listener in each pod.
pub const INBOUND_PORT: u16 = 15006;

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name (logs and metrics).
    pub node_name: String,
    /// The node agent's ZDS socket.
    pub zds_socket: PathBuf,
    /// Where Prometheus metrics are served (`/metrics`).
    pub metrics_addr: SocketAddr,
    /// Admin endpoint (`/config_dump`, `/logging`): keep it on localhost.
    pub admin_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    pub readiness_addr: SocketAddr,
    /// Longest wait for an upstream TCP connect.
    pub connect_timeout: Duration,
    /// How long open connections may run on after their pod is removed or ztunnel stops.
    pub drain_timeout: Duration,
    /// The control plane (xDS and CA), `https://host:15012`.
    pub control_plane: String,
    /// The name in the control plane's serving certificate.
    pub control_plane_name: String,
    /// The mesh's trust bundle (PEM).
    pub roots_pem: String,
    /// The file `roots_pem` was read from: re-read every few seconds, so a root rotation
    /// (new roots added, old ones removed) reaches peer verification without a restart.
    pub roots_file: Option<PathBuf>,
    /// Lifetime asked of the CA for workload certificates (renewed at about half of it).
    pub cert_ttl: Duration,
    /// This node's credential for xDS and the CA.
    pub credential: trellis_core::credential::Credential,
    /// The mesh's trust domain.
    pub trust_domain: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_name: "node".into(),
            zds_socket: PathBuf::from("/var/run/ztunnel/ztunnel.sock"),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 15020)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15000)),
            readiness_addr: SocketAddr::from(([0, 0, 0, 0], 15021)),
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            control_plane: String::new(),
            control_plane_name: "localhost".into(),
            roots_pem: String::new(),
            roots_file: None,
            cert_ttl: Duration::from_secs(24 * 3600),
            credential: String::new().into(),
            trust_domain: "cluster.local".into(),
        }
    }
}
