//! What buyers and the vendor do to an order once placed: cancel, confirm, ship.

use chipgate_domain::ids::OrderId;
use chipgate_domain::orders::{Cause, CauseKind, OrderRecord, OrderStatus};
use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::service::Records;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::Txn;

use crate::clients::rpc;
use crate::keys::OrderIds;
use crate::{EffectOnly, Error, Orders, book, keys};

/// The request id and the order a call names; the order's id when both are valid.
fn check(request_id: &str, order_id: &str) -> Result<OrderId, Error> {
    let mut v = Violations::new();
    validate::request_id(&mut v, request_id);
    let order_id = validate::parse(&mut v, "order_id", order_id.to_string());
    Ok(validate::finish(v, order_id)?)
}

impl Orders {
    async fn require_order(&self, id: &OrderId) -> Result<(u64, OrderRecord), Error> {
        self.load_order(keys::order(id)).await?.ok_or_else(|| Error::not_found("order", id))
    }

    pub(crate) async fn cancel_order(
        &self,
        ctx: &RequestContext,
        req: pb::CancelOrderRequest,
    ) -> Result<pb::CancelOrderResponse, Error> {
        let order_id = check(&req.request_id, &req.order_id)?;
        let mut v = Violations::new();
        validate::text(&mut v, "reason", &req.reason, validate::MAX_TEXT_LEN, false);
        v.check().map_err(Error::Status)?;
        let reason = if req.reason.is_empty() { "cancelled by the buyer".to_string() } else { req.reason.clone() };
        self.run_txn(None, || async {
            let (ver, o) = self.require_order(&order_id).await?;
            ctx.check_owner(&o.buyer_id).map_err(Error::Status)?;
            if o.status() == OrderStatus::Cancelled {
                return Ok((Txn::new(), EffectOnly {}));
            }
            let mut new = o.clone();
            new.cancel(&reason, now_ms()).map_err(|e| {
                Error::precondition("ORDER_STATE", &o.id, format!("order {} is {}: {e}", o.id, o.status().name()))
            })?;
            let mut t = Txn::new();
            let mut events = book::Events::traced(ctx);
            book::write(&mut t, &mut events, ver, Some(&o.before()), &new);
            if o.status().is_waiting() {
                // A waiting order gives no quota back, so nothing else would tell the buyer's later
                // orders that may have queued behind it (CONDITION_QUEUE_ORDER) to look again.
                crate::marks::awaiting(
                    &mut t,
                    &o.typed_sku(),
                    crate::marks::Who::Buyer(&o.buyer_id),
                    &Cause::new(CauseKind::Cancelled, &o.id),
                    &ctx.traceparent(),
                );
            }
            // A waiting order a wave concerns no longer keeps the wave from settling.
            self.left_waiting(&mut t, &o, &new).await?;
            events.flush(&mut t);
            Ok((t, EffectOnly {}))
        })
        .await?;
        // And from a snapshot taken after the waves were read above (a retry comes here again).
        if let Some(sku) = order_id.product() {
            self.leave_snapshots(&sku, order_id.as_str()).await?;
        }
        // Give quota and stock back now rather than on the worker's next round.
        if let Err(e) = self.cleanup_once(ctx).await {
            tracing::warn!(order = %req.order_id, error = ?e, "releases after cancel deferred to the cleanup worker");
            self.inner.cleanup_wake.notify_one();
        }
        Ok(pb::CancelOrderResponse { order: Some(self.order_view(&order_id, true).await?) })
    }

