//! The buyers: each buyer runs two workers with the buyer's own token. They place orders (some large,
//! some without a justification), confirm or cancel what they hold (or let holds expire), cancel
//! waiting orders, submit and withdraw applications — and send bad input now and then (other buyers'
//! orders, zero units, unknown products, a reused request id with another body, calls a buyer may not
//! make).

use std::time::Duration;

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_proto::orders::v1::OrderState;
use fastrand::Rng;
use tonic::Code;

use crate::calls::Mode;
use crate::model::{App, AppState, Order, now_ms};
use crate::world::{BUYERS, Ctx, DESTINATIONS, PRODUCTS, Party};
use crate::{send, send_ord};

/// States a placement may answer with: evaluated at once, or still pending — or, when the answer is a
/// retry's (the first attempt's outcome was unknown), expired already (the buyer can't have confirmed
/// or cancelled an order whose id it never saw).
const PLACED_STATES: [OrderState; 6] = [
    OrderState::Pending,
    OrderState::AwaitingLicense,
    OrderState::Backordered,
    OrderState::Reserved,
    OrderState::Rejected,
    OrderState::Expired,
];

struct Buyer {
    ctx: Ctx,
    buyer: &'static str,
    worker: usize,
    party: Party,
    rng: Rng,
    /// Orders this worker placed and that are not final yet.
    mine: Vec<String>,
    /// Acknowledged placements of this worker: (request id, the request).
    placed: Vec<opb::PlaceOrderRequest>,
}

/// Runs worker `worker` of `buyer` until the run stops.
pub async fn run(ctx: Ctx, buyer: &'static str, worker: usize) {
    let party = Party::buyer(&ctx.urls, &ctx.signer, buyer);
    let seed =
        ctx.seed ^ (0xb0b0 + worker as u64) ^ (buyer.len() as u64 * 0x1000_0001) ^ u64::from(buyer.as_bytes()[0]) << 40;
    let mut b = Buyer { ctx, buyer, worker, party, rng: Rng::with_seed(seed), mine: Vec::new(), placed: Vec::new() };
    while !b.ctx.stopped() {
        tokio::time::sleep(Duration::from_millis(b.rng.u64(20..90))).await;
        match b.rng.u8(..100) {
            0..=7 if b.worker == 0 => b.application().await,
            0..=49 => b.place().await,
            50..=92 => b.act().await,
            _ => b.bad().await,
        }
    }
}

/// Confirms every RESERVED order of `buyer` (the end of a run: no hold left to expire). Returns how
/// many were RESERVED.
pub async fn confirm_all(ctx: &Ctx, buyer: &str, orders: &[opb::Order]) -> usize {
    let party = Party::buyer(&ctx.urls, &ctx.signer, buyer);
    let mut b = Buyer {
        ctx: ctx.clone(),
        buyer: "closing",
        worker: usize::MAX,
        party,
        rng: Rng::with_seed(ctx.seed),
        mine: Vec::new(),
        placed: Vec::new(),
    };
    let mut n = 0;
    for o in orders.iter().filter(|o| o.buyer_id == buyer && o.state() == OrderState::Reserved) {
        n += 1;
        b.confirm(&o.order_id, Mode::Once).await;
    }
    n
}

impl Buyer {
    fn mode(&mut self) -> Mode {
        Mode::pick(&mut self.rng)
    }

