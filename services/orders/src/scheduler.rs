//! Scheduling passes: which products want a reconciliation pass and when, one running task per
//! product on this replica, and how their passes have gone — with back-off for a product whose passes
//! keep failing and the propagation health check built on it. What a pass does is in
//! [`crate::reconcile`].

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chipgate_runtime::Shutdown;
use tokio::sync::{Notify, watch};

use crate::Orders;

/// Passes started and completed on one product by this replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    pub started: u64,
    pub completed: u64,
}

/// The name the propagation check answers under in `grpc.health.v1`.
pub const PROPAGATION_HEALTH: &str = "chipgate.orders.v1.Propagation";

/// First pause after a failed pass; it doubles with each further failure, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest pause between passes of a product that keep failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a product that keeps failing the same way is logged again.
const REMIND_EVERY: Duration = Duration::from_secs(60);

/// How this replica's passes over one product have gone lately.
#[derive(Clone, Debug)]
pub(crate) struct PassHealth {
    /// Passes failed in a row (0: the last one succeeded).
    pub consecutive_failures: u32,
    /// When the current run of failures began.
    pub failing_since: Option<Instant>,
    /// The last failure, in words.
    pub last_error: String,
    /// When a pass last succeeded (None: never, on this replica).
    pub last_ok: Option<Instant>,
    /// No pass before this (backing off).
    not_before: Option<Instant>,
    /// When the failure was last logged at WARN.
    last_logged: Option<Instant>,
}

impl PassHealth {
    fn new() -> Self {
        PassHealth {
            consecutive_failures: 0,
            failing_since: None,
            last_error: String::new(),
            last_ok: None,
            not_before: None,
            last_logged: None,
        }
    }
}

