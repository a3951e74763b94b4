//! Allocation policies and previews through the real services (authentication on): a preview of a
//! draft wave and of a supply receipt equals what then happens when the wave is published or the
//! supply received — under FIFO and pro-rata, with and without a per-buyer cap, with an order above
//! its licence's per-order cap, a licence pending terms, a domestic ratio not met and an embargoed
//! product in play — every allocation is explained in the order's history, and no buyer passes its
//! cap. The policy API itself: validation, idempotency per request id, who may set it, and that a
//! change takes nothing back.

use crate::common;

use std::time::{Duration, Instant};

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_proto::orders::v1::order_service_client::OrderServiceClient;
use chipgate_runtime::auth::Role;
use chipgate_testkit::Cluster;
use common::*;
use opb::OrderState::*;
use tonic::Code;
use tonic_types::StatusExt;

const WAIT: Duration = Duration::from_secs(20);

async fn set_policy(w: &mut World, sku: &str, strategy: opb::AllocationStrategy, cap: u32) {
    w.ord
        .set_allocation_policy(opb::SetAllocationPolicyRequest {
            request_id: rid("policy"),
            product_sku: sku.into(),
            strategy: strategy as i32,
            max_share_percent: cap,
            reason: "fair shares".into(),
        })
        .await
        .unwrap();
}

async fn place_waiting(w: &mut World, buyer: &str, sku: &str, units: u64) -> String {
    w.place(buyer, sku, units).await.order_id
}

/// An order as a preview or the services show it: where it stands, what it holds, the licence whose
/// quota it holds, each failed condition (and the licence it concerns), and in words what its history
/// recorded since `before`.
type Seen = (String, i32, u64, String, Vec<(i32, String)>, String);

fn predicted(o: &opb::OrderOutcome) -> Seen {
    let reasons = o.reasons.iter().map(|f| (f.condition, f.license_id.clone())).collect();
    (o.order_id.clone(), o.next_state, o.next_held_units, o.license_id.clone(), reasons, o.detail.clone())
}

fn happened(before: &opb::Order, now: &opb::Order) -> Seen {
    let reasons = now.reasons.iter().map(|f| (f.condition, f.license_id.clone())).collect();
    let steps: Vec<&str> =
        now.history.iter().skip(before.history.len()).map(|t| t.detail.as_str()).filter(|d| !d.is_empty()).collect();
    (now.order_id.clone(), now.state, now.held_units, now.license_id.clone(), reasons, steps.join("; "))
}

