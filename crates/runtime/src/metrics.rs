//! Prometheus metrics: one registry per service, the per-RPC figures the edge layer records, the
//! business figures each service samples from its state, and the admin HTTP server that serves them.
//!
//! Each service owns a [`Metrics`] (not a process-global recorder), so three services in one process —
//! the dev cluster, the test harness — keep their figures apart, each on its own admin port.
//!
//! Two kinds of figures:
//! * **counters and histograms** the code bumps as things happen (calls, events processed, holds
//!   expired). They are per replica; sum them across replicas.
//! * **gauges read from the shared state** (orders by state, queue lengths, quota, stock, stream lag).
//!   They are refreshed by [`Sample`]rs when `/metrics` is scraped — so they cost nothing while nobody
//!   scrapes, and are as fresh as the scrape — at most once per [`MIN_REFRESH`] however many scrapers
//!   there are. Every replica reports the same cluster-wide value; aggregate them with `max`, not `sum`.
//!
//! Label values are bounded: the method label only takes methods the server actually serves (anything
//! else is `unknown`), so a caller can't blow up the series count with made-up paths.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry, Unit};

pub use prometheus_client::metrics::counter::Counter as CounterMetric;
pub use prometheus_client::metrics::gauge::Gauge as GaugeMetric;
pub use prometheus_client::metrics::histogram::Histogram as HistogramMetric;

/// Scrapes closer together than this reuse the previous sample instead of reading the state again.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// A sample that takes longer than this is abandoned (the previous values stay, and the failure is
/// counted), so a slow Redis can't hang the scrape.
pub const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);

