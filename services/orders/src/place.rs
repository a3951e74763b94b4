//! Placing an order: record it in the buyer's awaiting queue, then let the product's next pass evaluate
//! it, and answer with where it stands once that pass is done (or after `place_wait`).

use chipgate_domain::ids::OrderId;
use chipgate_domain::orders::{Cause, CauseKind, OrderRecord, OrderStatus, TransitionRecord};
use chipgate_proto::orders::v1 as pb;
use chipgate_runtime::RequestContext;
use chipgate_runtime::idempotency::fingerprint;
use chipgate_runtime::service::Records;
use chipgate_runtime::time::now_ms;
use chipgate_state::{Backend, CommitError, Txn};

use crate::convert::NewOrder;
use crate::keys::OrderIds;
use crate::marks::{self, Who};
use crate::{Error, Orders, book, keys};

/// What a PlaceOrder request id is remembered as: the order it placed.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Placed {
    #[prost(string, tag = "1")]
    pub order_id: String,
}

impl Orders {
    pub(crate) async fn place_order(
        &self,
        ctx: &RequestContext,
        req: pb::PlaceOrderRequest,
    ) -> Result<pb::PlaceOrderResponse, Error> {
        // The request's fingerprint (a retry must be the same call), then the call as the domain sees it.
        let fp = fingerprint(&req);
        let req = NewOrder::try_from(req)?;
        // Only catalogue products: a made-up SKU would wait for ever with a misleading reason and
        // add a product for every pass and metric to carry.
        if !self.inner.products.in_catalogue(self.store(), &req.sku).await? {
            return Err(Error::Status(chipgate_runtime::errors::invalid_argument(
                "product_sku",
                chipgate_contract::catalogue::unknown_product(&req.sku),
            )));
        }

        let began = std::time::Instant::now();
        // Which pass must finish before the answer: the first one that starts after the commit.
        let mut progress = self.inner.scheduler.progress(&req.sku);
        let idem = &self.inner.idem;
        // The order, its answer and everything it implies live in the product's partition.
        let part = keys::part(&req.sku);
        // A sequence number for the order and the registration of the buyer's product (idempotent,
        // before the order exists), at once. An earlier call with this request id is not looked up
        // first: the commit below is guarded on the request id, so a retry conflicts and is answered
        // from the earlier call's record then. That keeps a new placement (by far the common case)
        // to two round trips to its partition; a retry wastes a sequence number, which only leaves a
        // gap.
        let (seq, ()) = tokio::try_join!(
            async { Ok::<u64, Error>(self.store().incr(&keys::seq(&req.sku), 1).await?) },
            self.register(&req.buyer_id, &req.sku),
        )?;
        let now = now_ms();
        let id = keys::order_id(&req.sku, seq);
        let order = OrderRecord {
            id: id.to_string(),
            request_id: req.request_id.clone(),
            buyer_id: req.buyer_id.to_string(),
            sku: req.sku.to_string(),
            units: req.units,
            justification: req.justification.clone(),
            status: OrderStatus::Pending as i32,
            generation: 1,
            seq,
            create_ms: now,
            update_ms: now,
            history: vec![TransitionRecord {
                from: OrderStatus::Unspecified as i32,
                to: OrderStatus::Pending as i32,
                at_ms: now,
                cause: Some(Cause::new(CauseKind::Placed, &id)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let placed = Placed { order_id: id.into_string() };
        let mut t = Txn::new();
        let mut events = book::Events::traced(ctx);
        book::write(&mut t, &mut events, 0, None, &order);
        // The mark names the order: a round marked by nothing else judges the buyer's orders from it on.
        marks::awaiting(
            &mut t,
            &req.sku,
            Who::Buyer(&order.buyer_id),
            &Cause::new(CauseKind::Placed, &order.id),
            &ctx.traceparent(),
        );
        idem.record(&mut t, Some(&part), "PlaceOrder", &req.request_id, &fp, &placed);
        events.flush(&mut t);
        let (placed, fresh) = self.commit_placement(t, &part, &req.request_id, &fp, placed).await?;
        let committed_at = began.elapsed();
        // The round that evaluates a new order leaves its record here (see [`crate::answers`]).
        let ticket = fresh.then(|| self.inner.answers.expect(&placed.order_id, req.sku.as_str()));
        if let Some(t) = &ticket {
            let target = progress.borrow().started + 1;
            self.inner.scheduler.request(&req.sku);
            let wait = match ctx.remaining() {
                // Leave a little of the caller's deadline for the answer itself.
                Some(left) => left.saturating_sub(std::time::Duration::from_millis(50)).min(self.options().place_wait),
                None => self.options().place_wait,
            };
            // The round's end, or sooner its commit of the order in a state the rest of the round
            // can't change (see [`crate::answers`]).
            let evaluated = async {
                tokio::select! {
                    _ = progress.wait_for(|p| p.completed >= target) => {}
                    () = t.settled() => {}
                }
            };
            let done = tokio::time::timeout(wait, evaluated).await;
            if done.is_err() {
                tracing::debug!(order = %placed.order_id, "first evaluation still running; answering with the order as it stands");
            }
        }
        let waited = began.elapsed();
        let order = match ticket.and_then(crate::answers::Ticket::take) {
            Some(o) => self.view(o, true).await?,
            // Our own record of the id this call handed out.
            None => self.order_view(&OrderId::from_trusted(placed.order_id.as_str()), true).await?,
        };
        tracing::debug!(
            order = %placed.order_id,
            commit_us = committed_at.as_micros() as u64,
            wait_us = (waited - committed_at).as_micros() as u64,
            read_us = (began.elapsed() - waited).as_micros() as u64,
            "placed"
        );
        Ok(pb::PlaceOrderResponse { order: Some(order) })
    }

    /// Commits placement `t` of the order `placed` names, with its idempotency record under
    /// `request_id`, and answers which order the request id placed and whether it is this call's
    /// own new one (which the caller then waits to see evaluated).
    ///
    /// The commit goes without a receipt ([`Txn::without_receipt`]): a placement is the one write per
    /// order that every order makes, and its idempotency record, created under a must-not-exist
    /// guard, already makes a re-sent copy conflict instead of applying twice. A conflict is then
    /// either another call with this request id that committed first (answer as it did) or this
    /// call's own first copy, re-sent by the Redis client after a reconnect: the record then names
    /// the order this call numbered, and the order is this call's own and new. Either way the
    /// record is written again before it is answered from, so the replicas' acknowledgement covers
    /// it ([`Idempotency::lookup_durable`](chipgate_runtime::idempotency::Idempotency::lookup_durable)).
    pub(crate) async fn commit_placement(
        &self,
        mut t: Txn,
        part: &chipgate_state::Partition,
        request_id: &str,
        fp: &chipgate_runtime::idempotency::Fingerprint,
        placed: Placed,
    ) -> Result<(Placed, bool), Error> {
        t.without_receipt();
        match self.store().commit(&t).await {
            Ok(_) => Ok((placed, true)),
            Err(CommitError::Conflict { .. }) => {
                let stored = self
                    .inner
                    .idem
                    .lookup_durable::<Placed>(self.store(), Some(part), "PlaceOrder", request_id, fp)
                    .await
                    .map_err(Error::Status)?
                    .ok_or_else(|| Error::Internal("idempotency record vanished".into()))?;
                let ours = stored.order_id == placed.order_id;
                if ours {
                    tracing::debug!(order = %placed.order_id, "a re-sent placement commit found its own first copy");
                }
                Ok((stored, ours))
            }
            Err(CommitError::State(e)) => Err(Error::State(e)),
            Err(e) => Err(Error::Internal(e.to_string())),
        }
    }

    /// An order as the API shows it, with its backlog position.
    pub(crate) async fn order_view(&self, id: &OrderId, with_history: bool) -> Result<pb::Order, Error> {
        let Some((_, o)) = self.load_order(keys::order(id)).await? else {
            // Closed long enough ago to have been archived out of Redis?
            return self.archived_order(id).await;
        };
        self.view(o, with_history).await
    }

    /// A stored order as the API shows it, with its backlog position.
    async fn view(&self, o: OrderRecord, with_history: bool) -> Result<pb::Order, Error> {
        let position = if o.status() == OrderStatus::Backordered {
            let member = keys::index_member(&o.typed_id());
            self.store().zrank(&keys::backlog(&o.typed_sku()), &member).await?.map(|r| r + 1).unwrap_or(0)
        } else {
            0
        };
        let mut view = crate::convert::order_to(&o, position, with_history);
        // Not evaluated yet because its product's passes keep failing: say so, rather than a silent
        // PENDING (the order is kept, and evaluated once they recover).
        if o.status() == OrderStatus::Pending
            && let Some(h) = self.inner.scheduler.failing(&o.sku)
        {
            let since = h.failing_since.map(|t| t.elapsed().as_secs()).unwrap_or(0);
            view.reasons.push(chipgate_proto::licensing::v1::ConditionFailure {
                description: format!(
                    "not evaluated yet: evaluation of {} has failed {} times over {since} s ({}); the order is kept \
                     and will be evaluated once that recovers",
                    o.sku, h.consecutive_failures, h.last_error
                ),
                ..Default::default()
            });
        }
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use chipgate_domain::ids::Sku;
    use chipgate_domain::orders::{OrderRecord, OrderStatus};
    use chipgate_runtime::idempotency::fingerprint;
    use chipgate_state::{Backend, Store, Txn};

    use super::Placed;
    use crate::{Error, book, keys};

    /// A placement's transaction, as `place_order` builds it: the order and the request id's record.
    fn placement(svc: &crate::Orders, sku: &Sku, seq: u64, request_id: &str, units: u64) -> (Txn, Placed) {
        let id = keys::order_id(sku, seq);
        let order = OrderRecord {
            id: id.to_string(),
            request_id: request_id.into(),
            buyer_id: "buyer-1".into(),
            sku: sku.to_string(),
            units,
            status: OrderStatus::Pending as i32,
            generation: 1,
            seq,
            ..Default::default()
        };
        let placed = Placed { order_id: id.into_string() };
        let mut t = Txn::new();
        book::write(&mut t, &mut book::Events::default(), 0, None, &order);
        let fp = fingerprint(&chipgate_proto::orders::v1::PlaceOrderRequest { units, ..Default::default() });
        svc.inner.idem.record(&mut t, Some(&keys::part(sku)), "PlaceOrder", request_id, &fp, &placed);
        (t, placed)
    }

    /// A placement commit re-sent after its first copy applied (what the Redis client does after a
    /// reconnect) conflicts, having no receipt; the call must still see the order as its own and new
    /// (so it waits for its evaluation), while another call with the same request id answers with
    /// the first call's order, not new.
    #[tokio::test]
    async fn a_resent_placement_is_recognised_as_the_calls_own() {
        let store = Store::memory();
        let (svc, shutdown) = crate::test_service(store.clone(), crate::Options::default());
        let sku = Sku::from_trusted("H200");
        let part = keys::part(&sku);
        let fp = fingerprint(&chipgate_proto::orders::v1::PlaceOrderRequest { units: 4, ..Default::default() });
        let period = svc.inner.idem.current_period();
        let record = || {
            let store = store.clone();
            let key = svc.inner.idem.period_key(Some(&part), "PlaceOrder", period);
            async move { store.hget_each(&[(key, "req-1".to_string())]).await.unwrap().remove(0) }
        };

        let (t, placed) = placement(&svc, &sku, 1, "req-1", 4);
        // The first copy applies (its answer lost with the connection) ...
        store.commit(&t).await.unwrap();
        let first = record().await.expect("the request id's record");
        // ... and the re-sent copy conflicts on the record the first created.
        let (answer, fresh) = svc.commit_placement(t, &part, "req-1", &fp, placed.clone()).await.unwrap();
        assert_eq!((answer, fresh), (placed.clone(), true), "the call's own order, new");
        assert_eq!(record().await, Some(first), "unchanged (and written again: the runtime's tests count it)");

        // A client retry (same request id and request) numbered another order: it answers with the
        // first order, as not new, and the order it numbered was never written.
        let (retry, other) = placement(&svc, &sku, 2, "req-1", 4);
        let (answer, fresh) = svc.commit_placement(retry, &part, "req-1", &fp, other.clone()).await.unwrap();
        assert_eq!((answer, fresh), (placed, false));
        let second = keys::order(&keys::order_id(&sku, 2));
        assert_eq!(store.get(&[second]).await.unwrap(), vec![None]);

        // The same request id for a different request is refused.
        let (t, p) = placement(&svc, &sku, 3, "req-1", 5);
        let fp5 = fingerprint(&chipgate_proto::orders::v1::PlaceOrderRequest { units: 5, ..Default::default() });
        match svc.commit_placement(t, &part, "req-1", &fp5, p).await {
            Err(Error::Status(s)) => assert_eq!(s.code(), tonic::Code::InvalidArgument),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }

        // A new request id places a new order.
        let (t, p) = placement(&svc, &sku, 4, "req-2", 4);
        assert_eq!(svc.commit_placement(t, &part, "req-2", &fp, p.clone()).await.unwrap(), (p, true));
        shutdown.trigger();
    }
}
