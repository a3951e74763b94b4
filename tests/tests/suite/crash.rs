//! Crash test: the real `chipgate-orders` binary is killed with SIGKILL in the middle of a large wave's
//! propagation and started again. Every order must end in exactly one correct state, with licence quota
//! and stock accounted for exactly.

use crate::common;

use std::time::{Duration, Instant};

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_testkit::invariants::{self, Clients};
use chipgate_testkit::{ClusterOptions, OrdersProcess};
use common::*;

const ORDERS: usize = 1500;
const BUYERS: [&str; 3] = ["bytedance", "alibaba", "tencent"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_killed_mid_wave_finishes_exactly_once_after_restart() {
    let cluster =
        chipgate_testkit::Cluster::start_with(ClusterOptions { orders_in_process: false, ..ClusterOptions::default() })
            .await;
    // Small batches make the wave's propagation long enough to be cut in the middle.
    // Short lease and claim times so the restarted replica takes over the dead one's product leases and
    // pending events in seconds rather than the production defaults (10 s, 30 s).
    let env = [("CHIPGATE_BATCH_SIZE", "25"), ("CHIPGATE_LEASE_TTL", "2s"), ("CHIPGATE_CLAIM_IDLE", "3s")];
    let mut first = OrdersProcess::start(&cluster, &env).await;
    let mut lic = cluster.licensing_client();
    let mut inv = cluster.inventory_client();

    lic.grant_export_authorization(lpb::GrantExportAuthorizationRequest {
        request_id: rid("exp"),
        vendor: "nvidia".into(),
        product_sku: H200.into(),
        destination: "CN".into(),
        reference: "BIS".into(),
    })
    .await
    .unwrap();
    let mut apps = Vec::new();
    for b in BUYERS {
        let a = lic
            .submit_application(lpb::SubmitApplicationRequest {
                request_id: rid("app"),
                buyer_id: b.into(),
                product_sku: H200.into(),
                quantity: 1_000_000,
                end_use: "training".into(),
                site: "dc".into(),
                destination: "CN".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .application
            .unwrap();
        apps.push(a.application_id);
    }

    // 1,500 orders wait for a licence.
    let mut acked = Vec::new();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut ord = first.client();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for k in (t..ORDERS).step_by(16) {
                let request_id = rid(&format!("o{k}"));
                let req = opb::PlaceOrderRequest {
                    request_id: request_id.clone(),
                    buyer_id: BUYERS[k % 3].into(),
                    product_sku: H200.into(),
                    units: 10 + (k as u64 % 7) * 10,
                    justification: "x".into(),
                };
                let o = ord.place_order(req).await.unwrap().into_inner().order.unwrap();
                // Or PENDING: PlaceOrder answers the order as it stands when its first evaluation
                // takes longer than --place-wait (5 s), as 1,500 placements on one product can while
                // the suite's other process tests load the machine; it is evaluated all the same.
                assert!(
                    matches!(o.state(), opb::OrderState::AwaitingLicense | opb::OrderState::Pending),
                    "{:?}",
                    o.state()
                );
                ids.push(request_id);
            }
            ids
        }));
    }
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    // Stock for about a third of the demand.
    let demand: u64 = (0..ORDERS).map(|k| 10 + (k as u64 % 7) * 10).sum();
    inv.receive_supply(chipgate_proto::inventory::v1::ReceiveSupplyRequest {
        request_id: rid("rcv"),
        receipt_id: "rcpt-1".into(),
        product_sku: H200.into(),
        units: demand / 3,
        source: "air".into(),
    })
    .await
    .unwrap();

    // The wave: published with final terms, so every order becomes eligible at once.
    let wave = lic
        .create_wave(lpb::CreateWaveRequest { request_id: rid("w"), display_name: "wave 1".into() })
        .await
        .unwrap()
        .into_inner()
        .wave
        .unwrap();
    for a in &apps {
        lic.add_wave_grant(lpb::AddWaveGrantRequest {
            request_id: rid("g"),
            wave_id: wave.wave_id.clone(),
            application_id: a.clone(),
            granted_units: 1_000_000,
            conditions: None,
        })
        .await
        .unwrap();
    }
    lic.publish_wave(lpb::PublishWaveRequest { request_id: rid("p"), wave_id: wave.wave_id.clone() }).await.unwrap();

    // Kill the orders service once propagation is under way but not finished.
    let mut ord = first.client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let moved_at_kill = loop {
        let p = ord
            .get_wave_progress(opb::GetWaveProgressRequest { wave_id: wave.wave_id.clone() })
            .await
            .unwrap()
            .into_inner()
            .progress
            .unwrap();
        let moved = p.orders_backordered + p.orders_reserved;
        if moved > 0 {
            first.kill();
            break moved;
        }
        assert!(Instant::now() < deadline, "the wave did not start propagating");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(
        (moved_at_kill as usize) < ORDERS,
        "the kill came after propagation finished ({moved_at_kill} moved); nothing was cut"
    );

    // A new process takes over: the lease of the dead one expires, its pending events are claimed.
    let second = OrdersProcess::start(&cluster, &[("CHIPGATE_BATCH_SIZE", "500")]).await;
    let mut ord = second.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let orders = invariants::all_orders(&mut ord).await;
        let settled =
            orders.iter().all(|o| matches!(o.state(), opb::OrderState::Backordered | opb::OrderState::Reserved));
        if settled {
            break;
        }
        assert!(Instant::now() < deadline, "propagation did not finish after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(invariants::wait_quiet(&cluster.store, &mut ord, Duration::from_secs(30)).await);
    let mut clients = Clients { licensing: lic.clone(), inventory: inv.clone(), orders: ord.clone() };
    let report = invariants::check(&mut clients, &acked).await;
    assert_eq!(report.orders, ORDERS);
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    let stock = inv
        .get_stock(chipgate_proto::inventory::v1::GetStockRequest { product_sku: H200.into() })
        .await
        .unwrap()
        .into_inner()
        .stock
        .unwrap();
    assert!(stock.available < 70, "stock was handed out until the next order in line didn't fit: {stock:?}");
    assert_eq!(stock.held, demand / 3 - stock.available);
}
