//! The orders service's metrics.
//!
//! Read from the state when `/metrics` is scraped (every replica reports the same cluster-wide
//! figures; aggregate with `max`): orders by state; per product the awaiting queues, the backlog and
//! the orders holding quota, and the units each buyer holds (its share under the product's allocation
//! policy); the event streams' pending entries and lag for the `orders` group; the
//! release outbox; and the latest waves' progress, including the time from publish to the last of
//! their orders settled.
//!
//! Counted by this replica's code (sum across replicas): events processed by stream and kind, and
//! reconciliation rounds with their duration. Its own view (aggregate with `max`): per product, passes
//! failed in a row and the age of the last good pass.

use chipgate_runtime::service::Records;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, Weak};

use chipgate_domain::ids::{BuyerId, Sku, WaveId};
use chipgate_domain::orders::OrderStatus;
use chipgate_proto::orders::v1 as pb;
use chipgate_runtime::Metrics;
use chipgate_runtime::metrics::{
    CounterBy1, CounterBy2, GaugeBy1, GaugeBy2, GaugeF64By1, GaugeMetric as Gauge, HistogramMetric, Sample,
};
use chipgate_state::Backend;

use crate::consumer::{GROUP, Source};
use crate::convert::state_to;
use crate::{Inner, Orders, keys};

/// Waves whose progress is shown (the latest by publish time).
const WAVES_SHOWN: i64 = 5;

/// What the service's own code counts.
#[derive(Clone)]
pub(crate) struct Counters {
    /// Events applied, by stream and kind.
    pub events: CounterBy2,
    /// Reconciliation rounds, by product.
    pub rounds: CounterBy1,
    /// How long rounds take.
    pub round_seconds: HistogramMetric,
    /// Batches of orders rounds cut, by product and size (`full`, or `shared` while other products'
    /// placements waited).
    pub batches: CounterBy2,
    /// Buyers whose waiting orders rounds judged, by product and how: `new_orders` (from the first
    /// new one on, marked only by their placements), `all`, or `again` (all once more, in the same
    /// round, their reasons left stale).
    pub buyers_judged: CounterBy2,
}

pub(crate) struct Sampler {
    svc: Weak<Inner>,
    orders: GaugeBy1,
    per_product: GaugeBy2,
    streams: GaugeBy2,
    outbox: Gauge,
    waves: GaugeBy2,
    settle: GaugeF64By1,
    propagation_failures: GaugeBy1,
    propagation_age: GaugeF64By1,
    allocated: GaugeBy2,
    /// Waves currently shown (their series are removed when they drop out).
    shown: Mutex<Vec<String>>,
    /// (product, buyer) series of allocated units shown (removed when a buyer holds nothing).
    allocated_shown: Mutex<std::collections::BTreeSet<(String, String)>>,
}

/// Buyers shown per product in `chipgate_allocated_units`, the largest holders (the rest are summed
/// under `buyer="_other"`, so a product with many buyers can't blow up the series count).
const BUYERS_SHOWN: usize = 50;

