//! Metrics: scrape `/metrics` of each service over HTTP after a small scenario, parse it as
//! Prometheus text, and check that the per-RPC, business and propagation figures exist and moved by
//! exactly what the scenario did (units held per buyer and product included). Also checks the Grafana
//! dashboard only charts series that exist.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_testkit::ClusterOptions;
use chipgate_testkit::prom::{Scrape, scrape};
use common::{H200, World, rid};

const LIC: &str = "chipgate.licensing.v1.LicensingService";
const ORD: &str = "chipgate.orders.v1.OrderService";

/// Scrapes `url` until `check` holds (figures derived from the event streams settle eventually).
async fn scrape_until(url: &str, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = scrape(url).await.expect("scrape parses");
        if check(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: never held; last scrape: {:#?}", s.samples);
        // Samplers refresh at most once a second.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_figures_move_by_what_the_scenario_did() {
    let mut w = World::start().await;
    let (lic_url, inv_url, ord_url) = (
        w.cluster.licensing.metrics_url(),
        w.cluster.inventory.metrics_url(),
        w.cluster.orders.as_ref().unwrap().metrics_url(),
    );

    // A buyer waits for a licence with four orders; another buyer's application waits in the queue.
    w.export(H200).await;
    let app = w.apply("alpha", H200, 100).await;
    w.apply("beta", H200, 50).await;
    w.receive(H200, 30).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(w.place("alpha", H200, 10).await.order_id);
    }
    // A bad request, refused at the edge of the handler.
    let bad = w
        .ord
        .place_order(opb::PlaceOrderRequest {
            request_id: rid("bad"),
            buyer_id: "alpha".into(),
            product_sku: H200.into(),
            units: 0,
            justification: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // The wave makes alpha's four orders eligible: 30 units of stock serve three, one is backordered.
    let (wave_id, _) = w.wave(&[(&app, 100)], lpb::LicenseConditions::default()).await;
    w.until(&ids, Duration::from_secs(15), |os| {
        os.iter().filter(|o| o.state() == opb::OrderState::Reserved).count() == 3
            && os.iter().filter(|o| o.state() == opb::OrderState::Backordered).count() == 1
    })
    .await;
    // An unlicensed buyer's order waits.
    let gamma = w.place("gamma", H200, 5).await;
    assert_eq!(gamma.state(), opb::OrderState::AwaitingLicense);

    // --- orders
    let ord = scrape_until(&ord_url, "orders settled and streams drained", |s| {
        s.get("chipgate_orders", &[("state", "RESERVED")]) == Some(3.0)
            && s.get("chipgate_event_stream", &[("stream", "licensing"), ("figure", "lag")]) == Some(0.0)
            && s.get("chipgate_event_stream", &[("stream", "licensing"), ("figure", "pending")]) == Some(0.0)
            && s.get("chipgate_wave_settle_seconds", &[("wave", &wave_id)]).is_some()
    })
    .await;
    assert_eq!(ord.get("chipgate_orders", &[("state", "BACKORDERED")]), Some(1.0));
    assert_eq!(ord.get("chipgate_orders", &[("state", "AWAITING_LICENSE")]), Some(1.0));
    assert_eq!(ord.get("chipgate_orders", &[("state", "CANCELLED")]), Some(0.0));
    assert_eq!(ord.get("chipgate_product_orders", &[("product", H200), ("queue", "backlog")]), Some(1.0));
    assert_eq!(ord.get("chipgate_product_orders", &[("product", H200), ("queue", "awaiting")]), Some(1.0));
    assert_eq!(ord.get("chipgate_product_orders", &[("product", H200), ("queue", "holding")]), Some(4.0));
    assert_eq!(
        ord.get(
            "grpc_server_handled_total",
            &[("grpc_service", ORD), ("grpc_method", "PlaceOrder"), ("grpc_code", "OK")]
        ),
        Some(5.0)
    );
    assert_eq!(
        ord.get(
            "grpc_server_handled_total",
            &[("grpc_service", ORD), ("grpc_method", "PlaceOrder"), ("grpc_code", "INVALID_ARGUMENT")]
        ),
        Some(1.0)
    );
    assert_eq!(
        ord.get("grpc_server_handling_seconds_count", &[("grpc_service", ORD), ("grpc_method", "PlaceOrder")]),
        Some(6.0)
    );
    assert_eq!(ord.get("grpc_server_in_flight", &[]).map(|v| v <= 1.0), Some(true), "only the scrape's own work");
    assert_eq!(
        ord.get("chipgate_events_processed_total", &[("stream", "licensing"), ("kind", "wave_published")]),
        Some(1.0)
    );
    assert!(
        ord.value("chipgate_events_processed_total", &[("stream", "inventory"), ("kind", "supply_received")]) >= 1.0
    );
    assert!(ord.value("chipgate_reconcile_rounds_total", &[("product", H200)]) >= 1.0);
    assert!(ord.value("chipgate_reconcile_round_seconds_count", &[]) >= 1.0);
    for (figure, n) in
        [("concerned", 4.0), ("evaluated", 4.0), ("reserved", 3.0), ("backordered", 1.0), ("awaiting", 0.0)]
    {
        assert_eq!(
            ord.get("chipgate_wave_orders", &[("wave", &wave_id), ("figure", figure)]),
            Some(n),
            "wave {figure}"
        );
    }
    let settle = ord.get("chipgate_wave_settle_seconds", &[("wave", &wave_id)]).unwrap();
    assert!((0.0..15.0).contains(&settle), "settled {settle} s after publish");
    assert_eq!(ord.get("chipgate_release_outbox", &[]), Some(0.0));
    // Units each buyer holds of each product: alpha's three reserved orders (the backordered one
    // holds none yet); nobody else holds any.
    assert_eq!(ord.get("chipgate_allocated_units", &[("product", H200), ("buyer", "alpha")]), Some(30.0));
    assert_eq!(ord.get("chipgate_allocated_units", &[("product", H200), ("buyer", "gamma")]), None);

    // --- licensing
    let lic = scrape(&lic_url).await.unwrap();
    assert_eq!(lic.get("chipgate_approval_queue_length", &[]), Some(1.0), "beta still waits");
    assert_eq!(lic.get("chipgate_licences", &[("state", "ACTIVE")]), Some(1.0));
    assert_eq!(lic.get("chipgate_licence_quota_units", &[("product", H200), ("kind", "granted")]), Some(100.0));
    assert_eq!(lic.get("chipgate_licence_quota_units", &[("product", H200), ("kind", "used")]), Some(40.0));
    assert!(lic.value("chipgate_audit_entries", &[]) >= 5.0);
    assert_eq!(
        lic.get(
            "grpc_server_handled_total",
            &[("grpc_service", LIC), ("grpc_method", "PublishWave"), ("grpc_code", "OK")]
        ),
        Some(1.0)
    );
    // The orders service's own calls show up too (quota for the wave's orders).
    assert!(
        lic.value("grpc_server_handled_total", &[("grpc_method", "BatchReserveQuota"), ("grpc_code", "OK")]) >= 1.0
    );

    // --- inventory
    let inv = scrape(&inv_url).await.unwrap();
    assert_eq!(inv.get("chipgate_stock_units", &[("product", H200), ("kind", "received")]), Some(30.0));
    assert_eq!(inv.get("chipgate_stock_units", &[("product", H200), ("kind", "held")]), Some(30.0));
    assert_eq!(inv.get("chipgate_stock_units", &[("product", H200), ("kind", "available")]), Some(0.0));
    assert_eq!(inv.get("chipgate_holds_unconfirmed", &[]), Some(3.0));
    assert_eq!(inv.get("chipgate_holds_expired_total", &[]), Some(0.0));
    assert!(inv.value("grpc_server_handled_total", &[("grpc_method", "BatchReserve"), ("grpc_code", "OK")]) >= 1.0);

    // --- the dashboard charts only series that exist
    let families: BTreeSet<String> =
        [&ord, &lic, &inv].iter().flat_map(|s| s.samples.iter().map(|x| x.name.clone())).collect();
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/dashboards/chipgate.json"))
            .expect("dashboard exists");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has panels");
    for e in &exprs {
        for name in metric_names(e) {
            assert!(families.contains(&name), "dashboard query `{e}` uses `{name}`, which no service exposes");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_holds_are_counted() {
    let mut options = ClusterOptions::default();
    options.orders.hold_seconds = 1;
    let mut w = World::with(options).await;
    w.export(H200).await;
    let app = w.apply("alpha", H200, 100).await;
    w.wave(&[(&app, 100)], lpb::LicenseConditions::default()).await;
    w.receive(H200, 100).await;
    let ids = vec![w.place("alpha", H200, 7).await.order_id, w.place("alpha", H200, 5).await.order_id];
    w.until(&ids, Duration::from_secs(15), |os| common::all_in(os, opb::OrderState::Expired)).await;

    let inv = scrape_until(&w.cluster.inventory.metrics_url(), "expiry counted", |s| {
        s.get("chipgate_holds_expired_total", &[]) == Some(2.0)
    })
    .await;
    assert_eq!(inv.get("chipgate_hold_units_expired_total", &[]), Some(12.0));
    assert_eq!(inv.get("chipgate_holds_unconfirmed", &[]), Some(0.0));
    assert_eq!(inv.get("chipgate_stock_units", &[("product", H200), ("kind", "available")]), Some(100.0));
    let ord = scrape_until(&w.cluster.orders.as_ref().unwrap().metrics_url(), "orders expired", |s| {
        s.get("chipgate_orders", &[("state", "EXPIRED")]) == Some(2.0)
    })
    .await;
    assert!(ord.value("chipgate_events_processed_total", &[("stream", "inventory"), ("kind", "holds_expired")]) >= 1.0);
    // The quota went back through the outbox.
    let lic = scrape_until(&w.cluster.licensing.metrics_url(), "quota returned", |s| {
        s.get("chipgate_licence_quota_units", &[("product", H200), ("kind", "used")]) == Some(0.0)
    })
    .await;
    assert_eq!(lic.get("chipgate_licence_quota_units", &[("product", H200), ("kind", "granted")]), Some(100.0));
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The series names a PromQL expression reads (`chipgate_*` and `grpc_server_*` identifiers).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..].iter().collect();
        let starts = rest.starts_with("chipgate_") || rest.starts_with("grpc_server_");
        let boundary = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_');
        if starts && boundary {
            let name: String = bytes[i..].iter().take_while(|c| c.is_alphanumeric() || **c == '_').collect();
            i += name.len();
            out.push(name);
        } else {
            i += 1;
        }
    }
    out
}
