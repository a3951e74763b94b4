//! Logging: `tracing` with a pretty human format for the dev cluster and JSON (with the current span's
//! fields, so request and trace ids land in every line) for production. The level comes from
//! `RUST_LOG` (default `info`).

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when the output is a terminal.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Later calls (several services in one process, tests) are no-ops.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let result = match format {
        LogFormat::Pretty => tracing_subscriber::fmt().with_env_filter(filter).with_target(false).try_init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .try_init(),
    };
    // Err means a subscriber is already installed, which is fine.
    let _ = result;
}

/// Installs a subscriber for tests: warnings only unless `RUST_LOG` says otherwise, written through
/// the test harness's capture.
pub fn init_for_tests() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}
