//! Bulk loading: many orders straight into the awaiting queues, as if each had been placed and found
//! no licence. It exists for benchmarks and data migrations, where placing a million orders one call at
//! a time would measure the loader rather than the system; it writes exactly what placement and a
//! first evaluation would have written (records, queues, indexes, history), in large atomic batches.

use chipgate_domain::allocation::Standing;
use chipgate_domain::ids::{BuyerId, Sku};
use chipgate_domain::licensing::Failure;
use chipgate_domain::orders::{Cause, CauseKind, OrderRecord, OrderStatus, TransitionRecord};
use chipgate_runtime::service::Records;
use chipgate_runtime::time::now_ms;
use chipgate_state::{Backend, Txn};
use prost::Message;

use crate::{Error, Orders, book, keys};

/// One order to load.
#[derive(Clone, Debug)]
pub struct BulkOrder {
    /// Buyer.
    pub buyer_id: String,
    /// Product.
    pub sku: String,
    /// Units.
    pub units: u64,
}

/// Orders per transaction.
const BATCH: usize = 1000;

impl Orders {
    /// Loads `orders` as AWAITING_LICENSE (reason: no licence), in the given order; returns their ids.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn bulk_load_awaiting(&self, orders: &[BulkOrder]) -> Result<Vec<String>, Error> {
        // Product by product (each in its partition), the ids answered in the given order.
        let mut by_product: std::collections::BTreeMap<&str, Vec<usize>> = std::collections::BTreeMap::new();
        for (i, o) in orders.iter().enumerate() {
            by_product.entry(o.sku.as_str()).or_default().push(i);
        }
        let mut ids = vec![String::new(); orders.len()];
        for (sku, positions) in by_product {
            // A bulk load is the operator's own data (benchmarks, migrations), taken as it is, as
            // ever: it is not checked like a caller's request.
            let sku = &Sku::from_trusted(sku);
            let mut buyers: Vec<&str> = positions.iter().map(|&i| orders[i].buyer_id.as_str()).collect();
            buyers.sort_unstable();
            buyers.dedup();
            for b in buyers {
                self.register(&BuyerId::from_trusted(b), sku).await?;
            }
            for chunk in positions.chunks(BATCH) {
                let last = self.store().incr(&keys::seq(sku), chunk.len() as u64).await?;
                let first = last - chunk.len() as u64 + 1;
                let now = now_ms();
                let mut t = Txn::new();
                let mut events = book::Events::default();
                for (n, &i) in chunk.iter().enumerate() {
                    let o = &orders[i];
                    let seq = first + n as u64;
                    let id = keys::order_id(sku, seq);
                    let no_licence = vec![Failure::no_licence(&o.buyer_id)];
                    let placed = Cause::new(CauseKind::Placed, &id);
                    let record = OrderRecord {
                        id: id.to_string(),
                        request_id: format!("bulk:{id}"),
                        buyer_id: o.buyer_id.clone(),
                        sku: o.sku.clone(),
                        units: o.units,
                        status: OrderStatus::AwaitingLicense as i32,
                        reasons: no_licence.clone(),
                        generation: 1,
                        seq,
                        create_ms: now,
                        update_ms: now,
                        history: vec![
                            TransitionRecord {
                                from: OrderStatus::Unspecified as i32,
                                to: OrderStatus::Pending as i32,
                                at_ms: now,
                                cause: Some(placed.clone()),
                                ..Default::default()
                            },
                            TransitionRecord {
                                from: OrderStatus::Pending as i32,
                                to: OrderStatus::AwaitingLicense as i32,
                                at_ms: now,
                                cause: Some(placed),
                                failures: no_licence,
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    };
                    book::write(&mut t, &mut events, 0, None, &record);
                    ids[i] = id.into_string();
                }
                // Waiting orders no standing knows of (and no mark announces): their buyers' next
                // round judges all their orders. Written, not deleted, so that a round that read the
                // standing before this load fails to write its own over it.
                let mut loaded: Vec<&str> = chunk.iter().map(|&i| orders[i].buyer_id.as_str()).collect();
                loaded.sort_unstable();
                loaded.dedup();
                let judge_all = Standing { first_recheck: 1, ..Standing::default() }.encode_to_vec();
                for b in loaded {
                    t.put(keys::standing(sku, &BuyerId::from_trusted(b)), judge_all.clone());
                }
                events.flush(&mut t);
                self.store().commit(&t).await.map_err(|e| Error::Internal(e.to_string()))?;
            }
        }
        Ok(ids)
    }
}
