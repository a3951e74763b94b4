//! The cross-service suite, one test binary (one link of the whole stack instead of one per file):
//! each module boots the real services — in process on port 0, or as real processes — against a
//! private real `redis-server`, and talks gRPC to them, or drives them with real external clients
//! (grpcurl, Python grpcio). `cargo test -p chipgate-tests --test suite <module>::` runs one module.
//!
//! The traces test is its own target (`tests/tests/traces.rs`): it installs the process-wide
//! tracing subscriber with an OpenTelemetry exporter, which must not race the other tests' subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod allocation;
mod archive;
mod audit_checkpoints;
mod authz;
mod closing_gates;
mod concurrency;
mod crash;
mod drain;
mod failover;
mod faults;
mod fuzz_smoke;
mod grpcurl;
mod hardening;
mod health;
mod inventory_api;
mod licensing_api;
mod lifecycle;
mod metrics;
mod mtls;
mod partitions;
mod placements;
mod propagation;
mod python_client;
mod stalls;
mod streams;
mod triggers;
mod wave_progress;