/// The pause after the `n`th failure in a row: doubling from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`],
/// with ±25 % jitter so replicas and products don't retry in step.
pub(crate) fn backoff(n: u32, jitter: f64) -> Duration {
    let base = FIRST_BACKOFF.saturating_mul(1u32 << n.saturating_sub(1).min(16)).min(MAX_BACKOFF);
    base.mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Which products want a pass, and how far passes have got (for placement to wait on).
#[derive(Default)]
pub(crate) struct Scheduler {
    wanted: Mutex<HashSet<String>>,
    running: Mutex<HashSet<String>>,
    progress: Mutex<HashMap<String, watch::Sender<Progress>>>,
    wake: Notify,
    /// How passes over each product this replica tried have gone.
    health: Mutex<HashMap<String, PassHealth>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Scheduler {
    /// Asks for a pass over `sku` soon.
    pub(crate) fn request(&self, sku: &str) {
        lock(&self.wanted).insert(sku.to_string());
        self.wake.notify_one();
    }

    pub(crate) fn sender(&self, sku: &str) -> watch::Sender<Progress> {
        lock(&self.progress).entry(sku.to_string()).or_insert_with(|| watch::channel(Progress::default()).0).clone()
    }

    /// Pass progress on `sku`.
    pub(crate) fn progress(&self, sku: &str) -> watch::Receiver<Progress> {
        self.sender(sku).subscribe()
    }

    pub(crate) fn take_wanted(&self) -> HashSet<String> {
        std::mem::take(&mut *lock(&self.wanted))
    }

    pub(crate) fn still_wanted(&self, sku: &str) -> bool {
        lock(&self.wanted).remove(sku)
    }

    /// Whether `sku` is backing off after failures (its next pass must wait).
    pub(crate) fn backing_off(&self, sku: &str) -> bool {
        lock(&self.health).get(sku).and_then(|h| h.not_before).is_some_and(|t| Instant::now() < t)
    }

    /// Records a failed pass of `sku`: logs the cause when it is new (and as a reminder once a minute
    /// while it lasts, otherwise at debug) and sets the back-off; returns the pause.
    pub(crate) fn failed(&self, sku: &str, error: &str) -> Duration {
        let now = Instant::now();
        let mut all = lock(&self.health);
        let h = all.entry(sku.to_string()).or_insert_with(PassHealth::new);
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        let since = *h.failing_since.get_or_insert(now);
        let pause = backoff(h.consecutive_failures, fastrand::f64());
        h.not_before = Some(now + pause);
        let changed = h.last_error != error;
        let remind = h.last_logged.is_none_or(|t| now.duration_since(t) >= REMIND_EVERY);
        if changed || remind {
            h.last_logged = Some(now);
            tracing::warn!(
                %sku,
                error,
                failures = h.consecutive_failures,
                failing_for_s = now.duration_since(since).as_secs(),
                next_try_ms = pause.as_millis() as u64,
                "propagation pass failed; backing off"
            );
        } else {
            tracing::debug!(%sku, error, failures = h.consecutive_failures, "propagation pass failed again");
        }
        h.last_error = error.to_string();
        pause
    }

    /// Records a pass of `sku` that completed.
    pub(crate) fn succeeded(&self, sku: &str) {
        let mut all = lock(&self.health);
        let h = all.entry(sku.to_string()).or_insert_with(PassHealth::new);
        if h.consecutive_failures > 0 {
            let over = h.failing_since.map(|t| t.elapsed().as_secs()).unwrap_or(0);
            tracing::info!(%sku, failures = h.consecutive_failures, over_s = over, "propagation recovered");
        }
        *h = PassHealth { last_ok: Some(Instant::now()), ..PassHealth::new() };
    }

    /// How passes over each product have gone on this replica.
    pub(crate) fn health(&self) -> HashMap<String, PassHealth> {
        lock(&self.health).clone()
    }

    /// The product's failure, when its passes have been failing (for an order that waits on it).
    pub(crate) fn failing(&self, sku: &str) -> Option<PassHealth> {
        lock(&self.health).get(sku).filter(|h| h.consecutive_failures > 0).cloned()
    }
}

/// Keeps the propagation health check up to date until shutdown: unhealthy while some product's
/// passes have been failing for `unhealthy_after` or longer.
pub(crate) async fn watch_health(svc: Orders, verdict: watch::Sender<bool>, shutdown: Shutdown) {
    let after = svc.options().unhealthy_after;
    loop {
        let stalled: Vec<String> = svc
            .inner
            .scheduler
            .health()
            .into_iter()
            .filter(|(_, h)| h.failing_since.is_some_and(|t| t.elapsed() >= after))
            .map(|(sku, _)| sku)
            .collect();
        let healthy = stalled.is_empty();
        if *verdict.borrow() != healthy {
            if healthy {
                tracing::info!("propagation healthy again");
            } else {
                tracing::error!(products = ?stalled, after_s = after.as_secs(), "propagation stalled");
            }
            verdict.send_replace(healthy);
        }
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Removes a product from the running set when its task ends, however it ends.
pub(crate) struct Running<'a> {
    /// The service.
    pub svc: &'a Orders,
    /// The product.
    pub sku: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.svc.inner.scheduler.running).remove(&self.sku);
    }
}

/// Schedules passes until shutdown: on request, and on a tick for marks left by other replicas.
pub(crate) async fn run(svc: Orders, shutdown: Shutdown) {
    let tick = svc.options().tick;
    let full_every = svc.options().full_reconcile_every;
    let mut last_full = Instant::now();
    let mut last_scan = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            () = svc.inner.scheduler.wake.notified() => {}
            () = tokio::time::sleep(tick) => {}
        }
        let mut todo = svc.inner.scheduler.take_wanted();
        // Local requests need no look at the store; marks left by other replicas (or by a replica
        // that died) are found by a scan once per tick.
        if last_scan.elapsed() >= tick {
            last_scan = Instant::now();
            match svc.dirty_products(!full_every.is_zero() && last_full.elapsed() >= full_every).await {
                Ok((dirty, full)) => {
                    if full {
                        last_full = Instant::now();
                    }
                    todo.extend(dirty.into_iter().map(String::from));
                }
                Err(e) => tracing::warn!(error = ?e, "can't read dirty marks; retrying next tick"),
            }
        }
        for sku in todo {
            if svc.inner.scheduler.backing_off(&sku) {
                // Failed lately: its marks keep it wanted, and a tick after the pause picks it up.
                continue;
            }
            let start = lock(&svc.inner.scheduler.running).insert(sku.clone());
            if start {
                let svc = svc.clone();
                let shutdown = shutdown.clone();
                // Products wanted are ones orders were placed for, with SKUs parsed on entry.
                let sku = chipgate_domain::ids::Sku::from_trusted(sku);
                tokio::spawn(async move { svc.run_product(sku, shutdown).await });
            } else {
                // A pass is running; make it go round once more.
                lock(&svc.inner.scheduler.wanted).insert(sku);
            }
        }
    }
}
