//! A closed-loop load generator: `in_flight` tasks, each sending one call at a time for a fixed time,
//! over a set of HTTP/2 connections, with latencies in an HDR histogram.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tonic::transport::{Channel, Endpoint};

/// What a load run measured.
pub struct LoadResult {
    /// Calls that succeeded.
    pub ok: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Wall time of the measured window.
    pub elapsed: Duration,
    /// Latencies of successful calls, in microseconds.
    pub histogram: Histogram<u64>,
}

impl LoadResult {
    /// Successful calls per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A percentile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }
}

/// `n` connections to `url` (connected eagerly, so connection setup is not measured).
///
/// # Panics
/// When the server can't be reached.
pub async fn connections(url: &str, n: usize) -> Vec<Channel> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let ch =
            Endpoint::from_shared(url.to_string()).expect("url").tcp_nodelay(true).connect().await.expect("connect");
        out.push(ch);
    }
    out
}

/// A spinner-with-counter for a timed run.
pub fn bar(label: &str, total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>14} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// Runs `call(channel, task, n)` from `in_flight` tasks for `duration` (after a short warm-up).
pub async fn run<F, Fut>(label: &str, channels: &[Channel], in_flight: usize, duration: Duration, call: F) -> LoadResult
where
    F: Fn(Channel, usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = bool> + Send,
{
    let warmup = Duration::from_millis(500).min(duration / 4);
    let start = Instant::now() + warmup;
    let end = start + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let pb = bar(label, duration.as_millis() as u64);
    let mut tasks = Vec::with_capacity(in_flight);
    for t in 0..in_flight.max(1) {
        let ch = channels[t % channels.len()].clone();
        let call = call.clone();
        let errors = errors.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut n = 0u64;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let ok = call(ch.clone(), t, n).await;
                n += 1;
                if began < start {
                    continue;
                }
                if ok {
                    let _ = h.record(began.elapsed().as_micros().max(1) as u64);
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            h
        }));
    }
    let ticker = {
        let pb = pb.clone();
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = Instant::now();
                let pos = now.saturating_duration_since(start).min(duration).as_millis() as u64;
                pb.set_position(pos);
                pb.set_message(format!("{} ok", done.load(Ordering::Relaxed)));
                if now >= end {
                    return;
                }
            }
        })
    };
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    for t in tasks {
        if let Ok(h) = t.await {
            let _ = histogram.add(h);
        }
    }
    let _ = ticker.await;
    pb.finish_and_clear();
    LoadResult {
        ok: done.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: duration,
        histogram,
    }
}
