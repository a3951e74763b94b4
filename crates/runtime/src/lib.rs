//! The server runtime every chipgate service runs on, so that the three binaries behave alike.
//!
//! It owns the parts of a production gRPC service that are not business logic: configuration from
//! flags and environment ([`config`]), logs and traces ([`telemetry`]), Prometheus metrics and the admin
//! port that serves them ([`metrics`]), the per-request context with request ids,
//! deadlines and W3C trace context carried through gRPC metadata ([`context`]), the edge layer that
//! enforces deadlines and a global concurrency limit with load shedding ([`edge`]), gRPC health that
//! tells the truth ([`health`]), reflection and graceful shutdown ([`server`]), and the shared helpers
//! for rich gRPC errors ([`errors`]), input validation ([`validate`]), paging ([`paging`]) and
//! retry-safe mutations ([`idempotency`]). The licensing, inventory and orders services, the dev
//! cluster and the test harness all build on it.

pub mod auth;
pub mod config;
pub mod context;
pub mod edge;
pub mod errors;
pub mod health;
pub mod hub;
pub mod idempotency;
pub mod known;
pub mod locks;
pub mod metrics;
pub mod paging;
pub mod periodic;
pub mod policy;
pub mod ratelimit;
pub mod records;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod txn;
pub mod validate;

pub use context::RequestContext;
pub use metrics::Metrics;
pub use server::{ServerConfig, ServiceSpec, serve};
pub use shutdown::Shutdown;