/// Waits until the orders a preview names stand as it said (each compared with its state `before`),
/// then asserts it, so a mismatch fails with both sides.
async fn becomes(w: &mut World, outcomes: &[opb::OrderOutcome], before: &[opb::Order], what: &str) {
    let ids: Vec<String> = outcomes.iter().map(|o| o.order_id.clone()).collect();
    let want: Vec<Seen> = outcomes.iter().map(predicted).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let now = w.orders(&ids).await;
        let got: Vec<Seen> = before.iter().zip(&now).map(|(b, n)| happened(b, n)).collect();
        if got == want {
            return;
        }
        if Instant::now() > deadline {
            assert_eq!(got, want, "{what}: what happened differs from the preview");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Previews a receipt, receives it, and checks the preview came true.
async fn supply_as_previewed(w: &mut World, sku: &str, units: u64, what: &str) -> opb::PreviewSupplyResponse {
    let p = w
        .ord
        .preview_supply(opb::PreviewSupplyRequest { product_sku: sku.into(), units, max_orders: 0 })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = p.orders.iter().map(|o| o.order_id.clone()).collect();
    let before = w.orders(&ids).await;
    w.receive(sku, units).await;
    becomes(w, &p.orders, &before, what).await;
    p
}

/// No buyer holds more than `cap` % of what every buyer holds of `sku` (holdings only grew, so an
/// allocation that kept a buyer within the cap keeps it there).
async fn within_cap(w: &mut World, sku: &str, cap: u32) -> opb::GetAllocationPolicyResponse {
    let p = w
        .ord
        .get_allocation_policy(opb::GetAllocationPolicyRequest { product_sku: sku.into() })
        .await
        .unwrap()
        .into_inner();
    if cap > 0 {
        for a in &p.allocations {
            assert!(
                a.allocated_units * 100 <= u64::from(cap) * p.allocated_units,
                "{} holds {} of {} units of {sku}: above {cap} %",
                a.buyer_id,
                a.allocated_units,
                p.allocated_units
            );
        }
    }
    p
}

/// The story under one policy: an earlier buyer's backordered order takes a first receipt; a draft
/// wave licenses three buyers of H200 (one order above its per-order cap, one licence pending terms,
/// one buyer short of its domestic ratio for its second order) and one of the embargoed H200 NVL; the
/// wave is previewed and published, then a second receipt is previewed and received.
///
/// `after_wave` and `after_receipt` are the units the four orders that take quota hold (epsilon's,
/// alpha's 200, beta's 300, alpha's 250), worked out by hand from the policy.
async fn story(strategy: opb::AllocationStrategy, cap: u32, after_wave: [u64; 4], after_receipt: [u64; 4]) {
    let label = format!("{} cap {cap}", strategy.as_str_name());
    let mut w = World::start().await;
    set_policy(&mut w, H200, strategy, cap).await;
    w.export(NVL).await;
    w.customs(NVL, true).await;
    w.licensed("epsilon", H200, 2000).await;
    let e1 = w.place("epsilon", H200, 400).await;
    assert_eq!(e1.state(), Backordered);
    let first = supply_as_previewed(&mut w, H200, 600, &format!("{label}: first receipt")).await;
    if cap > 0 {
        // Alone in the backlog, epsilon would hold every unit allocated: the cap keeps them.
        assert_eq!(first.allocation.as_ref().map(|a| a.allocated_units), Some(0), "{label}");
        assert!(first.allocation.as_ref().is_some_and(|a| a.buyers[0].capped), "{label}");
    }

    let a = w.apply("alpha", H200, 1000).await;
    let b = w.apply("beta", H200, 1000).await;
    let g = w.apply("gamma", H200, 500).await;
    let d = w.apply("delta", NVL, 200).await;
    w.domestic("beta", 100).await;
    let mut placed = Vec::new();
    for (buyer, sku, units) in [
        ("alpha", H200, 200),
        ("beta", H200, 300),
        ("alpha", H200, 250),
        ("gamma", H200, 100),
        ("beta", H200, 200),
        ("alpha", H200, 300),
        ("delta", NVL, 50),
    ] {
        let o = place_waiting(&mut w, buyer, sku, units).await;
        assert_eq!(w.order(&o).await.state(), AwaitingLicense, "{label}: no licence yet");
        placed.push(o);
    }
    let takers = [e1.order_id.clone(), placed[0].clone(), placed[1].clone(), placed[2].clone()];
    let wave = w
        .lic
        .create_wave(lpb::CreateWaveRequest { request_id: rid("wave"), display_name: "wave 2".into() })
        .await
        .unwrap()
        .into_inner()
        .wave
        .unwrap();
    let conditions = [
        (&a, 1000, lpb::LicenseConditions { per_order_cap: 250, ..Default::default() }),
        (&b, 1000, lpb::LicenseConditions { domestic_ratio_bps: 2500, ..Default::default() }),
        (&g, 500, lpb::LicenseConditions { terms_pending: true, ..Default::default() }),
        (&d, 200, lpb::LicenseConditions::default()),
    ];
    for (app, units, c) in conditions {
        w.lic
            .add_wave_grant(lpb::AddWaveGrantRequest {
                request_id: rid("grant"),
                wave_id: wave.wave_id.clone(),
                application_id: app.clone(),
                granted_units: units,
                conditions: Some(c),
            })
            .await
            .unwrap();
    }
    let preview = w
        .ord
        .preview_wave(opb::PreviewWaveRequest { wave_id: wave.wave_id.clone(), max_orders: 0 })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = preview.orders.iter().map(|o| o.order_id.clone()).collect();
    let before = w.orders(&ids).await;
    assert!(
        before.iter().filter(|o| o.buyer_id != "epsilon").all(|o| o.state() == AwaitingLicense),
        "{label}: a preview changes nothing"
    );
    // What the preview says, per buyer: alpha's 300 is above its per-order cap, beta's second order
    // misses its domestic ratio, gamma waits for terms, delta for the embargo to lift.
    let buyer = |id: &str| preview.buyers.iter().find(|b| b.buyer_id == id).cloned().unwrap_or_default();
    assert_eq!((buyer("alpha").orders_eligible, buyer("alpha").orders_rejected), (2, 1), "{label}");
    assert_eq!((buyer("beta").orders_eligible, buyer("beta").orders_waiting), (1, 1), "{label}");
    let conds = |id: &str| buyer(id).reasons.iter().map(|f| f.condition()).collect::<Vec<_>>();
    assert_eq!(conds("beta"), [lpb::Condition::DomesticRatio], "{label}");
    assert!(conds("gamma").contains(&lpb::Condition::TermsFinal), "{label}: {:?}", conds("gamma"));
    assert!(conds("delta").contains(&lpb::Condition::ImportPolicy), "{label}: {:?}", conds("delta"));
    assert_eq!(preview.licenses.len(), 4);

    let published = w
        .lic
        .publish_wave(lpb::PublishWaveRequest { request_id: rid("pub"), wave_id: wave.wave_id.clone() })
        .await
        .unwrap()
        .into_inner();
    let want: Vec<&str> = preview.licenses.iter().map(|l| l.license_id.as_str()).collect();
    let got: Vec<&str> = published.licenses.iter().map(|l| l.license_id.as_str()).collect();
    assert_eq!(want, got, "{label}: the licences the preview foresaw");
    becomes(&mut w, &preview.orders, &before, &format!("{label}: the wave")).await;
    within_cap(&mut w, H200, cap).await;
    let held: Vec<u64> = w.orders(&takers).await.iter().map(|o| o.held_units).collect();
    assert_eq!(held, after_wave, "{label}: after the wave");

    let second = supply_as_previewed(&mut w, H200, 500, &format!("{label}: second receipt")).await;
    assert!(!second.orders.is_empty(), "{label}: the receipt fills some order");
    within_cap(&mut w, H200, cap).await;
    let held: Vec<u64> = w.orders(&takers).await.iter().map(|o| o.held_units).collect();
    assert_eq!(held, after_receipt, "{label}: after the second receipt");
    // Every allocation under a policy that shares says why, in the order's history.
    if strategy == opb::AllocationStrategy::ProRata || cap > 0 {
        let words = if strategy == opb::AllocationStrategy::ProRata { "pro-rata share" } else { "first come" };
        for o in &second.orders {
            assert!(o.detail.contains(words), "{label}: {} says {:?}", o.order_id, o.detail);
        }
    }
}

/// FIFO: epsilon takes 400 of the first 600; the wave's first eligible order (alpha's 200) takes the
/// other 200 at once; the second receipt goes to beta's 300, then 200 of alpha's 250.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_come_true_under_fifo() {
    story(opb::AllocationStrategy::Fifo, 0, [400, 200, 0, 0], [400, 200, 300, 200]).await;
}

/// Pro-rata: the 200 left after epsilon go 120 / 80 to alpha (waiting for 450) and beta (300); the
/// second receipt 300 / 200 over alpha's 330 and beta's 220 still waited for, alpha's oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_come_true_under_pro_rata() {
    story(opb::AllocationStrategy::ProRata, 0, [400, 120, 80, 0], [400, 200, 280, 220]).await;
}

