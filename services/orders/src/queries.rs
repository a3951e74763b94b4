//! Reading orders, backlogs and wave progress, and watching transitions.

use chipgate_domain::ids::{BuyerId, OrderId, Sku};
use chipgate_domain::orders::OrderRecord;
use chipgate_proto::orders::v1 as pb;
use chipgate_runtime::edge::shed::Slot;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::paging::{self, Page};
use chipgate_runtime::service::Records;
use chipgate_runtime::time::ts_opt;
use chipgate_runtime::{RequestContext, hub, validate};
use chipgate_state::Backend;

use crate::convert::{order_to, state_from};
use crate::{Error, Orders, keys};

/// The stream type of `WatchOrders`.
pub type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<pb::WatchOrdersResponse, tonic::Status>>;

impl Orders {
    pub(crate) async fn get_order(
        &self,
        ctx: &RequestContext,
        req: pb::GetOrderRequest,
    ) -> Result<pb::GetOrderResponse, Error> {
        let mut v = Violations::new();
        let order_id = validate::parse::<OrderId>(&mut v, "order_id", req.order_id);
        let order_id = validate::finish(v, order_id)?;
        let order = self.order_view(&order_id, true).await?;
        ctx.check_owner(&order.buyer_id).map_err(Error::Status)?;
        Ok(pb::GetOrderResponse { order: Some(order) })
    }

    /// Orders are listed product by product (in SKU order), each product's in placement order: a
    /// product's orders and indexes live in its own partition. The page token says where in which
    /// product the last page stopped.
    pub(crate) async fn list_orders(&self, req: pb::ListOrdersRequest) -> Result<pb::ListOrdersResponse, Error> {
        let mut v = Violations::new();
        let buyer = validate::parse_optional::<BuyerId>(&mut v, "buyer_id", req.buyer_id.clone());
        let product = validate::parse_optional::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        let (buyer, product) = validate::finish(v, (buyer, product))?;
        let state = state_from(req.state());
        // The product sets list SKUs parsed when orders were placed.
        let mut skus: Vec<Sku> = if let Some(sku) = product {
            vec![sku]
        } else if let Some(buyer) = &buyer {
            self.store().smembers(&keys::buyer_products(buyer)).await?.into_iter().map(Sku::from_trusted).collect()
        } else {
            self.store().smembers(&keys::products()).await?.into_iter().map(Sku::from_trusted).collect()
        };
        skus.sort();
        skus.dedup();
        let (from_sku, from_pos) = match page.cursor.split_once('\n') {
            Some((sku, pos)) => (sku.to_string(), pos.parse::<usize>().unwrap_or(0)),
            None => (String::new(), 0),
        };
        let keep = |o: &OrderRecord| {
            (req.product_sku.is_empty() || o.sku == req.product_sku)
                && (req.buyer_id.is_empty() || o.buyer_id == req.buyer_id)
                && state.is_none_or(|s| o.status() == s)
        };
        let chunk = page.size.max(200);
        let mut out = Vec::new();
        let mut bytes = 0;
        for sku in skus.into_iter().filter(|s| s.as_str() >= from_sku.as_str()) {
            let mut pos = if sku.as_str() == from_sku { from_pos } else { 0 };
            // The buyer's or the state's index of the product, or (no filter) its sequence of ids.
            let index = match (&buyer, state) {
                (Some(b), _) => Some(keys::orders_of(&sku, b)),
                (_, Some(s)) => Some(keys::orders_in(&sku, s)),
                _ => None,
            };
            loop {
                let ids: Vec<OrderId> = match &index {
                    Some(index) => self
                        .store()
                        .zrange(index, pos as i64, (pos + chunk - 1) as i64, false)
                        .await?
                        .into_iter()
                        .map(|(member, _)| keys::indexed_order(&sku, &member))
                        .collect(),
                    None => {
                        let last = self.store().incr(&keys::seq(&sku), 0).await? as usize;
                        (pos + 1..=(pos + chunk).min(last)).map(|n| keys::order_id(&sku, n as u64)).collect()
                    }
                };
                if ids.is_empty() {
                    break;
                }
                let order_keys: Vec<String> = ids.iter().map(keys::order).collect();
                for (i, o) in self.load_orders(&order_keys).await?.into_iter().enumerate() {
                    let Some((_, o)) = o else { continue };
                    if keep(&o) {
                        let view = order_to(&o, 0, !req.omit_history);
                        // A page also ends before it outgrows what a client accepts by default (orders
                        // with long histories: 1,000 of them made 4.6 MB in a soak).
                        let len = prost::Message::encoded_len(&view) + 8;
                        if !out.is_empty() && bytes + len > self.options().page_bytes {
                            let token = paging::token(&format!("{sku}\n{}", pos + i));
                            return Ok(pb::ListOrdersResponse { orders: out, next_page_token: token });
                        }
                        bytes += len;
                        out.push(view);
                        if out.len() == page.size {
                            let token = paging::token(&format!("{sku}\n{}", pos + i + 1));
                            return Ok(pb::ListOrdersResponse { orders: out, next_page_token: token });
                        }
                    }
                }
                pos += ids.len();
                if ids.len() < chunk {
                    break;
                }
            }
        }
        Ok(pb::ListOrdersResponse { orders: out, next_page_token: String::new() })
    }

