//! The orders service: which order may take which chip, and when.
//!
//! It places orders, keeps the awaiting queue of each buyer and product and the backlog of each
//! product (both in placement order), takes licence quota (licensing) and stock (inventory) for them in
//! batches, and re-evaluates exactly the orders a change concerns — a published wave, finalised terms,
//! a reinstated licence, a domestic purchase, an export authorisation, a lifted embargo, stock received
//! or released — by consuming the licensing and inventory event streams through consumer groups.
//!
//! How it stays correct with several replicas and crashes:
//! * Every change to an order is one atomic commit guarded by the order's version ([`book::write`]
//!   keeps queues, indexes, wave figures and the transition stream in step with it).
//! * Work on a product's queues happens in *passes* under a per-product lease; quota and stock calls
//!   carry the lease's fencing token, so a stalled replica whose lease expired can't act after its
//!   successor did ([`reconcile`]).
//! * What to look at is recorded as dirty marks after each change is committed and consumed before the
//!   world is read ([`marks`]), so nothing is skipped; events are acknowledged only once their marks
//!   are stored, and a dead consumer's pending events are claimed by another replica.
//! * Quota and holds are idempotent per (order, generation); releases an order owes are recorded with
//!   the move that owes them and carried out by a worker ([`cleanup`]), so no crash leaks either.

mod allocation_policy;
mod answers;
pub mod archive;
mod book;
mod bulk;
mod cleanup;
mod clients;
mod consumer;
mod convert;
pub mod keys;
mod lifecycle;
mod marks;
mod metrics;
mod place;
mod previews;
mod products;
mod queries;
mod queues;
mod reconcile;
mod scheduler;
mod service;
mod waves;

use std::sync::Arc;
use std::time::Duration;

use chipgate_proto::orders::v1 as pb;
use chipgate_runtime::hub::StreamHub;
use chipgate_runtime::idempotency::Idempotency;
use chipgate_runtime::server::{ServerConfig, ServiceSpec};
use chipgate_runtime::{RequestContext, Shutdown};
use chipgate_state::Store;
use tokio::sync::Notify;

pub use book::EventBatch;
pub use bulk::BulkOrder;
pub use chipgate_runtime::service::Error;
pub use clients::Peers;
pub use scheduler::PROPAGATION_HEALTH;

/// Fully-qualified gRPC service name.
pub const SERVICE_NAME: &str = "chipgate.orders.v1.OrderService";

/// Default port of the orders service.
pub const DEFAULT_PORT: u16 = 50053;

/// Largest single order, in units.
pub const MAX_UNITS: u64 = 1_000_000_000;

