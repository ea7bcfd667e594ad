//! Trellis ztunnel: one per node. It serves every enrolled pod of its node from *inside*
//! the pod's network namespace: the node agent hands it each pod's namespace over ZDS, and
//! ztunnel opens the pod's capture listeners there (15001 outbound, 15006 inbound).
//!
//! Built so far (issue 5): the ZDS client and the in-pod listeners; a captured connection
//! is forwarded as plain TCP to its original destination, with an access-log line and
//! Istio-named metrics. HBONE (15008) and L4 authorization come next (issue 6).
//!
//! It must never leave a thread in a pod's namespace (see `trellis_core::netns`), and never
//! let its own sockets be captured again (they carry mark 0x539, which the capture rules
//! let pass).

pub mod admin;
pub mod config;
pub mod inpod;
pub mod limits;
pub mod memory;
pub mod mesh;
pub mod proxy;
pub mod telemetry;

pub use config::Config;

use std::sync::Arc;

use trellis_proto::type_url::{ADDRESS, AUTHORIZATION};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The control plane's data and the certificate manager, over authenticated TLS (both
/// connect lazily and retry on their own).
pub fn connect_mesh(config: &Config) -> Result<mesh::Mesh, BoxError> {
    let c = trellis_core::channel::connect_proxy(&trellis_core::channel::ProxyClient {
        endpoint: config.control_plane.clone(),
        server_name: config.control_plane_name.clone(),
        trust_domain: config.trust_domain.clone(),
        roots_pem: config.roots_pem.clone(),
        credential: config.credential.clone(),
        node_id: format!("ztunnel~{}", config.node_name),
        types: vec![ADDRESS.into(), AUTHORIZATION.into()],
        cert_ttl: config.cert_ttl,
    })?;
    Ok(mesh::Mesh {
        xds: c.xds,
        certs: c.certs,
        bundle: c.bundle,
        trust_domain: config.trust_domain.clone(),
        loads: Arc::default(),
    })
}

/// Runs ztunnel until SIGTERM/SIGINT; `set_log_level` changes the log filter (admin).
pub async fn run(
    config: Config,
    set_log_level: admin::SetLogLevel,
    log_level: String,
) -> Result<(), BoxError> {
    let config = Arc::new(config);
    let metrics = telemetry::install_metrics()?;
    let mesh = Arc::new(connect_mesh(&config)?);
    let pods = inpod::Pods::new(config.clone(), mesh.clone());
    let bundle = mesh.bundle.clone();
    let held: telemetry::HeldIdentities = {
        let mesh = mesh.clone();
        Arc::new(move || {
            mesh.certs
                .identities()
                .iter()
                .map(ToString::to_string)
                .collect()
        })
    };
    let (admin_addr, ready_addr) = admin::start(
        admin::Admin {
            mesh,
            pods: pods.clone(),
            set_log_level,
            log_level: Arc::new(std::sync::Mutex::new(log_level)),
        },
        config.admin_addr,
        config.readiness_addr,
    )
    .await?;
    tracing::info!(admin = %admin_addr, readiness = %ready_addr, "admin and readiness serving");
    let admin = telemetry::serve(config.metrics_addr, metrics, held).await?;
    tracing::info!(metrics = %admin, zds = %config.zds_socket.display(), node = %config.node_name, "ztunnel starting");
    let zds = tokio::spawn(inpod::run_zds_client(config.clone(), pods.clone()));
    let roots = config.roots_file.clone().map(|path| {
        tokio::spawn(trellis_core::tls::follow_roots_file(
            path,
            bundle.clone(),
            config.roots_pem.clone(),
        ))
    });
    let trim = tokio::spawn(memory::trim_when_idle());
    trellis_core::shutdown::terminated().await;
    tracing::info!("shutting down: closing every pod's listeners");
    zds.abort();
    trim.abort();
    if let Some(r) = roots {
        r.abort();
    }
    pods.shutdown(config.drain_timeout).await;
    Ok(())
}
