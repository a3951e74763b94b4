//! Reading orders, backlogs and wave progress, and watching transitions.

use chipgate_domain::orders::OrderRecord;
use chipgate_proto::orders::v1 as pb;
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
        validate::id(&mut v, "order_id", &req.order_id);
        v.check().map_err(Error::Status)?;
        let order = self.order_view(&req.order_id, true).await?;
        ctx.check_owner(&order.buyer_id).map_err(Error::Status)?;
        Ok(pb::GetOrderResponse { order: Some(order) })
    }

    pub(crate) async fn list_orders(&self, req: pb::ListOrdersRequest) -> Result<pb::ListOrdersResponse, Error> {
        let mut v = Violations::new();
        validate::optional_id(&mut v, "buyer_id", &req.buyer_id);
        validate::optional_id(&mut v, "product_sku", &req.product_sku);
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        v.check().map_err(Error::Status)?;
        let state = state_from(req.state());
        let index = match (&req.buyer_id, state) {
            (b, _) if !b.is_empty() => Some(keys::orders_of(b)),
            (_, Some(s)) => Some(keys::orders_in(s)),
            _ => None,
        };
        let keep = |o: &OrderRecord| {
            (req.product_sku.is_empty() || o.sku == req.product_sku) && state.is_none_or(|s| o.status() == s)
        };
        let mut out = Vec::new();
        match index {
            Some(index) => {
                let mut rank = page.offset();
                let chunk = page.size.max(200);
                loop {
                    let ids = self.store().zrange(&index, rank as i64, (rank + chunk - 1) as i64, false).await?;
                    if ids.is_empty() {
                        return Ok(pb::ListOrdersResponse { orders: out, next_page_token: String::new() });
                    }
                    let order_keys: Vec<String> = ids.iter().map(|(id, _)| keys::order(id)).collect();
                    for (i, o) in self.load_many::<OrderRecord>(&order_keys).await?.into_iter().enumerate() {
                        let Some((_, o)) = o else { continue };
                        if keep(&o) {
                            out.push(order_to(&o, 0, !req.omit_history));
                            if out.len() == page.size {
                                let token = paging::token(&(rank + i + 1).to_string());
                                return Ok(pb::ListOrdersResponse { orders: out, next_page_token: token });
                            }
                        }
                    }
                    rank += ids.len();
                    if ids.len() < chunk {
                        return Ok(pb::ListOrdersResponse { orders: out, next_page_token: String::new() });
                    }
                }
            }
            None => {
                // Every order: ids are `ord-<sequence>`, so walk the sequence (no index needed; ids a
                // failed placement skipped are simply absent).
                let last = self.store().incr(&keys::seq(), 0).await?;
                let mut next = page.offset().max(1) as u64;
                let chunk = page.size.max(200) as u64;
                while next <= last {
                    let end = (next + chunk - 1).min(last);
                    let order_keys: Vec<String> = (next..=end).map(|n| keys::order(&format!("ord-{n}"))).collect();
                    for (i, o) in self.load_many::<OrderRecord>(&order_keys).await?.into_iter().enumerate() {
                        let Some((_, o)) = o else { continue };
                        if keep(&o) {
                            out.push(order_to(&o, 0, !req.omit_history));
                            if out.len() == page.size {
                                let token = paging::token(&(next + i as u64 + 1).to_string());
                                return Ok(pb::ListOrdersResponse { orders: out, next_page_token: token });
                            }
                        }
                    }
                    next = end + 1;
                }
                Ok(pb::ListOrdersResponse { orders: out, next_page_token: String::new() })
            }
        }
    }

    pub(crate) async fn get_backlog(&self, req: pb::GetBacklogRequest) -> Result<pb::GetBacklogResponse, Error> {
        let mut v = Violations::new();
        validate::id(&mut v, "product_sku", &req.product_sku);
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        v.check().map_err(Error::Status)?;
        let key = keys::backlog(&req.product_sku);
        let start = page.offset();
        let ids = self.store().zrange(&key, start as i64, (start + page.size) as i64 - 1, false).await?;
        let total = self.store().zcard(&key).await?;
        let order_keys: Vec<String> = ids.iter().map(|(id, _)| keys::order(id)).collect();
        let entries: Vec<pb::BacklogEntry> = self
            .load_many::<OrderRecord>(&order_keys)
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

    pub(crate) async fn watch_orders(&self, req: pb::WatchOrdersRequest) -> Result<WatchStream, Error> {
        let mut v = Violations::new();
        validate::optional_id(&mut v, "buyer_id", &req.buyer_id);
        validate::optional_id(&mut v, "order_id", &req.order_id);
        if req.buyer_id.is_empty() && req.order_id.is_empty() {
            v.add("buyer_id", "give buyer_id, order_id, or both");
        }
        v.check().map_err(Error::Status)?;
        let rx = self.inner.hub.subscribe();
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
