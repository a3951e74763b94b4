//! An order's life after placement, through the real services: confirm and ship, cancel (quota and
//! stock go back and the next order takes them), holds that expire, rejection, per-buyer queue order,
//! idempotent placement, and watching transitions.

use crate::common;

use std::time::Duration;

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_testkit::ClusterOptions;
use common::*;
use opb::OrderState::*;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_ship_cancel_and_the_next_order_takes_what_was_freed() {
    let mut w = World::start().await;
    let lic = w.licensed("bytedance", H200, 1000).await;
    w.receive(H200, 300).await;
    let mut watch = w
        .ord
        .watch_orders(opb::WatchOrdersRequest { buyer_id: "bytedance".into(), order_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let o1 = w.place("bytedance", H200, 100).await;
    let o2 = w.place("bytedance", H200, 100).await;
    let o3 = w.place("bytedance", H200, 100).await;
    assert_eq!(
        states(&[o1.clone(), o2.clone(), o3.clone()]),
        [Reserved, Reserved, Reserved],
        "placement answers after the first evaluation"
    );
    assert!(o1.hold_expire_time.is_some());

    // The watch saw each order go PENDING → BACKORDERED → RESERVED.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = tokio::time::timeout(WAIT, watch.next()).await.unwrap().unwrap().unwrap();
        if e.transition.as_ref().unwrap().to_state() == Reserved {
            seen.push(e.order_id);
        }
    }
    assert_eq!(seen, vec![o1.order_id.clone(), o2.order_id.clone(), o3.order_id.clone()]);

    let c = w
        .ord
        .confirm_order(opb::ConfirmOrderRequest { request_id: rid("c"), order_id: o1.order_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(c.state(), Confirmed);
    let again = w
        .ord
        .confirm_order(opb::ConfirmOrderRequest { request_id: rid("c"), order_id: o1.order_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(again.state(), Confirmed, "confirming twice is harmless");
    let s = w
        .ord
        .ship_order(opb::ShipOrderRequest { request_id: rid("s"), order_id: o1.order_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(s.state(), Shipped);
    let l = w.license(&lic).await;
    assert_eq!((l.used_units, l.confirmed_units), (300, 100));

    // Cancelling gives quota and stock back at once, and a new order takes the freed stock.
    let x = w
        .ord
        .cancel_order(opb::CancelOrderRequest {
            request_id: rid("x"),
            order_id: o2.order_id.clone(),
            reason: "changed plans".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!((x.state(), x.held_units), (Cancelled, 0));
    assert_eq!(w.license(&lic).await.used_units, 200);
    let stock = w.stock(H200).await;
    assert_eq!((stock.available, stock.held, stock.shipped), (100, 100, 100));
    let o4 = w.place("bytedance", H200, 100).await;
    assert_eq!(o4.state(), Reserved);

    // Shipped orders can't be cancelled; unknown orders are NOT_FOUND.
    let e = w
        .ord
        .cancel_order(opb::CancelOrderRequest {
            request_id: rid("x"),
            order_id: o1.order_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = w.ord.get_order(opb::GetOrderRequest { order_id: "ord-999999".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Confirming a backordered order is refused with details.
    let o5 = w.place("bytedance", H200, 100).await;
    assert_eq!(o5.state(), Backordered);
    let e = w
        .ord
        .confirm_order(opb::ConfirmOrderRequest { request_id: rid("c"), order_id: o5.order_id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.get_error_details().precondition_failure().unwrap().violations[0].r#type, "ORDER_NOT_RESERVED");
    let history = w.order(&o2.order_id).await.history;
    let kinds: Vec<opb::CauseKind> = history.iter().map(|t| t.cause.as_ref().unwrap().kind()).collect();
    assert_eq!(kinds.last(), Some(&opb::CauseKind::Cancelled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_holds_expire_and_their_stock_and_quota_move_on() {
    let options = ClusterOptions {
        orders: chipgate_orders::Options { hold_seconds: 1, tick: Duration::from_millis(50), ..Default::default() },
        ..ClusterOptions::default()
    };
    let mut w = World::with(options).await;
    let lic = w.licensed("alibaba", H200, 1000).await;
    w.receive(H200, 100).await;
    let first = w.place("alibaba", H200, 100).await;
    let second = w.place("alibaba", H200, 100).await;
    assert_eq!((first.state(), second.state()), (Reserved, Backordered));
    // The first hold expires: the order expires, its quota goes back, and the second takes the stock.
    let now = w
        .until(&[first.order_id.clone(), second.order_id.clone()], WAIT, |os| {
            os[0].state() == Expired && os[1].state() == Reserved
        })
        .await;
    assert_eq!(now[0].history.last().unwrap().cause.as_ref().unwrap().kind(), opb::CauseKind::HoldExpired);
    let deadline = std::time::Instant::now() + WAIT;
    while w.license(&lic).await.used_units != 100 {
        assert!(std::time::Instant::now() < deadline, "the expired order's quota did not go back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejection_queue_order_and_idempotent_placement() {
    let mut w = World::start().await;
    w.export(H200).await;
    let app = w.apply("tencent", H200, 100).await;
    w.wave(&[(&app, 100)], lpb::LicenseConditions { per_order_cap: 80, ..Default::default() }).await;

    // Above the per-order cap of the buyer's only licence: rejected, with the reason.
    let big = w.place("tencent", H200, 90).await;
    assert_eq!(big.state(), Rejected);
    assert_eq!(reasons(&big), vec![lpb::Condition::PerOrderCap]);
    assert!(big.reasons[0].permanent);

    // Within the buyer's own queue, an earlier order is never overtaken.
    let a = w.place("tencent", H200, 70).await;
    let b = w.place("tencent", H200, 40).await;
    let c = w.place("tencent", H200, 10).await;
    assert_eq!(a.state(), Backordered);
    assert_eq!(b.state(), AwaitingLicense);
    assert_eq!(reasons(&b), vec![lpb::Condition::Quota]);
    assert_eq!(c.state(), AwaitingLicense, "10 units would fit, but c may not overtake b");
    assert_eq!(reasons(&c), vec![lpb::Condition::QueueOrder]);
    // Cancelling a gives its quota back: b and c go through, in order.
    w.ord
        .cancel_order(opb::CancelOrderRequest {
            request_id: rid("x"),
            order_id: a.order_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    w.until(&[b.order_id.clone(), c.order_id.clone()], WAIT, |os| all_in(os, Backordered)).await;

    // The same request id returns the same order; with another body it is refused.
    let req = opb::PlaceOrderRequest {
        request_id: "fixed-1".into(),
        buyer_id: "tencent".into(),
        product_sku: H200.into(),
        units: 5,
        justification: String::new(),
    };
    let first = w.ord.place_order(req.clone()).await.unwrap().into_inner().order.unwrap();
    let again = w.ord.place_order(req.clone()).await.unwrap().into_inner().order.unwrap();
    assert_eq!(first.order_id, again.order_id);
    let mut other = req;
    other.units = 6;
    let e = w.ord.place_order(other).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.get_error_details().bad_request().unwrap().field_violations[0].field, "request_id");
    // The same call sent eight times at once (a client retrying before the first answer): one order,
    // and every call answers with it.
    let before = w.all_orders().await.len();
    let dup = opb::PlaceOrderRequest {
        request_id: "fixed-2".into(),
        buyer_id: "tencent".into(),
        product_sku: H200.into(),
        units: 3,
        justification: String::new(),
    };
    let calls = (0..8).map(|_| {
        let mut ord = w.ord.clone();
        let dup = dup.clone();
        tokio::spawn(async move { ord.place_order(dup).await })
    });
    let mut ids = std::collections::BTreeSet::new();
    for call in calls.collect::<Vec<_>>() {
        let answer = call.await.expect("call task").expect("a duplicate placement answers");
        ids.insert(answer.into_inner().order.expect("order").order_id);
    }
    assert_eq!(ids.len(), 1, "every duplicate names the same order: {ids:?}");
    assert_eq!(w.all_orders().await.len(), before + 1, "exactly one order placed");
    // Bad input is refused with every violation, and nothing is placed.
    let before = w.all_orders().await.len();
    let e = w
        .ord
        .place_order(opb::PlaceOrderRequest {
            request_id: String::new(),
            buyer_id: "bytedance".into(),
            product_sku: String::new(),
            units: 0,
            justification: String::new(),
        })
        .await
        .unwrap_err();
    let fields: Vec<String> =
        e.get_error_details().bad_request().unwrap().field_violations.iter().map(|f| f.field.clone()).collect();
    assert_eq!(fields, ["request_id", "product_sku", "units"]);
    assert_eq!(w.all_orders().await.len(), before);
}

/// ListOrders walks products in SKU order, each product's orders in placement order, and pages by
/// size *and* by bytes: with a page budget that fits a few orders, every order still comes exactly
/// once, whatever the filter (all, one buyer, one state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_orders_pages_across_products_by_size_and_bytes() {
    let orders = chipgate_orders::Options {
        tick: Duration::from_millis(50),
        page_bytes: 700,
        ..chipgate_orders::Options::default()
    };
    let mut w = World::with(ClusterOptions { orders, ..ClusterOptions::default() }).await;
    let mut placed = Vec::new();
    for (buyer, sku) in [("alpha", NVL), ("beta", H200), ("alpha", H200), ("beta", NVL), ("alpha", NVL)] {
        for _ in 0..3 {
            placed.push(w.place(buyer, sku, 10).await);
        }
    }
    let page = |page_size: i32, buyer: &str, state: opb::OrderState, token: String| opb::ListOrdersRequest {
        buyer_id: buyer.into(),
        state: state as i32,
        page_size,
        page_token: token,
        ..Default::default()
    };
    for (buyer, state) in [
        ("", opb::OrderState::Unspecified),
        ("alpha", opb::OrderState::Unspecified),
        ("", opb::OrderState::AwaitingLicense),
    ] {
        let mut got = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let r = w.ord.list_orders(page(4, buyer, state, token)).await.unwrap().into_inner();
            assert!(r.orders.len() <= 4);
            let bytes: usize = r.orders.iter().map(prost::Message::encoded_len).sum();
            assert!(r.orders.len() <= 1 || bytes <= 700, "a page of {bytes} bytes");
            got.extend(r.orders.into_iter().map(|o| (o.product_sku, o.order_id)));
            pages += 1;
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        let mut want: Vec<(String, String)> = placed
            .iter()
            .filter(|o| buyer.is_empty() || o.buyer_id == buyer)
            .filter(|o| state == opb::OrderState::Unspecified || o.state() == state)
            .map(|o| (o.product_sku.clone(), o.order_id.clone()))
            .collect();
        // Products in SKU order, each in placement order (the sequence in the id).
        let seq = |id: &str| id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        want.sort_by(|a, b| a.0.cmp(&b.0).then(seq(&a.1).cmp(&seq(&b.1))));
        assert_eq!(got, want, "buyer {buyer:?}, state {state:?}");
        assert!(pages > want.len().div_ceil(4), "the byte budget ended pages early ({pages} pages)");
    }
}
