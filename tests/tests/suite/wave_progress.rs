//! Wave progress counts the orders a wave concerns — the waiting orders of its buyers when it was
//! observed — not evaluations: one cancelled before its evaluation no longer holds the wave back, one
//! placed after the publication is not counted, and the wave settles exactly once every concerned
//! order is evaluated. Played with real processes (authentication on) and inventory killed while the
//! wave is published, so evaluation stalls and the cancel and the new placement land in the window.

use std::time::{Duration, Instant};

use chipgate_proto::orders::v1 as opb;
use chipgate_testkit::procs::{ProcessCluster, ProcessOptions};

use crate::common::{H200, Moves, all_in, rid};

async fn progress(m: &mut Moves, wave: &str) -> opb::WaveProgress {
    m.ord
        .get_wave_progress(opb::GetWaveProgressRequest { wave_id: wave.into() })
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_settles_on_its_concerned_orders_whatever_happens_in_between() {
    let mut c = ProcessCluster::start(ProcessOptions::default()).await;
    let mut m = Moves::of(&c, 0);
    m.export(H200).await;
    m.receive(H200, 1000).await;
    let app = m.apply("x-corp", H200, 500).await;
    let first = m.place("x-corp", H200, 100).await.order_id;
    let second = m.place("x-corp", H200, 100).await.order_id;
    m.until(&[first.clone(), second.clone()], Duration::from_secs(10), |o| all_in(o, opb::OrderState::AwaitingLicense))
        .await;

    // Inventory goes down: the wave's evaluation can't take stock and stays unfinished.
    c.inventory.kill();
    let (wave, _) = m.wave(&[(&app, 500)], Default::default()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let p = progress(&mut m, &wave).await;
        if p.observed && p.orders_concerned > 0 {
            break p;
        }
        assert!(Instant::now() < deadline, "the wave was not observed: {p:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(seen.orders_concerned, 2, "the two waiting orders");
    assert!(seen.settle_time.is_none());

    // In the window: one concerned order is cancelled, and two new ones are placed.
    m.ord
        .cancel_order(opb::CancelOrderRequest {
            request_id: rid("cancel"),
            order_id: first.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let third = m.place("x-corp", H200, 50).await.order_id;
    let fourth = m.place("x-corp", H200, 50).await.order_id;

    c.inventory.start().await;
    m.until(&[second, third, fourth], Duration::from_secs(20), |o| all_in(o, opb::OrderState::Reserved)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = loop {
        let p = progress(&mut m, &wave).await;
        if p.settle_time.is_some() {
            break p;
        }
        assert!(Instant::now() < deadline, "the wave never settled: {p:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((done.orders_concerned, done.orders_evaluated), (2, 2), "exactly the concerned orders: {done:?}");
    assert_eq!(done.orders_reserved, 3, "the second, third and fourth hold the wave's quota");
    let observed = done.observe_time.unwrap();
    let settled = done.settle_time.unwrap();
    assert!((settled.seconds, settled.nanos) >= (observed.seconds, observed.nanos));
}