    pub(crate) async fn confirm_order(
        &self,
        ctx: &RequestContext,
        req: pb::ConfirmOrderRequest,
    ) -> Result<pb::ConfirmOrderResponse, Error> {
        let order_id = check(&req.request_id, &req.order_id)?;
        let (_, o) = self.require_order(&order_id).await?;
        ctx.check_owner(&o.buyer_id).map_err(Error::Status)?;
        match o.status() {
            OrderStatus::Confirmed | OrderStatus::Shipped => {
                return Ok(pb::ConfirmOrderResponse { order: Some(self.order_view(&o.typed_id(), true).await?) });
            }
            OrderStatus::Reserved => {}
            s => {
                return Err(Error::precondition(
                    "ORDER_NOT_RESERVED",
                    &o.id,
                    format!("order {} is {}; only RESERVED orders (every unit held) can be confirmed", o.id, s.name()),
                ));
            }
        }
        if o.hold_expire_ms != 0 && now_ms() >= o.hold_expire_ms {
            return Err(Error::precondition(
                "HOLD_EXPIRED",
                &o.id,
                format!("the hold of order {} expired before it was confirmed", o.id),
            ));
        }
        // Commit quota first (a suspended licence refuses here), then the stock.
        let q = lpb::ConfirmQuotaRequest {
            request_id: format!("{}:confirm:{}", o.id, o.generation),
            order_id: o.id.clone(),
            generation: o.generation,
            product_sku: o.sku.clone(),
        };
        rpc!(ctx, self.inner.peers.licensing, confirm_quota, q).map_err(Error::Peer)?;
        let h = ipb::ConfirmReservationRequest {
            request_id: format!("{}:confirm:{}", o.id, o.generation),
            order_id: o.id.clone(),
            generation: o.generation,
            product_sku: o.sku.clone(),
        };
        rpc!(ctx, self.inner.peers.inventory, confirm_reservation, h).map_err(Error::Peer)?;
        let generation = o.generation;
        self.run_txn(None, || async {
            let (ver, o) = self.require_order(&order_id).await?;
            if o.status() == OrderStatus::Confirmed {
                return Ok((Txn::new(), EffectOnly {}));
            }
            if o.status() != OrderStatus::Reserved || o.generation != generation {
                return Err(Error::precondition(
                    "ORDER_CHANGED",
                    &o.id,
                    format!("order {} became {} while it was being confirmed", o.id, o.status().name()),
                ));
            }
            let mut new = o.clone();
            new.move_to(OrderStatus::Confirmed, Cause::new(CauseKind::Confirmed, &o.id), "", vec![], now_ms())
                .map_err(|e| Error::Internal(e.to_string()))?;
            let mut t = Txn::new();
            let mut events = book::Events::traced(ctx);
            book::write(&mut t, &mut events, ver, Some(&o.before()), &new);
            events.flush(&mut t);
            Ok((t, EffectOnly {}))
        })
        .await?;
        Ok(pb::ConfirmOrderResponse { order: Some(self.order_view(&order_id, true).await?) })
    }

    pub(crate) async fn ship_order(
        &self,
        ctx: &RequestContext,
        req: pb::ShipOrderRequest,
    ) -> Result<pb::ShipOrderResponse, Error> {
        let order_id = check(&req.request_id, &req.order_id)?;
        let (_, o) = self.require_order(&order_id).await?;
        match o.status() {
            OrderStatus::Shipped => {
                return Ok(pb::ShipOrderResponse { order: Some(self.order_view(&o.typed_id(), true).await?) });
            }
            OrderStatus::Confirmed => {}
            s => {
                return Err(Error::precondition(
                    "ORDER_NOT_CONFIRMED",
                    &o.id,
                    format!("order {} is {}; only CONFIRMED orders can ship", o.id, s.name()),
                ));
            }
        }
        let s = ipb::ShipReservationRequest {
            request_id: format!("{}:ship:{}", o.id, o.generation),
            order_id: o.id.clone(),
            generation: o.generation,
            product_sku: o.sku.clone(),
        };
        rpc!(ctx, self.inner.peers.inventory, ship_reservation, s).map_err(Error::Peer)?;
        self.run_txn(None, || async {
            let (ver, o) = self.require_order(&order_id).await?;
            if o.status() == OrderStatus::Shipped {
                return Ok((Txn::new(), EffectOnly {}));
            }
            let mut new = o.clone();
            new.move_to(OrderStatus::Shipped, Cause::new(CauseKind::Shipped, &o.id), "", vec![], now_ms())
                .map_err(|e| Error::precondition("ORDER_CHANGED", &o.id, format!("order {}: {e}", o.id)))?;
            let mut t = Txn::new();
            let mut events = book::Events::traced(ctx);
            book::write(&mut t, &mut events, ver, Some(&o.before()), &new);
            events.flush(&mut t);
            Ok((t, EffectOnly {}))
        })
        .await?;
        Ok(pb::ShipOrderResponse { order: Some(self.order_view(&order_id, true).await?) })
    }
}