    pub(crate) async fn get_backlog(&self, req: pb::GetBacklogRequest) -> Result<pb::GetBacklogResponse, Error> {
        let mut v = Violations::new();
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        let sku = validate::finish(v, sku)?;
        let key = keys::backlog(&sku);
        let start = page.offset();
        let ids = self.store().zrange(&key, start as i64, (start + page.size) as i64 - 1, false).await?;
        let total = self.store().zcard(&key).await?;
        let order_keys: Vec<String> = ids.iter().map(|(m, _)| keys::order(&keys::indexed_order(&sku, m))).collect();
        let entries: Vec<pb::BacklogEntry> = self
            .load_orders(&order_keys)
            .await?
            .into_iter()
            .enumerate()
            .filter_map(|(i, o)| {
                o.map(|(_, o)| pb::BacklogEntry {
                    position: (start + i + 1) as u64,
                    order_id: o.id,
                    buyer_id: o.buyer_id,
                    units: o.units,
                    held_units: o.held,
                    sequence: o.seq,
                    create_time: ts_opt(o.create_ms),
                })
            })
            .collect();
        let next = if ((start + ids.len()) as u64) < total && ids.len() == page.size {
            paging::token(&(start + ids.len()).to_string())
        } else {
            String::new()
        };
        Ok(pb::GetBacklogResponse { product_sku: req.product_sku, entries, next_page_token: next, total_orders: total })
    }

    pub(crate) async fn watch_orders(
        &self,
        slot: Option<&Slot>,
        req: pb::WatchOrdersRequest,
    ) -> Result<WatchStream, Error> {
        let mut v = Violations::new();
        validate::optional_id(&mut v, "buyer_id", &req.buyer_id);
        validate::optional_id(&mut v, "order_id", &req.order_id);
        if req.buyer_id.is_empty() && req.order_id.is_empty() {
            v.add("buyer_id", "give buyer_id, order_id, or both");
        }
        v.check().map_err(Error::Status)?;
        let rx = self.inner.hub.subscribe(slot).await;
        let keep = move |batch: &crate::book::EventBatch| {
            batch
                .items
                .iter()
                .filter(|e| {
                    (req.buyer_id.is_empty() || e.buyer_id == req.buyer_id)
                        && (req.order_id.is_empty() || e.order_id == req.order_id)
                })
                .cloned()
                .collect()
        };
        Ok(hub::forward(rx, Vec::new(), self.inner.shutdown.clone(), keep))
    }
}
