//! Waiting for the signal to stop (SIGTERM from the kubelet or a service manager, SIGINT
//! from a terminal), shared by every binary.

/// Resolves when the process receives SIGTERM or SIGINT. If the handlers cannot be
/// installed it never resolves, and the signals' default action (exit) applies.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
