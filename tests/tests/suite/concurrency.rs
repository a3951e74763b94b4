//! Many buyers placing orders while waves publish, terms are finalised, supply arrives and orders are
//! cancelled, all at once (three real services, real Redis). Afterwards every invariant holds: licence
//! quota used equals the units of the orders holding it, stock adds up and matches the orders, every
//! placement happened exactly once, and no order overtook an earlier one in its backlog.

use crate::common;

use std::time::Duration;

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_testkit::invariants;
use common::*;

const BUYERS: [&str; 6] = ["bytedance", "alibaba", "tencent", "baidu", "moonshot", "zhipu"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_at_once_keeps_every_invariant() {
    let mut w = World::start().await;
    w.export(H200).await;
    w.export(NVL).await;
    // Applications for four of the six buyers, on both products.
    let mut apps = Vec::new();
    for buyer in &BUYERS[..4] {
        for sku in [H200, NVL] {
            apps.push(w.apply(buyer, sku, 5_000).await);
        }
    }

    // Buyers place orders concurrently.
    let mut placers = Vec::new();
    for (i, buyer) in BUYERS.iter().enumerate() {
        let mut ord = w.ord.clone();
        let buyer = buyer.to_string();
        placers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for k in 0..30u64 {
                let sku = if (k + i as u64).is_multiple_of(3) { NVL } else { H200 };
                let request_id = rid(&format!("{buyer}-{k}"));
                let units = 10 + (k * 7 + i as u64 * 13) % 90;
                let req = opb::PlaceOrderRequest {
                    request_id: request_id.clone(),
                    buyer_id: buyer.clone(),
                    product_sku: sku.into(),
                    units,
                    justification: "x".into(),
                };
                // A client retry of every fifth call: the same request id again.
                let mut result = ord.place_order(req.clone()).await;
                if k % 5 == 0 {
                    result = ord.place_order(req).await;
                }
                if result.is_ok() {
                    acked.push(request_id);
                }
            }
            acked
        }));
    }

    // Meanwhile: waves with pending terms, then the terms; supply in receipts; and cancellations.
    let mut lic = w.lic.clone();
    let authority = tokio::spawn(async move {
        let mut licences = Vec::new();
        for pair in apps.chunks(2) {
            let wave = lic
                .create_wave(lpb::CreateWaveRequest { request_id: rid("w"), display_name: "w".into() })
                .await
                .unwrap()
                .into_inner()
                .wave
                .unwrap();
            for app in pair {
                lic.add_wave_grant(lpb::AddWaveGrantRequest {
                    request_id: rid("g"),
                    wave_id: wave.wave_id.clone(),
                    application_id: app.clone(),
                    granted_units: 1_200,
                    conditions: Some(lpb::LicenseConditions { terms_pending: true, ..Default::default() }),
                })
                .await
                .unwrap();
            }
            let p = lic
                .publish_wave(lpb::PublishWaveRequest { request_id: rid("p"), wave_id: wave.wave_id })
                .await
                .unwrap()
                .into_inner();
            licences.extend(p.licenses.into_iter().map(|l| l.license_id));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        for l in licences {
            lic.finalize_terms(lpb::FinalizeTermsRequest { request_id: rid("f"), license_id: l, conditions: None })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut inv = w.inv.clone();
    let vendor = tokio::spawn(async move {
        for k in 0..10 {
            for sku in [H200, NVL] {
                inv.receive_supply(chipgate_proto::inventory::v1::ReceiveSupplyRequest {
                    request_id: rid("rcv"),
                    receipt_id: rid(&format!("rcpt-{k}")),
                    product_sku: sku.into(),
                    units: 150,
                    source: "air".into(),
                })
                .await
                .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
    let mut ord = w.ord.clone();
    let canceller = tokio::spawn(async move {
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let orders = invariants::all_orders(&mut ord).await;
            if let Some(o) = orders.iter().filter(|o| o.state() != opb::OrderState::Shipped).nth(orders.len() / 3) {
                let _ = ord
                    .cancel_order(opb::CancelOrderRequest {
                        request_id: rid("x"),
                        order_id: o.order_id.clone(),
                        reason: "changed plans".into(),
                    })
                    .await;
            }
        }
    });

    let mut acked = Vec::new();
    for p in placers {
        acked.extend(p.await.unwrap());
    }
    authority.await.unwrap();
    vendor.await.unwrap();
    canceller.await.unwrap();
    assert_eq!(acked.len(), BUYERS.len() * 30, "every placement was acknowledged");

    let mut ord = w.ord.clone();
    assert!(
        invariants::wait_quiet(&w.cluster.store, &mut ord, Duration::from_secs(30)).await,
        "the cluster did not settle"
    );
    let mut clients = w.cluster.clients();
    let report = invariants::check(&mut clients, &acked).await;
    assert_eq!(report.orders, BUYERS.len() * 30);
    assert!(report.violations.is_empty(), "{:#?}", report.violations);

    // And the workload really exercised the system: orders in every kind of state.
    let orders = w.all_orders().await;
    let by = count_by_state(&orders);
    for s in [opb::OrderState::AwaitingLicense, opb::OrderState::Reserved, opb::OrderState::Cancelled] {
        assert!(by.get(&s).copied().unwrap_or(0) > 0, "no order ended {s:?}: {by:?}");
    }
    // The unlicensed buyers still wait for a licence.
    assert!(
        orders
            .iter()
            .filter(|o| o.buyer_id == "moonshot" || o.buyer_id == "zhipu")
            .all(|o| matches!(o.state(), opb::OrderState::AwaitingLicense | opb::OrderState::Cancelled))
    );
}

/// The checker is only worth something if it catches a broken state: tamper with a licence's quota
/// and a product's stock directly in Redis and it must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_tampered_quota_and_stock() {
    use chipgate_state::{Backend, Txn};
    use prost::Message;

    let mut w = World::start().await;
    let lic = w.licensed("bytedance", H200, 1000).await;
    w.receive(H200, 100).await;
    w.place("bytedance", H200, 60).await;
    let mut clients = w.cluster.clients();
    let clean = invariants::check(&mut clients, &[]).await;
    assert!(clean.violations.is_empty(), "{:#?}", clean.violations);

    let store = &w.cluster.store;
    let key = chipgate_licensing::keys::license(&chipgate_domain::ids::LicenceId::from_trusted(lic.as_str()))
        .expect("a licence id names its product");
    let rec = store.get(std::slice::from_ref(&key)).await.unwrap().remove(0).unwrap();
    let mut l = chipgate_domain::licensing::LicenseRecord::decode(rec.data.as_slice()).unwrap();
    l.used += 1;
    let mut t = Txn::new();
    t.replace(key, rec.version, l.encode_to_vec());
    store.commit(&t).await.unwrap();

    let key = chipgate_inventory::keys::stock(&chipgate_domain::ids::Sku::from_trusted(H200));
    let rec = store.get(std::slice::from_ref(&key)).await.unwrap().remove(0).unwrap();
    let mut s = chipgate_domain::inventory::StockRecord::decode(rec.data.as_slice()).unwrap();
    s.available += 5;
    let mut t = Txn::new();
    t.replace(key, rec.version, s.encode_to_vec());
    store.commit(&t).await.unwrap();

    let report = invariants::check(&mut clients, &["never-sent".to_string()]).await;
    let v = report.violations.join("\n");
    assert!(v.contains(&format!("licence {lic}: 61 units in use, but its orders hold 60")), "{v}");
    assert!(v.contains("does not add up"), "{v}");
    assert!(v.contains("acknowledged request never-sent placed no order"), "{v}");
}
