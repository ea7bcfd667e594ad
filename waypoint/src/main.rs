//! `trellis-waypoint`: parse flags, start logging, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use trellis_waypoint::Config;

/// mimalloc rather than glibc's malloc: measured in docs/performance.md (the waypoint
/// allocates per request; glibc's arenas took a quarter of its CPU under load).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "trellis-waypoint", version, about)]
struct Cli {
    /// The control plane (xDS and CA), `https://host:15012`.
    #[arg(long)]
    control_plane: String,
    /// The name in the control plane's serving certificate.
    #[arg(long, default_value = "localhost")]
    control_plane_name: String,
    /// The mesh's trust bundle (PEM; re-read every few seconds, for root rotation).
    #[arg(long)]
    ca_roots: PathBuf,
    /// File holding the waypoint's credential (its projected token on Kubernetes).
    #[arg(long)]
    credential_file: PathBuf,
    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The waypoint Gateway, `namespace/name`; the waypoint runs as the service account of
    /// that name.
    #[arg(long)]
    gateway: String,
    /// HBONE listener.
    #[arg(long, default_value = "0.0.0.0:15008")]
    hbone_addr: SocketAddr,
    /// Admin address (config dump): keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Metrics address.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Readiness address.
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Log format (`json` also makes the access log JSON).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Seconds open requests may run on after SIGTERM.
    #[arg(long, default_value_t = 5)]
    drain_seconds: u64,
    /// Seconds a client may take to send a request's headers (HTTP/1).
    #[arg(long, default_value_t = 10)]
    header_read_timeout_seconds: u64,
    /// Largest request head in bytes (larger is answered 431).
    #[arg(long, default_value_t = 60 * 1024)]
    max_header_bytes: usize,
    /// Milliseconds to wait for a client's first bytes on a port of undeclared protocol.
    #[arg(long, default_value_t = 1000)]
    sniff_timeout_ms: u64,
    /// Lifetime asked of the CA for the waypoint's certificate, in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    cert_ttl_seconds: u64,
    /// A plaintext listener `LISTEN=VIP:PORT` (loopback only, for benchmarks and debugging):
    /// connections are served as if addressed to the service port, from no identity.
    #[arg(long = "plaintext-listener", value_parser = parse_plaintext)]
    plaintext_listener: Vec<(SocketAddr, SocketAddr)>,
    /// A regular expression whose matches are masked (`****`) in access and audit log
    /// lines (repeatable; the mesh config's `accessLogMasking.regexes`).
    #[arg(long = "mask-regex")]
    mask_regex: Vec<String>,
    /// Proxies in front of the mesh whose X-Forwarded-For entries are trusted (the client
    /// address policy sees is the entry this many from the right; 0: the peer's address).
    #[arg(long, default_value_t = 0)]
    trusted_proxies: usize,
    /// CA bundle (PEM) trusted for `https` JWKS servers (`jwksUri`) instead of the
    /// system's, as OpenSSL and Go read `SSL_CERT_FILE`.
    #[arg(long, env = "SSL_CERT_FILE")]
    jwks_ca_file: Option<std::path::PathBuf>,
    /// Write an audit line for every allowed request too (the mesh config's
    /// `auditLog.allows`); denies, AUDIT matches and dry-run decisions always have one.
    #[arg(long)]
    audit_allows: bool,
    /// The OTLP/gRPC collector (`host:port` or `http://host:port`) request spans are
    /// exported to; unset: no tracing.
    #[arg(long, env = "TRELLIS_TRACING_ENDPOINT")]
    tracing_endpoint: Option<String>,
    /// Share of new traces sampled, percent (requests with a sampled `traceparent` are
    /// always traced). Istio's default is 1.
    #[arg(long, default_value_t = 1.0)]
    tracing_sampling: f64,
    /// Worker threads serving connections (each connection stays on one).
    #[arg(long, env = "WAYPOINT_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
}

fn parse_plaintext(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (listen, target) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected LISTEN=VIP:PORT"))?;
    let listen: SocketAddr = listen.parse().map_err(|e| format!("{listen:?}: {e}"))?;
    if !listen.ip().is_loopback() {
        return Err(format!(
            "{listen}: only loopback addresses (clients come without mTLS)"
        ));
    }
    Ok((
        listen,
        target.parse().map_err(|e| format!("{target:?}: {e}"))?,
    ))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(trellis_waypoint::logbuf::start());
    if cli.log_format == "json" {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let fail = |e: String| {
        eprintln!("trellis-waypoint: {e}");
        std::process::ExitCode::FAILURE
    };
    let Some((ns, name)) = cli.gateway.split_once('/') else {
        return fail(format!(
            "--gateway {:?}: expected namespace/name",
            cli.gateway
        ));
    };
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let roots_pem = match read(&cli.ca_roots) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    // Read again for each request (a projected token rotates); readable now.
    if let Err(e) = read(&cli.credential_file) {
        return fail(e);
    }
    let config = Config {
        control_plane: cli.control_plane,
        control_plane_name: cli.control_plane_name,
        roots_pem,
        roots_file: Some(cli.ca_roots.clone()),
        credential: trellis_core::credential::Credential::File(cli.credential_file.clone()),
        trust_domain: cli.trust_domain,
        gateway: (ns.to_string(), name.to_string()),
        hbone_addr: cli.hbone_addr,
        admin_addr: cli.admin_addr,
        metrics_addr: cli.metrics_addr,
        readiness_addr: cli.readiness_addr,
        drain_timeout: Duration::from_secs(cli.drain_seconds),
        header_read_timeout: Duration::from_secs(cli.header_read_timeout_seconds.max(1)),
        max_header_bytes: cli.max_header_bytes,
        sniff_timeout: Duration::from_millis(cli.sniff_timeout_ms),
        cert_ttl: Duration::from_secs(cli.cert_ttl_seconds.max(10)),
        plaintext: cli.plaintext_listener,
        workers: cli.worker_threads.max(1),
        trusted_proxies: cli.trusted_proxies,
        mask_regexes: cli.mask_regex,
        jwks_roots_file: cli.jwks_ca_file,
        audit_allows: cli.audit_allows,
        tracing_endpoint: cli.tracing_endpoint.filter(|e| !e.is_empty()),
        tracing_sampling: cli.tracing_sampling,
        ..Config::default()
    };
    // This runtime runs the control side (xDS, certificates, admin, metrics upkeep); the
    // connections are served by the workers, each on its own thread.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let result = rt.block_on(trellis_waypoint::run(config));
    trellis_waypoint::logbuf::flush();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}
