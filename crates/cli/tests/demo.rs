//! `chipgate demo` plays the seed story against a running cluster (real Redis, authentication on: the
//! demo acts as each party with tokens from the cluster's signing key) and its JSON summary matches
//! what the services report when asked independently afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_proto::orders::v1 as opb;
use chipgate_proto::orders::v1::order_service_client::OrderServiceClient;
use chipgate_runtime::auth::Role;
use chipgate_testkit::{Cluster, ClusterOptions};
use common::{Cli, H200};
use serde_json::Value;

/// A count: a number in the demo's own summary, a string where it is a proto message's 64-bit
/// field (the proto3 JSON mapping).
fn u(v: &Value) -> u64 {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or_else(|| panic!("not a number: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_plays_the_story_and_its_summary_is_what_the_services_say() {
    let cluster = Cluster::start_with(ClusterOptions { auth: true, ..ClusterOptions::default() }).await;
    let cli = Cli::for_cluster(&cluster);
    let key = cluster.auth_dir.as_ref().unwrap().path().join("signing.pem");
    let key = key.to_str().unwrap();

    // Without the cluster's key the demo can't act as anyone: refused at the first call, nothing done.
    let (code, err) = cli.fails(&["demo", "--signing-key", "/nonexistent/signing.pem"]).await;
    assert_ne!(code, 0, "{err}");
    let other = tempfile::tempdir().unwrap();
    let other_key = other.path().join("signing.pem");
    std::fs::write(&other_key, chipgate_runtime::auth::Signer::generate().unwrap().private_pem()).unwrap();
    let (_, err) = cli.fails(&["demo", "--signing-key", other_key.to_str().unwrap()]).await;
    assert_eq!(err["error"]["code"], "UNAUTHENTICATED", "{err}");

    let started = Instant::now();
    let summary = cli.json(&["demo", "--signing-key", key]).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(60), "the demo took {took:?}");

    // The story's shape, from the summary.
    let totals = &summary["totals"];
    assert!(u(&totals["units_ordered"]) > 2_000_000, "{totals}");
    assert!(u(&totals["orders"]) < 3_000, "{totals}");
    assert!(u(&totals["licensed_units_granted"]) >= 400_000, "{totals}");
    assert!(
        u(&totals["orders_reserved"]) > 0 && u(&totals["orders_backordered"]) > 0 && u(&totals["orders_awaiting"]) > 0
    );
    let licences = summary["licenses"].as_array().unwrap();
    let mut licensed: Vec<&str> = licences.iter().map(|l| l["buyer_id"].as_str().unwrap()).collect();
    licensed.sort_unstable();
    assert_eq!(licensed, ["alibaba", "bytedance", "tencent"], "wave 1 licenses exactly the three");
    // Finalised: usable, or every unit in use (orders of different sizes may fill a licence exactly).
    assert!(
        licences.iter().all(|l| l["state"] == "LICENSE_STATE_ACTIVE" || l["state"] == "LICENSE_STATE_EXHAUSTED"),
        "{licences:?}"
    );
    assert!(u(&summary["queue"]["total_queued"]) >= 5, "other buyers are still queued");
    assert_eq!(summary["audit"]["valid"], true);
    assert_eq!(summary["wave"]["observed"], true);
    // Wave 1 moved nothing while its terms were pending; the domestic purchases moved orders.
    let steps = summary["steps"].as_array().unwrap();
    let wave_step = steps.iter().find(|s| s["title"] == "wave 1 published").unwrap();
    assert!(wave_step["moved"].as_array().unwrap().is_empty(), "{wave_step}");
    let dom = steps.iter().find(|s| s["title"] == "domestic purchases").unwrap();
    assert!(dom["moved"].as_array().unwrap().iter().any(|m| m["to"] == "BACKORDERED"), "{dom}");

    // Now ask the services ourselves.
    let auditor = cluster.token(Role::Auditor);
    let orders_url = cluster.orders.as_ref().unwrap().url();
    let mut ord = OrderServiceClient::new(Cluster::authed(&orders_url, &auditor));
    let mut lic = LicensingServiceClient::new(Cluster::authed(&cluster.licensing.url(), &auditor));
    let mut inv = InventoryServiceClient::new(Cluster::authed(&cluster.inventory.url(), &auditor));
    let mut orders = Vec::new();
    let mut token = String::new();
    loop {
        let r = ord
            .list_orders(opb::ListOrdersRequest {
                page_size: 1000,
                page_token: token,
                omit_history: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        orders.extend(r.orders);
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    let mut per: BTreeMap<String, (u64, u64, u64, u64, u64, u64)> = BTreeMap::new();
    for o in &orders {
        let e = per.entry(o.buyer_id.clone()).or_default();
        e.0 += 1;
        e.1 += o.units;
        match o.state() {
            opb::OrderState::Reserved => e.2 += 1,
            opb::OrderState::Backordered => e.3 += 1,
            opb::OrderState::AwaitingLicense => e.4 += 1,
            _ => {}
        }
        e.5 += o.held_units;
    }
    let buyers = summary["buyers"].as_array().unwrap();
    assert_eq!(buyers.len(), per.len(), "every buyer is in the summary");
    assert!(buyers.len() >= 10, "many buyers: {}", buyers.len());
    for b in buyers {
        let id = b["buyer_id"].as_str().unwrap();
        let (n, units, reserved, backordered, awaiting, held) = per[id];
        assert_eq!(
            (
                u(&b["orders"]),
                u(&b["units_ordered"]),
                u(&b["orders_reserved"]),
                u(&b["orders_backordered"]),
                u(&b["orders_awaiting"]),
                u(&b["units_held"])
            ),
            (n, units, reserved, backordered, awaiting, held),
            "{id}"
        );
    }
    assert_eq!(u(&totals["orders"]), orders.len() as u64);

    for l in licences {
        let id = l["license_id"].as_str().unwrap();
        let now = lic
            .get_license(lpb::GetLicenseRequest { license_id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .license
            .unwrap();
        assert_eq!(
            (u(&l["granted_units"]), u(&l["used_units"]), u(&l["remaining_units"])),
            (now.granted_units, now.used_units, now.remaining_units),
            "{id}"
        );
        assert!(now.used_units > 0, "{id} is in use");
    }

    let stock =
        inv.get_stock(ipb::GetStockRequest { product_sku: H200.into() }).await.unwrap().into_inner().stock.unwrap();
    let s = &summary["stock"];
    assert_eq!(
        (u(&s["received"]), u(&s["available"]), u(&s["held"]), u(&s["committed"]), u(&s["shipped"])),
        (stock.received, stock.available, stock.held, stock.committed, stock.shipped)
    );
    assert!(stock.received > 0 && stock.received < u(&totals["units_ordered"]) / 10, "stock far below demand");
    assert_eq!(u(&totals["units_held"]), stock.held + stock.committed + stock.shipped, "every unit held is stock");

    let backlog = ord
        .get_backlog(opb::GetBacklogRequest { product_sku: H200.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u(&summary["backlog"]["total_orders"]), backlog.total_orders);
    let q = lic.list_queue(lpb::ListQueueRequest::default()).await.unwrap().into_inner();
    assert_eq!(u(&summary["queue"]["total_queued"]), q.total_queued);
    let wave = summary["wave"]["wave_id"].as_str().unwrap().to_string();
    let p = ord
        .get_wave_progress(opb::GetWaveProgressRequest { wave_id: wave })
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap();
    assert_eq!(
        (
            u(&summary["wave"]["orders_reserved"]),
            u(&summary["wave"]["orders_backordered"]),
            u(&summary["wave"]["units_held"])
        ),
        (p.orders_reserved, p.orders_backordered, p.units_held)
    );

    // A second run on the same cluster refuses rather than muddle the figures.
    let (code, err) = cli.fails(&["demo", "--signing-key", key]).await;
    assert_eq!(code, 11, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_contained_demo_prints_the_story_for_people() {
    let out = tokio::process::Command::new(common::bin())
        .args(["demo", "--self-contained"])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{text}", String::from_utf8_lossy(&out.stderr));
    for needle in [
        "Customs",
        "Wave 1",
        "nothing moves",
        "DOMESTIC_PURCHASE",
        "SUPPLY_RECEIVED",
        "Summary",
        "bytedance",
        "moonshot",
        "hash chain intact",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_refuses_a_cluster_with_applications_or_stock_and_changes_nothing() {
    let cluster = Cluster::start().await;
    let cli = Cli::for_cluster(&cluster);
    // No order and no licence yet, but an application its step 4 would collide with, and stock.
    cli.as_("buyer:bytedance")
        .json(&[
            "apply",
            "--buyer",
            "bytedance",
            "--product",
            H200,
            "--quantity",
            "10",
            "--end-use",
            "x",
            "--site",
            "y",
        ])
        .await;
    cli.as_("vendor").json(&["supply", "receive", "--product", H200, "--units", "500", "--receipt", "r-1"]).await;
    let key = cli.signing_key.clone().unwrap();
    let (code, err) = cli.fails(&["--signing-key", &key, "demo"]).await;
    assert_eq!(code, 11, "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains("1 application") && message.contains("500 units of stock"), "{message}");
    assert!(!message.contains("licence"), "no licence to speak of: {message}");
    let orders = cli.as_("auditor").json(&["order", "list"]).await;
    assert!(orders["orders"].as_array().unwrap().is_empty(), "nothing was placed: {orders}");
    let policies = cli.as_("auditor").json(&["customs", "list"]).await;
    assert!(policies["policies"].as_array().unwrap().is_empty(), "nothing was set: {policies}");
}
