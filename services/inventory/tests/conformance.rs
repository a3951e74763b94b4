//! Inventory behaviour on both state backends (in memory and a real redis-server): the catalogue,
//! stock arithmetic, receipts, holds in order, generations, expiry, the event stream, WatchStock, and
//! the no-oversell guarantee under concurrency.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use chipgate_inventory::{Inventory, Options, keys, parse_catalogue};
use chipgate_proto::inventory::v1 as pb;
use chipgate_proto::inventory::v1::inventory_service_server::InventoryService;
use chipgate_runtime::Shutdown;
use chipgate_state::{Backend, Store, backend_tests};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::{Code, Request};
use tonic_types::StatusExt;

const SKU: &str = "H200-SXM-141GB";

fn rid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    format!("r-{}", N.fetch_add(1, Ordering::Relaxed))
}

async fn service(store: Store) -> (Inventory, Shutdown) {
    let shutdown = Shutdown::new();
    let svc = Inventory::start(store, shutdown.clone(), Options { sweep_interval: Duration::from_millis(50) });
    let catalogue = include_str!("../../../data/catalogue.json");
    svc.load_catalogue(parse_catalogue(catalogue).unwrap()).await.unwrap();
    (svc, shutdown)
}

async fn receive(svc: &Inventory, receipt: &str, units: u64) -> pb::ReceiveSupplyResponse {
    svc.receive_supply(Request::new(pb::ReceiveSupplyRequest {
        request_id: rid(),
        receipt_id: receipt.into(),
        product_sku: SKU.into(),
        units,
        source: "shipment".into(),
    }))
    .await
    .unwrap()
    .into_inner()
}

async fn stock(svc: &Inventory) -> pb::Stock {
    svc.get_stock(Request::new(pb::GetStockRequest { product_sku: SKU.into() }))
        .await
        .unwrap()
        .into_inner()
        .stock
        .unwrap()
}

fn adds_up(s: &pb::Stock) -> bool {
    s.received == s.available + s.held + s.committed + s.shipped && s.on_hand == s.available + s.held + s.committed
}

fn item(order: &str, units: u64, partial: bool) -> pb::ReserveItem {
    pb::ReserveItem {
        order_id: order.into(),
        generation: 1,
        units,
        allow_partial: partial,
        hold_seconds: 0,
        known_held: None,
        max_units: None,
    }
}

/// An item whose caller has recorded `known` units as held.
fn known(order: &str, units: u64, known: u64) -> pb::ReserveItem {
    pb::ReserveItem { known_held: Some(known), ..item(order, units, true) }
}

async fn batch(svc: &Inventory, items: Vec<pb::ReserveItem>) -> pb::BatchReserveResponse {
    svc.batch_reserve(Request::new(pb::BatchReserveRequest {
        request_id: String::new(),
        product_sku: SKU.into(),
        items,
        fence_token: 0,
    }))
    .await
    .unwrap()
    .into_inner()
}

/// One order's hold, alone in a batch: its outcome.
async fn reserve(
    svc: &Inventory,
    order: &str,
    generation: u64,
    units: u64,
    partial: bool,
    hold_seconds: u32,
) -> Result<pb::ReserveItemResult, tonic::Status> {
    svc.batch_reserve(Request::new(pb::BatchReserveRequest {
        request_id: String::new(),
        product_sku: SKU.into(),
        items: vec![pb::ReserveItem {
            order_id: order.into(),
            generation,
            units,
            allow_partial: partial,
            hold_seconds,
            known_held: None,
            max_units: None,
        }],
        fence_token: 0,
    }))
    .await
    .map(|r| r.into_inner().results.remove(0))
}

/// Gives one order's hold back: the hold after the call.
async fn release(svc: &Inventory, order: &str, generation: u64) -> pb::Reservation {
    svc.batch_release_reservations(Request::new(pb::BatchReleaseReservationsRequest {
        request_id: rid(),
        items: vec![pb::ReleaseItem { order_id: order.into(), generation, product_sku: SKU.into() }],
        reason: "cancelled".into(),
        unless_confirmed: false,
    }))
    .await
    .unwrap()
    .into_inner()
    .reservations
    .remove(0)
}

