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
    /// Metrics and readiness address.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Log format (`json` also makes the access log JSON).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Seconds open connections may run on after their pod goes or ztunnel stops.
    #[arg(long, default_value_t = 5)]
    drain_seconds: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let config = Config {
        node_name: cli.node_name,
        zds_socket: cli.zds_socket,
        metrics_addr: cli.metrics_addr,
        drain_timeout: Duration::from_secs(cli.drain_seconds),
        ..Config::default()
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-ztunnel: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(trellis_ztunnel::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-ztunnel: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
