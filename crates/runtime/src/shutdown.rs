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
    ///
    /// The handlers are installed before this returns, not when a spawned task first runs: a
    /// process's SIGTERM that arrives between the two would otherwise kill it with the default
    /// action instead of stopping it cleanly (seen on a loaded machine, a service still starting).
    /// Call it first thing in `main`, inside the runtime.
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let trigger = shutdown.clone();
        let signals = Signals::install();
        tokio::spawn(async move {
            signals.recv().await;
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

/// The stop signals this process listens for, registered with the runtime when made.
enum Signals {
    #[cfg(unix)]
    Unix { term: tokio::signal::unix::Signal, int: tokio::signal::unix::Signal },
    /// Only Ctrl-C (not unix, or SIGTERM's handler couldn't be installed).
    CtrlC,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                (Ok(term), Ok(int)) => return Signals::Unix { term, int },
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "can't listen for SIGTERM and SIGINT; only Ctrl-C will stop the server");
                }
            }
        }
        Signals::CtrlC
    }

    async fn recv(self) {
        match self {
            #[cfg(unix)]
            Signals::Unix { mut term, mut int } => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
                }
            }
            Signals::CtrlC => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
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
