//! Trellis waypoint: the optional L7 proxy of the services bound to it
//! (`istio.io/use-waypoint`). ztunnels send those services' connections to it over HBONE
//! (the CONNECT authority is the service VIP and port the client asked for); it routes each
//! HTTP request by the Gateway API routes of that service port and sends it on over HBONE
//! to an endpoint's ztunnel, as its own identity (the waypoint's service account). Ports
//! that are not HTTP are forwarded as TCP.
//!
//! Modules: [`routes`] (the compiled route table), [`proxy`] (HBONE in, protocol
//! detection, the HTTP handler), [`upstream`] (endpoint connections, pooled),
//! [`telemetry`] (Istio's request metrics, the access log), [`admin`].

pub mod admin;
pub mod authz;
pub mod framing;
pub mod grpc;
pub mod jwt;
pub mod local;
pub mod logbuf;
pub mod proxy;
pub mod resilience;
pub mod retry;
pub mod routes;
pub mod telemetry;
pub mod trace;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use trellis_core::SpiffeId;
use trellis_core::cert::{CertManager, GrpcCaClient};
use trellis_core::credential::Credential;
use trellis_core::tls::TrustBundle;
use trellis_core::xds::XdsClient;
use trellis_proto::type_url::{
    ADDRESS, WAYPOINT_L7_POLICY, WAYPOINT_REQUEST_AUTHENTICATION, WAYPOINT_ROUTE,
};

/// Errors of start-up.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The control plane (xDS and CA), `https://host:15012`.
    pub control_plane: String,
    /// The name in its serving certificate.
    pub control_plane_name: String,
    /// The trust bundle as read at start.
    pub roots_pem: String,
    /// The trust bundle file (re-read every few seconds: root rotation).
    pub roots_file: Option<PathBuf>,
    /// The credential for xDS and the CA (the projected token, or the issued credential).
    pub credential: Credential,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The waypoint `Gateway` (namespace, name); the identity is its service account.
    pub gateway: (String, String),
    /// HBONE listener.
    pub hbone_addr: SocketAddr,
    /// Admin (config dump): localhost.
    pub admin_addr: SocketAddr,
    /// Prometheus metrics.
    pub metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    pub readiness_addr: SocketAddr,
    /// Deadline of an upstream connection (TCP, TLS, CONNECT).
    pub connect_timeout: Duration,
    /// How long open connections may run on after SIGTERM.
    pub drain_timeout: Duration,
    /// How long a client may take to send a request's headers (HTTP/1).
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// How long to wait for a client's first bytes on a port whose protocol is detected.
    pub sniff_timeout: Duration,
    /// Lifetime asked of the CA for the waypoint's certificate.
    pub cert_ttl: Duration,
    /// Plaintext listeners (loopback only; benchmarks and debugging): each connection is
    /// served as if it were an HBONE CONNECT for the service port, from no identity.
    pub plaintext: Vec<(SocketAddr, SocketAddr)>,
    /// Worker threads serving connections (each a single-threaded runtime).
    pub workers: usize,
    /// Proxies in front of the mesh whose `X-Forwarded-For` entries are trusted: the
    /// client address policy sees (`remoteIpBlocks`, `remote.ip`) is the entry this many
    /// from the right; 0 (the default) trusts none (the peer's address).
    pub trusted_proxies: usize,
    /// Regular expressions masked in access and audit log lines.
    pub mask_regexes: Vec<String>,
    /// CA bundle (PEM) trusted for `https` JWKS servers; `None`: the system's bundle.
    pub jwks_roots_file: Option<std::path::PathBuf>,
    /// Write an audit line for every allowed request and connection too (not only denies,
    /// AUDIT matches and dry-run decisions).
    pub audit_allows: bool,
    /// The OTLP/gRPC collector spans are exported to; `None`: no tracing.
    pub tracing_endpoint: Option<String>,
    /// Share of new traces sampled, percent.
    pub tracing_sampling: f64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            control_plane: String::new(),
            control_plane_name: "localhost".into(),
            roots_pem: String::new(),
            roots_file: None,
            credential: String::new().into(),
            trust_domain: "cluster.local".into(),
            gateway: ("default".into(), "waypoint".into()),
            hbone_addr: SocketAddr::from(([0, 0, 0, 0], 15008)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15000)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 15020)),
            readiness_addr: SocketAddr::from(([0, 0, 0, 0], 15021)),
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 60 * 1024,
            sniff_timeout: Duration::from_secs(1),
            cert_ttl: Duration::from_secs(24 * 3600),
            plaintext: Vec::new(),
            workers: 2,
            trusted_proxies: 0,
            mask_regexes: Vec::new(),
            tracing_endpoint: None,
            tracing_sampling: 1.0,
            jwks_roots_file: None,
            audit_allows: false,
        }
    }
}

