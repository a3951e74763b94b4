//! Inventory's metrics: stock per product read from the state when `/metrics` is scraped (every
//! replica reports the same cluster-wide figures; aggregate with `max`), and counters of what this
//! replica did (sum across replicas).

use std::future::Future;
use std::pin::Pin;

use chipgate_domain::inventory::StockRecord;
use chipgate_runtime::metrics::{CounterMetric as Counter, GaugeBy2, GaugeMetric as Gauge, Sample};
use chipgate_runtime::{Metrics, records};
use chipgate_state::{Backend, Store};

use crate::keys;

/// What the service's own code counts.
#[derive(Clone)]
pub(crate) struct Counters {
    /// Holds the sweeper expired.
    pub holds_expired: Counter,
    /// Units those holds freed.
    pub units_expired: Counter,
    /// Batches of holds planned from the stock as this replica left it, without reading it.
    pub stock_guesses: Counter,
    /// Of those, the ones whose commit found the stock or a hold changed elsewhere (read, then done).
    pub stock_guesses_missed: Counter,
    /// Batches whose commit lost a race to another replica and took the product's hold turn.
    pub turns_taken: Counter,
    /// Batches that found the hold turn taken by another replica and gave way.
    pub turns_given: Counter,
}

struct Sampler {
    store: Store,
    stock: GaugeBy2,
    unconfirmed: Gauge,
}

/// Registers inventory's metrics in `metrics`; hands back the counters the code bumps.
pub(crate) fn register(metrics: &Metrics, store: Store) -> Counters {
    metrics.add_sampler(Sampler {
        store,
        stock: metrics.gauge_by2(
            "chipgate_stock_units",
            "Units per product: available, held (for orders, unconfirmed), committed (confirmed, not \
             shipped), shipped, received (all supply ever received)",
        ),
        unconfirmed: metrics.gauge(
            "chipgate_holds_unconfirmed",
            "Holds placed and not yet confirmed (they expire unless their order is confirmed in time)",
        ),
    });
    Counters {
        holds_expired: metrics.counter("chipgate_holds_expired", "Holds the expiry sweeper expired"),
        units_expired: metrics.counter("chipgate_hold_units_expired", "Units freed by expired holds"),
        stock_guesses: metrics.counter(
            "chipgate_hold_batches_unread",
            "Batches of holds committed from the stock as this replica last left it, without reading it first",
        ),
        stock_guesses_missed: metrics.counter(
            "chipgate_hold_batches_unread_missed",
            "Batches planned without reading whose commit found the stock or a hold changed elsewhere (then read \
             and planned again)",
        ),
        turns_taken: metrics.counter(
            "chipgate_hold_turns_taken",
            "Batches of holds that lost a race to another replica's commit and made replicas planning without \
             reading read first (a loser's turn)",
        ),
        turns_given: metrics.counter(
            "chipgate_hold_turns_given",
            "Batches of holds that found the product's hold turn taken by another replica and waited for it to \
             commit first",
        ),
    }
}

impl Sampler {
    async fn read(&self) -> Result<(), String> {
        let skus = chipgate_contract::catalogue::all(&self.store).await.map_err(|e| e.to_string())?;
        let stock_keys: Vec<String> = skus.iter().map(keys::stock).collect();
        let stocks = records::load_many::<StockRecord>(&self.store, &stock_keys).await.map_err(|e| e.to_string())?;
        for (sku, stock) in skus.iter().zip(stocks) {
            let Some((_, s)) = stock else { continue };
            for (kind, v) in [
                ("available", s.available),
                ("held", s.held),
                ("committed", s.committed),
                ("shipped", s.shipped),
                ("received", s.received),
            ] {
                self.stock.get_or_create(&[("product", sku.to_string()), ("kind", kind.to_string())]).set(v as i64);
            }
        }
        let mut unconfirmed = 0;
        for sku in &skus {
            unconfirmed += self.store.zcard(&keys::expiry(sku)).await.map_err(|e| e.to_string())?;
        }
        self.unconfirmed.set(unconfirmed as i64);
        Ok(())
    }
}

impl Sample for Sampler {
    fn sample(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(self.read())
    }
}