/// Registers the gauges and counters in `metrics`.
pub(crate) fn register(metrics: &Metrics) -> (Counters, Sampler) {
    let counters = Counters {
        events: metrics.counter_by2(
            "chipgate_events_processed",
            "Licensing and inventory events applied by this replica, by stream and kind",
        ),
        rounds: metrics
            .counter_by("chipgate_reconcile_rounds", "Reconciliation rounds run by this replica, by product"),
        round_seconds: metrics.seconds_histogram("chipgate_reconcile_round", "How long a reconciliation round takes"),
        batches: metrics.counter_by2(
            "chipgate_reconcile_batches",
            "Batches of orders cut by reconciliation rounds, by product and size: full (--batch-size), or shared \
             (--shared-batch-size, while placements of other products waited on this replica)",
        ),
        buyers_judged: metrics.counter_by2(
            "chipgate_reconcile_buyers_judged",
            "Buyers whose waiting orders reconciliation rounds judged, by product and how: new_orders (only \
             the orders placed since, behind where the earlier ones stood), all, or again (all once more in \
             the same round, their reasons left stale by a later order)",
        ),
    };
    let sampler = Sampler {
        svc: Weak::new(),
        orders: metrics.gauge_by("chipgate_orders", "Orders by state"),
        per_product: metrics.gauge_by2(
            "chipgate_product_orders",
            "Per product: orders awaiting a licence (queue=awaiting), holding quota and waiting for stock \
             in the backlog (queue=backlog), and holding unconfirmed quota (queue=holding)",
        ),
        streams: metrics.gauge_by2(
            "chipgate_event_stream",
            "The orders consumer group on each event stream: entries delivered and not yet acknowledged \
             (figure=pending) and entries not yet delivered (figure=lag)",
        ),
        outbox: metrics
            .gauge("chipgate_release_outbox", "Orders that owe a quota or stock release not yet carried out"),
        waves: metrics.gauge_by2(
            "chipgate_wave_orders",
            "The latest waves' orders: concerned (waiting when it was published), evaluated, reserved, \
             backordered, awaiting",
        ),
        settle: metrics.gauge_f64_by(
            "chipgate_wave_settle_seconds",
            "The latest waves: seconds from publish until the last order it concerned was settled",
        ),
        propagation_failures: metrics.gauge_by(
            "chipgate_propagation_failing_passes",
            "Per product, on this replica: passes failed in a row (0 once one succeeds); \
             alert when it stays above 0 (the product's orders are not being moved)",
        ),
        propagation_age: metrics.gauge_f64_by(
            "chipgate_propagation_last_pass_age_seconds",
            "Per product, on this replica: seconds since a pass last succeeded (or since passes began \
             failing, if none has)",
        ),
        allocated: metrics.gauge_by2(
            "chipgate_allocated_units",
            "Per product and buyer: units the buyer holds (held, committed, shipped) — its share of the \
             product under the allocation policy; the largest holders, the rest as buyer=_other",
        ),
        shown: Mutex::new(Vec::new()),
        allocated_shown: Mutex::new(std::collections::BTreeSet::new()),
    };
    (counters, sampler)
}

impl Sampler {
    /// Points the sampler at the service (weakly: the service owns the metrics that own the sampler).
    pub(crate) fn attach(mut self, svc: &Orders) -> Self {
        self.svc = std::sync::Arc::downgrade(&svc.inner);
        self
    }

