//! The products that have orders, across partitions: an order's own state lives in its product's
//! partition, and the few things that span products — which products have orders (the scheduler,
//! the cleanup worker and the transition watchers walk them) and which products each buyer ordered
//! (where a change about a buyer must look) — live in `{ord}`, registered by a placement in its own
//! idempotent step *before* the order is committed, so nothing can see an order whose product it
//! would not walk.

use std::time::Duration;

use chipgate_domain::ids::{BuyerId, Sku};
use chipgate_runtime::Shutdown;
use chipgate_runtime::known::Known;
use chipgate_runtime::service::Records;
use chipgate_state::{Backend, Txn};
use prost::Message;

use crate::{Error, Orders, book, keys};

/// How often the transition watchers look for products they don't follow yet.
const DISCOVER_EVERY: Duration = Duration::from_secs(2);

/// What this replica already knows is registered or followed (a set only grows).
#[derive(Debug, Default)]
pub(crate) struct Registered {
    registered: Known<(BuyerId, Sku)>,
    followed: Known<Sku>,
}

impl Orders {
    /// Registers that `buyer` orders `sku` (once per replica and pair: a set add, idempotent), and
    /// makes this replica's watchers follow the product's transitions.
    pub(crate) async fn register(&self, buyer: &BuyerId, sku: &Sku) -> Result<(), Error> {
        let pair = (buyer.clone(), sku.clone());
        if !self.inner.known.registered.contains(&pair) {
            let mut t = Txn::new();
            t.sadd(keys::products(), sku);
            t.sadd(keys::buyer_products(buyer), sku);
            // A store that is down is UNAVAILABLE to the caller (retry), like every other commit.
            self.store().commit(&t).await.map_err(<Error as chipgate_runtime::txn::TxnError>::from_commit)?;
            self.inner.known.registered.insert(pair);
        }
        self.follow_transitions(sku).await
    }

    /// Makes the watch hub follow product `sku`'s transitions from now on (once per replica).
    async fn follow_transitions(&self, sku: &Sku) -> Result<(), Error> {
        if self.inner.known.followed.contains(sku) {
            return Ok(());
        }
        let stream = keys::events(sku);
        let from = self.store().xlast_id(&stream).await?;
        if self.inner.known.followed.insert(sku.clone()) {
            // A product new to this replica may have streams its consumers don't follow yet.
            self.discover_soon();
            let svc = self.clone();
            let shutdown = self.inner.shutdown.clone();
            tokio::spawn(async move {
                let decode = |e: &chipgate_state::StreamEntry| {
                    book::EventBatch::decode(e.field(chipgate_contract::TRANSITIONS_FIELD)?).ok()
                };
                svc.inner.hub.follow_from(svc.store().clone(), stream, Some(from), shutdown, decode).await;
            });
        }
        Ok(())
    }
}

/// Follows every product's transitions until shutdown (products that get orders later are found
/// within [`DISCOVER_EVERY`], or at once on the replica that placed them).
pub(crate) async fn follow_all(svc: Orders, shutdown: Shutdown) {
    loop {
        match svc.store().smembers(&keys::products()).await {
            Ok(skus) => {
                for sku in skus {
                    // Products registered by placements, with SKUs parsed on entry.
                    let sku = Sku::from_trusted(sku);
                    if let Err(e) = svc.follow_transitions(&sku).await {
                        tracing::warn!(%sku, error = ?e, "can't follow the product's transitions yet; retrying");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "can't read the products with orders; retrying"),
        }
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(DISCOVER_EVERY) => {}
        }
    }
}
