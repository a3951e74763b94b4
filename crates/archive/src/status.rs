//! How archiving is going, for operators: Prometheus figures and a health name that goes
//! NOT_SERVING when archiving keeps failing (alert on it: Redis is then no longer bounded, and with
//! `noeviction` a full Redis refuses writes).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chipgate_runtime::health::HealthCheck;
use chipgate_runtime::metrics::{CounterBy1, GaugeBy1};
use chipgate_runtime::{Metrics, Shutdown};

/// Where a run stops as if the process had died right after that step (the crash tests of both
/// archivers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The data object and the manifest are written.
    Written,
    /// The segment was read back and verified.
    Verified,
    /// What the segment holds was removed from Redis.
    Trimmed,
}

impl Step {
    /// The error text of a run stopped after this step.
    pub fn crashed(self) -> String {
        format!("archiver stopped after {self:?} (crash test)")
    }
}

/// Calls `run(now_ms, cutoff_ms)` every `every` until `shutdown`, where `cutoff_ms` is `retention`
/// before now: the loop both services' background archivers share (each records its run's outcome).
pub fn spawn_every<F, Fut>(
    every: Duration,
    retention: Duration,
    shutdown: Shutdown,
    mut run: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut(u64, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut beat = chipgate_runtime::periodic::Every::new(every, shutdown);
        while beat.tick().await {
            let now = chipgate_runtime::time::now_ms();
            run(now, now.saturating_sub(retention.as_millis() as u64)).await;
        }
    })
}

/// Archives each partition of `parts` (its lease key, the lease's fence counter, and what `work`
/// needs) under that partition's archive lease, taken for `ttl`, so one replica at a time archives a
/// partition: a partition whose lease another replica holds is counted in `run.busy` and skipped.
/// The lease is given up after the work, except in a crash test (`stop_after`), which leaves it to
/// expire as a dead process would. Every partition is tried; `work` says what it did even when it
/// fails (added to `run`), and the first error is returned.
pub async fn each_leased<B, T, E, F, Fut>(
    store: &B,
    parts: impl IntoIterator<Item = (String, String, T)>,
    ttl: Duration,
    stop_after: Option<Step>,
    run: &mut Run,
    mut work: F,
) -> Option<E>
where
    B: chipgate_state::Backend,
    E: From<chipgate_state::StateError>,
    F: FnMut(T, u64) -> Fut,
    Fut: std::future::Future<Output = (Run, Result<(), E>)>,
{
    let mut first_error = None;
    for (lease, counter, part) in parts {
        let token = match store.lease_acquire(&lease, &counter, ttl).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                run.busy += 1;
                continue;
            }
            Err(e) => {
                first_error.get_or_insert(E::from(e));
                continue;
            }
        };
        let (did, done) = work(part, token).await;
        run.add(&did);
        if stop_after.is_none() {
            let _ = store.lease_release(&lease, token).await;
        }
        if let Err(e) = done {
            first_error.get_or_insert(e);
        }
    }
    first_error
}

/// What one archiving run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Run {
    /// Segments sealed (or finished, when an earlier run had written them).
    pub segments: u64,
    /// Records archived and removed from Redis (audit entries, orders).
    pub records: u64,
    /// Compressed bytes written to the archive.
    pub bytes: u64,
    /// Bytes of record payload removed from Redis (what it stored for them, without per-key overhead).
    pub redis_bytes_freed: u64,
    /// Partitions skipped because another replica held their archive lease.
    pub busy: u64,
}

impl Run {
    /// Adds another run's figures.
    pub fn add(&mut self, o: &Run) {
        self.segments += o.segments;
        self.records += o.records;
        self.bytes += o.bytes;
        self.redis_bytes_freed += o.redis_bytes_freed;
        self.busy += o.busy;
    }
}

/// The figures and the health verdict of one kind of archiving (`audit` or `orders`).
pub struct Status {
    kind: &'static str,
    records: CounterBy1,
    bytes: CounterBy1,
    freed: CounterBy1,
    failures: CounterBy1,
    last_success: GaugeBy1,
    healthy: tokio::sync::watch::Sender<bool>,
    failing_since: Mutex<Option<Instant>>,
    unhealthy_after: Mutex<Duration>,
}

impl Status {
    /// Registers the archive figures in `metrics` for `kind`; the health verdict goes bad once runs
    /// have kept failing for `unhealthy_after` (0: at the first failure).
    pub fn register(metrics: &Metrics, kind: &'static str, unhealthy_after: Duration) -> Self {
        Status {
            kind,
            records: metrics.counter_by("chipgate_archive_records", "Records archived and removed from Redis"),
            bytes: metrics.counter_by("chipgate_archive_bytes", "Compressed bytes written to the archive"),
            freed: metrics.counter_by(
                "chipgate_archive_redis_freed_bytes",
                "Bytes of record payload removed from Redis after archiving (without per-key overhead)",
            ),
            failures: metrics.counter_by("chipgate_archive_failures", "Archiving runs that failed"),
            last_success: metrics.gauge_by(
                "chipgate_archive_last_success_timestamp_seconds",
                "When an archiving run last finished without error (Unix seconds)",
            ),
            healthy: tokio::sync::watch::Sender::new(true),
            failing_since: Mutex::new(None),
            unhealthy_after: Mutex::new(unhealthy_after),
        }
    }

    /// Changes how long runs may keep failing before the health verdict goes bad.
    pub fn set_unhealthy_after(&self, after: Duration) {
        if let Ok(mut u) = self.unhealthy_after.lock() {
            *u = after;
        }
    }

    /// The health check answering under `name` (SERVING while archiving succeeds).
    pub fn health_check(&self, name: &'static str) -> HealthCheck {
        HealthCheck { name, healthy: self.healthy.subscribe() }
    }

    /// Whether archiving is healthy now.
    pub fn is_healthy(&self) -> bool {
        *self.healthy.borrow()
    }

    fn label(&self) -> [(&'static str, String); 1] {
        [("kind", self.kind.to_string())]
    }

    /// Records a run that finished without error at `now_ms`.
    pub fn succeeded(&self, run: &Run, now_ms: u64) {
        let l = self.label();
        self.records.get_or_create(&l).inc_by(run.records);
        self.bytes.get_or_create(&l).inc_by(run.bytes);
        self.freed.get_or_create(&l).inc_by(run.redis_bytes_freed);
        self.last_success.get_or_create(&l).set((now_ms / 1000) as i64);
        if let Ok(mut f) = self.failing_since.lock() {
            *f = None;
        }
        self.healthy.send_replace(true);
    }

    /// Records a failed run (what it did before failing still counts).
    pub fn failed(&self, partial: &Run, error: &str) {
        let l = self.label();
        self.records.get_or_create(&l).inc_by(partial.records);
        self.bytes.get_or_create(&l).inc_by(partial.bytes);
        self.freed.get_or_create(&l).inc_by(partial.redis_bytes_freed);
        self.failures.get_or_create(&l).inc();
        let since = match self.failing_since.lock() {
            Ok(mut f) => *f.get_or_insert_with(Instant::now),
            Err(_) => Instant::now(),
        };
        let after = self.unhealthy_after.lock().map(|u| *u).unwrap_or_default();
        let bad = since.elapsed() >= after;
        if bad && self.is_healthy() {
            tracing::error!(kind = self.kind, error, "archiving keeps failing: Redis is no longer bounded");
        } else {
            tracing::warn!(kind = self.kind, error, "archiving run failed; the next run retries");
        }
        if bad {
            self.healthy.send_replace(false);
        }
    }
}
