//! The licensing service: who may import what, on which conditions.
//!
//! It owns import-licence applications and the approval queue, approval waves (drafted, then published:
//! decided at once, put in force product by product), licences and their conditions, the quota each licence grants (taken per order, strictly
//! in order, never beyond the grant under any concurrency), the vendor's export authorisations, customs'
//! import policy, the buyers' domestic-purchase ledger, and a tamper-evident audit log. State is
//! partitioned by product, with a desk for what spans products ([`keys`]). Every change is appended to
//! its partition's event stream and audit chain in the same atomic step as the change; the orders
//! service consumes the streams to re-evaluate the orders a change concerns.
//!
//! The binary `chipgate-licensing` serves it; the dev cluster and the test harness run it in process
//! through [`Licensing::new`] and [`spec`].

mod apps;
pub mod archive;
mod audit;
pub mod checkpoint;
mod convert;
mod gates;
mod guesses;
pub mod keys;
mod licences;
mod metrics;
mod quota;
mod service;
mod waves;
mod worlds;

use chipgate_runtime::service::Records;
use std::sync::Arc;
use std::time::Duration;

use chipgate_domain::ids::Sku;
use chipgate_domain::licensing::Failure;
use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::RequestContext;
use chipgate_runtime::idempotency::Idempotency;
use chipgate_runtime::known::Known;
use chipgate_runtime::locks::KeyedLocks;
use chipgate_runtime::server::{ServerConfig, ServiceSpec};
use chipgate_state::{Backend, Store, Txn};
use prost::Message;

use crate::keys::Part;

pub use chipgate_runtime::service::Error;

/// Fully-qualified gRPC service name.
pub const SERVICE_NAME: &str = "chipgate.licensing.v1.LicensingService";

/// Default port of the licensing service.
pub const DEFAULT_PORT: u16 = 50051;

/// Largest batch of orders one quota call may carry.
pub const MAX_BATCH: usize = 10_000;

/// Largest single order or grant, in units.
pub const MAX_UNITS: u64 = 1_000_000_000;

/// Events kept in the stream (approximately); consumers read far faster than this fills.
const MAX_EVENTS: u64 = 1_000_000;

/// The licensing service. Clones share state.
#[derive(Clone)]
pub struct Licensing {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    idem: Idempotency,
    /// Serialises this replica's quota calls per product, so they don't conflict with each other.
    locks: KeyedLocks,
    /// Serialises this replica's commits per partition: every change appends to its partition's audit
    /// chain, so concurrent commits in one partition would only conflict on the chain's head.
    chains: KeyedLocks,
    /// Products this replica knows are registered in [`keys::products`].
    registered: Known<Sku>,
    /// Which licences the buyers' indexes named when this replica last read them: read beside the
    /// indexes instead of after them ([`guesses`]).
    guesses: guesses::IndexGuesses,
    /// Each product's quota world as this replica last read or wrote it: quota calls decided without
    /// reading first ([`worlds`]).
    worlds: worlds::WorldsSeen,
    /// Its Prometheus metrics.
    metrics: chipgate_runtime::Metrics,
    /// Products found in inventory's catalogue (applications name one).
    products: Known<Sku>,
    /// The key audit checkpoints are signed with (None: unsigned checkpoints, dev only).
    audit_key: Option<chipgate_runtime::auth::Signer>,
    /// The gauges and counters periodic checkpoints feed.
    checkpoints: metrics::CheckpointMetrics,
    /// Quota calls decided without reading first, and the ones that missed.
    counters: metrics::QuotaCounters,
    /// Where the audit log is archived, once set ([`Licensing::use_archive`]).
    archive: std::sync::OnceLock<chipgate_archive::Target>,
    /// The audit archiver's figures and health.
    archive_status: chipgate_archive::status::Status,
}

/// The health name that goes NOT_SERVING when archiving the audit log keeps failing.
pub const ARCHIVE_HEALTH: &str = "chipgate.licensing.v1.Archive";

/// The routes and names to serve licensing with [`chipgate_runtime::serve`].
pub fn spec(service: Licensing, config: &ServerConfig) -> ServiceSpec {
    let metrics = service.metrics().clone();
    let archive = service.inner.archive_status.health_check(ARCHIVE_HEALTH);
    let server = pb::licensing_service_server::LicensingServiceServer::new(service)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    ServiceSpec {
        names: vec![SERVICE_NAME],
        routes: tonic::service::Routes::new(server),
        metrics,
        checks: vec![archive],
    }
}