async fn events(store: &Store) -> Vec<pb::InventoryEvent> {
    store
        .xrange(&keys::events(&chipgate_domain::ids::Sku::from_trusted(SKU)), None, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|e| pb::InventoryEvent::decode(e.field("e").unwrap()).unwrap())
        .collect()
}

async fn catalogue_loads_and_lists_in_sku_order(store: Store) {
    let (svc, _s) = service(store).await;
    let list = svc
        .list_products(Request::new(pb::ListProductsRequest { page_size: 0, page_token: String::new() }))
        .await
        .unwrap()
        .into_inner();
    let skus: Vec<&str> = list.products.iter().map(|p| p.sku.as_str()).collect();
    assert_eq!(skus, ["ASCEND-910C", "H20-96GB", "H200-NVL-141GB", "H200-SXM-141GB", "MLU590"]);
    let h200 = svc
        .get_product(Request::new(pb::GetProductRequest { sku: SKU.into() }))
        .await
        .unwrap()
        .into_inner()
        .product
        .unwrap();
    assert_eq!(h200.product_class(), pb::ProductClass::ExportControlledAccelerator);
    assert!((h200.relative_performance - 6.0).abs() < f64::EPSILON);
    // Loading again is a no-op, and every product starts with empty stock.
    let catalogue = include_str!("../../../data/catalogue.json");
    svc.load_catalogue(parse_catalogue(catalogue).unwrap()).await.unwrap();
    let all = svc.list_stock(Request::new(pb::ListStockRequest {})).await.unwrap().into_inner().stock;
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|s| s.received == 0 && adds_up(s)));
    let bad =
        parse_catalogue(r#"[{"sku":"X","name":"x","class":"gpu","relative_performance":1,"vendor":"v"}]"#).unwrap_err();
    assert!(bad.contains("unknown class"), "{bad}");
}

