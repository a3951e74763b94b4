//! Logs and traces.
//!
//! Logs: `tracing` with a pretty human format for the dev cluster and JSON for production; every line
//! carries the fields of the span it was written in, so request id, trace id and span id land in each
//! one. The level comes from `RUST_LOG` (default `info`).
//!
//! Traces: every call and every piece of background work runs in a span that belongs to a W3C trace
//! ([`RequestContext`] carries the ids). The trace crosses services in gRPC metadata (`traceparent`)
//! and crosses the event streams in each entry, so a wave's propagation — the publish call, the
//! consumers that read its event, the reconciliation rounds, the quota and stock calls they make — is
//! one trace. When an OTLP endpoint is configured, spans are exported with OpenTelemetry (batched, off
//! the request path); when it isn't, no OpenTelemetry code runs at all and the ids only go to the logs.

use std::sync::atomic::{AtomicBool, Ordering};

use clap::ValueEnum;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::context::{RequestContext, parse_traceparent};

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable; coloured only when standard output is a terminal (a file or a pipe gets plain
    /// text).
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Whether spans go to OpenTelemetry (set once, when a subscriber with the exporter is installed).
static OTEL: AtomicBool = AtomicBool::new(false);

/// True when spans are exported with OpenTelemetry.
pub fn otel_enabled() -> bool {
    OTEL.load(Ordering::Relaxed)
}

/// Keeps the trace exporter alive; dropping it flushes the spans not yet exported.
#[must_use = "dropping the guard shuts the trace exporter down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "trace exporter did not shut down cleanly");
        }
    }
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct TelemetryError(String);

/// Installs the global subscriber: logs in `format`, and — when `otlp_endpoint` is set (e.g.
/// `http://otel-collector:4317`) — spans exported over OTLP/gRPC as `service_name`. Later calls
/// (several services in one process, tests) leave the first subscriber in place.
///
/// Must run inside the tokio runtime (the exporter's batch task runs on it).
///
/// # Errors
/// When the exporter can't be built (e.g. a malformed endpoint).
pub fn init(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    service_name: &str,
) -> Result<TelemetryGuard, TelemetryError> {
    let provider = match otlp_endpoint.filter(|e| !e.is_empty()) {
        None => None,
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(std::time::Duration::from_secs(5))
                .build()
                .map_err(|e| TelemetryError(e.to_string()))?;
            let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name.to_string()).build();
            Some(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build())
        }
    };
    Ok(init_with_provider(format, provider))
}

/// Installs the global subscriber with an already built tracer provider; `None` means logs only.
pub fn init_with_provider(format: LogFormat, provider: Option<SdkTracerProvider>) -> TelemetryGuard {
    install(Output::Stdout(format), provider, "info")
}

/// Installs a subscriber for tests: warnings only unless `RUST_LOG` says otherwise, written through
/// the test harness's capture.
pub fn init_for_tests() {
    let _ = install(Output::TestWriter, None, "warn");
}

/// Like [`init_for_tests`], with spans exported through `provider` (e.g. to an in-memory exporter).
pub fn init_for_tests_with_provider(provider: SdkTracerProvider) -> TelemetryGuard {
    install(Output::TestWriter, Some(provider), "warn")
}

enum Output {
    Stdout(LogFormat),
    TestWriter,
}

/// Logs are filtered by `RUST_LOG` (default `default_level`); exported spans separately, by their own
/// filter (chipgate's spans at info), so quieter logs don't thin out the traces.
fn install(output: Output, provider: Option<SdkTracerProvider>, default_level: &str) -> TelemetryGuard {
    use tracing_subscriber::Layer;
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("chipgate"))
            .with_filter(tracing_subscriber::filter::Targets::new().with_target("chipgate", tracing::Level::INFO))
    });
    let with_otel = otel.is_some();
    let registry = tracing_subscriber::registry().with(otel);
    let logs = match output {
        Output::Stdout(LogFormat::Pretty) => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
        Output::Stdout(LogFormat::Json) => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .boxed(),
        Output::TestWriter => tracing_subscriber::fmt::layer().with_test_writer().boxed(),
    };
    let result = registry.with(logs.with_filter(log_filter)).try_init();
    // Err means a subscriber is already installed, which is fine (and then ours isn't, so don't
    // claim OpenTelemetry is on).
    if result.is_ok() && with_otel {
        OTEL.store(true, Ordering::Relaxed);
    }
    TelemetryGuard { provider }
}

fn remote(trace_id: &str, span_id: &str) -> Option<SpanContext> {
    let sc = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// Ties `span` to the trace in `ctx`: with OpenTelemetry on, the span's parent becomes the caller's
/// span (`ctx.parent_span_id`), each `links` traceparent (other causes of the same work) becomes a
/// link, and `ctx` takes the exported span's ids so that whatever this work causes names the span
/// that really exists. The span's `trace_id` and `span_id` fields are (re)recorded either way.
///
/// The span must declare `trace_id` and `span_id` fields (e.g. `= tracing::field::Empty`).
pub fn attach(span: &tracing::Span, ctx: &mut RequestContext, links: &[&str]) {
    if otel_enabled() && !span.is_disabled() {
        if let Some(parent) = ctx.parent_span_id.as_deref().and_then(|p| remote(&ctx.trace_id, p)) {
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
        }
        for l in links {
            if let Some(sc) = parse_traceparent(l).and_then(|(t, s)| remote(&t, &s)) {
                span.add_link(sc);
            }
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            ctx.trace_id = sc.trace_id().to_string();
            ctx.span_id = sc.span_id().to_string();
        }
    }
    span.record("trace_id", ctx.trace_id.as_str());
    span.record("span_id", ctx.span_id.as_str());
}

/// A span for background work done under `ctx` (an event consumed, a reconciliation round), named
/// `what` (with `detail`, e.g. the product) and tied to its trace as [`attach`] does (which updates `ctx`'s ids).
pub fn work_span(ctx: &mut RequestContext, what: &'static str, detail: &str, links: &[&str]) -> tracing::Span {
    let span = tracing::info_span!(
        "work",
        otel.name = what,
        work = what,
        detail = %detail,
        request_id = %ctx.request_id,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    attach(&span, ctx, links);
    span
}
