//! `WatchStock`: one tail of the inventory event stream per replica, fanned out to every watcher.
//!
//! A single task follows the stream (a blocking read on its own connection) and broadcasts each change;
//! each watcher filters by product. A watcher that falls too far behind is told so and its stream ends,
//! rather than slowing the others; every stream ends when the server shuts down.

use std::sync::Arc;
use std::time::Duration;

use chipgate_domain::inventory::StockRecord;
use chipgate_proto::inventory::v1 as pb;
use chipgate_runtime::Shutdown;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::validate;
use chipgate_state::Backend;
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use crate::convert::stock_to;
use crate::holds::reference_of;
use crate::{Error, Inventory, keys};

/// The broadcast side of the watch.
pub(crate) struct Hub {
    tx: broadcast::Sender<Arc<pb::WatchStockResponse>>,
}

impl Hub {
    pub(crate) fn new() -> Self {
        let (tx, _) = broadcast::channel(4096);
        Hub { tx }
    }
}

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

/// Follows the event stream until shutdown, broadcasting every change.
pub(crate) async fn run(svc: Inventory, shutdown: Shutdown) {
    let stream = keys::events();
    let mut last = loop {
        tokio::select! {
            () = shutdown.wait() => return,
            r = svc.store().xlast_id(&stream) => match r {
                Ok(id) => break id,
                Err(e) => {
                    tracing::warn!(error = %e, "stock watch can't read the event stream yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    };
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            r = svc.store().tail(&stream, &last, 256, Duration::from_secs(2)) => match r {
                Ok(entries) => {
                    for e in entries {
                        last = e.id.clone();
                        let Some(raw) = e.field("e") else { continue };
                        match pb::InventoryEvent::decode(raw) {
                            Ok(ev) => {
                                if let Some(change) = describe(ev) {
                                    // No receivers is fine: nobody is watching.
                                    let _ = svc.inner.watch.tx.send(Arc::new(change));
                                }
                            }
                            Err(err) => tracing::warn!(id = %e.id, error = %err, "undecodable inventory event"),
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stock watch lost the event stream; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// The stream type of `WatchStock`.
pub type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<pb::WatchStockResponse, Status>>;

impl Inventory {
    pub(crate) async fn watch_stock(&self, req: pb::WatchStockRequest) -> Result<WatchStream, Error> {
        let mut v = Violations::new();
        validate::optional_id(&mut v, "product_sku", &req.product_sku);
        v.check().map_err(Error::Status)?;
        // Subscribe before reading the snapshot, so no change falls between the two.
        let mut rx = self.inner.watch.tx.subscribe();
        let snapshot: Vec<pb::Stock> = if req.product_sku.is_empty() {
            self.list_stock(pb::ListStockRequest {}).await?.stock
        } else {
            let (ver, s) =
                self.require::<StockRecord>(keys::stock(&req.product_sku), "product", &req.product_sku).await?;
            vec![stock_to(&s, ver)]
        };
        let (tx, out) = mpsc::channel(256);
        let sku = req.product_sku;
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            for s in snapshot {
                let first = pb::WatchStockResponse {
                    stock: Some(s),
                    cause: "snapshot".into(),
                    reference: String::new(),
                    time: None,
                };
                if tx.send(Ok(first)).await.is_err() {
                    return;
                }
            }
            loop {
                let next = tokio::select! {
                    () = shutdown.wait() => return,
                    () = tx.closed() => return,
                    n = rx.recv() => n,
                };
                match next {
                    Ok(change) => {
                        let matches = sku.is_empty() || change.stock.as_ref().is_some_and(|s| s.product_sku == sku);
                        if matches && tx.send(Ok((*change).clone())).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "this watcher fell {n} changes behind and was dropped; watch again and read GetStock"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(out))
    }
}
