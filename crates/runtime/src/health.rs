//! gRPC health (`grpc.health.v1`) that tells the truth.
//!
//! A monitor pings the state backend every second and reports SERVING only while it answers (within
//! a second) and the server is not draining; otherwise NOT_SERVING. The overall status (service name
//! "") and each of the server's services move together: that is what readiness probes ask.
//!
//! The service name [`LIVENESS`] answers SERVING for as long as the process serves at all, whatever
//! Redis does: liveness probes ask it, so an outage of Redis takes pods out of rotation without making
//! Kubernetes restart every one of them.
//!
//! A service may add named [`HealthCheck`]s of its own background work (the orders service's
//! propagation): each answers SERVING while the server does and its check holds. They are not part of
//! the overall status, so a stalled background job alerts without taking the API out of rotation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chipgate_state::{Backend, Store};
use tokio::sync::Notify;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Health service name that reports only that the process is alive (for liveness probes).
pub const LIVENESS: &str = "liveness";

/// A named health status a service computes itself (true: healthy).
#[derive(Clone, Debug)]
pub struct HealthCheck {
    /// The health service name it answers under.
    pub name: &'static str,
    /// Its current verdict.
    pub healthy: tokio::sync::watch::Receiver<bool>,
}

/// Controls and observes one server's health.
#[derive(Clone)]
pub struct HealthHandle {
    reporter: HealthReporter,
    names: Arc<Vec<String>>,
    checks: Arc<Vec<HealthCheck>>,
    draining: Arc<AtomicBool>,
    serving: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl HealthHandle {
    async fn publish(&self, serving: bool) {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.reporter.set_service_status("", status).await;
        for name in self.names.iter() {
            self.reporter.set_service_status(name.as_str(), status).await;
        }
        self.serving.store(serving, Ordering::SeqCst);
        self.publish_checks(serving).await;
    }

    /// Reports each check: SERVING while the server serves and the check holds.
    async fn publish_checks(&self, serving: bool) {
        for c in self.checks.iter() {
            let ok = serving && *c.healthy.borrow();
            let status = if ok { ServingStatus::Serving } else { ServingStatus::NotServing };
            self.reporter.set_service_status(c.name, status).await;
        }
    }

    /// Reports NOT_SERVING from now on (the server is shutting down), before returning.
    pub async fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.publish(false).await;
        self.wake.notify_one();
    }

    /// Whether the last report was SERVING.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }
}

/// Starts the monitor for `names` and `checks`, probing `store` every `interval`. Starts NOT_SERVING
/// until the first successful probe.
pub async fn spawn_monitor(
    reporter: HealthReporter,
    names: Vec<String>,
    checks: Vec<HealthCheck>,
    store: Store,
    interval: Duration,
) -> HealthHandle {
    let handle = HealthHandle {
        reporter,
        names: Arc::new(names),
        checks: Arc::new(checks),
        draining: Arc::new(AtomicBool::new(false)),
        serving: Arc::new(AtomicBool::new(false)),
        wake: Arc::new(Notify::new()),
    };
    handle.publish(false).await;
    handle.reporter.set_service_status(LIVENESS, ServingStatus::Serving).await;
    let h = handle.clone();
    tokio::spawn(async move {
        let mut last: Option<bool> = None;
        let mut last_checks: Vec<bool> = Vec::new();
        loop {
            let draining = h.draining.load(Ordering::SeqCst);
            let reachable = matches!(tokio::time::timeout(Duration::from_secs(1), store.ping()).await, Ok(Ok(())));
            let serving = reachable && !draining;
            if last != Some(serving) {
                if serving {
                    tracing::info!(backend = store.kind(), "health: SERVING");
                } else if draining {
                    tracing::info!("health: NOT_SERVING (draining)");
                } else {
                    tracing::warn!(backend = store.kind(), "health: NOT_SERVING (state backend unreachable)");
                }
                h.publish(serving).await;
                last = Some(serving);
            }
            let checks: Vec<bool> = h.checks.iter().map(|c| *c.healthy.borrow()).collect();
            if checks != last_checks {
                for (c, ok) in h.checks.iter().zip(&checks) {
                    if *ok {
                        tracing::info!(check = c.name, "health: SERVING");
                    } else {
                        tracing::warn!(check = c.name, "health: NOT_SERVING");
                    }
                }
                h.publish_checks(serving).await;
                last_checks = checks;
            }
            if draining {
                // Stays NOT_SERVING until the process exits.
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = h.wake.notified() => {}
            }
        }
    });
    handle
}