impl Licensing {
    /// The service on `store`, without an audit key: its audit checkpoints are unsigned (dev only).
    pub fn new(store: Store) -> Self {
        Self::with_audit_key(store, None)
    }

    /// The service on `store`, signing audit checkpoints with `audit_key` (an Ed25519 key kept out of
    /// Redis, so that whoever can write Redis can't forge a checkpoint of a rewritten log).
    pub fn with_audit_key(store: Store, audit_key: Option<chipgate_runtime::auth::Signer>) -> Self {
        let metrics = chipgate_runtime::Metrics::new();
        metrics::register(&metrics, store.clone());
        let checkpoints = metrics::CheckpointMetrics::register(&metrics);
        let counters = metrics::QuotaCounters::register(&metrics);
        let archive_status = chipgate_archive::status::Status::register(&metrics, "audit", Duration::ZERO);
        Licensing {
            inner: Arc::new(Inner {
                metrics,
                store,
                idem: Idempotency::new(keys::SPACE, Duration::from_secs(24 * 3600)),
                locks: KeyedLocks::new(),
                chains: KeyedLocks::new(),
                registered: Known::default(),
                guesses: guesses::IndexGuesses::default(),
                worlds: worlds::WorldsSeen::default(),
                products: Known::default(),
                audit_key,
                checkpoints,
                counters,
                archive: std::sync::OnceLock::new(),
                archive_status,
            }),
        }
    }

    /// The key id of the audit key (`ed25519:…`), or None when checkpoints are unsigned.
    pub fn audit_key_id(&self) -> Option<String> {
        self.inner.audit_key.as_ref().map(|k| checkpoint::key_id(&k.public_key()))
    }

    /// Takes a checkpoint of the audit log `every` so often until `shutdown`, and ships it outside
    /// Redis: one structured log line (heads, root, key id, signature) and gauges per chain (sequence
    /// and a short digest of the head). A chain whose head moved backwards since the previous
    /// checkpoint (a lower sequence, or the same sequence with another hash) is logged as an error and
    /// counted in `chipgate_audit_chain_rollbacks_total`.
    pub fn spawn_audit_checkpoints(
        &self,
        every: Duration,
        shutdown: chipgate_runtime::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let service = self.clone();
        tokio::spawn(async move {
            let mut previous: Option<pb::AuditCheckpoint> = None;
            let mut beat = chipgate_runtime::periodic::Every::new(every.max(Duration::from_millis(10)), shutdown);
            while beat.tick().await {
                match service.audit_checkpoint().await {
                    Ok(cp) => {
                        service.inner.checkpoints.record(&cp, previous.as_ref());
                        previous = Some(cp);
                    }
                    Err(e) => {
                        service.inner.checkpoints.failed();
                        tracing::warn!(error = %e.describe(), "can't take an audit checkpoint");
                    }
                }
            }
        })
    }

    /// Its Prometheus metrics (serve them with [`chipgate_runtime::metrics::serve`]).
    pub fn metrics(&self) -> &chipgate_runtime::Metrics {
        &self.inner.metrics
    }

    /// Allocates `n` ids from a counter; returns the first.
    async fn next_ids(&self, counter: &str, n: u64) -> Result<u64, Error> {
        Ok(self.store().incr(&keys::counter(counter), n).await? - n + 1)
    }

    /// Registers product `sku` in [`keys::products`] (once per replica: an idempotent set add) before a
    /// change in its partition commits, so checkpoints, verification and the orders service's
    /// consumers find every partition that has state.
    async fn register_product(&self, sku: &Sku) -> Result<(), Error> {
        if self.inner.registered.contains(sku) {
            return Ok(());
        }
        self.index_product(&keys::products(), sku).await?;
        self.inner.registered.insert(sku.clone());
        Ok(())
    }

    /// Adds product `sku` to a set in the desk (a set add: idempotent), in its own commit before a
    /// change in the product's partition, so a reader of the set never misses a product with state.
    async fn index_product(&self, index: &str, sku: &Sku) -> Result<(), Error> {
        let mut t = Txn::new();
        t.zadd(index, sku, 0.0);
        self.store().commit(&t).await.map_err(<Error as chipgate_runtime::txn::TxnError>::from_commit)?;
        Ok(())
    }