async fn receipts_count_once_and_stock_adds_up(store: Store) {
    let (svc, _s) = service(store.clone()).await;
    let first = receive(&svc, "rcpt-1", 1000).await;
    assert!(first.newly_booked);
    let again = receive(&svc, "rcpt-1", 1000).await;
    assert!(!again.newly_booked, "a retried receipt never counts twice");
    assert_eq!(stock(&svc).await.received, 1000);
    let conflict = svc
        .receive_supply(Request::new(pb::ReceiveSupplyRequest {
            request_id: rid(),
            receipt_id: "rcpt-1".into(),
            product_sku: SKU.into(),
            units: 5,
            source: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);

    reserve(&svc, "o1", 1, 300, false, 60).await.unwrap();
    reserve(&svc, "o2", 1, 200, false, 60).await.unwrap();
    svc.confirm_reservation(Request::new(pb::ConfirmReservationRequest {
        request_id: rid(),
        order_id: "o1".into(),
        generation: 1,
        product_sku: SKU.into(),
    }))
    .await
    .unwrap();
    svc.ship_reservation(Request::new(pb::ShipReservationRequest {
        request_id: rid(),
        order_id: "o1".into(),
        generation: 1,
        product_sku: SKU.into(),
    }))
    .await
    .unwrap();
    release(&svc, "o2", 1).await;
    let s = stock(&svc).await;
    assert_eq!((s.available, s.held, s.committed, s.shipped, s.received, s.on_hand), (700, 0, 0, 300, 1000, 700));
    assert!(adds_up(&s));
    // Shipped units can't be released: the hold stays shipped and the stock as it was.
    assert_eq!(release(&svc, "o1", 1).await.state(), pb::ReservationState::Shipped);
    assert_eq!(stock(&svc).await, s);
    // Every change is one event carrying the stock after it.
    let ev = events(&store).await;
    let kinds: Vec<&str> = ev
        .iter()
        .map(|e| match e.kind.as_ref().unwrap() {
            pb::inventory_event::Kind::ProductUpserted(_) => "product",
            pb::inventory_event::Kind::SupplyReceived(_) => "supply",
            pb::inventory_event::Kind::HoldsPlaced(_) => "placed",
            pb::inventory_event::Kind::HoldsReleased(_) => "released",
            pb::inventory_event::Kind::HoldsExpired(_) => "expired",
            pb::inventory_event::Kind::HoldsConfirmed(_) => "confirmed",
            pb::inventory_event::Kind::HoldsShipped(_) => "shipped",
        })
        .filter(|k| *k != "product")
        .collect();
    assert_eq!(kinds, ["supply", "placed", "placed", "confirmed", "shipped", "released"]);
    assert_eq!(ev.last().unwrap().stock.as_ref().unwrap().available, 700);
}

async fn holds_are_served_in_order_and_partial_holds_top_up(store: Store) {
    let (svc, _s) = service(store).await;
    receive(&svc, "r1", 100).await;
    let r = batch(&svc, vec![item("a", 60, false), item("b", 50, true), item("c", 10, false)]).await;
    let outcomes: Vec<pb::ReserveOutcome> = r.results.iter().map(|x| x.outcome()).collect();
    assert_eq!(outcomes, [pb::ReserveOutcome::Held, pb::ReserveOutcome::Partial, pb::ReserveOutcome::NotServed]);
    assert_eq!(r.results[1].reservation.as_ref().unwrap().held_units, 40);
    assert!(r.results[1].reservation.as_ref().unwrap().expire_time.is_none(), "partial holds don't expire");
    assert!(r.results[2].reservation.is_none(), "c may not overtake b");
    assert_eq!(r.stock.as_ref().unwrap().available, 0);

    // All or nothing with too little stock: nothing is held.
    let short = reserve(&svc, "d", 1, 5, false, 0).await.unwrap();
    assert_eq!(short.outcome(), pb::ReserveOutcome::NotServed);
    assert!(short.reservation.is_none());

    receive(&svc, "r2", 15).await;
    let r = batch(&svc, vec![item("b", 50, true), item("c", 10, false)]).await;
    assert_eq!(r.results[0].outcome(), pb::ReserveOutcome::Held);
    assert_eq!(r.results[0].reservation.as_ref().unwrap().held_units, 50);
    assert_eq!(r.results[1].outcome(), pb::ReserveOutcome::NotServed, "5 left, c needs 10 and can't go partial");
    // The same call again changes nothing.
    let again = batch(&svc, vec![item("a", 60, false)]).await;
    assert_eq!(again.results[0].outcome(), pb::ReserveOutcome::Held);
    assert_eq!(again.stock.unwrap().available, 5);
    // The same order and generation with other units is refused.
    let mismatch = svc
        .batch_reserve(Request::new(pb::BatchReserveRequest {
            request_id: String::new(),
            product_sku: SKU.into(),
            items: vec![item("a", 61, false)],
            fence_token: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(mismatch.code(), Code::FailedPrecondition);
    assert!(adds_up(&stock(&svc).await));
}

/// Holds an attempt took but its caller never recorded (its commit lost to a conflict or a crash) go
/// back when the caller asks again saying what it knows, and the batch is served afresh in its order:
/// they never let a later order keep stock an earlier one is short of.
async fn unrecorded_holds_go_back_and_the_batch_is_served_in_order(store: Store) {
    let (svc, _s) = service(store).await;
    receive(&svc, "r1", 100).await;
    // An attempt served b (80) and c (10); its caller recorded nothing.
    batch(&svc, vec![known("b", 80, 0), known("c", 10, 0)]).await;
    // Now an earlier order a (90) is in the batch too: it comes first.
    let r = batch(&svc, vec![known("a", 90, 0), known("b", 80, 0), known("c", 10, 0)]).await;
    let got: Vec<(pb::ReserveOutcome, u64)> =
        r.results.iter().map(|x| (x.outcome(), x.reservation.as_ref().map(|h| h.held_units).unwrap_or(0))).collect();
    assert_eq!(
        got,
        [(pb::ReserveOutcome::Held, 90), (pb::ReserveOutcome::Partial, 10), (pb::ReserveOutcome::NotServed, 0)],
        "a is served first; b keeps what is left; c waits"
    );
    let s = stock(&svc).await;
    assert_eq!((s.available, s.held), (0, 100));
    assert!(adds_up(&s));
    // The same call again (a retry) answers the same.
    let again = batch(&svc, vec![known("a", 90, 0), known("b", 80, 0), known("c", 10, 0)]).await;
    assert_eq!(
        again.results.iter().map(|x| x.outcome()).collect::<Vec<_>>(),
        got.iter().map(|g| g.0).collect::<Vec<_>>()
    );
    // What a caller recorded stays: asking with b's 10 known keeps them; without known_held an existing
    // hold is trusted as it stands.
    let r = batch(&svc, vec![known("b", 80, 10)]).await;
    assert_eq!(r.results[0].reservation.as_ref().map(|h| h.held_units), Some(10));
    let r = batch(&svc, vec![item("a", 90, true)]).await;
    assert_eq!(r.results[0].outcome(), pb::ReserveOutcome::Held);
    assert!(adds_up(&stock(&svc).await));
}

/// An allocation policy's planned shares: each order asks for at most its share (`max_units`), the
/// batch goes on past an order held up to its share, and a retry of the same asks takes nothing more.
async fn planned_shares_are_held_as_asked(store: Store) {
    let (svc, _s) = service(store).await;
    receive(&svc, "r1", 100).await;
    let share = |order: &str, units: u64, known: u64, max: u64| pb::ReserveItem {
        max_units: Some(max),
        ..self::known(order, units, known)
    };
    let asks = || vec![share("a", 300, 0, 60), share("b", 100, 0, 20), share("c", 50, 0, 20)];
    let r = batch(&svc, asks()).await;
    let got: Vec<(pb::ReserveOutcome, u64)> =
        r.results.iter().map(|x| (x.outcome(), x.reservation.as_ref().map(|h| h.held_units).unwrap_or(0))).collect();
    assert_eq!(
        got,
        [(pb::ReserveOutcome::Partial, 60), (pb::ReserveOutcome::Partial, 20), (pb::ReserveOutcome::Partial, 20)],
        "each holds its share; b and c are served past a"
    );
    assert_eq!(r.stock.as_ref().map(|s| s.available), Some(0));
    // The caller recorded them: asking again for the same shares takes nothing more.
    receive(&svc, "r2", 10).await;
    let again = batch(&svc, vec![share("a", 300, 60, 60), share("b", 100, 20, 20), share("c", 50, 20, 20)]).await;
    assert!(again.results.iter().all(|x| x.outcome() == pb::ReserveOutcome::NotServed));
    assert_eq!(stock(&svc).await.available, 10);
    // A share beyond what is there: held up to the stock, and the batch stops at that order.
    let r = batch(&svc, vec![share("b", 100, 20, 40), share("c", 50, 20, 25)]).await;
    let got: Vec<u64> = r.results.iter().map(|x| x.reservation.as_ref().map(|h| h.held_units).unwrap_or(0)).collect();
    assert_eq!(got, [30, 20], "b short of its share; c may not pass it");
    // Asked for no more than it records, an order only gives back what it never recorded: b's 10
    // above the 20 it knows go back.
    let r = batch(&svc, vec![share("b", 100, 20, 20)]).await;
    assert_eq!(r.results[0].reservation.as_ref().map(|h| h.held_units), Some(20));
    assert_eq!(r.stock.as_ref().map(|s| s.available), Some(10));
    // Out of range: refused with the field named, nothing changed.
    let bad = svc
        .batch_reserve(Request::new(pb::BatchReserveRequest {
            request_id: String::new(),
            product_sku: SKU.into(),
            items: vec![share("x", 10, 0, 11), share("y", 10, 0, 12), share("z", 10, 5, 4)],
            fence_token: 0,
        }))
        .await
        .unwrap_err();
    let fields: Vec<String> =
        bad.get_error_details().bad_request().unwrap().field_violations.iter().map(|f| f.field.clone()).collect();
    assert_eq!(fields, ["items[0].max_units", "items[1].max_units", "items[2].max_units"]);
    assert!(adds_up(&stock(&svc).await));
}

async fn generations_are_never_reopened(store: Store) {
    let (svc, _s) = service(store).await;
    receive(&svc, "r1", 100).await;
    reserve(&svc, "o", 1, 30, false, 0).await.unwrap();
    let rel = release(&svc, "o", 1).await;
    assert_eq!(rel.state(), pb::ReservationState::Released);
    let stale = reserve(&svc, "o", 1, 30, false, 0).await.unwrap();
    assert_eq!(stale.outcome(), pb::ReserveOutcome::Stale);
    assert_eq!(stale.reservation.unwrap().state(), pb::ReservationState::Released, "the hold as it stands");
    reserve(&svc, "o", 2, 30, false, 0).await.unwrap();
    // A newer generation supersedes an older one that still holds units.
    reserve(&svc, "o", 3, 10, false, 0).await.unwrap();
    let s = stock(&svc).await;
    assert_eq!((s.available, s.held), (90, 10));
    // Releasing an order that never held anything fences its late reserve.
    release(&svc, "ghost", 1).await;
    let r = batch(&svc, vec![item("ghost", 5, false)]).await;
    assert_eq!(r.results[0].outcome(), pb::ReserveOutcome::Stale);
    // Batch release leaves confirmed holds alone when asked to.
    svc.confirm_reservation(Request::new(pb::ConfirmReservationRequest {
        request_id: rid(),
        order_id: "o".into(),
        generation: 3,
        product_sku: SKU.into(),
    }))
    .await
    .unwrap();
    let out = svc
        .batch_release_reservations(Request::new(pb::BatchReleaseReservationsRequest {
            request_id: String::new(),
            items: vec![pb::ReleaseItem { order_id: "o".into(), generation: 3, product_sku: SKU.into() }],
            reason: "unwind".into(),
            unless_confirmed: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.reservations[0].state(), pb::ReservationState::Confirmed);
    let s = stock(&svc).await;
    assert_eq!((s.available, s.committed), (90, 10));
    assert!(adds_up(&s));
}

async fn holds_expire_on_their_own_exactly_once(store: Store) {
    let (svc, _s) = service(store.clone()).await;
    receive(&svc, "r1", 50).await;
    let h = reserve(&svc, "short", 1, 20, false, 1).await.unwrap().reservation.unwrap();
    assert!(h.expire_time.is_some());
    reserve(&svc, "long", 1, 20, false, 600).await.unwrap();
    assert_eq!(stock(&svc).await.available, 10);
    // Wait for expiry plus a few sweeps.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if stock(&svc).await.available == 30 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the short hold did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = svc
        .get_reservation(Request::new(pb::GetReservationRequest { order_id: "short".into(), product_sku: SKU.into() }))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(r.state(), pb::ReservationState::Expired);
    // Confirming it now is a failed precondition with details.
    let late = svc
        .confirm_reservation(Request::new(pb::ConfirmReservationRequest {
            request_id: rid(),
            order_id: "short".into(),
            generation: 1,
            product_sku: SKU.into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let pf = late.get_error_details();
    assert_eq!(pf.precondition_failure().unwrap().violations[0].r#type, "HOLD_EXPIRED");
    // More sweeps later, still exactly one expiry event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    svc.sweep_once().await.unwrap();
    let expired: Vec<_> = events(&store)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            Some(pb::inventory_event::Kind::HoldsExpired(x)) => Some(x),
            _ => None,
        })
        .collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].units_freed, 20);
    assert_eq!(expired[0].reservations[0].order_id, "short");
    let s = stock(&svc).await;
    assert_eq!((s.available, s.held), (30, 20));
    assert!(adds_up(&s));
}

async fn concurrent_holds_never_oversell(store: Store) {
    let (svc, _s) = service(store).await;
    receive(&svc, "r1", 500).await;
    // 20 clients × 5 orders × 12 units = 1,200 units asked for against 500; each call is repeated
    // (a client retry), half alone in a batch, half in a batch with an order that never fits.
    let mut tasks = Vec::new();
    for t in 0..20 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for k in 0..5 {
                let order = format!("c{t}-o{k}");
                for _retry in 0..2 {
                    let items = if (t + k) % 2 == 0 {
                        vec![item(&order, 12, false)]
                    } else {
                        vec![item(&order, 12, false), item(&format!("{order}-huge"), 100_000, false)]
                    };
                    let r = batch(&svc, items).await;
                    let held = r.results[0].reservation.clone().filter(|h| h.state() == pb::ReservationState::Held);
                    if let Some(h) = held {
                        got.push((h.order_id, h.held_units));
                    }
                }
            }
            got
        }));
    }
    let mut per_order: HashMap<String, u64> = HashMap::new();
    for t in tasks {
        for (o, u) in t.await.unwrap() {
            let prev = per_order.insert(o.clone(), u);
            assert!(prev.is_none() || prev == Some(u), "order {o} held twice with different amounts");
        }
    }
    let s = stock(&svc).await;
    let held: u64 = per_order.values().sum();
    assert_eq!(s.held, held, "held stock equals the sum over distinct orders");
    assert_eq!(held, 492, "41 holds of 12 fit into 500");
    assert_eq!(s.available, 8);
    assert!(adds_up(&s));
    let list = svc
        .list_reservations(Request::new(pb::ListReservationsRequest {
            product_sku: SKU.into(),
            state: pb::ReservationState::Held as i32,
            page_size: 1000,
            page_token: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.reservations.len(), per_order.len(), "one hold per order");
}

/// A counter of `svc`'s metrics (0 before it first counts).
async fn counter(svc: &Inventory, name: &str) -> u64 {
    let text = svc.metrics().render().await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_total ")))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// A replica plans a batch of holds from the stock as it last left it, without reading it first
/// (guarded): whatever another replica did in between, no batch holds stock that isn't there and no
/// order's existing hold is overlooked.
async fn replicas_planning_from_what_they_last_saw_never_oversell(store: Store) {
    let (a, _sa) = service(store.clone()).await;
    let (b, _sb) = service(store).await;
    receive(&a, "r1", 100).await;
    assert_eq!(reserve(&a, "o1", 1, 10, false, 0).await.unwrap().outcome(), pb::ReserveOutcome::Held);
    assert_eq!(reserve(&a, "o2", 1, 10, false, 0).await.unwrap().outcome(), pb::ReserveOutcome::Held);
    assert_eq!(counter(&a, "chipgate_hold_batches_unread").await, 1, "the second batch was planned without a read");

    // The other replica takes stock: what the first last saw is stale.
    assert_eq!(reserve(&b, "o3", 1, 50, false, 0).await.unwrap().outcome(), pb::ReserveOutcome::Held);
    let r = reserve(&a, "o4", 1, 40, false, 0).await.unwrap();
    assert_eq!(r.outcome(), pb::ReserveOutcome::NotServed, "30 left, not the 80 it last saw");
    assert_eq!(counter(&a, "chipgate_hold_batches_unread_missed").await, 1);
    let s = stock(&a).await;
    assert_eq!((s.held, s.available), (70, 30));
    assert!(adds_up(&s));

    // An order given up before it was ever held leaves a released hold and the stock as it was; a
    // replica whose view of the stock is right must still not judge that order as new.
    assert_eq!(reserve(&a, "o5", 1, 5, false, 0).await.unwrap().outcome(), pb::ReserveOutcome::Held);
    assert_eq!(reserve(&a, "o6", 1, 5, false, 0).await.unwrap().outcome(), pb::ReserveOutcome::Held);
    let unread = counter(&a, "chipgate_hold_batches_unread").await;
    assert!(unread >= 2, "guessing again once a read found the stock as left: {unread}");
    let missed = counter(&a, "chipgate_hold_batches_unread_missed").await;
    assert_eq!(release(&b, "o7", 1).await.state(), pb::ReservationState::Released);
    let r = reserve(&a, "o7", 1, 1_000, false, 0).await.unwrap();
    assert_eq!(r.outcome(), pb::ReserveOutcome::Stale, "its generation was released: {r:?}");
    assert_eq!(counter(&a, "chipgate_hold_batches_unread_missed").await, missed + 1, "the guess met the released hold");
    let r = reserve(&a, "o7", 1, 1, false, 0).await.unwrap();
    assert_eq!(r.outcome(), pb::ReserveOutcome::Stale, "never reopened, though it would fit: {r:?}");

    // Both replicas at once, each batch an order of 7 units: exactly as many holds as fit.
    let before = stock(&a).await.available;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let svc = if t % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut held = 0;
            for k in 0..4 {
                let r = reserve(&svc, &format!("c{t}-{k}"), 1, 7, false, 0).await.unwrap();
                if r.outcome() == pb::ReserveOutcome::Held {
                    held += 7;
                }
            }
            held
        }));
    }
    let mut held = 0;
    for t in tasks {
        held += t.await.unwrap();
    }
    let s = stock(&b).await;
    assert_eq!(held, before - before % 7, "every hold that fits, and no more");
    assert_eq!(s.available, before - held);
    assert!(adds_up(&s));
}

async fn watch_stock_streams_changes(store: Store) {
    let (svc, shutdown) = service(store).await;
    // Give the hub a moment to start following the stream.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut stream =
        svc.watch_stock(Request::new(pb::WatchStockRequest { product_sku: SKU.into() })).await.unwrap().into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.cause, "snapshot");
    receive(&svc, "watched", 77).await;
    let change = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(change.cause, "supply.received");
    assert_eq!(change.reference, "watched");
    assert_eq!(change.stock.unwrap().available, 77);
    // Other products' changes are filtered out; shutdown ends the stream.
    shutdown.trigger();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap();
    assert!(end.is_none(), "the stream ends on shutdown");
    let unknown =
        svc.watch_stock(Request::new(pb::WatchStockRequest { product_sku: "NOPE".into() })).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

async fn bad_input_changes_nothing(store: Store) {
    let (svc, _s) = service(store.clone()).await;
    let before = store.xlen(&keys::events(&chipgate_domain::ids::Sku::from_trusted(SKU))).await.unwrap();
    let e = svc
        .receive_supply(Request::new(pb::ReceiveSupplyRequest {
            request_id: rid(),
            receipt_id: "x".repeat(300),
            product_sku: "UNKNOWN".into(),
            units: 0,
            source: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let fields: Vec<String> =
        e.get_error_details().bad_request().unwrap().field_violations.iter().map(|f| f.field.clone()).collect();
    assert_eq!(fields, ["receipt_id", "units"]);
    let unknown = svc
        .receive_supply(Request::new(pb::ReceiveSupplyRequest {
            request_id: rid(),
            receipt_id: "r".into(),
            product_sku: "UNKNOWN".into(),
            units: 1,
            source: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert_eq!(unknown.get_error_details().bad_request().unwrap().field_violations[0].field, "product_sku");
    let oversized: Vec<pb::ReserveItem> = (0..10_001).map(|i| item(&format!("o{i}"), 1, false)).collect();
    let big = svc
        .batch_reserve(Request::new(pb::BatchReserveRequest {
            request_id: String::new(),
            product_sku: SKU.into(),
            items: oversized,
            fence_token: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(big.code(), Code::InvalidArgument);
    assert_eq!(big.get_error_details().bad_request().unwrap().field_violations[0].field, "items");
    // Every bad field of a batch at once.
    let bad = svc
        .batch_reserve(Request::new(pb::BatchReserveRequest {
            request_id: String::new(),
            product_sku: SKU.into(),
            items: vec![known("a", 5, 6), pb::ReserveItem { generation: 0, ..item("b", 0, true) }, item("a", 1, true)],
            fence_token: 0,
        }))
        .await
        .unwrap_err();
    let fields: Vec<String> =
        bad.get_error_details().bad_request().unwrap().field_violations.iter().map(|f| f.field.clone()).collect();
    assert_eq!(fields, ["items[0].known_held", "items[1].generation", "items[1].units", "items[2].order_id"]);
    let neg = reserve(&svc, "o", 0, 0, false, 100_000).await.unwrap_err();
    let fields: Vec<String> =
        neg.get_error_details().bad_request().unwrap().field_violations.iter().map(|f| f.field.clone()).collect();
    assert_eq!(fields, ["items[0].generation", "items[0].units", "items[0].hold_seconds"]);
    assert_eq!(
        store.xlen(&keys::events(&chipgate_domain::ids::Sku::from_trusted(SKU))).await.unwrap(),
        before,
        "nothing changed"
    );
    assert!(adds_up(&stock(&svc).await));
}

async fn stale_fences_are_refused(store: Store) {
    let (svc, _s) = service(store).await;
    receive(&svc, "r", 10).await;
    let call = |token: u64, order: &str| {
        let svc = svc.clone();
        let order = order.to_string();
        async move {
            svc.batch_reserve(Request::new(pb::BatchReserveRequest {
                request_id: String::new(),
                product_sku: SKU.into(),
                items: vec![item(&order, 1, false)],
                fence_token: token,
            }))
            .await
        }
    };
    call(3, "a").await.unwrap();
    let stale = call(2, "b").await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(stock(&svc).await.available, 9, "the fenced-off call took nothing");
}

/// A replica that plans batches of holds without reading commits in one round trip, one that reads
/// in two; while the first streams batches for a product, the second's commits could keep failing
/// (the first's land between its read and its commit) until it gives up with CONTENTION. The loser
/// takes its turn instead (`seen.rs`): every batch of the reading replica gets its answer while the
/// other keeps reserving as fast as it can, and the stock adds up.
async fn a_replica_planning_without_reading_never_starves_one_that_reads(store: Store) {
    let (fast, _sf) = service(store.clone()).await;
    let (slow, _ss) = service(store).await;
    receive(&fast, "r1", 100_000).await;
    assert_eq!(reserve(&fast, "f-1", 1, 1, false, 0).await.unwrap().outcome(), pb::ReserveOutcome::Held);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fast_batches = tokio::spawn({
        let (fast, done) = (fast.clone(), done.clone());
        async move {
            let mut n = 1u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) && n < 5_000 {
                n += 1;
                let r = reserve(&fast, &format!("f-{n}"), 1, 1, false, 0).await.unwrap();
                assert_eq!(r.outcome(), pb::ReserveOutcome::Held, "batch {n} of the fast replica");
            }
            n
        }
    });
    for k in 0..40 {
        match reserve(&slow, &format!("s-{k}"), 1, 1, false, 0).await {
            Ok(r) => assert_eq!(r.outcome(), pb::ReserveOutcome::Held, "batch {k} of the replica that reads"),
            Err(e) => panic!("batch {k} of the replica that reads: {e:?}"),
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let fast_held = fast_batches.await.unwrap();
    let s = stock(&slow).await;
    assert_eq!(s.held, fast_held + 40);
    assert!(adds_up(&s));
}

backend_tests!(
    a_replica_planning_without_reading_never_starves_one_that_reads,
    catalogue_loads_and_lists_in_sku_order,
    receipts_count_once_and_stock_adds_up,
    holds_are_served_in_order_and_partial_holds_top_up,
    unrecorded_holds_go_back_and_the_batch_is_served_in_order,
    planned_shares_are_held_as_asked,
    generations_are_never_reopened,
    holds_expire_on_their_own_exactly_once,
    concurrent_holds_never_oversell,
    replicas_planning_from_what_they_last_saw_never_oversell,
    watch_stock_streams_changes,
    bad_input_changes_nothing,
    stale_fences_are_refused,
);