/// How the service behaves in the background.
#[derive(Clone, Debug)]
pub struct Options {
    /// Hold time asked of inventory for each order once fully held.
    pub hold_seconds: u32,
    /// How often idle products are checked for marks left by other replicas.
    pub tick: Duration,
    /// Orders per quota or stock call.
    pub chunk: usize,
    /// Orders per batch while placements of other products wait on this replica (0, or not below
    /// `chunk`: always `chunk`). Each batch is one commit script (and one quota and one hold script)
    /// during which Redis runs nothing else, so a wave's full batches make every call of another
    /// product's round wait milliseconds; smaller batches while someone waits keep those short, and
    /// a wave that has the replica to itself still runs full ones. Measured with placements of
    /// another product during a 100k wave (BENCHMARKS.md): against 500, 100 took their p99 from
    /// 85–92 ms to 32–33 ms, the wave alone unchanged (round 5); on a later machine 50 took it from
    /// 55–84 ms (at 100) to 40–66 ms, p50 24–33 → 16–21 ms, for about 12 % less wave throughput
    /// while they wait, and 25 was worse on both (round 8). Hence 50 by default.
    pub shared_chunk: usize,
    /// Waiting orders a step of a wave's snapshot copies at most (small queues whole, a larger
    /// queue a page per step). Each step is one script during which Redis serves nobody else; the
    /// snapshot used to be one, which at a million waiting orders kept every other call waiting two
    /// seconds. Measured (BENCHMARKS.md, round 9): a step of 5,000 takes 15–20 ms of Redis, 10,000
    /// about 30 ms.
    pub snapshot_step: u64,
    /// Lifetime of a product lease (renewed while a pass runs).
    pub lease_ttl: Duration,
    /// Events pending this long with a consumer are taken over (the consumer is presumed dead).
    pub claim_idle: Duration,
    /// How often the catalogue and licensing's products are read for streams no consumer follows
    /// yet, at the latest. A desk event and a product new to this replica look at once (see
    /// [`consumer::run_all`]); this is the fallback for a product's first events that come with
    /// neither.
    pub discover_every: Duration,
    /// Every product is fully re-evaluated this often, as a safety net (0: never).
    pub full_reconcile_every: Duration,
    /// How long PlaceOrder waits for the first evaluation before answering with the order as it stands.
    pub place_wait: Duration,
    /// How long a product's passes may keep failing before the propagation health check
    /// (`chipgate.orders.v1.Propagation`) reports NOT_SERVING.
    pub unhealthy_after: Duration,
    /// The most a ListOrders page carries, encoded: a page ends early rather than outgrow what clients
    /// accept (orders with long histories: 1,000 of them made 4.6 MB in a soak; gRPC clients take
    /// 4 MiB by default).
    pub page_bytes: usize,
    /// Archiving closed orders out of Redis (None: they stay in Redis).
    pub archive: Option<archive::ArchiveOptions>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            hold_seconds: 900,
            tick: Duration::from_millis(100),
            // 500, not 2,000: each batch is one commit script (and one quota and one hold script),
            // and Redis runs nothing else while it does. Measured (BENCHMARKS.md, batch size): the
            // p99 of another product's placements during a 100k wave is about half at 500, for a
            // wave 0–30 % slower. (Stale reasons within a round, which the model checker once found
            // at 500, happened at any size; a round now judges those orders again.)
            chunk: 500,
            // Measured: see the field's documentation.
            shared_chunk: 50,
            snapshot_step: 5_000,
            lease_ttl: Duration::from_secs(10),
            claim_idle: Duration::from_secs(30),
            discover_every: Duration::from_secs(2),
            full_reconcile_every: Duration::from_secs(600),
            place_wait: Duration::from_secs(5),
            unhealthy_after: Duration::from_secs(60),
            page_bytes: 3 << 20,
            archive: None,
        }
    }
}

/// The orders service. Clones share state.
#[derive(Clone)]
pub struct Orders {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    peers: Peers,
    idem: Idempotency,
    options: Options,
    scheduler: scheduler::Scheduler,
    hub: StreamHub<book::EventBatch>,
    shutdown: Shutdown,
    /// This replica's consumer name in the event consumer groups.
    consumer: String,
    cleanup_wake: Notify,
    /// Wakes the search for product streams to follow ([`consumer::run_all`]) before its next
    /// periodic look.
    discover: Notify,
    /// Its Prometheus metrics.
    metrics: chipgate_runtime::Metrics,
    /// What its code counts.
    counters: metrics::Counters,
    /// Products found in inventory's catalogue (orders name one).
    products: chipgate_runtime::known::Known<chipgate_domain::ids::Sku>,
    /// The propagation health check's verdict (see [`scheduler::watch_health`]).
    propagation_ok: tokio::sync::watch::Sender<bool>,
    /// Products and buyers this replica knows are registered, products whose transitions it follows.
    known: products::Registered,
    /// The orders archiver's figures and health.
    archive_status: chipgate_archive::status::Status,
    /// Placements waiting for their first evaluation, and what this replica's rounds decided.
    answers: answers::Answers,
}

