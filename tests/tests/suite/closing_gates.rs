//! Gates that close on orders already holding quota and stock, in the configuration operators run
//! (authentication on, orders calling its peers with its `service` token): the orders go back to
//! waiting with the reason, their quota and stock go back, and the product keeps moving — a later
//! order is evaluated, not left PENDING. Also: products outside the catalogue are refused, and an
//! order that can never be served is rejected even while it waits behind another.

use std::time::Duration;

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_testkit::ClusterOptions;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{H200, World, all_in, reasons, rid};

const WITHIN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_export_authorisation_unwinds_holders_and_the_product_keeps_moving() {
    let mut w = World::start().await;
    let lic = w.licensed("bytedance", H200, 1000).await;
    w.receive(H200, 500).await;
    let first = w.place("bytedance", H200, 100).await;
    let first = w.until(&[first.order_id], WITHIN, |o| all_in(o, opb::OrderState::Reserved)).await.remove(0);

    w.revoke_export(H200).await;
    let back = w
        .until(std::slice::from_ref(&first.order_id), WITHIN, |o| all_in(o, opb::OrderState::AwaitingLicense))
        .await
        .remove(0);
    assert!(reasons(&back).contains(&lpb::Condition::ExportAuthorization), "{:?}", back.reasons);
    // Its quota and stock go back (the cleanup worker carries out what the move owes).
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        let (l, s) = (w.license(&lic).await, w.stock(H200).await);
        if l.used_units == 0 && s.held == 0 {
            assert_eq!(s.available, 500);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "quota {} and stock {} held still", l.used_units, s.held);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The product did not stall: a new order is evaluated and says why it waits.
    let second = w.place("bytedance", H200, 50).await;
    assert_ne!(second.state(), opb::OrderState::Pending, "a later order is evaluated, not left PENDING");
    assert_eq!(second.state(), opb::OrderState::AwaitingLicense);
    assert!(reasons(&second).contains(&lpb::Condition::ExportAuthorization));

    // Authorised again: both are served, in placement order.
    w.export(H200).await;
    let ids = vec![first.order_id, second.order_id];
    w.until(&ids, WITHIN, |o| all_in(o, opb::OrderState::Reserved)).await;
    assert_eq!(w.license(&lic).await.used_units, 150);
    w.cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_unwinds_holders_and_confirmation_under_a_closed_gate_is_refused() {
    let mut w = World::start().await;
    let lic = w.licensed("alibaba", H200, 1000).await;
    w.receive(H200, 500).await;
    let a = w.place("alibaba", H200, 100).await.order_id;
    let b = w.place("alibaba", H200, 100).await.order_id;
    w.until(&[a.clone(), b.clone()], WITHIN, |o| all_in(o, opb::OrderState::Reserved)).await;
    // One order is confirmed before the suspension: it keeps its quota and stock.
    w.ord.confirm_order(opb::ConfirmOrderRequest { request_id: rid("conf"), order_id: a.clone() }).await.unwrap();
    w.lic
        .suspend_license(lpb::SuspendLicenseRequest {
            request_id: rid("susp"),
            license_id: lic.clone(),
            reason: "inspection".into(),
        })
        .await
        .unwrap();
    let back =
        w.until(std::slice::from_ref(&b), WITHIN, |o| all_in(o, opb::OrderState::AwaitingLicense)).await.remove(0);
    assert_eq!(reasons(&back), vec![lpb::Condition::LicenseInForce]);
    assert_eq!(w.order(&a).await.state(), opb::OrderState::Confirmed);

    // A customs embargo: confirming an order while it stands is refused with the reason.
    w.lic
        .reinstate_license(lpb::ReinstateLicenseRequest {
            request_id: rid("rein"),
            license_id: lic.clone(),
            reason: "cleared".into(),
        })
        .await
        .unwrap();
    w.until(std::slice::from_ref(&b), WITHIN, |o| all_in(o, opb::OrderState::Reserved)).await;
    w.customs(H200, true).await;
    let confirm = w.ord.confirm_order(opb::ConfirmOrderRequest { request_id: rid("conf"), order_id: b.clone() }).await;
    match confirm {
        // The embargo reached the order first: it is back to waiting, and nothing was confirmed.
        Ok(r) => panic!("confirmed under an embargo: {:?}", r.into_inner().order.map(|o| o.state())),
        Err(s) => assert!(matches!(s.code(), Code::FailedPrecondition), "{s:?}"),
    }
    w.until(std::slice::from_ref(&b), WITHIN, |o| all_in(o, opb::OrderState::AwaitingLicense)).await;
    // The unwound order's quota goes back (the cleanup worker carries out what the move owes).
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        let l = w.license(&lic).await;
        if l.used_units == 100 {
            assert_eq!(l.confirmed_units, 100, "only the confirmed order holds quota");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "quota still held: {} used", l.used_units);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_products_are_refused_and_add_nothing() {
    let mut w = World::start().await;
    for call in ["place", "apply"] {
        let status = match call {
            "place" => w
                .ord
                .place_order(opb::PlaceOrderRequest {
                    request_id: rid("ord"),
                    buyer_id: "moonshot".into(),
                    product_sku: "H900-NOPE".into(),
                    units: 10,
                    justification: "x".into(),
                })
                .await
                .unwrap_err(),
            _ => w
                .lic
                .submit_application(lpb::SubmitApplicationRequest {
                    request_id: rid("app"),
                    buyer_id: "moonshot".into(),
                    product_sku: "H900-NOPE".into(),
                    quantity: 10,
                    end_use: "x".into(),
                    site: "y".into(),
                    destination: String::new(),
                })
                .await
                .unwrap_err(),
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{call}: {status:?}");
        let bad = status.get_error_details().bad_request().cloned().unwrap();
        assert_eq!(bad.field_violations[0].field, "product_sku", "{call}");
    }
    assert!(w.all_orders().await.is_empty());
    // A real product's order, so the per-product figures exist.
    w.place("moonshot", H200, 10).await;
    let queue = w.lic.list_queue(lpb::ListQueueRequest::default()).await.unwrap().into_inner();
    assert!(queue.applications.is_empty());
    // The made-up product never became one the orders service carries (no per-tick work, no metric).
    let orders = w.cluster.orders.as_ref().unwrap().metrics_url();
    let deadline = std::time::Instant::now() + WITHIN;
    let scrape = loop {
        let scrape = chipgate_testkit::prom::scrape(&orders).await.unwrap();
        if scrape.get("chipgate_product_orders", &[("product", H200)]).is_some() {
            break scrape;
        }
        assert!(std::time::Instant::now() < deadline, "no per-product figures for {H200}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let leaked: Vec<_> = scrape.samples.iter().filter(|s| s.labels.values().any(|v| v == "H900-NOPE")).collect();
    assert!(leaked.is_empty(), "the unknown SKU shows in the metrics: {leaked:?}");
    w.cluster.stop().await;
}

/// With one order per quota call, an order above every per-order cap placed behind an order of the
/// same buyer that waits for quota is rejected (it can never be served), and later orders still
/// queue behind the waiting one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_above_the_cap_is_rejected_even_behind_a_waiting_order() {
    let mut options = ClusterOptions::default();
    options.orders.chunk = 1;
    let mut w = World::with(options).await;
    w.export(H200).await;
    let app = w.apply("baidu", H200, 100).await;
    let cap = lpb::LicenseConditions { per_order_cap: 60, ..Default::default() };
    w.wave(&[(&app, 100)], cap).await;
    let taken = w.place("baidu", H200, 60).await.order_id;
    let waits = w.place("baidu", H200, 50).await.order_id;
    let big = w.place("baidu", H200, 70).await.order_id;
    let small = w.place("baidu", H200, 10).await.order_id;
    let all = vec![taken.clone(), waits.clone(), big.clone(), small.clone()];
    let got = w
        .until(&all, WITHIN, |o| {
            o[0].state() == opb::OrderState::Backordered
                && o[1].state() == opb::OrderState::AwaitingLicense
                && o[2].state() == opb::OrderState::Rejected
                && o[3].state() == opb::OrderState::AwaitingLicense
        })
        .await;
    assert_eq!(reasons(&got[1]), vec![lpb::Condition::Quota]);
    assert!(reasons(&got[2]).contains(&lpb::Condition::PerOrderCap), "{:?}", got[2].reasons);
    assert_eq!(reasons(&got[3]), vec![lpb::Condition::QueueOrder], "the small one may not overtake");
    w.cluster.stop().await;
}
