//! Orders placed one by one ahead of their licence, as buyers place them (authentication on). Each
//! placement marks its buyer, and the round that takes the mark judges only the buyer's new orders,
//! behind where its earlier ones stood: licensing judges (and audits) each waiting order about once
//! however long the queue grows, where every placement used to have all of the buyer's waiting orders
//! judged again (placing n orders cost n²/2 judgements, each written to licensing's audit chain). The
//! orders still come out as a full look would have them: in placement order when the wave comes, and
//! later placements queued behind the first order that waits for quota.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use chipgate_proto::licensing::v1 as lpb;
use chipgate_testkit::prom::scrape;
use common::*;
use opb::OrderState::*;

use chipgate_proto::orders::v1 as opb;

/// Orders the buyer places before its licence.
const ORDERS: usize = 40;

const WAIT: Duration = Duration::from_secs(20);

/// How many times licensing refused each order, by its audit of the quota decisions for `sku`.
async fn refusals(w: &mut World, sku: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    let mut token = String::new();
    loop {
        let r = w
            .lic
            .list_audit_entries(lpb::ListAuditEntriesRequest {
                page_size: 1000,
                page_token: token,
                product_sku: sku.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for e in r.entries.iter().filter(|e| e.action == "quota.decided") {
            // "reserved [..]; refused [<order>/<generation>:<conditions> ...]"
            let refused = e.detail.split("refused [").nth(1).unwrap_or_default().trim_end_matches(']');
            for item in refused.split_whitespace() {
                let order = item.split('/').next().unwrap_or_default();
                *out.entry(order.to_string()).or_default() += 1;
            }
        }
        if r.next_page_token.is_empty() {
            return out;
        }
        token = r.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_placed_ahead_of_their_licence_are_judged_about_once_each_and_served_in_order() {
    let mut w = World::start().await;
    let metrics = w.cluster.orders.as_ref().unwrap().metrics_url();
    w.export(H200).await;
    let alpha = w.apply("alpha", H200, 100).await;
    w.receive(H200, 1000).await;
    let mut ids = Vec::new();
    for i in 0..ORDERS {
        // Each answer waits for the round its placement marked.
        ids.push(w.place("alpha", H200, 10).await.order_id);
        if i % 8 == 0 {
            w.place("beta", H200, 5).await;
        }
    }
    let waiting = w.until(&ids, WAIT, |os| os.iter().all(|o| o.state() == AwaitingLicense)).await;
    assert!(waiting.iter().all(|o| reasons(o) == [lpb::Condition::License]), "{:?}", waiting[0].reasons);

    // Licensing judged each order about once (once more at most, when two placements' rounds
    // overlapped): the first order used to be judged once per later placement of its buyer.
    let judged = refusals(&mut w, H200).await;
    let most = ids.iter().map(|id| judged.get(id).copied().unwrap_or(0)).max().unwrap_or(0);
    assert!((1..=3).contains(&most), "an order was judged {most} times: {judged:?}");
    let m = scrape(&metrics).await.unwrap();
    let judged_new = m.value("chipgate_reconcile_buyers_judged_total", &[("product", H200), ("from", "new_orders")]);
    assert!(judged_new >= (ORDERS / 2) as f64, "rounds judged only new orders for {judged_new} buyers");

    // The wave: its 100 units serve the first ten orders, in placement order; the eleventh waits for
    // quota, and every later one queues behind it.
    w.wave(&[(&alpha, 100)], lpb::LicenseConditions::default()).await;
    let served = w
        .until(&ids, WAIT, |os| {
            os[..10].iter().all(|o| o.state() == Reserved)
                && os[10..].iter().all(|o| !reasons(o).contains(&lpb::Condition::License))
        })
        .await;
    assert_eq!(reasons(&served[10]), [lpb::Condition::Quota], "{:?}", served[10].reasons);
    for o in &served[11..] {
        assert_eq!((o.state(), reasons(o)), (AwaitingLicense, vec![lpb::Condition::QueueOrder]), "{}", o.order_id);
    }

    // Placed behind that queue, judged alone: each queues behind the eleventh order, taking nothing.
    let before = scrape(&metrics).await.unwrap();
    let mut later = Vec::new();
    for _ in 0..5 {
        later.push(w.place("alpha", H200, 1).await.order_id);
    }
    let queued = w.until(&later, WAIT, |os| os.iter().all(|o| !o.reasons.is_empty())).await;
    for o in &queued {
        assert_eq!((o.state(), reasons(o)), (AwaitingLicense, vec![lpb::Condition::QueueOrder]), "{}", o.order_id);
        assert!(o.reasons[0].description.contains(&served[10].order_id), "{:?}", o.reasons);
    }
    let after = scrape(&metrics).await.unwrap();
    let new_only = |s: &chipgate_testkit::prom::Scrape| {
        s.value("chipgate_reconcile_buyers_judged_total", &[("product", H200), ("from", "new_orders")])
    };
    assert!(new_only(&after) > new_only(&before), "the later placements were judged alone");
    let licence = w.lic.get_license(lpb::GetLicenseRequest { license_id: served[0].license_id.clone() }).await;
    assert_eq!(licence.unwrap().into_inner().license.unwrap().used_units, 100);
}
