//! `trellis-control-plane`: serve a directory of manifests to the data plane, issue node and
//! waypoint credentials, or check a directory without serving it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use trellis_control_plane::ca::auth::LocalCredentials;
use trellis_control_plane::config::authz::PolicyState;
use trellis_control_plane::config::dir::DirSource;
use trellis_control_plane::config::load::parse_mesh_config;
use trellis_control_plane::config::model::{MeshConfig, Model};
use trellis_control_plane::config::snapshot::Snapshot;
use trellis_control_plane::controller::ControllerConfig;
use trellis_control_plane::controller::lease::LeaseConfig;
use trellis_control_plane::controller::waypoint::WaypointTemplate;
use trellis_control_plane::server::{ControlPlane, Options};

#[derive(Parser, Debug)]
#[command(name = "trellis-control-plane", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of `Serve` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the configuration (the manifests below --config-dir, or the Kubernetes API)
    /// over xDS, and be the CA.
    Serve {
        /// Where the configuration comes from: `directory` (--config-dir), `kubernetes` (the
        /// API server: in-cluster, else the kubeconfig), or `auto`: the directory when
        /// --config-dir is given, else Kubernetes when running in a cluster.
        #[arg(long, env = "TRELLIS_CONFIG_SOURCE", default_value = "auto", value_parser = ["auto", "directory", "kubernetes"])]
        config_source: String,
        /// Directory of YAML manifests (read recursively, watched).
        #[arg(
            long,
            env = "TRELLIS_CONFIG_DIR",
            required_if_eq("config_source", "directory")
        )]
        config_dir: Option<PathBuf>,
        /// Mesh config file (trustDomain, rootNamespace, clusterId, domainSuffix).
        #[arg(long, env = "TRELLIS_MESH_CONFIG")]
        mesh_config: Option<PathBuf>,
        /// Where the CA root and issued credentials are kept.
        #[arg(
            long,
            env = "TRELLIS_STATE_DIR",
            default_value = "/var/lib/trellis/control-plane"
        )]
        state_dir: PathBuf,
        /// xDS and CA address (gRPC over TLS).
        #[arg(long, default_value = "0.0.0.0:15012")]
        grpc_addr: SocketAddr,
        /// Admin address (plain HTTP, unauthenticated: /ready, /debug/status). Keep it on
        /// localhost.
        #[arg(long, default_value = "127.0.0.1:15014")]
        admin_addr: SocketAddr,
        /// Serve /ready alone here too (for a kubelet's probe on the pod's address).
        #[arg(long)]
        readiness_addr: Option<SocketAddr>,
        /// Names and IPs clients dial, for the serving certificate (repeatable).
        #[arg(long = "serving-name", default_values = ["localhost", "127.0.0.1"])]
        serving_names: Vec<String>,
        /// Directory poll interval in milliseconds.
        #[arg(long, default_value_t = 500)]
        poll_ms: u64,
        /// Write the trust bundle (PEM) here once the CA is loaded, and again whenever the
        /// root of trust changes, for clients to use.
        #[arg(long)]
        write_roots: Option<PathBuf>,
        /// With --config-source=kubernetes: what waypoint Deployments are made from (YAML:
        /// image, resources, controlPlane, trustDomain, ...). Without it, waypoint Gateways
        /// are not deployed.
        #[arg(long, env = "TRELLIS_WAYPOINT_CONFIG")]
        waypoint_config: Option<PathBuf>,
        /// With --config-source=kubernetes: the control plane's own namespace, where its
        /// Lease and CA Secret are (default: the client's namespace, in a cluster the pod's).
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: Option<String>,
        /// With --config-source=kubernetes: the audience proxies' ServiceAccount tokens must
        /// be issued for.
        #[arg(long, default_value = "trellis-ca")]
        token_audience: String,
        /// With --config-source=kubernetes: ztunnel's ServiceAccount, NAMESPACE/NAME (its
        /// tokens make the caller the ztunnel of its pod's node); default
        /// <namespace>/trellis-ztunnel.
        #[arg(long)]
        ztunnel_service_account: Option<String>,
        /// This replica's name in the Lease (default: host name and process id).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
    },
    /// Issue a credential: prints the token (keep it secret); the CA stores only its digest.
    Credential {
        /// Where the CA keeps issued credentials (same as `serve`).
        #[arg(
            long,
            env = "TRELLIS_STATE_DIR",
            default_value = "/var/lib/trellis/control-plane"
        )]
        state_dir: PathBuf,
        #[command(subcommand)]
        for_: CredentialFor,
    },
    /// Load and translate a directory; print every error and policy status. Exit status 1
    /// when something is rejected.
    Check {
        /// Directory of YAML manifests.
        #[arg(long)]
        config_dir: PathBuf,
        /// Mesh config file.
        #[arg(long)]
        mesh_config: Option<PathBuf>,
    },
    /// Print, as a YAML stream, what the Kubernetes writer would apply for a directory of
    /// manifests on an API holding nothing of Trellis's yet: policy and route statuses,
    /// waypoint ServiceAccount/Service/Deployment and Gateway status, trust-bundle
    /// ConfigMaps. For checking the writes against the API's schemas without a cluster.
    Render {
        /// Directory of YAML manifests.
        #[arg(long)]
        config_dir: PathBuf,
        /// Mesh config file.
        #[arg(long)]
        mesh_config: Option<PathBuf>,
        /// The waypoint template (as `serve --waypoint-config`); without it no waypoint
        /// objects are rendered.
        #[arg(long)]
        waypoint_config: Option<PathBuf>,
        /// The trust bundle (PEM); without it no trust-bundle ConfigMaps are rendered.
        #[arg(long)]
        roots: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum CredentialFor {
    /// For the ztunnel of a node.
    Node {
        /// Node name.
        name: String,
    },
    /// For a waypoint running as a SPIFFE identity.
    Waypoint {
        /// `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
        identity: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trellis-control-plane: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn mesh_config(path: Option<&Path>) -> Result<MeshConfig, String> {
    let Some(path) = path else {
        return Ok(MeshConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (mesh, warnings) = parse_mesh_config(path, &text).map_err(|e| e.to_string())?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok(mesh)
}

/// The configuration source `auto` stands for: the directory when one is given, else the
/// Kubernetes API when running in a cluster (the service-account environment is there).
fn source_of(requested: &str, has_dir: bool) -> Result<&'static str, String> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    match requested {
        "directory" => Ok("directory"),
        "kubernetes" => Ok("kubernetes"),
        _ if has_dir => Ok("directory"),
        _ if in_cluster => Ok("kubernetes"),
        _ => Err(
            "no configuration source: give --config-dir, or --config-source=kubernetes (or run in a cluster)"
                .into(),
        ),
    }
}

fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Serve {
            config_source,
            config_dir,
            mesh_config: mesh_path,
            state_dir,
            grpc_addr,
            admin_addr,
            readiness_addr,
            serving_names,
            poll_ms,
            write_roots,
            waypoint_config,
            namespace,
            identity,
            token_audience,
            ztunnel_service_account,
        } => {
            let config_source = source_of(&config_source, config_dir.is_some())?;
            let mut opts = Options::new(config_dir.unwrap_or_default());
            opts.mesh = mesh_config(mesh_path.as_deref())?;
            opts.state_dir = state_dir;
            opts.grpc = grpc_addr;
            opts.admin = admin_addr;
            opts.readiness = readiness_addr;
            opts.serving_names = serving_names;
            opts.poll_interval = Duration::from_millis(poll_ms.max(10));
            opts.write_roots = write_roots;
            opts.token_audience = token_audience;
            if let Some(sa) = ztunnel_service_account {
                let (ns, name) = sa.split_once('/').ok_or_else(|| {
                    format!("--ztunnel-service-account {sa:?}: expected NAMESPACE/NAME")
                })?;
                opts.ztunnel_service_account = Some((ns.to_string(), name.to_string()));
            }
            let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            rt.block_on(async {
                if config_source == "kubernetes" {
                    // Two Secret reads per replica per round: not every 2 s on a cluster.
                    opts.ca_poll_interval = Duration::from_secs(15);
                    let unreachable = |e: &dyn std::fmt::Display| {
                        format!("cannot reach the Kubernetes API (in-cluster or kubeconfig): {e}")
                    };
                    let mut config = kube::Config::infer().await.map_err(|e| unreachable(&e))?;
                    if let Some(ns) = namespace {
                        config.default_namespace = ns;
                    }
                    let client = kube::Client::try_from(config).map_err(|e| unreachable(&e))?;
                    let template = match &waypoint_config {
                        Some(path) => {
                            let text = std::fs::read_to_string(path)
                                .map_err(|e| format!("{}: {e}", path.display()))?;
                            let mut t =
                                WaypointTemplate::parse(&path.display().to_string(), &text)?;
                            t.mask_regexes = opts.mesh.access_log_masking.regexes.clone();
                            t.audit_allows = opts.mesh.audit_log.allows;
                            t.tracing = opts.mesh.tracing().ok().flatten();
                            Some(t)
                        }
                        None => None,
                    };
                    let namespace = client.default_namespace().to_string();
                    let identity = identity.unwrap_or_else(|| {
                        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                            .unwrap_or_default();
                        format!("{}-{}", host.trim(), std::process::id())
                    });
                    opts.controller = Some(ControllerConfig {
                        lease: LeaseConfig::new(&namespace, "trellis-control-plane", &identity),
                        template,
                    });
                    opts.kubernetes = Some(trellis_control_plane::server::KubeClient(client));
                }
                let cp = ControlPlane::start(opts).await.map_err(|e| e.to_string())?;
                trellis_core::shutdown::terminated().await;
                tracing::info!("shutting down");
                cp.shutdown().await;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Credential { state_dir, for_ } => {
            let creds =
                LocalCredentials::open(state_dir.join("credentials")).map_err(|e| e.to_string())?;
            let token = match for_ {
                CredentialFor::Node { name } => creds.issue_node(&name),
                CredentialFor::Waypoint { identity } => {
                    let id = identity.parse().map_err(|e| format!("{identity}: {e}"))?;
                    creds.issue_waypoint(&id)
                }
            }
            .map_err(|e| e.to_string())?;
            // Exactly the token, no newline: `> file` then gives a file that a bearer-token
            // client can send verbatim (Istio's ztunnel does; a newline makes the header
            // invalid). A terminal still gets its line end, on stderr.
            use std::io::{IsTerminal, Write};
            let mut stdout = std::io::stdout();
            stdout
                .write_all(token.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|e| format!("cannot print the credential: {e}"))?;
            if stdout.is_terminal() {
                eprintln!();
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            config_dir,
            mesh_config: mesh_path,
        } => {
            let mesh = mesh_config(mesh_path.as_deref())?;
            let mut source = DirSource::new(&config_dir);
            let mut model = Model::default();
            let change = source
                .scan(&mut model)
                .map_err(|e| format!("{}: {e}", config_dir.display()))?;
            for w in &change.warnings {
                println!("warning: {w}");
            }
            for e in &change.errors {
                println!("error: {e}");
            }
            let snap = Snapshot::build(&model, &mesh);
            let mut rejected = !change.errors.is_empty();
            for (id, status) in &snap.statuses {
                let state = match status.state {
                    PolicyState::Accepted => "accepted",
                    PolicyState::AcceptedWithWarnings => "accepted with warnings",
                    PolicyState::Rejected => {
                        rejected = true;
                        "rejected"
                    }
                };
                println!("{id}: {state}");
                for r in &status.reasons {
                    println!("  - {r}");
                }
            }
            println!(
                "{} objects, {} resources for ztunnel",
                change.applied.len(),
                snap.resources.values().map(|m| m.len()).sum::<usize>()
            );
            Ok(if rejected {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Render {
            config_dir,
            mesh_config,
            waypoint_config,
            roots,
        } => render(
            &config_dir,
            mesh_config.as_deref(),
            waypoint_config.as_deref(),
            roots.as_deref(),
        ),
    }
}

fn render(
    config_dir: &Path,
    mesh_path: Option<&Path>,
    waypoint_config: Option<&Path>,
    roots: Option<&Path>,
) -> Result<ExitCode, String> {
    let read =
        |path: &Path| std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
    let mesh = mesh_config(mesh_path)?;
    let template = match waypoint_config {
        Some(path) => {
            let mut t = WaypointTemplate::parse(&path.display().to_string(), &read(path)?)?;
            t.mask_regexes = mesh.access_log_masking.regexes.clone();
            t.audit_allows = mesh.audit_log.allows;
            t.tracing = mesh.tracing().ok().flatten();
            Some(t)
        }
        None => None,
    };
    let roots = roots.map(read).transpose()?;
    let mut model = Model::default();
    let change = DirSource::new(config_dir)
        .scan(&mut model)
        .map_err(|e| format!("{}: {e}", config_dir.display()))?;
    for e in &change.errors {
        eprintln!("error: {e}");
    }
    let writes = trellis_control_plane::controller::first_writes(
        &model,
        &mesh,
        &change.errors,
        template.as_ref(),
        roots.as_deref(),
    );
    let mut out = String::new();
    for (target, body) in &writes {
        let yaml = serde_yaml_ng::to_string(body).map_err(|e| format!("{target}: {e}"))?;
        out.push_str(&format!("---\n# {target}\n{yaml}"));
    }
    // Refused objects are part of what is rendered (their status says so); `check` is the
    // command that fails on them.
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