    async fn read(&self) -> Result<(), String> {
        let Some(inner) = self.svc.upgrade() else { return Ok(()) };
        let svc = Orders { inner };
        let store = svc.store();
        let e = |e: &dyn std::fmt::Display| e.to_string();

        // This replica's own view first: it needs no store, so it stays true while the store is down.
        for (sku, h) in svc.inner.scheduler.health() {
            self.propagation_failures.get_or_create(&[("product", sku.clone())]).set(i64::from(h.consecutive_failures));
            if let Some(t) = h.last_ok.or(h.failing_since) {
                self.propagation_age.get_or_create(&[("product", sku)]).set(t.elapsed().as_secs_f64());
            }
        }

        // Products registered by placements, whose SKUs were parsed on entry.
        let products: Vec<Sku> =
            store.smembers(&keys::products()).await.map_err(|x| e(&x))?.into_iter().map(Sku::from_trusted).collect();
        // Each product keeps its own indexes (in its partition): the figures add up over them.
        for s in OrderStatus::ALL {
            let mut n = 0;
            for sku in &products {
                n += store.zcard(&keys::orders_in(sku, s)).await.map_err(|x| e(&x))?;
            }
            self.orders.get_or_create(&[("state", state_label(s))]).set(n as i64);
        }
        let mut outbox = 0;
        for sku in &products {
            outbox += store.smembers(&keys::cleanup(sku)).await.map_err(|x| e(&x))?.len();
        }

        let mut allocated: std::collections::BTreeMap<(String, String), u64> = std::collections::BTreeMap::new();
        for sku in products {
            let mut awaiting = 0;
            for b in store.smembers(&keys::awaiting_buyers(&sku)).await.map_err(|x| e(&x))? {
                awaiting += store.zcard(&keys::awaiting(&sku, &BuyerId::from_trusted(b))).await.map_err(|x| e(&x))?;
            }
            let backlog = store.zcard(&keys::backlog(&sku)).await.map_err(|x| e(&x))?;
            let mut holding = 0;
            for key in keys::holding(&sku) {
                holding += store.zcard(&key).await.map_err(|x| e(&x))?;
            }
            for (queue, n) in [("awaiting", awaiting), ("backlog", backlog), ("holding", holding)] {
                self.per_product.get_or_create(&[("product", sku.to_string()), ("queue", queue.into())]).set(n as i64);
            }
            let mut held: Vec<(String, u64)> =
                svc.allocated_by_buyer(&sku).await.map_err(|x| e(&x))?.into_iter().collect();
            held.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let other: u64 = held.iter().skip(BUYERS_SHOWN).map(|(_, n)| n).sum();
            held.truncate(BUYERS_SHOWN);
            if other > 0 {
                held.push(("_other".to_string(), other));
            }
            allocated.extend(held.into_iter().map(|(buyer, n)| ((sku.to_string(), buyer), n)));
        }
        {
            let mut shown = self.allocated_shown.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for gone in shown.iter().filter(|k| !allocated.contains_key(*k)) {
                self.allocated.remove(&[("product", gone.0.clone()), ("buyer", gone.1.clone())]);
            }
            for ((sku, buyer), n) in &allocated {
                self.allocated.get_or_create(&[("product", sku.clone()), ("buyer", buyer.clone())]).set(*n as i64);
            }
            *shown = allocated.into_keys().collect();
        }

        // Licensing's and inventory's figures add up over their products' streams.
        let mut sources = vec![Source::Licensing];
        sources.extend(
            chipgate_contract::licensing_products::all(store)
                .await
                .map_err(|x| e(&x))?
                .into_iter()
                .map(Source::LicensingProduct),
        );
        sources.extend(
            chipgate_contract::catalogue::all(store).await.map_err(|x| e(&x))?.into_iter().map(Source::Inventory),
        );
        let mut figures: std::collections::BTreeMap<&str, (u64, Option<u64>)> = std::collections::BTreeMap::new();
        for source in &sources {
            let info = match (store.group_info(&source.stream(), GROUP).await, source) {
                (Ok(info), _) => info,
                // A product listed since its consumer last looked has no group yet: nothing to count.
                (Err(_), Source::Inventory(_) | Source::LicensingProduct(_)) => continue,
                (Err(x), Source::Licensing) => return Err(e(&x)),
            };
            let f = figures.entry(source.name()).or_insert((0, Some(0)));
            f.0 += info.pending;
            f.1 = f.1.zip(info.lag).map(|(a, b)| a + b);
        }
        for (name, (pending, lag)) in figures {
            self.streams.get_or_create(&[("stream", name.into()), ("figure", "pending".into())]).set(pending as i64);
            if let Some(lag) = lag {
                self.streams.get_or_create(&[("stream", name.into()), ("figure", "lag".into())]).set(lag as i64);
            }
        }

        self.outbox.set(outbox as i64);

        let latest: Vec<String> = store
            .zrange(&keys::waves(), 0, WAVES_SHOWN - 1, true)
            .await
            .map_err(|x| e(&x))?
            .into_iter()
            .map(|(w, _)| w)
            .collect();
        for w in &latest {
            let p = svc
                .get_wave_progress(pb::GetWaveProgressRequest { wave_id: w.clone() })
                .await
                .map_err(|x| format!("{x:?}"))?
                .progress
                .unwrap_or_default();
            for (figure, n) in [
                ("concerned", p.orders_concerned),
                ("evaluated", p.orders_evaluated),
                ("reserved", p.orders_reserved),
                ("backordered", p.orders_backordered),
                ("awaiting", p.orders_awaiting),
            ] {
                self.waves.get_or_create(&[("wave", w.clone()), ("figure", figure.into())]).set(n as i64);
            }
            let published = svc.wave_published_ms(&WaveId::from_trusted(w.as_str())).await?;
            if let (Some(settled), Some(published)) = (p.settle_time, published) {
                let settled_ms = settled.seconds * 1000 + i64::from(settled.nanos) / 1_000_000;
                let seconds = (settled_ms - published as i64).max(0) as f64 / 1000.0;
                self.settle.get_or_create(&[("wave", w.clone())]).set(seconds);
            }
        }
        let mut shown = self.shown.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for old in shown.iter().filter(|w| !latest.contains(w)) {
            for figure in ["concerned", "evaluated", "reserved", "backordered", "awaiting"] {
                self.waves.remove(&[("wave", old.clone()), ("figure", figure.into())]);
            }
            self.settle.remove(&[("wave", old.clone())]);
        }
        *shown = latest;
        Ok(())
    }
}

fn state_label(s: OrderStatus) -> String {
    let name = state_to(s).as_str_name();
    name.strip_prefix("ORDER_STATE_").unwrap_or(name).to_string()
}

impl Sample for Sampler {
    fn sample(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(self.read())
    }
}
