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

pub mod config;
pub mod inpod;
pub mod proxy;
pub mod telemetry;

pub use config::Config;

/// Runs ztunnel until SIGTERM/SIGINT.
pub async fn run(config: Config) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = std::sync::Arc::new(config);
    let metrics = telemetry::install_metrics()?;
    let pods = inpod::Pods::new(config.clone());
    let admin = telemetry::serve(config.metrics_addr, metrics, pods.clone()).await?;
    tracing::info!(metrics = %admin, zds = %config.zds_socket.display(), node = %config.node_name, "ztunnel starting");
    let zds = tokio::spawn(inpod::run_zds_client(config.clone(), pods.clone()));
    trellis_core::shutdown::terminated().await;
    tracing::info!("shutting down: closing every pod's listeners");
    zds.abort();
    pods.shutdown(config.drain_timeout).await;
    Ok(())
}
