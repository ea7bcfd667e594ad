//! `trellis-ztunnel`: parse flags, start logging, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use trellis_ztunnel::Config;

#[derive(Parser, Debug)]
#[command(name = "trellis-ztunnel", version, about)]
struct Cli {
    /// This node's name.
    #[arg(long, env = "NODE_NAME", default_value = "node")]
    node_name: String,
    /// The node agent's ZDS socket.
    #[arg(long, default_value = "/var/run/ztunnel/ztunnel.sock")]
    zds_socket: PathBuf,
    /// Metrics address.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Admin address (config dump, log level): keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Readiness address.
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Log format (`json` also makes the access log JSON).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Seconds open connections may run on after their pod goes or ztunnel stops.
    #[arg(long, default_value_t = 5)]
    drain_seconds: u64,
    /// The control plane (xDS and CA), `https://host:15012`.
    #[arg(long)]
    control_plane: String,
    /// The name in the control plane's serving certificate.
    #[arg(long, default_value = "localhost")]
    control_plane_name: String,
    /// The mesh's trust bundle (PEM file; re-read every few seconds, for root rotation).
    #[arg(long)]
    ca_roots: PathBuf,
    /// Lifetime asked of the CA for workload certificates, in seconds (renewed at about
    /// half of it; the CA may grant less).
    #[arg(long, default_value_t = 24 * 3600)]
    cert_ttl_seconds: u64,
    /// File holding this node's credential.
    #[arg(long)]
    credential_file: PathBuf,
    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Worker threads of the proxy's runtime (Istio's ztunnel uses 2 by default).
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The filter sits behind a reload handle: the admin endpoint changes it at run time.
    use tracing_subscriber::prelude::*;
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&initial)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, reload) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if cli.log_format == "json" {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json())
            .init();
    } else {
        tracing_subscriber::registry().with(filter).with(fmt).init();
    }
    let set_log_level: trellis_ztunnel::admin::SetLogLevel =
        std::sync::Arc::new(move |level: &str| {
            let f = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            reload.reload(f).map_err(|e| e.to_string())
        });
    // Descriptors: one per socket on each side of every connection (docs/reliability.md).
    match trellis_ztunnel::limits::raise_nofile() {
        Ok((before, now, hard)) => {
            tracing::info!(
                soft_before = before,
                soft = now,
                hard,
                "open-files limit (RLIMIT_NOFILE)"
            )
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise RLIMIT_NOFILE"),
    }
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    // The credential file is read again for each request (a projected token rotates); it
    // must be readable now.
    let (roots_pem, credential) = match (read(&cli.ca_roots), read(&cli.credential_file)) {
        (Ok(r), Ok(_)) => (
            r,
            trellis_core::credential::Credential::File(cli.credential_file.clone()),
        ),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("trellis-ztunnel: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let config = Config {
        control_plane: cli.control_plane,
        control_plane_name: cli.control_plane_name,
        roots_pem,
        credential,
        trust_domain: cli.trust_domain,
        node_name: cli.node_name,
        zds_socket: cli.zds_socket,
        metrics_addr: cli.metrics_addr,
        admin_addr: cli.admin_addr,
        readiness_addr: cli.readiness_addr,
        drain_timeout: Duration::from_secs(cli.drain_seconds),
        roots_file: Some(cli.ca_roots.clone()),
        cert_ttl: Duration::from_secs(cli.cert_ttl_seconds.max(10)),
        ..Config::default()
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-ztunnel: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(trellis_ztunnel::run(config, set_log_level, initial)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-ztunnel: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
