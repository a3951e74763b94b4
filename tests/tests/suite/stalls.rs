//! A propagation that can't make progress is loud, and quiet again when it recovers: with inventory
//! down, a product's passes fail; they back off instead of retrying five times a second, the cause is
//! logged once (not once per attempt), the per-product metrics show the failures, the health service
//! `chipgate.orders.v1.Propagation` turns NOT_SERVING after its configured time, and a new order says
//! in its reasons why it is still PENDING. When inventory returns, all of it clears and the orders move.

use std::time::{Duration, Instant};

use chipgate_proto::orders::v1 as opb;
use chipgate_testkit::procs::{ProcessCluster, ProcessOptions};
use chipgate_testkit::{channel, free_port};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::{H200, Moves, all_in};

async fn propagation_health(url: &str) -> ServingStatus {
    HealthClient::new(channel(url))
        .check(HealthCheckRequest { service: chipgate_orders::PROPAGATION_HEALTH.into() })
        .await
        .map(|r| r.into_inner().status())
        .unwrap_or(ServingStatus::Unknown)
}

async fn until_health(url: &str, want: ServingStatus, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = propagation_health(url).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "propagation health stayed {got:?}, wanted {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_propagation_backs_off_says_why_and_recovers() {
    let metrics_port = free_port();
    let options = ProcessOptions {
        orders_env: vec![
            ("CHIPGATE_PROPAGATION_UNHEALTHY_AFTER".into(), "2s".into()),
            ("CHIPGATE_METRICS_LISTEN".into(), format!("127.0.0.1:{metrics_port}")),
            ("RUST_LOG".into(), "warn,chipgate_orders=info".into()),
        ],
        ..ProcessOptions::default()
    };
    let mut c = ProcessCluster::start(options).await;
    let orders_url = c.orders[0].url();
    let mut m = Moves::of(&c, 0);
    assert_eq!(propagation_health(&orders_url).await, ServingStatus::Serving);
    m.licensed("bytedance", H200, 1000).await;
    m.receive(H200, 100).await;

    c.inventory.kill();
    let began = Instant::now();
    // Placement can't be evaluated (stock can't be taken): the answer says so instead of a bare PENDING.
    let order = m.place("bytedance", H200, 10).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut waiting = order.clone();
    while !waiting.reasons.iter().any(|r| r.description.starts_with("not evaluated yet")) {
        assert!(Instant::now() < deadline, "no reason given for a stuck order: {waiting:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        waiting = m.order(&order.order_id).await;
    }
    assert_eq!(waiting.state(), opb::OrderState::Pending);
    let why = &waiting.reasons.last().unwrap().description;
    assert!(why.contains(H200) && why.contains("Unavailable"), "{why}");

    until_health(&orders_url, ServingStatus::NotServing, Duration::from_secs(10)).await;
    assert!(began.elapsed() >= Duration::from_secs(2), "NOT_SERVING only after the configured time");
    let scrape = chipgate_testkit::prom::scrape(&format!("http://127.0.0.1:{metrics_port}/metrics")).await.unwrap();
    let failing = scrape.value("chipgate_propagation_failing_passes", &[("product", H200)]);
    assert!(failing >= 1.0, "the failures show per product: {failing}");
    assert!(scrape.value("chipgate_propagation_last_pass_age_seconds", &[("product", H200)]) >= 1.0);

    // Backing off: over the stall, far fewer passes than 5 a second, and the cause logged a few times,
    // not once per attempt.
    let stalled_for = began.elapsed().as_secs_f64();
    assert!(failing < stalled_for * 5.0 / 2.0, "{failing} failed passes in {stalled_for:.1} s: no back-off");
    let logged = c.log_lines_containing("propagation pass failed");
    assert!((1..=4).contains(&logged), "the failure was logged {logged} times in {stalled_for:.1} s");

    c.inventory.start().await;
    m.until(std::slice::from_ref(&order.order_id), Duration::from_secs(45), |o| all_in(o, opb::OrderState::Reserved))
        .await;
    until_health(&orders_url, ServingStatus::Serving, Duration::from_secs(10)).await;
    // Scrapes refresh state-derived figures at most once a second (metrics::MIN_REFRESH): a scrape
    // within a second of the last one shows that one's figures, so wait for the refresh.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let scrape = chipgate_testkit::prom::scrape(&format!("http://127.0.0.1:{metrics_port}/metrics")).await.unwrap();
        let failing = scrape.value("chipgate_propagation_failing_passes", &[("product", H200)]);
        if failing == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the failures never cleared from the metrics: {failing}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(c.log_lines_containing("propagation recovered") >= 1);
}