    /// Every product with a partition.
    async fn products(&self) -> Result<Vec<Sku>, Error> {
        Ok(chipgate_contract::licensing_products::all(self.store()).await?)
    }

    /// Runs one transaction in partition `part` (see [`chipgate_runtime::txn::run`]): this replica's
    /// commits in one partition queue for its audit chain's head instead of conflicting on it, while
    /// commits in different partitions run side by side. A change in a product's partition leaves
    /// the product's quota world, as this replica remembers it ([`worlds`]), to be read again.
    async fn run_in<T, F, Fut>(
        &self,
        part: Part<'_>,
        idem: Option<&chipgate_runtime::txn::IdemKey<'_>>,
        attempt: F,
    ) -> Result<(T, chipgate_state::Committed), Error>
    where
        T: Message + Default + Send,
        F: FnMut() -> Fut + Send,
        Fut: std::future::Future<Output = Result<(Txn, T), Error>> + Send,
    {
        let mut attempt = attempt;
        let done = self.run_in_remembering(part, idem, |_| attempt()).await;
        if let (Part::Product(sku), Ok(_)) = (part, &done) {
            self.inner.worlds.forget(sku);
        }
        done
    }

    /// [`Self::run_in`] for quota calls, which keep what they remember of the world up to date
    /// themselves; each attempt gets the key the previous one's commit conflicted on (see
    /// [`chipgate_runtime::txn::run_chained_seeing`]).
    async fn run_in_remembering<T, F, Fut>(
        &self,
        part: Part<'_>,
        idem: Option<&chipgate_runtime::txn::IdemKey<'_>>,
        attempt: F,
    ) -> Result<(T, chipgate_state::Committed), Error>
    where
        T: Message + Default + Send,
        F: FnMut(Option<String>) -> Fut + Send,
        Fut: std::future::Future<Output = Result<(Txn, T), Error>> + Send,
    {
        if let Part::Product(sku) = part {
            self.register_product(sku).await?;
        }
        let chain = part.audit();
        let _chain = self.inner.chains.lock(&chain.stream).await;
        // Every change here appends to the partition's chain: its head is read beside the attempt's reads.
        chipgate_runtime::txn::run_chained_seeing(self.store(), idem, Some(&chain), attempt).await
    }

    /// 1-based position of an application in the queue (0 when not queued).
    async fn queue_position(&self, application_id: &str) -> Result<u64, Error> {
        Ok(self.store().zrank(&keys::queue(), application_id).await?.map(|r| r + 1).unwrap_or(0))
    }
}

/// Appends the event of a change to its partition's stream, in the change's transaction.
fn emit(txn: &mut Txn, part: Part<'_>, ctx: &RequestContext, now_ms: u64, kind: pb::licensing_event::Kind) {
    let event = pb::LicensingEvent {
        time: chipgate_runtime::time::ts_opt(now_ms),
        request_id: ctx.request_id.clone(),
        actor: ctx.actor.clone(),
        traceparent: ctx.traceparent(),
        kind: Some(kind),
    };
    txn.xadd(
        part.events(),
        vec![(chipgate_contract::EVENT_FIELD.to_string(), event.encode_to_vec())],
        Some(MAX_EVENTS),
    );
}

/// Appends a decision to its partition's audit chain, in the change's transaction.
fn record(
    txn: &mut Txn,
    part: Part<'_>,
    ctx: &RequestContext,
    now_ms: u64,
    action: &str,
    subject: &str,
    detail: String,
) {
    let entry = pb::AuditEntry {
        sequence: 0,
        time: chipgate_runtime::time::ts_opt(now_ms),
        actor: ctx.actor.clone(),
        action: action.to_string(),
        subject: subject.to_string(),
        detail,
        prev_hash: String::new(),
        hash: String::new(),
        request_id: ctx.request_id.clone(),
        idempotency_key: ctx.idempotency_key.clone(),
    };
    txn.audit(&part.audit(), entry.encode_to_vec());
}

fn encode<M: Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

/// Short text for a list of failures (for audit details).
fn failure_codes(f: &[Failure]) -> String {
    f.iter().map(|x| x.condition().api_name().trim_start_matches("CONDITION_")).collect::<Vec<_>>().join(",")
}

impl chipgate_runtime::service::Records for Licensing {
    fn store(&self) -> &Store {
        &self.inner.store
    }
}