/// FIFO capped at 40 %: epsilon alone gets nothing of the first 600; with the wave's buyers waiting
/// too, 600 go out with epsilon capped at 240, alpha's 200 in full and beta's 300 getting the last 160.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_come_true_under_fifo_with_a_cap() {
    story(opb::AllocationStrategy::Fifo, 40, [240, 200, 160, 0], [400, 200, 300, 200]).await;
}

/// Pro-rata capped at 45 % (the cap never binds once three buyers share): 600 over 400 / 450 / 300
/// waited for is 209 / 235 / 156 (largest remainders to alpha and epsilon), then 500 over 191 / 215 /
/// 144 is 174 / 195 / 131.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_come_true_under_pro_rata_with_a_cap() {
    story(opb::AllocationStrategy::ProRata, 45, [209, 200, 156, 35], [383, 200, 287, 230]).await;
}

/// Pro-rata in figures: 500 units over three buyers waiting for 600, 300 and 100 units go 300 / 150 /
/// 50, oldest order first inside a buyer, and the history says so; FIFO had given the oldest order
/// everything. Switching the policy takes nothing back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pro_rata_shares_by_what_each_buyer_waits_for() {
    let mut w = World::start().await;
    w.export(H200).await;
    let mut apps = Vec::new();
    for buyer in ["alpha", "beta", "gamma"] {
        apps.push(w.apply(buyer, H200, 10_000).await);
    }
    let grants: Vec<(&str, u64)> = apps.iter().map(|a| (a.as_str(), 10_000)).collect();
    w.wave(&grants, lpb::LicenseConditions::default()).await;
    let a1 = place_waiting(&mut w, "alpha", H200, 400).await;
    let b1 = place_waiting(&mut w, "beta", H200, 300).await;
    let a2 = place_waiting(&mut w, "alpha", H200, 200).await;
    let c1 = place_waiting(&mut w, "gamma", H200, 100).await;
    let ids = [a1.clone(), b1.clone(), a2.clone(), c1.clone()];
    // Under FIFO (the default) the oldest order would take everything it can.
    let fifo = w
        .ord
        .preview_supply(opb::PreviewSupplyRequest { product_sku: H200.into(), units: 500, max_orders: 0 })
        .await
        .unwrap()
        .into_inner();
    let plan: Vec<(String, u64)> = fifo.orders.iter().map(|o| (o.order_id.clone(), o.next_held_units)).collect();
    assert_eq!(plan, [(a1.clone(), 400), (b1.clone(), 100)]);
    assert_eq!((fifo.orders_left_waiting, fifo.units_left_waiting), (2, 300), "a2 and c1 get nothing");

    set_policy(&mut w, H200, opb::AllocationStrategy::ProRata, 0).await;
    let p = supply_as_previewed(&mut w, H200, 500, "pro-rata").await;
    let shares: Vec<(String, u64, bool)> =
        p.allocation.as_ref().unwrap().buyers.iter().map(|b| (b.buyer_id.clone(), b.units, b.capped)).collect();
    assert_eq!(shares, [("alpha".into(), 300, false), ("beta".into(), 150, false), ("gamma".into(), 50, false)]);
    let now = w.orders(&ids).await;
    let held: Vec<u64> = now.iter().map(|o| o.held_units).collect();
    assert_eq!(held, [300, 150, 0, 50], "inside alpha, its oldest order first");
    let last = now[0].history.last().unwrap();
    assert_eq!(
        last.detail,
        "300 of 400 units held (pro-rata share 300 of 500 units: 3 buyers waiting); waiting in the backlog for the rest"
    );

    // Back to FIFO: what is held stays; the next receipt goes to the oldest order first.
    set_policy(&mut w, H200, opb::AllocationStrategy::Fifo, 0).await;
    w.receive(H200, 120).await;
    let now = w.until(&ids, WAIT, |o| o[0].state() == Reserved).await;
    let held: Vec<u64> = now.iter().map(|o| o.held_units).collect();
    assert_eq!(held, [400, 170, 0, 50]);
    let p = w
        .ord
        .get_allocation_policy(opb::GetAllocationPolicyRequest { product_sku: H200.into() })
        .await
        .unwrap()
        .into_inner();
    let by: Vec<(String, u64)> = p.allocations.iter().map(|a| (a.buyer_id.clone(), a.allocated_units)).collect();
    assert_eq!(by, [("alpha".into(), 400), ("beta".into(), 170), ("gamma".into(), 50)]);
    assert_eq!(p.allocated_units, 620);
    assert_eq!(p.changes.len(), 2);
}