/// What the waypoint knows and holds: the control plane's data, its certificate, the
/// trust bundle.
pub struct Mesh {
    /// Its identity: the Gateway's service account.
    pub identity: SpiffeId,
    /// Services, workloads and routes it may read.
    pub xds: XdsClient,
    /// Its certificate.
    pub certs: CertManager<GrpcCaClient>,
    /// The roots peers are verified with.
    pub bundle: Arc<TrustBundle>,
    /// The trust domain.
    pub trust_domain: String,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("identity", &self.identity.to_string())
            .finish_non_exhaustive()
    }
}

/// Connects to the control plane (lazily; both channels retry on their own).
pub fn connect_mesh(config: &Config) -> Result<Mesh, BoxError> {
    let (ns, name) = &config.gateway;
    let identity = SpiffeId::new(&config.trust_domain, ns, name)
        .map_err(|e| format!("the waypoint's identity (Gateway {ns}/{name}): {e}"))?;
    let c = trellis_core::channel::connect_proxy(&trellis_core::channel::ProxyClient {
        endpoint: config.control_plane.clone(),
        server_name: config.control_plane_name.clone(),
        trust_domain: config.trust_domain.clone(),
        roots_pem: config.roots_pem.clone(),
        credential: config.credential.clone(),
        node_id: format!("waypoint~{ns}/{name}"),
        types: vec![
            ADDRESS.into(),
            WAYPOINT_ROUTE.into(),
            WAYPOINT_L7_POLICY.into(),
            WAYPOINT_REQUEST_AUTHENTICATION.into(),
        ],
        cert_ttl: config.cert_ttl,
    })?;
    Ok(Mesh {
        identity,
        xds: c.xds,
        certs: c.certs,
        bundle: c.bundle,
        trust_domain: config.trust_domain.clone(),
    })
}

/// Runs the waypoint until SIGTERM/SIGINT, then drains: no new connection is accepted,
/// HTTP/1 responses say `Connection: close`, HTTP/2 and HBONE peers get GOAWAY, and open
/// requests may finish within the drain timeout.
pub async fn run(config: Config) -> Result<(), BoxError> {
    let config = Arc::new(config);
    telemetry::set_masks(&config.mask_regexes)?;
    if let Some(endpoint) = &config.tracing_endpoint {
        trace::install(trace::TraceConfig {
            endpoint: endpoint.clone(),
            sampling: config.tracing_sampling,
            service_name: format!("{}.{}", config.gateway.1, config.gateway.0),
        })?;
        tracing::info!(collector = %endpoint, sampling = config.tracing_sampling, "tracing to OTLP");
    }
    let metrics = telemetry::install_metrics()?;
    {
        // Histogram samples wait in the recorder until drained: drained here every few
        // seconds whether or not anyone scrapes (else they grow without bound).
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                metrics.run_upkeep();
            }
        });
    }
    let mesh = Arc::new(connect_mesh(&config)?);
    {
        // The certificate now, so the first connection does not wait for it.
        let mesh = mesh.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match mesh.certs.fetch(&mesh.identity).await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(identity = %mesh.identity, error = %e, "cannot obtain the waypoint's certificate yet");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });
    }
    let roots = config.roots_file.clone().map(|path| {
        tokio::spawn(trellis_core::tls::follow_roots_file(
            path,
            mesh.bundle.clone(),
            config.roots_pem.clone(),
        ))
    });
    let (drain_tx, draining) = tokio::sync::watch::channel(false);
    let waypoint = Arc::new(proxy::Waypoint::new(config.clone(), mesh.clone(), draining));
    let hbone = std::net::TcpListener::bind(config.hbone_addr)
        .map_err(|e| format!("{}: {e}", config.hbone_addr))?;
    let addrs = admin::start(&config, waypoint.clone(), metrics).await?;
    tracing::info!(
        identity = %mesh.identity,
        hbone = %hbone.local_addr()?,
        admin = %addrs.admin,
        metrics = %addrs.metrics,
        readiness = %addrs.readiness,
        "waypoint starting"
    );
    let mut plaintext = Vec::new();
    for (listen, target) in &config.plaintext {
        if !listen.ip().is_loopback() {
            return Err(format!("--plaintext-listener {listen}: only loopback addresses (it takes clients without mTLS)").into());
        }
        let l = std::net::TcpListener::bind(listen).map_err(|e| format!("{listen}: {e}"))?;
        tracing::warn!(listen = %listen, target = %target, "plaintext listener (no mTLS, loopback only)");
        plaintext.push((l, *target));
    }
    proxy::start_workers(&waypoint, proxy::Listeners { hbone, plaintext })
        .map_err(|e| format!("cannot start the workers: {e}"))?;
    trellis_core::shutdown::terminated().await;
    tracing::info!(drain = ?config.drain_timeout, "shutting down: draining connections");
    let _ = drain_tx.send(true);
    waypoint.wait_drained(config.drain_timeout).await;
    if let Some(r) = roots {
        r.abort();
    }
    Ok(())
}
