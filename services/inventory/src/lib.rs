//! The inventory service: what exists, and who holds it.
//!
//! It owns the product catalogue, the stock of each product (which always adds up), supply receipts
//! (idempotent per receipt id), and holds: an order's reservation of units, taken strictly in the
//! order asked, never beyond what is available under any concurrency, expiring on its own when not
//! confirmed in time (a sweeper driven by an expiry index in the state store, so it survives
//! restarts). Every stock change appends an event to the inventory stream in the same atomic step; the
//! orders service hands freed stock to its backlogs from it, and `WatchStock` streams it.
//!
//! The binary `chipgate-inventory` serves it; the dev cluster and the test harness run it in process
//! through [`Inventory::start`] and [`spec`].

mod catalogue;
mod convert;
mod holds;
pub mod keys;
mod metrics;
mod seen;
mod service;
mod stock;
mod sweeper;
mod watch;

use chipgate_runtime::service::Records;
use std::sync::Arc;
use std::time::Duration;

use chipgate_domain::ids::{OrderId, Sku};
use chipgate_domain::inventory::{HoldRecord, StockRecord};
use chipgate_proto::inventory::v1 as pb;
use chipgate_runtime::idempotency::Idempotency;
use chipgate_runtime::locks::KeyedLocks;
use chipgate_runtime::records::{self, Loaded};
use chipgate_runtime::server::{ServerConfig, ServiceSpec};
use chipgate_runtime::{RequestContext, Shutdown};
use chipgate_state::{Backend, Store, Txn};
use prost::Message;

pub use catalogue::{CatalogueEntry, load_catalogue_file, parse_catalogue};
pub use chipgate_runtime::service::Error;

/// Fully-qualified gRPC service name.
pub const SERVICE_NAME: &str = "chipgate.inventory.v1.InventoryService";

/// Default port of the inventory service.
pub const DEFAULT_PORT: u16 = 50052;

/// Largest batch of holds in one call.
pub const MAX_BATCH: usize = 10_000;

/// Largest amount of units in one receipt or hold.
pub const MAX_UNITS: u64 = 1_000_000_000;

/// Hold time when the caller gives none.
pub const DEFAULT_HOLD_SECONDS: u32 = 900;

/// Longest hold time.
pub const MAX_HOLD_SECONDS: u32 = 86_400;

/// Events kept in the stream (approximately).
const MAX_EVENTS: u64 = 1_000_000;

/// Background behaviour.
#[derive(Clone, Debug)]
pub struct Options {
    /// How often the expiry sweeper looks for expired holds.
    pub sweep_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { sweep_interval: Duration::from_millis(200) }
    }
}

/// The inventory service. Clones share state.
#[derive(Clone)]
pub struct Inventory {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    idem: Idempotency,
    locks: KeyedLocks,
    watch: chipgate_runtime::hub::StreamHub<pb::WatchStockResponse>,
    /// Products whose event streams the watch hub follows.
    followed: chipgate_runtime::known::Known<Sku>,
    shutdown: Shutdown,
    /// Its Prometheus metrics.
    metrics: chipgate_runtime::Metrics,
    /// What its code counts.
    counters: metrics::Counters,
    /// Each product's stock as this replica last read or wrote it (see [`seen`]).
    stock_seen: seen::StockSeen,
}

/// The routes and names to serve inventory with [`chipgate_runtime::serve`].
pub fn spec(service: Inventory, config: &ServerConfig) -> ServiceSpec {
    let metrics = service.metrics().clone();
    let server = pb::inventory_service_server::InventoryServiceServer::new(service)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    ServiceSpec { names: vec![SERVICE_NAME], routes: tonic::service::Routes::new(server), metrics, checks: Vec::new() }
}

impl Inventory {
    /// Reads the holds of product `sku`'s `orders`, one answer per order: each stored form is read
    /// with the product and order its key names ([`HoldRecord::from_stored`]).
    async fn load_holds(&self, sku: &Sku, orders: &[OrderId]) -> Result<Vec<Loaded<HoldRecord>>, Error> {
        let hkeys: Vec<String> = orders.iter().map(|o| keys::hold(sku, o)).collect();
        let raw = self.store().get(&hkeys).await?;
        Ok(records::decode_each(raw, &hkeys, |i, data| {
            HoldRecord::from_stored(data, sku.as_str(), orders[i].as_str())
        })?)
    }

