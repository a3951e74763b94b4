//! Each trigger moves exactly the orders it concerns, and nothing else (three real services, real
//! Redis): finalised terms, a domestic purchase, supply, an embargo and its lifting, a suspension and a
//! reinstatement.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use common::*;
use opb::OrderState::*;

const WAIT: Duration = Duration::from_secs(15);

/// Order id → (state, history length).
fn snapshot(orders: &[opb::Order]) -> HashMap<String, (opb::OrderState, usize)> {
    orders.iter().map(|o| (o.order_id.clone(), (o.state(), o.history.len()))).collect()
}

/// The orders of `all` whose state or history changed since `before`.
fn moved(before: &HashMap<String, (opb::OrderState, usize)>, all: &[opb::Order]) -> Vec<String> {
    let mut m: Vec<String> = all
        .iter()
        .filter(|o| before.get(&o.order_id) != Some(&(o.state(), o.history.len())))
        .map(|o| o.order_id.clone())
        .collect();
    m.sort();
    m
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_trigger_moves_exactly_the_orders_it_concerns() {
    let mut w = World::start().await;
    w.export(H200).await;
    w.export(NVL).await;
    // bytedance: H200 licence with terms pending, NVL licence active; alibaba: H200 licence with a
    // domestic ratio; tencent: nothing.
    let a1 = w.apply("bytedance", H200, 1000).await;
    let b1 = w.apply("alibaba", H200, 1000).await;
    let (_, lics) = w.wave(&[(&a1, 1000)], lpb::LicenseConditions { terms_pending: true, ..Default::default() }).await;
    let a_h200 = lics[0].clone();
    let (_, lics) =
        w.wave(&[(&b1, 1000)], lpb::LicenseConditions { domestic_ratio_bps: 5000, ..Default::default() }).await;
    let b_h200 = lics[0].clone();
    let a2 = w.apply("bytedance", NVL, 1000).await;
    w.wave(&[(&a2, 1000)], lpb::LicenseConditions::default()).await;

    let a_orders = vec![w.place("bytedance", H200, 50).await.order_id, w.place("bytedance", H200, 60).await.order_id];
    let a_nvl = w.place("bytedance", NVL, 50).await.order_id;
    let b_orders = vec![w.place("alibaba", H200, 70).await.order_id, w.place("alibaba", H200, 80).await.order_id];
    let c_order = w.place("tencent", H200, 90).await.order_id;
    let mut all_ids = a_orders.clone();
    all_ids.extend(b_orders.clone());
    all_ids.push(a_nvl.clone());
    all_ids.push(c_order.clone());

    let now = w.orders(&all_ids).await;
    assert_eq!(
        states(&now),
        [AwaitingLicense, AwaitingLicense, AwaitingLicense, AwaitingLicense, Backordered, AwaitingLicense]
    );
    assert_eq!(reasons(&now[0]), vec![lpb::Condition::TermsFinal]);
    assert_eq!(reasons(&now[2]), vec![lpb::Condition::DomesticRatio]);
    assert_eq!(reasons(&now[3]), vec![lpb::Condition::QueueOrder], "alibaba's second order waits behind its first");
    assert_eq!(reasons(&now[5]), vec![lpb::Condition::License]);

    // 1. Finalised terms move bytedance's H200 orders, and only those.
    let before = snapshot(&now);
    w.finalize(&a_h200).await;
    let now = w.until(&a_orders, WAIT, |os| all_in(os, Backordered)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = w.orders(&all_ids).await;
    assert_eq!(moved(&before, &all), sorted(a_orders.clone()));
    let cause = now[0].history.last().unwrap().cause.clone().unwrap();
    assert_eq!((cause.kind(), cause.reference.as_str()), (opb::CauseKind::TermsFinalized, a_h200.as_str()));

    // 2. A domestic purchase moves the buyer's waiting orders, and only those (75 units cover 50% of 150).
    let before = snapshot(&all);
    w.domestic("alibaba", 75).await;
    w.until(&b_orders, WAIT, |os| all_in(os, Backordered)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = w.orders(&all_ids).await;
    assert_eq!(moved(&before, &all), sorted(b_orders.clone()));

    // 3. Supply of the NVL moves the NVL backlog only.
    let before = snapshot(&all);
    w.receive(NVL, 50).await;
    w.until(std::slice::from_ref(&a_nvl), WAIT, |os| all_in(os, Reserved)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = w.orders(&all_ids).await;
    assert_eq!(moved(&before, &all), vec![a_nvl.clone()]);

    // 4. Supply of the H200 serves the H200 backlog in placement order: 50 + 60 (bytedance) fully,
    //    then alibaba's 70 in part.
    w.receive(H200, 150).await;
    let mut h200 = a_orders.clone();
    h200.extend(b_orders.clone());
    let now = w
        .until(&h200, WAIT, |os| os[0].state() == Reserved && os[1].state() == Reserved && os[2].held_units == 40)
        .await;
    assert_eq!(now[3].held_units, 0, "alibaba's second order may not overtake its first");
    let stock = w.stock(H200).await;
    assert_eq!((stock.available, stock.held), (0, 150));

    // 5. An embargo sends every unconfirmed H200 order back to waiting and gives quota and stock back;
    //    the NVL order is untouched.
    let before = snapshot(&w.orders(&all_ids).await);
    w.customs(H200, true).await;
    let now = w.until(&h200, WAIT, |os| all_in(os, AwaitingLicense)).await;
    assert!(now.iter().all(|o| reasons(o).contains(&lpb::Condition::ImportPolicy)));
    assert!(now.iter().all(|o| o.generation == 2 && o.held_units == 0));
    // Releases are carried out by the cleanup worker.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = w.stock(H200).await;
        let used = w.license(&a_h200).await.used_units + w.license(&b_h200).await.used_units;
        if s.held == 0 && s.available == 150 && used == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "quota and stock were not given back: {s:?}, used {used}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = w.orders(&all_ids).await;
    let mut expected = h200.clone();
    expected.push(c_order.clone());
    assert_eq!(moved(&before, &all), sorted(expected), "the embargo concerns every H200 order, and no NVL order");
    let unwound = &all[0].history;
    let step = unwound.iter().rev().find(|t| t.from_state() == Reserved).unwrap();
    assert_eq!(step.cause.as_ref().unwrap().kind(), opb::CauseKind::EmbargoSet);

    // 6. Lifting it lets them through again, in order.
    w.customs(H200, false).await;
    let now = w
        .until(&h200, WAIT, |os| os[0].state() == Reserved && os[1].state() == Reserved && os[2].held_units == 40)
        .await;
    assert_eq!(now[2].generation, 2, "the new attempt runs at the new generation");

    // 7. Suspending bytedance's licence unwinds bytedance's orders only; alibaba keeps its holds.
    let before = snapshot(&w.orders(&all_ids).await);
    w.lic
        .suspend_license(lpb::SuspendLicenseRequest {
            request_id: rid("s"),
            license_id: a_h200.clone(),
            reason: "inspection".into(),
        })
        .await
        .unwrap();
    let now = w.until(&a_orders, WAIT, |os| all_in(os, AwaitingLicense)).await;
    assert!(now.iter().all(|o| reasons(o) == vec![lpb::Condition::LicenseInForce]));
    // bytedance's 110 units go back to stock: alibaba's partly held order tops up (40 → 70) and its
    // second order takes the remaining 80.
    let b_now = w.until(&b_orders, WAIT, |os| all_in(os, Reserved)).await;
    assert_eq!((b_now[0].held_units, b_now[1].held_units), (70, 80));
    let all = w.orders(&all_ids).await;
    let mut expected = a_orders.clone();
    expected.extend(b_orders.clone());
    assert_eq!(moved(&before, &all), sorted(expected));

    // 8. Reinstating it brings bytedance's orders back; they take quota and wait behind alibaba for stock.
    w.lic
        .reinstate_license(lpb::ReinstateLicenseRequest {
            request_id: rid("r"),
            license_id: a_h200.clone(),
            reason: "cleared".into(),
        })
        .await
        .unwrap();
    let now = w.until(&a_orders, WAIT, |os| all_in(os, Backordered)).await;
    assert!(now.iter().all(|o| o.held_units == 0));
    let backlog = w
        .ord
        .get_backlog(opb::GetBacklogRequest { product_sku: H200.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let order: Vec<String> = backlog.entries.iter().map(|e| e.order_id.clone()).collect();
    // Back in the backlog in placement order, with nothing left to hold.
    assert_eq!(order, a_orders);
    let s = w.stock(H200).await;
    assert_eq!((s.available, s.held), (0, 150));
}