/// The routes and names to serve orders with [`chipgate_runtime::serve`].
pub fn spec(service: Orders, config: &ServerConfig) -> ServiceSpec {
    let metrics = service.metrics().clone();
    let propagation = chipgate_runtime::health::HealthCheck {
        name: scheduler::PROPAGATION_HEALTH,
        healthy: service.inner.propagation_ok.subscribe(),
    };
    let archive = service.inner.archive_status.health_check(archive::ARCHIVE_HEALTH);
    let server = pb::order_service_server::OrderServiceServer::new(service)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    ServiceSpec {
        names: vec![SERVICE_NAME],
        routes: tonic::service::Routes::new(server),
        metrics,
        checks: vec![propagation, archive],
    }
}

impl Orders {
    /// The service on `store`, talking to `peers`, with its reconciler, event consumers, cleanup
    /// worker and watch hub running until `shutdown`.
    pub fn start(store: Store, peers: Peers, shutdown: Shutdown, options: Options) -> Self {
        let consumer = format!("orders-{}-{:08x}", std::process::id(), fastrand::u32(..));
        let metrics = chipgate_runtime::Metrics::new();
        let (counters, sampler) = metrics::register(&metrics);
        let archive_status = chipgate_archive::status::Status::register(&metrics, "orders", Duration::ZERO);
        let svc = Orders {
            inner: Arc::new(Inner {
                metrics: metrics.clone(),
                counters,
                store,
                peers,
                idem: Idempotency::new(keys::SPACE, Duration::from_secs(24 * 3600)),
                options,
                scheduler: scheduler::Scheduler::default(),
                hub: StreamHub::default(),
                shutdown: shutdown.clone(),
                consumer,
                cleanup_wake: Notify::new(),
                discover: Notify::new(),
                products: chipgate_runtime::known::Known::default(),
                propagation_ok: tokio::sync::watch::Sender::new(true),
                known: products::Registered::default(),
                archive_status,
                answers: answers::Answers::default(),
            }),
        };
        metrics.add_sampler(sampler.attach(&svc));
        tokio::spawn(scheduler::run(svc.clone(), shutdown.clone()));
        tokio::spawn(consumer::run_all(svc.clone(), shutdown.clone()));
        tokio::spawn(cleanup::run(svc.clone(), shutdown.clone()));
        tokio::spawn(scheduler::watch_health(svc.clone(), svc.inner.propagation_ok.clone(), shutdown.clone()));
        svc.spawn_archiver(shutdown.clone());
        tokio::spawn(products::follow_all(svc.clone(), shutdown));
        svc
    }

    /// Its Prometheus metrics (serve them with [`chipgate_runtime::metrics::serve`]).
    pub fn metrics(&self) -> &chipgate_runtime::Metrics {
        &self.inner.metrics
    }

    fn options(&self) -> &Options {
        &self.inner.options
    }

    /// Runs one reconciliation round for `sku` now (tests and tools; the service runs them itself).
    pub async fn reconcile_now(&self, sku: &str) {
        self.inner.scheduler.request(sku);
    }

    /// Carries out owed releases now; returns how many orders were settled (tests and tools).
    ///
    /// # Errors
    /// When the store or a peer fails.
    pub async fn cleanup_now(&self) -> Result<usize, Error> {
        self.cleanup_once(&RequestContext::background("cleanup", None)).await
    }
}

/// An orders service on `store` whose peers are never called (unit tests of what it does with
/// its store alone).
#[cfg(test)]
pub(crate) fn test_service(store: Store, options: Options) -> (Orders, Shutdown) {
    let shutdown = Shutdown::new();
    let peers = clients::Peers::connect(
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        1 << 20,
        chipgate_runtime::auth::TokenSource::None,
        None,
    )
    .expect("well-formed urls");
    (Orders::start(store, peers, shutdown.clone(), options), shutdown)
}

/// An empty answer for transactions whose result is their effect.
#[derive(Clone, PartialEq, prost::Message)]
struct EffectOnly {}

impl chipgate_runtime::service::Records for Orders {
    fn store(&self) -> &Store {
        &self.inner.store
    }
}