    /// Reads the hold of product `sku`'s order `order`: NOT_FOUND (a "reservation") when there is none.
    async fn require_hold(&self, sku: &Sku, order: &OrderId) -> Result<(u64, HoldRecord), Error> {
        self.load_holds(sku, std::slice::from_ref(order))
            .await?
            .pop()
            .flatten()
            .ok_or_else(|| Error::not_found("reservation", order))
    }

    /// The service on `store`, with its expiry sweeper and stock-watch hub running until `shutdown`.
    pub fn start(store: Store, shutdown: Shutdown, options: Options) -> Self {
        let metrics = chipgate_runtime::Metrics::new();
        let counters = metrics::register(&metrics, store.clone());
        let svc = Inventory {
            inner: Arc::new(Inner {
                metrics,
                counters,
                stock_seen: seen::StockSeen::default(),
                store,
                idem: Idempotency::new(keys::SPACE, Duration::from_secs(24 * 3600)),
                locks: KeyedLocks::new(),
                watch: chipgate_runtime::hub::StreamHub::default(),
                followed: chipgate_runtime::known::Known::default(),
                shutdown: shutdown.clone(),
            }),
        };
        tokio::spawn(sweeper::run(svc.clone(), shutdown.clone(), options.sweep_interval));
        tokio::spawn(watch::run(svc.clone(), shutdown));
        svc
    }

    /// Its Prometheus metrics (serve them with [`chipgate_runtime::metrics::serve`]).
    pub fn metrics(&self) -> &chipgate_runtime::Metrics {
        &self.inner.metrics
    }

    /// An order's hold and its product's stock as one consistent pair: the hold is read again after the
    /// stock and both are read again if it changed in between. Otherwise a decision could pair a hold with
    /// stock that already shows the hold's next step (two copies of one ShipReservation at once: the
    /// second saw the hold CONFIRMED and the stock already shipped, and answered INTERNAL).
    async fn hold_with_stock(
        &self,
        sku: &Sku,
        order_id: &OrderId,
    ) -> Result<((u64, HoldRecord), (u64, StockRecord)), Error> {
        const READS: u32 = 16;
        for _ in 0..READS {
            let (hver, h) = self.require_hold(sku, order_id).await?;
            let stock = self.stock_of(sku, "product_sku").await?;
            let (again, _) = self.require_hold(sku, order_id).await?;
            if again == hver {
                return Ok(((hver, h), stock));
            }
        }
        Err(Error::Contention { attempts: READS })
    }

    /// The stock of a product that must exist (unknown products are bad input in mutating calls).
    async fn stock_of(&self, sku: &Sku, field: &str) -> Result<(u64, StockRecord), Error> {
        match self.load::<StockRecord>(keys::stock(sku)).await? {
            Some(s) => Ok(s),
            None => Err(Error::invalid(field, format!("unknown product {sku:?}; add it to the catalogue first"))),
        }
    }
}

/// Appends a stock change's event, in the change's transaction. `stock_version` is the version the
/// stock record will have after the commit.
fn emit(
    txn: &mut Txn,
    ctx: &RequestContext,
    now_ms: u64,
    stock: &StockRecord,
    stock_version: u64,
    kind: pb::inventory_event::Kind,
) {
    let event = pb::InventoryEvent {
        time: chipgate_runtime::time::ts_opt(now_ms),
        request_id: ctx.request_id.clone(),
        actor: ctx.actor.clone(),
        traceparent: ctx.traceparent(),
        stock: Some(convert::stock_to(stock, stock_version)),
        kind: Some(kind),
    };
    txn.xadd(
        // A stock record's product was parsed when the product was upserted.
        keys::events(&Sku::from_trusted(stock.sku.as_str())),
        vec![(chipgate_contract::EVENT_FIELD.to_string(), event.encode_to_vec())],
        Some(MAX_EVENTS),
    );
}

/// Writes the hold of product `sku`'s order `order_id`, guarded by the version it was read at: in
/// its stored form ([`HoldRecord::to_stored`], read back by [`Inventory::load_holds`] with the key's
/// product and order) when the record's own are exactly those, else whole (so nothing the key
/// doesn't say is ever left out).
fn put_hold(t: &mut Txn, sku: &Sku, order_id: &OrderId, read_version: u64, h: &HoldRecord) {
    let data = if h.sku == sku.as_str() && h.order_id == order_id.as_str() { h.to_stored() } else { encode(h) };
    t.replace(keys::hold(sku, order_id), read_version, data);
}

fn encode<M: Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

impl chipgate_runtime::service::Records for Inventory {
    fn store(&self) -> &Store {
        &self.inner.store
    }
}
