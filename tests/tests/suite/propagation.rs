//! Propagation across the three real services (real Redis, real gRPC): the seed story end to end, and
//! each trigger moving exactly the orders it concerns.

use crate::common;

use std::time::Duration;

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use common::*;
use opb::OrderState::*;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_story_end_to_end() {
    let mut w = World::start().await;
    // Customs says the H200 can't enter; the US lets the vendor export it.
    w.customs(H200, true).await;
    w.export(H200).await;

    // Buyers order far more than exists while nothing is licensed: everything waits, with reasons.
    let mut orders: Vec<(String, String)> = Vec::new();
    for round in 0..3 {
        for buyer in ["bytedance", "alibaba", "tencent", "moonshot"] {
            let o = w.place(buyer, H200, 100 + round * 10).await;
            assert_eq!(o.state(), AwaitingLicense, "{o:?}");
            assert!(reasons(&o).contains(&lpb::Condition::License));
            assert!(reasons(&o).contains(&lpb::Condition::ImportPolicy));
            orders.push((buyer.to_string(), o.order_id));
        }
    }
    let ids_of =
        |buyer: &str| -> Vec<String> { orders.iter().filter(|(b, _)| b == buyer).map(|(_, id)| id.clone()).collect() };
    let wave_ids: Vec<String> = orders.iter().filter(|(b, _)| b != "moonshot").map(|(_, id)| id.clone()).collect();

    // Applications; wave 1 grants three of the four, terms pending, with a domestic ratio.
    let a = w.apply("bytedance", H200, 200_000).await;
    let b = w.apply("alibaba", H200, 150_000).await;
    let c = w.apply("tencent", H200, 100_000).await;
    let queued = w.apply("moonshot", H200, 50_000).await;
    let conditions = lpb::LicenseConditions { terms_pending: true, domestic_ratio_bps: 1000, ..Default::default() };
    let (wave, licences) = w.wave(&[(&a, 200_000), (&b, 150_000), (&c, 100_000)], conditions).await;

    // Nothing moves: the wave's buyers now wait on pending terms (and customs), the queued buyer on a licence.
    let now = w
        .until(&wave_ids, WAIT, |os| {
            os.iter().all(|o| o.reasons.iter().any(|r| r.condition() == lpb::Condition::TermsFinal))
        })
        .await;
    assert!(all_in(&now, AwaitingLicense));
    let last = now[0].history.last().unwrap();
    assert_eq!(last.cause.as_ref().unwrap().kind(), opb::CauseKind::WavePublished);
    assert_eq!(last.cause.as_ref().unwrap().reference, wave);

    // Customs lifts the embargo and the terms are finalised: the ratio condition now holds them back.
    w.customs(H200, false).await;
    for l in &licences {
        w.finalize(l).await;
    }
    let now = w
        .until(&wave_ids, WAIT, |os| {
            os.iter().all(|o| {
                reasons(o) == vec![lpb::Condition::DomesticRatio] || reasons(o) == vec![lpb::Condition::QueueOrder]
            })
        })
        .await;
    assert!(all_in(&now, AwaitingLicense));

    // Domestic purchases recorded: the orders take quota, in placement order, and wait for stock.
    for buyer in ["bytedance", "alibaba", "tencent"] {
        w.domestic(buyer, 1000).await;
    }
    let now = w.until(&wave_ids, WAIT, |os| all_in(os, Backordered)).await;
    let mut by_seq = now.clone();
    by_seq.sort_by_key(|o| o.sequence);
    let positions: Vec<u64> = by_seq.iter().map(|o| o.backlog_position).collect();
    assert_eq!(positions, (1..=9).collect::<Vec<u64>>(), "the backlog is in placement order");

    // The queued buyer outside the wave still waits for a licence.
    let moonshot = w.orders(&ids_of("moonshot")).await;
    assert!(all_in(&moonshot, AwaitingLicense));
    assert!(moonshot.iter().all(|o| reasons(o).contains(&lpb::Condition::License)));
    let app = w
        .lic
        .get_application(lpb::GetApplicationRequest { application_id: queued })
        .await
        .unwrap()
        .into_inner()
        .application
        .unwrap();
    assert_eq!((app.state(), app.queue_position), (lpb::ApplicationState::Queued, 1));

    // Stock far below demand: 250 units serve the two oldest orders fully and the third in part.
    w.receive(H200, 250).await;
    let first = by_seq[0].order_id.clone();
    let now = w.until(&wave_ids, WAIT, |os| os.iter().any(|o| o.order_id == first && o.state() == Reserved)).await;
    let mut now_by_seq = now.clone();
    now_by_seq.sort_by_key(|o| o.sequence);
    let held: Vec<u64> = now_by_seq.iter().map(|o| o.held_units).collect();
    assert_eq!(held, vec![100, 100, 50, 0, 0, 0, 0, 0, 0], "served strictly in placement order");
    assert_eq!(states(&now_by_seq)[..3], [Reserved, Reserved, Backordered]);
    let backlog = w
        .ord
        .get_backlog(opb::GetBacklogRequest { product_sku: H200.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(backlog.total_orders, 7);
    assert_eq!(backlog.entries[0].held_units, 50, "{backlog:?} {now_by_seq:#?}");
    assert_eq!(backlog.entries[0].order_id, now_by_seq[2].order_id);

    // More supply drains the backlog further, still in order.
    w.receive(H200, 500).await;
    let now = w.until(&wave_ids, WAIT, |os| os.iter().filter(|o| o.state() == Reserved).count() == 7).await;
    let mut now_by_seq = now.clone();
    now_by_seq.sort_by_key(|o| o.sequence);
    assert_eq!(
        states(&now_by_seq),
        [Reserved, Reserved, Reserved, Reserved, Reserved, Reserved, Reserved, Backordered, Backordered]
    );
    // 100+100+100+110+110+110+120 = 750: the seventh takes the last unit, the eighth gets none.
    assert_eq!((now_by_seq[6].held_units, now_by_seq[7].held_units), (120, 0));

    // Quota and stock add up.
    let s = w.stock(H200).await;
    assert_eq!((s.available, s.held, s.received), (0, 750, 750));
    let mut used = 0;
    for l in &licences {
        used += w.license(l).await.used_units;
    }
    let served: u64 = now.iter().map(|o| o.units).sum();
    assert_eq!(used, served);

    // The wave's progress tells the same story.
    let p = w
        .ord
        .get_wave_progress(opb::GetWaveProgressRequest { wave_id: wave })
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap();
    assert!(p.observed);
    assert_eq!(p.orders_concerned, 9);
    assert!(p.orders_evaluated >= 9);
    assert_eq!((p.orders_reserved, p.orders_backordered, p.orders_awaiting, p.units_held), (7, 2, 0, 750));
}

/// What a waiting order names is what a fresh look would find, also when a later order of the same
/// buyer takes the quota it was judged against. The buyer holds a licence with a per-order cap and
/// quota for 100, and one whose terms are pending. The first order (80 units: above the cap, and the
/// other licence not usable yet) waits; the second (50 units) takes quota of the first licence,
/// which leaves 50: now the first order also misses quota there. Without a second look its reasons
/// would stay as judged before the second order took the quota, and a forced full reconcile would
/// change them — the model checker found this (issue 21, batch sizes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_order_names_the_quota_a_later_order_of_its_buyer_took() {
    let mut w = World::start().await;
    w.export(H200).await;
    let capped = w.apply("zeta", H200, 100).await;
    let (_, capped) =
        w.wave(&[(&capped, 100)], lpb::LicenseConditions { per_order_cap: 60, ..Default::default() }).await;
    let pending = w.apply("zeta", H200, 500).await;
    let (_, pending) =
        w.wave(&[(&pending, 500)], lpb::LicenseConditions { terms_pending: true, ..Default::default() }).await;
    let by_licence = |o: &opb::Order| -> Vec<(String, lpb::Condition)> {
        let mut r: Vec<(String, lpb::Condition)> =
            o.reasons.iter().map(|f| (f.license_id.clone(), f.condition())).collect();
        r.sort();
        r
    };

    let first = w.place("zeta", H200, 80).await;
    assert_eq!(first.state(), AwaitingLicense, "{first:?}");
    let mut want =
        vec![(capped[0].clone(), lpb::Condition::PerOrderCap), (pending[0].clone(), lpb::Condition::TermsFinal)];
    want.sort();
    assert_eq!(by_licence(&first), want, "judged while the quota is free");

    let second = w.place("zeta", H200, 50).await;
    assert!(matches!(second.state(), Backordered | Reserved), "it takes quota of the capped licence: {second:?}");
    assert_eq!(second.license_id, capped[0]);
    // The same round judged the first order once more: the capped licence's quota is short now.
    let first = w.order(&first.order_id).await;
    assert_eq!(first.state(), AwaitingLicense);
    want.push((capped[0].clone(), lpb::Condition::Quota));
    want.sort();
    assert_eq!(by_licence(&first), want, "{first:?}");
    // And that is what licensing's own check says for such an order now.
    let check = w
        .lic
        .check_eligibility(lpb::CheckEligibilityRequest {
            buyer_id: "zeta".into(),
            product_sku: H200.into(),
            units: 80,
            justification: first.justification.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut checked: Vec<(String, lpb::Condition)> =
        check.failures.iter().map(|f| (f.license_id.clone(), f.condition())).collect();
    checked.sort();
    assert_eq!(checked, want);
}