/// The policy API: bad input names every bad field and changes nothing; a retry with the same request
/// id answers the same, the same id with another body is refused; only the vendor sets a policy;
/// every change is kept with who made it, when and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_validated_idempotent_and_only_the_vendors() {
    let mut w = World::start().await;
    let get = |w: &mut World| {
        let mut ord = w.ord.clone();
        async move {
            ord.get_allocation_policy(opb::GetAllocationPolicyRequest { product_sku: H200.into() })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let fresh = get(&mut w).await;
    assert_eq!(fresh.policy.as_ref().unwrap().strategy(), opb::AllocationStrategy::Fifo, "FIFO by default");
    assert!(fresh.changes.is_empty());

    let bad = w
        .ord
        .set_allocation_policy(opb::SetAllocationPolicyRequest {
            request_id: String::new(),
            product_sku: "no such".into(),
            strategy: 0,
            max_share_percent: 101,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let fields: Vec<String> =
        bad.get_error_details().bad_request().unwrap().field_violations.iter().map(|f| f.field.clone()).collect();
    assert_eq!(fields, ["request_id", "product_sku", "strategy", "max_share_percent"]);
    let unknown = w
        .ord
        .set_allocation_policy(opb::SetAllocationPolicyRequest {
            request_id: rid("p"),
            product_sku: "NO-SUCH-SKU".into(),
            strategy: opb::AllocationStrategy::ProRata as i32,
            max_share_percent: 0,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);

    let req = opb::SetAllocationPolicyRequest {
        request_id: rid("p"),
        product_sku: H200.into(),
        strategy: opb::AllocationStrategy::ProRata as i32,
        max_share_percent: 30,
        reason: "no buyer corners the H200".into(),
    };
    let first = w.ord.set_allocation_policy(req.clone()).await.unwrap().into_inner();
    let again = w.ord.set_allocation_policy(req.clone()).await.unwrap().into_inner();
    assert_eq!(first, again, "a retry answers the same");
    let change = first.change.unwrap();
    assert_eq!((change.revision, change.changed_by.as_str()), (1, "vendor"));
    assert_eq!(change.reason, "no buyer corners the H200");
    let other = w
        .ord
        .set_allocation_policy(opb::SetAllocationPolicyRequest { max_share_percent: 31, ..req.clone() })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::InvalidArgument, "the same request id with another body");
    let now = get(&mut w).await;
    assert_eq!(now.changes.len(), 1);
    assert_eq!(now.policy.unwrap().max_share_percent, 30);

    // Only the vendor sets it; a buyer may not even read it.
    let orders_url = w.cluster.orders.as_ref().unwrap().url();
    for token in [w.cluster.token(Role::ImportAuthority), w.cluster.buyer_token("alpha")] {
        let mut c = OrderServiceClient::new(Cluster::authed(&orders_url, &token));
        let e = c
            .set_allocation_policy(opb::SetAllocationPolicyRequest { request_id: rid("p"), ..req.clone() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    let mut buyer = OrderServiceClient::new(Cluster::authed(&orders_url, &w.cluster.buyer_token("alpha")));
    let e =
        buyer.get_allocation_policy(opb::GetAllocationPolicyRequest { product_sku: H200.into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A preview of something that can't be previewed says why.
    let e =
        w.ord.preview_wave(opb::PreviewWaveRequest { wave_id: "wave-999".into(), max_orders: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = w
        .ord
        .preview_supply(opb::PreviewSupplyRequest { product_sku: H200.into(), units: 0, max_orders: -1 })
        .await
        .unwrap_err();
    let fields: Vec<String> =
        e.get_error_details().bad_request().unwrap().field_violations.iter().map(|f| f.field.clone()).collect();
    assert_eq!(fields, ["units", "max_orders"]);
}

/// A pass cut short after its evaluation filled the backlog and before its drain (its lease lost
/// while the drain read a million-order backlog, as once happened) is finished by the pass that takes
/// over its marks: the backlog is drained although no order waits any more and no stock event is
/// left to mark a drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_left_by_a_pass_cut_short_is_drained_by_the_next() {
    use chipgate_domain::ids::Sku;
    use chipgate_orders::keys;
    use chipgate_state::{Backend, CommitError, Txn};

    let mut w = World::start().await;
    w.licensed("bytedance", H200, 100).await;
    // No stock yet: both orders take quota and wait in the backlog.
    let ids = vec![w.place("bytedance", H200, 10).await.order_id, w.place("bytedance", H200, 10).await.order_id];
    w.until(&ids, WAIT, |o| all_in(o, Backordered)).await;

    // Someone else holds the product's lease (taken once the passes so far let it go): the stock
    // that arrives now is marked for a drain that no pass runs yet.
    let sku = Sku::from_trusted(H200);
    let (store, lease) = (w.cluster.store.clone(), keys::lease(&sku));
    let deadline = Instant::now() + WAIT;
    loop {
        let mut t = Txn::new();
        t.expect_version(lease.clone(), 0).put(lease.clone(), b"another replica".to_vec());
        match store.commit(&t).await {
            Ok(_) => break,
            Err(CommitError::Conflict { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("can't take the lease: {e}"),
        }
    }
    w.receive(H200, 100).await;
    let (dirty, working) = (keys::dirty(&sku), keys::working(&sku));
    let (drain, traceparent) = loop {
        let marks = store.hgetall(&dirty).await.unwrap();
        if let Some(m) = marks.into_iter().find(|(f, _)| f.starts_with("d|")) {
            break m;
        }
        assert!(Instant::now() < deadline, "the receipt's drain mark never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // What a pass cut between its evaluation and its drain leaves: its evaluation's mark in the
    // working hash, and no drain mark (that pass had taken it). Then its lease expires.
    let mut t = Txn::new();
    t.hdel(dirty, drain.clone()).hset(working, format!("a|*|{}", &drain[2..]), traceparent).delete(lease);
    store.commit(&t).await.unwrap();

    let orders = w.until(&ids, WAIT, |o| all_in(o, Reserved)).await;
    assert!(orders.iter().all(|o| o.held_units == 10), "{orders:?}");
    assert_eq!(w.stock(H200).await.held, 20);
}