/// One label, e.g. `("product", "H100-SXM5-80GB")`.
pub type Label = (&'static str, String);
/// A gauge per value of one label.
pub type GaugeBy1 = Family<[Label; 1], Gauge>;
/// A gauge per value of two labels.
pub type GaugeBy2 = Family<[Label; 2], Gauge>;
/// A fractional gauge per value of one label.
pub type GaugeF64By1 = Family<[Label; 1], Gauge<f64, std::sync::atomic::AtomicU64>>;
/// A counter per value of one label.
pub type CounterBy1 = Family<[Label; 1], Counter>;
/// A counter per value of two labels.
pub type CounterBy2 = Family<[Label; 2], Counter>;

/// Something that refreshes gauges from the state when `/metrics` is scraped.
pub trait Sample: Send + Sync + 'static {
    /// Reads the state and sets the gauges.
    ///
    /// # Errors
    /// When the state can't be read; the gauges keep their previous values.
    fn sample(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// A service's metrics: its registry, the RPC figures, and the samplers of its business gauges.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Mutex<Registry>,
    rpc: RpcMetrics,
    samplers: Mutex<Vec<Arc<dyn Sample>>>,
    /// When the samplers last ran (serialises concurrent scrapes, too).
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    sample_errors: Counter,
}

/// The figures the edge layer records for every call.
#[derive(Clone)]
pub struct RpcMetrics {
    handled: Family<[Label; 3], Counter>,
    latency: Family<[Label; 2], Histogram>,
    in_flight: Gauge,
    shed: Counter,
    deadline_exceeded: Counter,
    streams_open: Gauge,
    streams_refused: Counter,
    streams_idle_closed: Counter,
    auth_refused: Family<[Label; 1], Counter>,
    signature_checks: Counter,
    known: Arc<std::sync::RwLock<HashSet<String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Splits `/pkg.Service/Method` into (`pkg.Service`, `Method`).
fn split_path(path: &str) -> (&str, &str) {
    let p = path.strip_prefix('/').unwrap_or(path);
    p.split_once('/').unwrap_or((p, ""))
}

impl RpcMetrics {
    fn new(registry: &mut Registry) -> Self {
        let handled = Family::<[Label; 3], Counter>::default();
        registry.register(
            "grpc_server_handled",
            "Calls answered, by service, method and gRPC status code (code is the status the call started \
             its response with; for streams, that is the status of opening the stream)",
            handled.clone(),
        );
        let latency = Family::<[Label; 2], Histogram>::new_with_constructor(|| {
            // 250 µs .. ~16 s
            Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
        });
        registry.register_with_unit(
            "grpc_server_handling",
            "Time from the call's arrival to its response headers, by service and method",
            Unit::Seconds,
            latency.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("grpc_server_in_flight", "Calls being served right now", in_flight.clone());
        let shed = Counter::default();
        registry.register(
            "chipgate_grpc_shed",
            "Calls answered RESOURCE_EXHAUSTED at once because the global concurrency limit was reached",
            shed.clone(),
        );
        let deadline_exceeded = Counter::default();
        registry.register(
            "chipgate_grpc_deadline_exceeded",
            "Calls the edge answered DEADLINE_EXCEEDED (their outcome is unknown to the caller)",
            deadline_exceeded.clone(),
        );
        let streams_open = Gauge::default();
        registry.register(
            "chipgate_grpc_streams_open",
            "Streaming calls open right now (WatchStock, WatchOrders, Health/Watch, reflection)",
            streams_open.clone(),
        );
        let streams_refused = Counter::default();
        registry.register(
            "chipgate_grpc_streams_refused",
            "Streaming calls refused RESOURCE_EXHAUSTED by the global or per-caller stream quota",
            streams_refused.clone(),
        );
        let streams_idle_closed = Counter::default();
        registry.register(
            "chipgate_grpc_streams_idle_closed",
            "Streams the server ended because nothing was sent on them for the idle bound",
            streams_idle_closed.clone(),
        );
        let auth_refused = Family::<[Label; 1], Counter>::default();
        registry.register(
            "chipgate_auth_refused",
            "Calls refused before the policy table: UNAUTHENTICATED by reason (TOKEN_MISSING, TOKEN_EXPIRED, \
             TOKEN_NOT_YET_VALID, TOKEN_INVALID), or AUTH_FAILURE_BUDGET when the peer address failed too often",
            auth_refused.clone(),
        );
        let signature_checks = Counter::default();
        registry.register(
            "chipgate_auth_signature_checks",
            "Bearer tokens verified with an Ed25519 signature check (tokens seen before are remembered)",
            signature_checks.clone(),
        );
        RpcMetrics {
            handled,
            latency,
            in_flight,
            shed,
            deadline_exceeded,
            streams_open,
            streams_refused,
            streams_idle_closed,
            auth_refused,
            signature_checks,
            known: Default::default(),
        }
    }

    /// Declares the method paths this server serves; only these get their own series.
    pub fn know(&self, paths: impl IntoIterator<Item = String>) {
        let mut known = self.known.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        known.extend(paths);
    }

    fn labels(&self, path: &str) -> (String, String) {
        let known = self.known.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.contains(path) {
            let (s, m) = split_path(path);
            (s.to_string(), m.to_string())
        } else {
            ("unknown".to_string(), "unknown".to_string())
        }
    }

    /// A call started.
    pub fn started(&self) {
        self.in_flight.inc();
    }

    /// A call that [`started`](Self::started) finished with status `code` (its name, e.g. `OK`) after
    /// `elapsed`.
    pub fn finished(&self, path: &str, code: &'static str, elapsed: Duration) {
        self.in_flight.dec();
        self.answered(path, code, elapsed);
    }

    /// A call answered with status `code` (its name) after `elapsed`, e.g. one shed without reaching
    /// a handler.
    pub fn answered(&self, path: &str, code: &'static str, elapsed: Duration) {
        let (service, method) = self.labels(path);
        self.handled
            .get_or_create(&[
                ("grpc_service", service.clone()),
                ("grpc_method", method.clone()),
                ("grpc_code", code.into()),
            ])
            .inc();
        self.latency
            .get_or_create(&[("grpc_service", service), ("grpc_method", method)])
            .observe(elapsed.as_secs_f64());
    }

    /// A call was shed.
    pub fn shed(&self) {
        self.shed.inc();
    }

    /// The edge answered DEADLINE_EXCEEDED.
    pub fn deadline_exceeded(&self) {
        self.deadline_exceeded.inc();
    }

    /// A stream opened (`true`) or ended (`false`).
    pub fn stream_open(&self, open: bool) {
        if open {
            self.streams_open.inc();
        } else {
            self.streams_open.dec();
        }
    }

    /// A streaming call was refused by a stream quota.
    pub fn stream_refused(&self) {
        self.streams_refused.inc();
    }

    /// A stream was ended for being idle.
    pub fn stream_idle_closed(&self) {
        self.streams_idle_closed.inc();
    }

    /// A call was refused before the policy table, for `reason` (one of a fixed set).
    pub fn auth_refused(&self, reason: &'static str) {
        self.auth_refused.get_or_create(&[("reason", reason.to_string())]).inc();
    }

    /// A token was verified with a signature check.
    pub fn signature_checked(&self) {
        self.signature_checks.inc();
    }
}

/// The canonical name of a numeric `grpc-status` (bounded: anything else is `UNKNOWN`).
pub fn grpc_code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "6" => "ALREADY_EXISTS",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "10" => "ABORTED",
        "11" => "OUT_OF_RANGE",
        "12" => "UNIMPLEMENTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "15" => "DATA_LOSS",
        "16" => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// An empty registry with the RPC figures registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let rpc = RpcMetrics::new(&mut registry);
        let sample_errors = Counter::default();
        registry.register(
            "chipgate_metrics_sample_errors",
            "Scrapes whose state-derived gauges could not be refreshed (they kept their previous values)",
            sample_errors.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry: Mutex::new(registry),
                rpc,
                samplers: Mutex::new(Vec::new()),
                refreshed: tokio::sync::Mutex::new(None),
                sample_errors,
            }),
        }
    }

    /// The per-call figures (the edge layer records them).
    pub fn rpc(&self) -> &RpcMetrics {
        &self.inner.rpc
    }

    /// Registers `metric` under `name` (counters get `_total` appended) and hands it back.
    pub fn register<M: Metric + Clone>(&self, name: &str, help: &str, metric: M) -> M {
        lock(&self.inner.registry).register(name, help, metric.clone());
        metric
    }

    /// Registers `metric` with a unit suffix (e.g. `_seconds`) and hands it back.
    pub fn register_with_unit<M: Metric + Clone>(&self, name: &str, help: &str, unit: Unit, metric: M) -> M {
        lock(&self.inner.registry).register_with_unit(name, help, unit, metric.clone());
        metric
    }

    /// A gauge per value of one label.
    pub fn gauge_by(&self, name: &str, help: &str) -> GaugeBy1 {
        self.register(name, help, GaugeBy1::default())
    }

    /// A gauge per value of two labels.
    pub fn gauge_by2(&self, name: &str, help: &str) -> GaugeBy2 {
        self.register(name, help, GaugeBy2::default())
    }

    /// A fractional gauge per value of one label.
    pub fn gauge_f64_by(&self, name: &str, help: &str) -> GaugeF64By1 {
        self.register(name, help, GaugeF64By1::default())
    }

    /// A single gauge.
    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.register(name, help, Gauge::default())
    }

    /// A single counter.
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        self.register(name, help, Counter::default())
    }

    /// A counter per value of one label.
    pub fn counter_by(&self, name: &str, help: &str) -> CounterBy1 {
        self.register(name, help, CounterBy1::default())
    }

    /// A counter per value of two labels.
    pub fn counter_by2(&self, name: &str, help: &str) -> CounterBy2 {
        self.register(name, help, CounterBy2::default())
    }

    /// A histogram of seconds with buckets from 1 ms to about 1 h.
    pub fn seconds_histogram(&self, name: &str, help: &str) -> Histogram {
        self.register_with_unit(name, help, Unit::Seconds, Histogram::new(exponential_buckets(0.001, 2.0, 22)))
    }

    /// Adds a sampler run on scrape.
    pub fn add_sampler(&self, sampler: impl Sample) {
        lock(&self.inner.samplers).push(Arc::new(sampler));
    }

    /// Runs the samplers (unless they ran less than [`MIN_REFRESH`] ago).
    pub async fn refresh(&self) {
        let mut last = self.inner.refreshed.lock().await;
        if last.is_some_and(|t| t.elapsed() < MIN_REFRESH) {
            return;
        }
        let samplers: Vec<Arc<dyn Sample>> = lock(&self.inner.samplers).clone();
        for s in samplers {
            match tokio::time::timeout(SAMPLE_TIMEOUT, s.sample()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.inner.sample_errors.inc();
                    tracing::warn!(error = %e, "can't refresh state-derived metrics; keeping the previous values");
                }
                Err(_) => {
                    self.inner.sample_errors.inc();
                    tracing::warn!(timeout = ?SAMPLE_TIMEOUT, "refreshing state-derived metrics timed out");
                }
            }
        }
        *last = Some(Instant::now());
    }

    /// Refreshes and renders everything in the Prometheus/OpenMetrics text format.
    pub async fn render(&self) -> String {
        self.refresh().await;
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &lock(&self.inner.registry)) {
            tracing::error!(error = %e, "can't encode metrics");
        }
        out
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], m.render().await) }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Gauge, Arc<std::sync::atomic::AtomicU64>);

    impl Sample for Fixed {
        fn sample(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
            Box::pin(async move {
                let n = self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                self.0.set(n as i64 * 10);
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn unknown_methods_share_one_series_and_codes_are_named() {
        let m = Metrics::new();
        m.rpc().know(["/a.B/C".to_string()]);
        m.rpc().answered("/a.B/C", grpc_code_name("0"), Duration::from_millis(2));
        m.rpc().answered("/a.B/C", grpc_code_name("5"), Duration::from_millis(2));
        m.rpc().answered("/made/up1", grpc_code_name("12"), Duration::from_millis(1));
        m.rpc().answered("/made/up2", grpc_code_name("12"), Duration::from_millis(1));
        let text = m.render().await;
        assert!(
            text.contains(r#"grpc_server_handled_total{grpc_service="a.B",grpc_method="C",grpc_code="OK"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"grpc_code="NOT_FOUND"} 1"#), "{text}");
        assert!(
            text.contains(
                r#"grpc_server_handled_total{grpc_service="unknown",grpc_method="unknown",grpc_code="UNIMPLEMENTED"} 2"#
            ),
            "{text}"
        );
        assert!(!text.contains("made"), "{text}");
        assert!(text.contains("grpc_server_handling_seconds_bucket"), "{text}");
    }

    #[tokio::test]
    async fn samplers_run_on_scrape_but_not_more_than_once_a_second() {
        let m = Metrics::new();
        let g = m.gauge("chipgate_thing", "a thing");
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        m.add_sampler(Fixed(g, runs.clone()));
        assert!(m.render().await.contains("chipgate_thing 10"));
        assert!(m.render().await.contains("chipgate_thing 10"), "a second scrape right away reuses the sample");
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
