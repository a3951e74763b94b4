//! A cloneable shutdown signal: triggered once (by SIGTERM/SIGINT or by a test), observed by the
//! gRPC server, background workers and open streams alike.

use tokio::sync::watch;

/// Shutdown signal. Clones observe the same trigger.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal nobody has triggered yet.
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Shutdown { tx: std::sync::Arc::new(tx), rx }
    }

    /// A signal triggered by the first SIGTERM or SIGINT (Ctrl-C).
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            trigger.trigger();
        });
        shutdown
    }

    /// Triggers the signal (idempotent).
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// True once triggered.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once triggered.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means every sender is gone, which can't happen while `self` holds one.
        let _ = rx.wait_for(|triggered| *triggered).await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "can't listen for SIGTERM; only Ctrl-C will stop the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clones_observe_the_trigger() {
        let s = Shutdown::new();
        let c = s.clone();
        assert!(!c.is_triggered());
        let waiter = tokio::spawn(async move { c.wait().await });
        s.trigger();
        waiter.await.expect("waiter finished");
        assert!(s.is_triggered());
    }
}
