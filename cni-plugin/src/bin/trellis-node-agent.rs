//! `trellis-node-agent`: installs the CNI plugin on its node, then enrolls pods and hands
//! them to ztunnel. `uninstall` removes the plugin again.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use trellis_cni_plugin::agent::{Agent, AgentConfig, NetnsScan, bind_cni_socket};
use trellis_cni_plugin::install;
use trellis_cni_plugin::removal::RemovalWatch;
use trellis_core::xds::{XdsClient, XdsConfig};
use trellis_core::zds::ZdsListener;
use trellis_proto::type_url::ADDRESS;

#[derive(Parser, Debug)]
#[command(name = "trellis-node-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum Command {
    /// Install the plugin, then serve until SIGTERM (the plugin stays installed, so pods
    /// of enrolled namespaces cannot start unenrolled while the agent restarts).
    Run {
        /// This node's name.
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// CNI binary directory (the plugin is copied here).
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// CNI configuration directory (the plugin is added to its first list).
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// The `trellis-cni` binary to install (default: next to this one).
        #[arg(long)]
        plugin_binary: Option<PathBuf>,
        /// Let pods start unenrolled when the agent is unreachable.
        #[arg(long)]
        fail_open: bool,
        /// Socket for the plugin.
        #[arg(long, default_value = trellis_cni_plugin::protocol::DEFAULT_SOCKET)]
        cni_socket: PathBuf,
        /// Socket ztunnel connects to.
        #[arg(long, default_value = "/var/run/ztunnel/ztunnel.sock")]
        zds_socket: PathBuf,
        /// State across restarts.
        #[arg(long, default_value = "/var/run/trellis/node-agent.json")]
        state_file: PathBuf,
        /// Control plane (xDS), `https://host:15012`.
        #[arg(long)]
        xds_address: String,
        /// Name in the control plane's serving certificate.
        #[arg(long, default_value = "localhost")]
        xds_server_name: String,
        /// Trust bundle (PEM) the control plane's certificate chains to.
        #[arg(long)]
        ca_roots: PathBuf,
        /// File holding this node's credential.
        #[arg(long)]
        credential_file: PathBuf,
        /// Cluster id in workload uids.
        #[arg(long, default_value = "Kubernetes")]
        cluster_id: String,
        /// Where the container runtime pins pod network namespaces (read to rebuild the
        /// state when the state file is corrupt).
        #[arg(long, default_value = "/var/run/netns")]
        netns_dir: PathBuf,
        /// The prefix of pod network namespaces' names in `--netns-dir`.
        #[arg(long, default_value = "cni-")]
        netns_prefix: String,
        /// On Kubernetes: this agent's DaemonSet, NAMESPACE/NAME. Stopping while it is gone
        /// or being deleted (the release is uninstalled) releases every pod and removes the
        /// plugin from the node; any other stop keeps them.
        #[arg(long)]
        daemonset: Option<String>,
    },
    /// Remove the plugin from the node's CNI configuration and bin directory.
    Uninstall {
        /// CNI binary directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Uninstall {
            cni_bin_dir,
            cni_conf_dir,
        } => match install::uninstall(&cni_bin_dir, &cni_conf_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trellis-node-agent: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            node_name,
            cni_bin_dir,
            cni_conf_dir,
            plugin_binary,
            fail_open,
            cni_socket,
            zds_socket,
            state_file,
            xds_address,
            xds_server_name,
            ca_roots,
            credential_file,
            cluster_id,
            netns_dir,
            netns_prefix,
            daemonset,
        } => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("trellis-node-agent: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(async {
                let plugin = match plugin_binary {
                    Some(p) => p,
                    None => std::env::current_exe()
                        .map_err(|e| e.to_string())?
                        .with_file_name("trellis-cni"),
                };
                // Read again for each xDS stream (a projected token rotates); readable now.
                let credential = trellis_core::credential::Credential::File(credential_file);
                credential.token()?;
                // The roots file is read again at each connection: a root rotation reaches
                // the reconnect to a control plane serving under the new root.
                let channel = trellis_core::channel::control_plane_channel(
                    &trellis_core::channel::ControlPlaneTarget {
                        endpoint: xds_address,
                        server_name: xds_server_name,
                        roots: trellis_core::channel::ControlPlaneRoots::File(ca_roots),
                        connect_timeout: Duration::from_secs(5),
                        request_timeout: None,
                    },
                )?;
                let xds = XdsClient::start(
                    channel,
                    XdsConfig {
                        node_id: format!("node-agent~{node_name}"),
                        types: vec![ADDRESS.into()],
                        initial_backoff: Duration::from_millis(200),
                        max_backoff: Duration::from_secs(10),
                        credential: Some(credential),
                    },
                );
                let cni = bind_cni_socket(&cni_socket)
                    .map_err(|e| format!("{}: {e}", cni_socket.display()))?;
                let zds = ZdsListener::bind(&zds_socket)
                    .map_err(|e| format!("{}: {e}", zds_socket.display()))?;
                let agent = Agent::new(
                    AgentConfig {
                        node_name,
                        cluster_id,
                        cni_socket: cni_socket.clone(),
                        zds_socket,
                        state_file,
                        zds_timeout: Duration::from_secs(5),
                        // Below the plugin's 10 s wait for the answer.
                        enrollment_wait: Duration::from_secs(5),
                        netns_scan: NetnsScan {
                            dir: netns_dir,
                            prefix: netns_prefix,
                        },
                    },
                    xds,
                )?;
                // Serving first, installing second: the plugin never finds no agent.
                tokio::spawn(agent.clone().serve_cni(cni));
                tokio::spawn(agent.clone().serve_zds(zds));
                tokio::spawn(agent.clone().run_reconciler());
                let list =
                    install::install(&plugin, &cni_bin_dir, &cni_conf_dir, &cni_socket, fail_open)
                        .map_err(|e| e.to_string())?;
                tracing::info!(list = %list.display(), "trellis-cni installed");
                let removal = match &daemonset {
                    Some(ds) => Some(watch_removal(ds).await?),
                    None => None,
                };
                trellis_core::shutdown::terminated().await;
                if let Some(removal) = removal
                    && removal.uninstalling().await
                {
                    for e in agent.release_all().await {
                        tracing::error!(error = %e, "uninstall: a pod could not be released");
                    }
                    install::uninstall(&cni_bin_dir, &cni_conf_dir).map_err(|e| e.to_string())?;
                    tracing::info!(
                        "node agent uninstalled: pods released, trellis-cni removed from the node"
                    );
                    return Ok(());
                }
                tracing::info!("node agent stopping; the plugin stays installed");
                Ok::<(), String>(())
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("trellis-node-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Starts watching the agent's DaemonSet `ds` (NAMESPACE/NAME), if running on Kubernetes.
async fn watch_removal(ds: &str) -> Result<RemovalWatch, String> {
    let (ns, name) = ds
        .split_once('/')
        .ok_or_else(|| format!("--daemonset {ds:?}: expected NAMESPACE/NAME"))?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("--daemonset needs the Kubernetes API: {e}"))?;
    Ok(RemovalWatch::start(client, ns, name))
}
