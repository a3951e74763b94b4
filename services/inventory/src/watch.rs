//! `WatchStock`: one tail of each product's event stream per replica ([`hub::StreamHub`]), fanned out
//! to every watcher, each filtering by product (products added later are followed once the catalogue
//! lists them); every stream ends when the server shuts down (and,
//! like every stream, when idle for the edge's idle bound, or refused over the stream quotas).
//!
//! Stock figures are public (GetStock is open to everyone), but which orders took or gave back
//! stock is each buyer's business: a buyer's watch carries no hold references (the ids of the
//! orders a change concerns). Inventory doesn't know which orders are whose, so a buyer sees none,
//! and follows its own orders with `WatchOrders`. Every other role sees the references.

use chipgate_domain::ids::Sku;
use chipgate_domain::inventory::StockRecord;
use chipgate_proto::inventory::v1 as pb;
use chipgate_runtime::edge::shed::Slot;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::service::Records;
use chipgate_runtime::{RequestContext, Shutdown, hub, validate};
use chipgate_state::Backend;
use prost::Message;
use tonic::Status;

use crate::convert::stock_to;
use crate::holds::reference_of;
use crate::{Error, Inventory, keys};

fn describe(event: pb::InventoryEvent) -> Option<pb::WatchStockResponse> {
    use pb::inventory_event::Kind;
    let (cause, reference) = match event.kind? {
        Kind::ProductUpserted(p) => ("product.upserted", p.product.map(|p| p.sku).unwrap_or_default()),
        Kind::SupplyReceived(r) => ("supply.received", r.receipt.map(|r| r.receipt_id).unwrap_or_default()),
        Kind::HoldsPlaced(h) => ("holds.placed", reference_of(&h.reservations)),
        Kind::HoldsReleased(h) => ("holds.released", reference_of(&h.reservations)),
        Kind::HoldsExpired(h) => ("holds.expired", reference_of(&h.reservations)),
        Kind::HoldsConfirmed(h) => ("holds.confirmed", reference_of(&h.reservations)),
        Kind::HoldsShipped(h) => ("holds.shipped", reference_of(&h.reservations)),
    };
    Some(pb::WatchStockResponse { stock: event.stock, cause: cause.to_string(), reference, time: event.time })
}

/// How often the catalogue is read for products whose streams aren't followed yet.
const DISCOVER_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Follows every product's event stream until shutdown, broadcasting every change; products added
/// later are followed once the catalogue lists them (or a watcher asks for them first).
pub(crate) async fn run(svc: Inventory, shutdown: Shutdown) {
    loop {
        match chipgate_contract::catalogue::all(svc.store()).await {
            Ok(skus) => {
                for sku in skus {
                    if let Err(e) = svc.follow_product(&sku).await {
                        tracing::warn!(%sku, error = ?e, "can't follow the product's stream yet; retrying");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "can't read the catalogue to follow its products' streams; retrying"),
        }
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(DISCOVER_EVERY) => {}
        }
    }
}

impl Inventory {
    /// Whether the watch hub follows product `sku`'s stream already.
    fn follows(&self, sku: &str) -> bool {
        self.inner.followed.contains(sku)
    }

    /// Makes the watch hub follow product `sku`'s stream, from its end as it is now (once per product).
    /// Returns once the starting point is read, so a watcher that subscribed before calling this misses
    /// nothing committed after it.
    async fn follow_product(&self, sku: &Sku) -> Result<(), Error> {
        if self.follows(sku) {
            return Ok(());
        }
        let stream = keys::events(sku);
        let from = self.store().xlast_id(&stream).await?;
        if self.inner.followed.insert(sku.clone()) {
            let decode = |e: &chipgate_state::StreamEntry| match pb::InventoryEvent::decode(
                e.field(chipgate_contract::EVENT_FIELD)?,
            ) {
                Ok(ev) => describe(ev),
                Err(err) => {
                    tracing::warn!(id = %e.id, error = %err, "undecodable inventory event");
                    None
                }
            };
            let svc = self.clone();
            let shutdown = self.inner.shutdown.clone();
            tokio::spawn(async move {
                svc.inner.watch.follow_from(svc.store().clone(), stream, Some(from), shutdown, decode).await;
            });
        }
        Ok(())
    }
}

/// What a watcher may see of `change`: a buyer (`for_buyer`) gets no order references.
fn visible(change: &pb::WatchStockResponse, for_buyer: bool) -> pb::WatchStockResponse {
    let mut out = change.clone();
    if for_buyer && out.cause.starts_with("holds.") {
        out.reference.clear();
    }
    out
}

/// The stream type of `WatchStock`.
pub type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<pb::WatchStockResponse, Status>>;

impl Inventory {
    pub(crate) async fn watch_stock(
        &self,
        ctx: &RequestContext,
        slot: Option<&Slot>,
        req: pb::WatchStockRequest,
    ) -> Result<WatchStream, Error> {
        let mut v = Violations::new();
        let sku = validate::parse_optional::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        let sku = validate::finish(v, sku)?;
        // Subscribe before reading the snapshot, so no change falls between the two; a product the hub
        // doesn't follow yet (added since its last look at the catalogue) is followed from now on.
        let rx = self.inner.watch.subscribe(slot).await;
        // (Followed already, the usual case: no store read on the way, so the call holds its share of
        // the global concurrency limit only as long as its snapshot takes.)
        if let Some(sku) = &sku
            && !self.follows(sku)
            && chipgate_contract::catalogue::has_product(self.store(), sku).await?
        {
            self.follow_product(sku).await?;
        }
        let snapshot: Vec<pb::Stock> = if let Some(sku) = &sku {
            let (ver, s) = self.require::<StockRecord>(keys::stock(sku), "product", sku).await?;
            vec![stock_to(&s, ver)]
        } else {
            self.list_stock(pb::ListStockRequest {}).await?.stock
        };
        let first: Vec<pb::WatchStockResponse> = snapshot
            .into_iter()
            .map(|s| pb::WatchStockResponse {
                stock: Some(s),
                cause: "snapshot".into(),
                reference: String::new(),
                time: None,
            })
            .collect();
        let sku = req.product_sku;
        let buyer = ctx.buyer_scope().is_some();
        let keep = move |change: &pb::WatchStockResponse| {
            (sku.is_empty() || change.stock.as_ref().is_some_and(|s| s.product_sku == sku))
                .then(|| visible(change, buyer))
                .into_iter()
                .collect()
        };
        Ok(hub::forward(rx, first, self.inner.shutdown.clone(), keep))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buyers_see_no_order_references_and_everyone_else_does() {
        let change = |cause: &str, reference: &str| pb::WatchStockResponse {
            stock: None,
            cause: cause.into(),
            reference: reference.into(),
            time: None,
        };
        for cause in ["holds.placed", "holds.released", "holds.expired", "holds.confirmed", "holds.shipped"] {
            assert_eq!(visible(&change(cause, "ord-1,ord-2"), true).reference, "", "{cause}");
            assert_eq!(visible(&change(cause, "ord-1,ord-2"), false).reference, "ord-1,ord-2", "{cause}");
        }
        assert_eq!(visible(&change("supply.received", "rcpt-1"), true).reference, "rcpt-1");
        assert_eq!(visible(&change("product.upserted", "H200"), true).reference, "H200");
    }
}
