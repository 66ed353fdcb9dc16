//! Shutdown on SIGINT / SIGTERM, for the binaries that run engines, relays
//! and consumers: one token, cancelled by the first signal.

use tokio_util::sync::CancellationToken;

/// Waits for Ctrl-C (SIGINT) or SIGTERM, then cancels `shutdown`.
/// Spawn it next to the tasks that watch the token.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
    shutdown.cancel();
}