    fn pick_sku(&mut self) -> &'static str {
        PRODUCTS[self.rng.usize(..PRODUCTS.len())]
    }

    fn refused<T>(&self, request_id: &str, r: &Result<T, tonic::Status>) {
        if r.is_err() {
            self.ctx.model.lock().unwrap().refused.push(request_id.to_string());
        }
    }

    async fn application(&mut self) {
        let sku = self.pick_sku();
        let open: Option<App> = self.ctx.model.lock().unwrap().open_application(self.buyer, sku).cloned();
        match open {
            None => self.submit(sku).await,
            Some(a) if a.state == AppState::Queued && !a.c.busy() && self.rng.u8(..100) < 30 => {
                self.withdraw(&a.id).await
            }
            Some(_) => {}
        }
    }

    async fn submit(&mut self, sku: &str) {
        let destination = if self.rng.u8(..100) < 20 { DESTINATIONS[1] } else { DESTINATIONS[0] };
        let msg = lpb::SubmitApplicationRequest {
            request_id: self.ctx.rid("apply"),
            buyer_id: self.buyer.into(),
            product_sku: sku.into(),
            quantity: self.rng.u64(10..=300) * 10,
            end_use: "LLM training".into(),
            site: "Ulanqab".into(),
            destination: destination.into(),
        };
        let mode = self.mode();
        let r = self
            .ctx
            .call(
                "SubmitApplication",
                mode,
                send!(self.party.lic, submit_application, msg),
                |a: &lpb::SubmitApplicationResponse, b| {
                    a.application.as_ref().map(|x| &x.application_id)
                        == b.application.as_ref().map(|x| &x.application_id)
                },
            )
            .await;
        self.ctx.expect("SubmitApplication", &format!("{}/{sku}", self.buyer), &r, true, &[]);
        self.refused(&msg.request_id, &r);
        if let Ok(a) = r {
            let a = a.application.unwrap_or_default();
            let mut m = self.ctx.model.lock().unwrap();
            if a.buyer_id != self.buyer
                || a.product_sku != sku
                || a.quantity != msg.quantity
                || a.destination != destination
                || a.state() != lpb::ApplicationState::Queued
                || a.queue_position == 0
            {
                m.violation(format!("SubmitApplication: answered {a:?} for {msg:?}"));
            }
            if m.apps.contains_key(&a.application_id) {
                m.violation(format!("SubmitApplication: application id {} handed out twice", a.application_id));
            }
            m.audited.push((self.party.subject.clone(), msg.request_id.clone(), "application.submitted"));
            m.apps.insert(
                a.application_id.clone(),
                App {
                    id: a.application_id,
                    buyer: self.buyer.into(),
                    sku: sku.into(),
                    quantity: msg.quantity,
                    destination: destination.into(),
                    state: AppState::Queued,
                    licence: None,
                    moved: false,
                    c: Default::default(),
                },
            );
        }
    }

    async fn withdraw(&mut self, app: &str) {
        let msg = lpb::WithdrawApplicationRequest {
            request_id: self.ctx.rid("withdraw"),
            application_id: app.into(),
            reason: "plans changed".into(),
        };
        let began = self.ctx.model.lock().unwrap().apps.get_mut(app).expect("app").c.begin();
        let mode = self.mode();
        let r = self
            .ctx
            .call(
                "WithdrawApplication",
                mode,
                send!(self.party.lic, withdraw_application, msg),
                |a: &lpb::WithdrawApplicationResponse, b| a == b,
            )
            .await;
        let (contended, state) = {
            let mut m = self.ctx.model.lock().unwrap();
            let a = m.apps.get_mut(app).expect("app");
            (a.c.end(began), a.state)
        };
        if contended {
            self.ctx.expect("WithdrawApplication", app, &r, true, &[Code::FailedPrecondition]);
        } else if state == AppState::Queued {
            self.ctx.expect("WithdrawApplication", app, &r, true, &[]);
        } else {
            self.ctx.expect("WithdrawApplication", app, &r, false, &[Code::FailedPrecondition]);
        }
        self.refused(&msg.request_id, &r);
        if let Ok(a) = r {
            let got = a.application.unwrap_or_default();
            let mut m = self.ctx.model.lock().unwrap();
            m.audited.push((self.party.subject.clone(), msg.request_id.clone(), "application.withdrawn"));
            let prior = m.apps[app].state;
            if prior != AppState::Queued {
                m.violation(format!("WithdrawApplication {app}: acknowledged, but its {prior:?} was acknowledged too"));
            }
            if got.state() != lpb::ApplicationState::Withdrawn {
                m.violation(format!("WithdrawApplication {app}: answered {:?}", got.state()));
            }
            m.apps.get_mut(app).expect("app").state = AppState::Withdrawn;
        }
    }

    async fn place(&mut self) {
        let sku = self.pick_sku();
        let units = if self.rng.u8(..100) < 85 { self.rng.u64(1..=30) * 10 } else { self.rng.u64(40..=200) * 10 };
        let justification = if self.rng.u8(..100) < 80 { "training cluster" } else { "" };
        let msg = opb::PlaceOrderRequest {
            request_id: self.ctx.rid("place"),
            buyer_id: self.buyer.into(),
            product_sku: sku.into(),
            units,
            justification: justification.into(),
        };
        let mode = self.mode();
        let r = self
            .ctx
            .call("PlaceOrder", mode, send_ord!(self.party, place_order, msg), |a: &opb::PlaceOrderResponse, b| {
                a.order.as_ref().map(|o| &o.order_id) == b.order.as_ref().map(|o| &o.order_id)
            })
            .await;
        self.ctx.expect("PlaceOrder", &format!("{units} x {sku}"), &r, true, &[]);
        if let Ok(p) = r {
            self.placed_ok(&msg, p.order.unwrap_or_default());
        }
    }

    /// Books an acknowledged placement.
    fn placed_ok(&mut self, msg: &opb::PlaceOrderRequest, o: opb::Order) {
        let mut m = self.ctx.model.lock().unwrap();
        if o.buyer_id != msg.buyer_id
            || o.product_sku != msg.product_sku
            || o.units != msg.units
            || o.justification != msg.justification
            || o.request_id != msg.request_id
            || !PLACED_STATES.contains(&o.state())
        {
            m.violation(format!("PlaceOrder {}: answered {} {:?} for {msg:?}", o.order_id, o.order_id, o.state()));
        }
        if m.orders.contains_key(&o.order_id) {
            m.violation(format!("PlaceOrder: order id {} handed out twice", o.order_id));
        }
        m.placed.push(msg.request_id.clone());
        m.orders.insert(
            o.order_id.clone(),
            Order {
                id: o.order_id.clone(),
                request_id: msg.request_id.clone(),
                buyer: msg.buyer_id.clone(),
                sku: msg.product_sku.clone(),
                units: msg.units,
                justification: msg.justification.clone(),
                ..Default::default()
            },
        );
        drop(m);
        self.mine.push(o.order_id);
        self.placed.push(msg.clone());
    }

    async fn act(&mut self) {
        if self.mine.is_empty() {
            return;
        }
        let i = self.rng.usize(..self.mine.len());
        let id = self.mine[i].clone();
        let get = opb::GetOrderRequest { order_id: id.clone() };
        let party = self.party.clone();
        let r = self
            .ctx
            .call(
                "GetOrder",
                Mode::Once,
                move |attempt: usize| {
                    let mut c = party.ord(attempt);
                    let m = get.clone();
                    async move { c.get_order(crate::calls::req("", m)).await }
                },
                |a: &opb::GetOrderResponse, b| a == b,
            )
            .await;
        let Ok(o) = r else {
            self.ctx.violation(format!("GetOrder {id} by its buyer: {}", crate::calls::label(&r)));
            return;
        };
        let state = o.order.map(|o| o.state()).unwrap_or_default();
        let roll = self.rng.u8(..100);
        match state {
            OrderState::Reserved if roll < 65 => {
                let mode = self.mode();
                self.confirm(&id, mode).await;
            }
            OrderState::Reserved if roll < 75 => self.cancel(&id).await,
            OrderState::Confirmed if roll < 6 => self.cancel(&id).await,
            OrderState::Pending | OrderState::AwaitingLicense | OrderState::Backordered if roll < 7 => {
                self.cancel(&id).await
            }
            OrderState::Shipped | OrderState::Cancelled | OrderState::Expired | OrderState::Rejected => {
                self.mine.swap_remove(i);
            }
            _ => {}
        }
    }

    async fn confirm(&mut self, id: &str, mode: Mode) {
        let (cancelled, confirmed) = {
            let m = self.ctx.model.lock().unwrap();
            let o = &m.orders[id];
            (o.cancelled.is_some(), o.confirmed.is_some())
        };
        let msg = opb::ConfirmOrderRequest { request_id: self.ctx.rid("confirm"), order_id: id.into() };
        let r = self
            .ctx
            .call(
                "ConfirmOrder",
                mode,
                send_ord!(self.party, confirm_order, msg),
                |a: &opb::ConfirmOrderResponse, b| {
                    a.order.as_ref().map(|o| &o.order_id) == b.order.as_ref().map(|o| &o.order_id)
                },
            )
            .await;
        if cancelled {
            self.ctx.expect("ConfirmOrder", &format!("{id} (cancelled)"), &r, false, &[Code::FailedPrecondition]);
        } else if confirmed {
            self.ctx.expect("ConfirmOrder", &format!("{id} (confirmed before)"), &r, true, &[]);
        } else {
            // It may have expired, or gone back to waiting, since it was read.
            self.ctx.expect("ConfirmOrder", id, &r, true, &[Code::FailedPrecondition]);
        }
        if let Ok(c) = r {
            let o = c.order.unwrap_or_default();
            let mut m = self.ctx.model.lock().unwrap();
            if !matches!(o.state(), OrderState::Confirmed | OrderState::Shipped) {
                m.violation(format!("ConfirmOrder {id}: acknowledged, but the order is {:?}", o.state()));
            }
            let mo = m.orders.get_mut(id).expect("known order");
            mo.confirmed.get_or_insert(now_ms());
        }
    }

    async fn cancel(&mut self, id: &str) {
        let (shipped, confirmed, began) = {
            let mut m = self.ctx.model.lock().unwrap();
            let o = m.orders.get_mut(id).expect("known order");
            (o.shipped.is_some(), o.confirmed.is_some(), o.c.begin())
        };
        let msg = opb::CancelOrderRequest {
            request_id: self.ctx.rid("cancel"),
            order_id: id.into(),
            reason: "no longer needed".into(),
        };
        let mode = self.mode();
        let r = self
            .ctx
            .call("CancelOrder", mode, send_ord!(self.party, cancel_order, msg), |a: &opb::CancelOrderResponse, b| {
                a.order.as_ref().map(|o| &o.order_id) == b.order.as_ref().map(|o| &o.order_id)
            })
            .await;
        let contended = self.ctx.model.lock().unwrap().orders.get_mut(id).expect("known order").c.end(began);
        if shipped {
            self.ctx.expect("CancelOrder", &format!("{id} (shipped)"), &r, false, &[Code::FailedPrecondition]);
        } else if confirmed && !contended {
            // A confirmed order can't expire or be rejected: only a shipment stops its cancellation.
            self.ctx.expect("CancelOrder", &format!("{id} (confirmed)"), &r, true, &[]);
        } else {
            self.ctx.expect("CancelOrder", id, &r, true, &[Code::FailedPrecondition]);
        }
        if let Ok(c) = r {
            let o = c.order.unwrap_or_default();
            let mut m = self.ctx.model.lock().unwrap();
            if o.state() != OrderState::Cancelled {
                m.violation(format!("CancelOrder {id}: acknowledged, but the order is {:?}", o.state()));
            }
            m.orders.get_mut(id).expect("known order").cancelled.get_or_insert(now_ms());
        }
    }

    /// A call the model knows must be refused (and change nothing).
    async fn bad(&mut self) {
        let other = loop {
            let b = BUYERS[self.rng.usize(..BUYERS.len())];
            if b != self.buyer {
                break b;
            }
        };
        let place = |ctx: &Ctx, buyer: &str, sku: &str, units: u64, justification: String| opb::PlaceOrderRequest {
            request_id: ctx.rid("place-bad"),
            buyer_id: buyer.into(),
            product_sku: sku.into(),
            units,
            justification,
        };
        match self.rng.u8(..13) {
            0 => {
                self.bad_place(
                    place(&self.ctx, self.buyer, PRODUCTS[0], 0, String::new()),
                    "zero units",
                    &[Code::InvalidArgument],
                )
                .await
            }
            1 => {
                self.bad_place(
                    place(&self.ctx, other, PRODUCTS[0], 10, String::new()),
                    "another buyer's id",
                    &[Code::PermissionDenied],
                )
                .await
            }
            2 => {
                let sku = format!("H900-NOPE-{}", self.rng.u8(..4));
                self.bad_place(
                    place(&self.ctx, self.buyer, &sku, 10, String::new()),
                    "unknown product",
                    &[Code::NotFound, Code::InvalidArgument],
                )
                .await;
            }
            3 => {
                let mut msg = place(&self.ctx, self.buyer, PRODUCTS[1], 10, String::new());
                msg.request_id = String::new();
                self.bad_place(msg, "no request id", &[Code::InvalidArgument]).await;
            }
            4 => {
                let Some(mut msg) =
                    (!self.placed.is_empty()).then(|| self.placed[self.rng.usize(..self.placed.len())].clone())
                else {
                    return;
                };
                msg.units += 10;
                self.bad_place(msg, "a used request id with another body", &[Code::InvalidArgument]).await;
            }
            5 | 6 => {
                let target = {
                    let m = self.ctx.model.lock().unwrap();
                    let theirs: Vec<String> =
                        m.orders.values().filter(|o| o.buyer == other).map(|o| o.id.clone()).collect();
                    if roll_nonexistent(&theirs) {
                        "ord-999999999".to_string()
                    } else {
                        theirs[self.rng.usize(..theirs.len())].clone()
                    }
                };
                let msg = opb::CancelOrderRequest {
                    request_id: self.ctx.rid("cancel-bad"),
                    order_id: target.clone(),
                    reason: String::new(),
                };
                let r = self
                    .ctx
                    .call(
                        "CancelOrder",
                        Mode::Once,
                        send_ord!(self.party, cancel_order, msg),
                        |a: &opb::CancelOrderResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect(
                    "CancelOrder",
                    &format!("(bad: {target}, not the caller's)"),
                    &r,
                    false,
                    &[Code::PermissionDenied],
                );
                let msg =
                    opb::ConfirmOrderRequest { request_id: self.ctx.rid("confirm-bad"), order_id: target.clone() };
                let r = self
                    .ctx
                    .call(
                        "ConfirmOrder",
                        Mode::Once,
                        send_ord!(self.party, confirm_order, msg),
                        |a: &opb::ConfirmOrderResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect(
                    "ConfirmOrder",
                    &format!("(bad: {target}, not the caller's)"),
                    &r,
                    false,
                    &[Code::PermissionDenied],
                );
            }
            7 | 8 => {
                let msg = lpb::SubmitApplicationRequest {
                    request_id: self.ctx.rid("apply-bad"),
                    buyer_id: self.buyer.into(),
                    product_sku: PRODUCTS[0].into(),
                    quantity: if self.rng.bool() { 0 } else { 10 },
                    end_use: "x".into(),
                    site: "y".into(),
                    destination: "CHINA".into(),
                };
                let r = self
                    .ctx
                    .call(
                        "SubmitApplication",
                        Mode::Once,
                        send!(self.party.lic, submit_application, msg),
                        |a: &lpb::SubmitApplicationResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect(
                    "SubmitApplication",
                    "(bad: zero units or a destination that is no country code)",
                    &r,
                    false,
                    &[Code::InvalidArgument],
                );
                self.refused(&msg.request_id, &r);
            }
            9 => {
                let lic =
                    self.ctx.model.lock().unwrap().licences.keys().next().cloned().unwrap_or_else(|| "lic-1".into());
                let msg = lpb::SuspendLicenseRequest {
                    request_id: self.ctx.rid("suspend-bad"),
                    license_id: lic,
                    reason: "mine now".into(),
                };
                let r = self
                    .ctx
                    .call(
                        "SuspendLicense",
                        Mode::Once,
                        send!(self.party.lic, suspend_license, msg),
                        |a: &lpb::SuspendLicenseResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect("SuspendLicense", "(bad: by a buyer)", &r, false, &[Code::PermissionDenied]);
                self.refused(&msg.request_id, &r);
            }
            10 => {
                let msg = ipb::ReceiveSupplyRequest {
                    request_id: self.ctx.rid("receive-bad"),
                    receipt_id: self.ctx.rid("rcpt-bad"),
                    product_sku: PRODUCTS[0].into(),
                    units: 1000,
                    source: "wishful thinking".into(),
                };
                let r = self
                    .ctx
                    .call(
                        "ReceiveSupply",
                        Mode::Once,
                        send!(self.party.inv, receive_supply, msg),
                        |a: &ipb::ReceiveSupplyResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect("ReceiveSupply", "(bad: by a buyer)", &r, false, &[Code::PermissionDenied]);
            }
            11 => {
                let msg = place(
                    &self.ctx,
                    self.buyer,
                    PRODUCTS[2],
                    10,
                    "x".repeat(chipgate_runtime::validate::MAX_TEXT_LEN + 1),
                );
                self.bad_place(msg, "a justification too long", &[Code::InvalidArgument]).await;
            }
            _ => {
                let sku = format!("H900-NOPE-{}", self.rng.u8(..4));
                let msg = lpb::SubmitApplicationRequest {
                    request_id: self.ctx.rid("apply-bad"),
                    buyer_id: self.buyer.into(),
                    product_sku: sku.clone(),
                    quantity: 10,
                    end_use: "x".into(),
                    site: "y".into(),
                    destination: "CN".into(),
                };
                let r = self
                    .ctx
                    .call(
                        "SubmitApplication",
                        Mode::Once,
                        send!(self.party.lic, submit_application, msg),
                        |a: &lpb::SubmitApplicationResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect(
                    "SubmitApplication",
                    &format!("(bad: unknown product {sku})"),
                    &r,
                    false,
                    &[Code::NotFound, Code::InvalidArgument],
                );
                self.refused(&msg.request_id, &r);
            }
        }
    }

    async fn bad_place(&mut self, msg: opb::PlaceOrderRequest, what: &str, codes: &[Code]) {
        let r = self
            .ctx
            .call(
                "PlaceOrder",
                Mode::Once,
                send_ord!(self.party, place_order, msg),
                |a: &opb::PlaceOrderResponse, b| a == b,
            )
            .await;
        self.ctx.expect("PlaceOrder", &format!("(bad: {what})"), &r, false, codes);
    }
}

fn roll_nonexistent(theirs: &[String]) -> bool {
    theirs.is_empty() || fastrand::u8(..100) < 20
}
