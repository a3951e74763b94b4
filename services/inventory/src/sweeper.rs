//! The expiry sweeper: gives back holds that were complete but not confirmed in time.
//!
//! It works from the expiry index in the state store (complete, unconfirmed holds scored by expiry),
//! not from Redis key-expiry notifications (which are not delivered reliably), so it survives
//! restarts and several replicas can sweep at once: each expiry commits under the hold's and the
//! stock's versions, so a hold expires exactly once.

use chipgate_runtime::service::Records;
use std::ops::Bound;
use std::time::Duration;

use chipgate_domain::ids::{OrderId, Sku};
use chipgate_domain::inventory::{HoldStatus, StockRecord};
use chipgate_proto::inventory::v1 as pb;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::{RequestContext, Shutdown};
use chipgate_state::{Backend, Txn};

use crate::convert::hold_to;
use crate::{Error, Inventory, emit, encode, keys, put_hold};

/// Holds looked at per sweep.
const SWEEP_BATCH: usize = 1000;

/// Sweeps every `interval` until shutdown.
pub(crate) async fn run(svc: Inventory, shutdown: Shutdown, interval: Duration) {
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match svc.sweep_once().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "expired unconfirmed holds"),
            Err(e) => tracing::warn!(error = ?e, "expiry sweep failed; retrying next round"),
        }
    }
}

impl Inventory {
    /// Expires every hold that is due now, product by product (each product's expiry index lives in
    /// its partition); returns how many expired.
    ///
    /// # Errors
    /// When the state store fails.
    pub async fn sweep_once(&self) -> Result<usize, Error> {
        let mut expired = 0;
        for sku in chipgate_contract::catalogue::all(self.store()).await? {
            expired += self.sweep_product(&sku).await?;
        }
        Ok(expired)
    }

    async fn sweep_product(&self, sku: &Sku) -> Result<usize, Error> {
        let now = now_ms();
        let due = self
            .store()
            .zrange_by_score(&keys::expiry(sku), Bound::Unbounded, Bound::Included(now as f64), SWEEP_BATCH)
            .await?;
        if due.is_empty() {
            return Ok(0);
        }
        // The index lists orders whose ids were parsed when their holds were asked for.
        let orders: Vec<OrderId> = due.into_iter().map(|(o, _)| OrderId::from_trusted(o)).collect();
        let mut held = Vec::new();
        let mut stale = Vec::new();
        for (o, h) in orders.iter().zip(self.load_holds(sku, &orders).await?) {
            match h {
                Some((_, h)) if h.status() == HoldStatus::Held => held.push(o.clone()),
                // Confirmed, released or gone: the index entry is left over.
                _ => stale.push(o.clone()),
            }
        }
        if !stale.is_empty() {
            let mut t = Txn::new();
            for o in &stale {
                t.zrem(keys::expiry(sku), o);
            }
            self.store().commit(&t).await.map_err(|e| Error::Internal(e.to_string()))?;
        }
        if held.is_empty() {
            return Ok(0);
        }
        self.expire(sku, &held).await
    }

    async fn expire(&self, sku: &Sku, orders: &[OrderId]) -> Result<usize, Error> {
        let ctx = RequestContext::background("expiry-sweeper", None);
        let (answer, _) = self
            .run_txn(None, || async {
                let now = now_ms();
                let (sver, mut stock) = self.require::<StockRecord>(keys::stock(sku), "product", sku).await?;
                let holds = self.load_holds(sku, orders).await?;
                let mut t = Txn::new();
                let mut gone = Vec::new();
                let mut units = 0;
                for (hver, mut h) in holds.into_iter().flatten() {
                    if !h.is_expired(now) {
                        continue;
                    }
                    stock.release_held(h.held).map_err(|e| Error::Internal(format!("stock of {sku}: {e}")))?;
                    units += h.held;
                    h.set_status(HoldStatus::Expired);
                    h.update_ms = now;
                    h.release_reason = "not confirmed before the hold expired".to_string();
                    put_hold(&mut t, sku, &OrderId::from_trusted(h.order_id.as_str()), hver, &h);
                    t.zrem(keys::expiry(sku), &h.order_id);
                    gone.push(hold_to(&h));
                }
                if gone.is_empty() {
                    return Ok((Txn::new(), ExpiredCount { n: 0, units: 0 }));
                }
                stock.update_ms = now;
                t.replace(keys::stock(sku), sver, encode(&stock));
                let n = gone.len() as u64;
                emit(
                    &mut t,
                    &ctx,
                    now,
                    &stock,
                    sver + 1,
                    pb::inventory_event::Kind::HoldsExpired(pb::HoldsExpired {
                        reservations: gone,
                        units_freed: units,
                    }),
                );
                Ok((t, ExpiredCount { n, units }))
            })
            .await?;
        self.inner.counters.holds_expired.inc_by(answer.n);
        self.inner.counters.units_expired.inc_by(answer.units);
        Ok(answer.n as usize)
    }
}

/// How many holds one expiry transaction expired (a message so the transaction loop can carry it).
#[derive(Clone, PartialEq, prost::Message)]
struct ExpiredCount {
    #[prost(uint64, tag = "1")]
    n: u64,
    #[prost(uint64, tag = "2")]
    units: u64,
}
