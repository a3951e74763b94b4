//! The cleanup worker: carries out the releases orders owe licensing and inventory.
//!
//! A move that gives up quota or stock (cancel, expiry, unwind) records what it owes in the order, in
//! the same commit ([`chipgate_domain::orders::PendingRelease`]). This worker sends the releases (which
//! are idempotent per order and generation), then clears what was settled. A crash anywhere in between
//! only means the release is sent again.

use chipgate_runtime::service::Records;
use std::time::Duration;

use chipgate_domain::ids::{OrderId, Sku};
use chipgate_domain::orders::OrderRecord;
use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::{RequestContext, Shutdown};
use chipgate_state::{Backend, CommitError, Txn};

use crate::clients::rpc;
use crate::{Error, Orders, book, keys};

/// Orders settled per round.
const ROUND: usize = 2000;

/// Settles owed releases until shutdown: when woken, and every half second.
pub(crate) async fn run(svc: Orders, shutdown: Shutdown) {
    let ctx = RequestContext::background("cleanup", None);
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            () = svc.inner.cleanup_wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        loop {
            match svc.cleanup_once(&ctx).await {
                Ok(n) if n >= ROUND => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = ?e, "cleanup round failed; retrying");
                    break;
                }
            }
        }
    }
}

impl Orders {
    /// One round: the first owed release of up to [`ROUND`] orders of each product. Returns how many
    /// were settled.
    pub(crate) async fn cleanup_once(&self, ctx: &RequestContext) -> Result<usize, Error> {
        let mut settled = 0;
        for sku in self.store().smembers(&keys::products()).await? {
            // Products registered by placements, whose SKUs were parsed on entry.
            settled += self.cleanup_product(ctx, &Sku::from_trusted(sku)).await?;
        }
        Ok(settled)
    }

    /// The first owed release of up to [`ROUND`] orders of product `sku` (cleared in one transaction
    /// of its partition).
    async fn cleanup_product(&self, ctx: &RequestContext, sku: &Sku) -> Result<usize, Error> {
        let mut ids = self.store().smembers(&keys::cleanup(sku)).await?;
        ids.truncate(ROUND);
        if ids.is_empty() {
            return Ok(0);
        }
        let order_keys: Vec<String> = ids.iter().map(|id| keys::order(&OrderId::from_trusted(id.as_str()))).collect();
        let orders: Vec<(u64, OrderRecord)> = self.load_orders(&order_keys).await?.into_iter().flatten().collect();
        // One release per order per round (a batch may not name an order twice).
        let mut quota = Vec::new();
        let mut holds = Vec::new();
        let mut reason = String::from("released by orders");
        for (_, o) in &orders {
            let Some(p) = o.pending.first() else { continue };
            reason.clone_from(&p.reason);
            if p.quota {
                quota.push(lpb::ReleaseItem {
                    order_id: o.id.clone(),
                    generation: p.generation,
                    product_sku: o.sku.clone(),
                });
            }
            if p.hold {
                holds.push(ipb::ReleaseItem {
                    order_id: o.id.clone(),
                    generation: p.generation,
                    product_sku: o.sku.clone(),
                });
            }
        }
        if !quota.is_empty() {
            let msg = lpb::BatchReleaseQuotaRequest {
                request_id: String::new(),
                items: quota,
                reason: reason.clone(),
                unless_confirmed: false,
            };
            rpc!(ctx, self.inner.peers.licensing, batch_release_quota, msg).map_err(Error::Peer)?;
        }
        if !holds.is_empty() {
            let msg = ipb::BatchReleaseReservationsRequest {
                request_id: String::new(),
                items: holds,
                reason,
                unless_confirmed: false,
            };
            rpc!(ctx, self.inner.peers.inventory, batch_release_reservations, msg).map_err(Error::Peer)?;
        }
        // Clear what was released. A concurrent change to one of these orders makes the commit fail:
        // read again and clear what still matches (whatever no longer matches is settled next round).
        let released: std::collections::HashMap<&str, &chipgate_domain::orders::PendingRelease> =
            orders.iter().filter_map(|(_, o)| o.pending.first().map(|p| (o.id.as_str(), p))).collect();
        for _attempt in 0..5 {
            let current: Vec<(u64, OrderRecord)> = self.load_orders(&order_keys).await?.into_iter().flatten().collect();
            let mut settled = 0;
            let mut t = Txn::new();
            let mut events = book::Events::traced(ctx);
            for (ver, o) in &current {
                match (o.pending.first(), released.get(o.id.as_str())) {
                    (None, _) => {
                        // Listed but owing nothing: drop the stale entry.
                        t.srem(keys::cleanup(sku), &o.id);
                    }
                    (Some(p), Some(done)) if p == *done => {
                        let mut new = o.clone();
                        new.pending.remove(0);
                        new.update_ms = now_ms();
                        book::write(&mut t, &mut events, *ver, Some(&o.before()), &new);
                        settled += 1;
                    }
                    _ => {}
                }
            }
            events.flush(&mut t);
            match self.store().commit(&t).await {
                Ok(_) => return Ok(settled),
                Err(CommitError::Conflict { .. }) => continue,
                Err(e) => return Err(Error::Internal(e.to_string())),
            }
        }
        Ok(0)
    }
}
