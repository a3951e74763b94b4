//! The `chipgate` binary's client commands against a real cluster (real gRPC, real Redis): a day of an
//! operator and a buyer, every output parsed as JSON and checked for the values the cluster holds;
//! failures exit non-zero with the server's error details.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use chipgate_testkit::Cluster;
use common::{Cli, H200, reasons};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}")).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_and_a_buyers_day_through_the_cli() {
    let cluster = Cluster::start().await;
    let cli = Cli::for_cluster(&cluster);

    // The catalogue and empty stock.
    let products = cli.as_("vendor").json(&["products"]).await;
    assert!(products["products"].as_array().unwrap().iter().any(|p| p["sku"] == H200), "{products}");
    let stock = cli.as_("vendor").json(&["stock", H200]).await;
    assert_eq!(stock["stock"]["received"], "0");

    // Export authorisation and a customs embargo.
    let x =
        cli.as_("export_authority").json(&["export", "grant", "--product", H200, "--reference", "BIS-2026-1"]).await;
    assert_eq!(x["authorization"]["active"], true);
    assert_eq!(x["authorization"]["destination"], "CN");
    assert_eq!(x["authorization"]["vendor"], "nvidia");
    let xs = cli.as_("export_authority").json(&["export", "list"]).await;
    assert_eq!(xs["authorizations"].as_array().unwrap().len(), 1);
    let p = cli.as_("customs").json(&["customs", "set", H200, "embargoed", "--reason", "customs notice"]).await;
    assert_eq!(p["policy"]["stance"], "IMPORT_STANCE_EMBARGOED");
    let p = cli.as_("customs").json(&["customs", "show", H200]).await;
    assert_eq!(
        (p["policy"]["stance"].clone(), p["policy"]["reason"].clone()),
        ("IMPORT_STANCE_EMBARGOED".into(), "customs notice".into())
    );

    // Applications and the queue; a retried apply with the same request id is the same application.
    let apply = [
        "apply",
        "--buyer",
        "bytedance",
        "--product",
        H200,
        "--quantity",
        "1000",
        "--end-use",
        "training",
        "--site",
        "Ulanqab",
    ];
    let mut with_id = apply.to_vec();
    with_id.extend(["--request-id", "apply-bytedance-1"]);
    let bytedance = cli.as_("buyer:bytedance");
    let a1 = bytedance.json(&with_id).await;
    let again = bytedance.json(&with_id).await;
    assert_eq!(a1["application"]["application_id"], again["application"]["application_id"]);
    assert_eq!(a1["application"]["state"], "APPLICATION_STATE_QUEUED");
    assert_eq!(a1["application"]["queue_position"], "1");
    let app1 = s(&a1["application"]["application_id"]);
    let a2 = cli
        .as_("buyer:moonshot")
        .json(&[
            "apply",
            "--buyer",
            "moonshot",
            "--product",
            H200,
            "--quantity",
            "500",
            "--end-use",
            "Kimi",
            "--site",
            "Beijing",
        ])
        .await;
    let app2 = s(&a2["application"]["application_id"]);
    let q = cli.as_("import_authority").json(&["queue"]).await;
    assert_eq!(q["total_queued"], "2");
    let queued: Vec<String> = q["applications"].as_array().unwrap().iter().map(|a| s(&a["application_id"])).collect();
    assert_eq!(queued, vec![app1.clone(), app2.clone()]);

    // An order while nothing is licensed waits, with the conditions that fail.
    let o = bytedance
        .json(&[
            "order",
            "place",
            "--buyer",
            "bytedance",
            "--product",
            H200,
            "--units",
            "100",
            "--justification",
            "training",
        ])
        .await;
    let ord1 = s(&o["order"]["order_id"]);
    assert_eq!(o["order"]["state"], "ORDER_STATE_AWAITING_LICENSE");
    let why = reasons(&o["order"]);
    assert!(
        why.contains(&"CONDITION_LICENSE".to_string()) && why.contains(&"CONDITION_IMPORT_POLICY".to_string()),
        "{why:?}"
    );

    // Wave 1: draft, grant (terms pending, domestic ratio), publish, follow.
    let w = cli.as_("import_authority").json(&["wave", "create", "--name", "wave 1"]).await;
    assert_eq!(w["wave"]["state"], "WAVE_STATE_DRAFT");
    let wave = s(&w["wave"]["wave_id"]);
    let w = cli
        .as_("import_authority")
        .json(&[
            "wave",
            "grant",
            &wave,
            &app1,
            "--units",
            "800",
            "--terms-pending",
            "--domestic-ratio-bps",
            "2500",
            "--justification-required",
        ])
        .await;
    // The answer carries the grant and the wave's figures, not every grant so far.
    assert_eq!(w["grant"]["granted_units"], "800");
    assert_eq!(w["grant"]["conditions"]["terms_pending"], true);
    assert_eq!(w["grant"]["conditions"]["domestic_ratio_bps"], 2500);
    assert_eq!(w["wave"]["grant_count"], "1");
    assert_eq!(w["wave"]["total_granted_units"], "800");
    assert!(w["wave"]["grants"].as_array().is_none_or(|g| g.is_empty()), "{w}");
    let shown = cli.as_("import_authority").json(&["wave", "show", &wave]).await;
    assert_eq!(shown["wave"]["grants"][0]["granted_units"], "800", "the draft lists its grants");
    let pubd = cli.as_("import_authority").json(&["wave", "publish", &wave]).await;
    assert_eq!(pubd["wave"]["state"], "WAVE_STATE_PUBLISHED");
    assert_eq!(pubd["wave"]["total_granted_units"], "800");
    let lic = s(&pubd["licenses"][0]["license_id"]);
    assert_eq!(pubd["licenses"][0]["state"], "LICENSE_STATE_PENDING_TERMS");
    let lines = cli.as_("import_authority").json_lines(&["wave", "follow", &wave, "--within", "20s"]).await;
    let last = &lines.last().unwrap()["progress"];
    assert_eq!(last["observed"], true);
    assert!(last["settle_time"].is_string(), "{last}");
    assert_eq!(last["orders_concerned"], "1");
    assert_eq!(last["orders_evaluated"], "1");
    let shown = cli.as_("import_authority").json(&["wave", "show", &wave]).await;
    assert_eq!(shown["wave"]["grants"][0]["license_id"], lic.as_str());
    let waves = cli.as_("import_authority").json(&["wave", "list"]).await;
    assert_eq!(waves["waves"].as_array().unwrap().len(), 1);
    // Nothing moves: the order now waits on the pending terms.
    let o = cli
        .as_("import_authority")
        .order_until(&ord1, WAIT, |o| reasons(o).contains(&"CONDITION_TERMS_FINAL".to_string()))
        .await;
    assert_eq!(o["state"], "ORDER_STATE_AWAITING_LICENSE");

    // The embargo lifts, terms are finalised (with a new cap), the ratio holds the order back.
    cli.as_("customs").json(&["customs", "set", H200, "open", "--reason", "lifted"]).await;
    let l = cli.as_("import_authority").json(&["license", "finalize", &lic, "--per-order-cap", "500"]).await;
    assert_eq!(l["license"]["state"], "LICENSE_STATE_ACTIVE");
    assert_eq!(l["license"]["conditions"]["per_order_cap"], "500");
    assert_eq!(l["license"]["conditions"]["domestic_ratio_bps"], 2500, "flags change only what they name");
    let ls = cli.as_("import_authority").json(&["license", "list", "--wave", &wave]).await;
    assert_eq!(ls["licenses"].as_array().unwrap().len(), 1);
    let o = cli.as_("import_authority").order_until(&ord1, WAIT, |o| reasons(o) == ["CONDITION_DOMESTIC_RATIO"]).await;
    assert_eq!(o["reasons"][0]["required"], "25");
    let chk = cli
        .as_("import_authority")
        .json(&["check", "--buyer", "bytedance", "--product", H200, "--units", "100", "--justification", "x"])
        .await;
    assert_eq!(chk["eligible"], false);
    assert_eq!(chk["failures"][0]["condition"], "CONDITION_DOMESTIC_RATIO");

    // A domestic purchase: the order takes quota and waits for stock in the backlog.
    let d = cli
        .as_("import_authority")
        .json(&[
            "domestic",
            "record",
            "--buyer",
            "bytedance",
            "--units",
            "1000",
            "--supplier",
            "huawei",
            "--evidence",
            "INV-1",
        ])
        .await;
    assert_eq!(d["total_domestic_units"], "1000");
    assert_eq!(d["purchase"]["evidence_ref"], "INV-1");
    let ledger = cli.as_("import_authority").json(&["domestic", "show", "bytedance"]).await;
    assert_eq!(ledger["total_domestic_units"], "1000");
    let o = cli.as_("import_authority").order_until(&ord1, WAIT, |o| o["state"] == "ORDER_STATE_BACKORDERED").await;
    assert_eq!(o["license_id"], lic.as_str());
    let backlog = cli.as_("vendor").json(&["backlog", H200]).await;
    assert_eq!(backlog["total_orders"], "1");
    assert_eq!(backlog["entries"][0]["order_id"], ord1.as_str());
    assert_eq!(backlog["entries"][0]["position"], "1");

    // Supply arrives: the order is reserved; stock adds up.
    let r = cli
        .as_("vendor")
        .json(&["supply", "receive", "--product", H200, "--units", "150", "--receipt", "rcpt-1", "--source", "ship 1"])
        .await;
    assert_eq!(r["newly_booked"], true);
    assert_eq!(r["receipt"]["units"], "150");
    assert_eq!(r["stock"]["received"], "150");
    let again = cli
        .as_("vendor")
        .json(&["supply", "receive", "--product", H200, "--units", "150", "--receipt", "rcpt-1"])
        .await;
    assert_eq!(again["newly_booked"], false, "a receipt counts once");
    let o = cli.as_("import_authority").order_until(&ord1, WAIT, |o| o["state"] == "ORDER_STATE_RESERVED").await;
    assert_eq!(o["held_units"], "100");
    assert!(o["hold_expire_time"].is_string());
    let st = cli.as_("vendor").json(&["stock", H200]).await;
    assert_eq!((st["stock"]["available"].clone(), st["stock"]["held"].clone()), ("50".into(), "100".into()));
    let all = cli.as_("vendor").json(&["stock"]).await;
    assert!(all["stock"].as_array().unwrap().iter().any(|x| x["product_sku"] == H200 && x["received"] == "150"));

    // Confirm and ship; the lifecycle shows in the history.
    let c = bytedance.json(&["order", "confirm", &ord1]).await;
    assert_eq!(c["order"]["state"], "ORDER_STATE_CONFIRMED");
    let sh = cli.as_("vendor").json(&["order", "ship", &ord1]).await;
    assert_eq!(sh["order"]["state"], "ORDER_STATE_SHIPPED");
    let kinds: Vec<String> =
        sh["order"]["history"].as_array().unwrap().iter().map(|t| s(&t["cause"]["kind"])).collect();
    for k in [
        "CAUSE_KIND_PLACED",
        "CAUSE_KIND_WAVE_PUBLISHED",
        "CAUSE_KIND_DOMESTIC_PURCHASE",
        "CAUSE_KIND_SUPPLY_RECEIVED",
        "CAUSE_KIND_SHIPPED",
    ] {
        assert!(kinds.contains(&k.to_string()), "{k} missing from {kinds:?}");
    }
    let st = cli.as_("vendor").json(&["stock", H200]).await;
    assert_eq!(st["stock"]["shipped"], "100");

    // Place and cancel; list the buyer's orders.
    let o2 = bytedance
        .json(&[
            "order",
            "place",
            "--buyer",
            "bytedance",
            "--product",
            H200,
            "--units",
            "40",
            "--justification",
            "spare",
        ])
        .await;
    let ord2 = s(&o2["order"]["order_id"]);
    let cancelled = bytedance.json(&["order", "cancel", &ord2, "--reason", "changed plans"]).await;
    assert_eq!(cancelled["order"]["state"], "ORDER_STATE_CANCELLED");
    let listed = bytedance.json(&["order", "list", "--buyer", "bytedance"]).await;
    let states: Vec<(String, String)> =
        listed["orders"].as_array().unwrap().iter().map(|o| (s(&o["order_id"]), s(&o["state"]))).collect();
    assert_eq!(
        states,
        vec![(ord1.clone(), "ORDER_STATE_SHIPPED".to_string()), (ord2.clone(), "ORDER_STATE_CANCELLED".to_string())]
    );
    assert_eq!(listed["orders"][0]["history"].as_array().unwrap().len(), 0, "lists leave histories out by default");
    let shipped = cli.as_("import_authority").json(&["order", "list", "--state", "shipped"]).await;
    assert_eq!(shipped["orders"].as_array().unwrap().len(), 1);

    // Bulk import from CSV: three rows placed; importing again with the same prefix places nothing new.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("demand.csv");
    std::fs::write(
        &csv,
        "buyer,product,units,justification\n\
         bytedance,H200-SXM-141GB,30,\"training, phase 2\"\n\
         bytedance,H200-SXM-141GB,20,inference\n\
         moonshot,H200-SXM-141GB,10,Kimi\n",
    )
    .unwrap();
    let csv = csv.to_str().unwrap();
    // Each row is placed as its own buyer, with tokens minted from the cluster's signing key.
    let key = cli.signing_key.clone().unwrap();
    let imp = cli
        .json(&["--signing-key", &key, "order", "import", csv, "--request-id", "import-1", "--concurrency", "2"])
        .await;
    assert_eq!((imp["rows"].clone(), imp["placed"].clone(), imp["failed"].clone()), (3.into(), 3.into(), 0.into()));
    let ids: Vec<String> = imp["orders"].as_array().unwrap().iter().map(|o| s(&o["order_id"])).collect();
    assert_eq!(imp["orders"][0]["request_id"], "import-1-2");
    assert_eq!(imp["orders"][2]["buyer_id"], "moonshot");
    assert_eq!(imp["orders"][2]["state"], "ORDER_STATE_AWAITING_LICENSE", "moonshot holds no licence");
    let first = cli.as_("import_authority").json(&["order", "show", &ids[0]]).await;
    assert_eq!(first["order"]["justification"], "training, phase 2");
    let again = cli.json(&["--signing-key", &key, "order", "import", csv, "--request-id", "import-1"]).await;
    let ids_again: Vec<String> = again["orders"].as_array().unwrap().iter().map(|o| s(&o["order_id"])).collect();
    assert_eq!(ids, ids_again, "a re-run import replays, it does not place twice");
    let moonshot = cli.as_("buyer:moonshot").json(&["order", "list", "--buyer", "moonshot"]).await;
    assert_eq!(moonshot["orders"].as_array().unwrap().len(), 1);

    // Applications, audit.
    let a = cli.as_("import_authority").json(&["application", "show", &app2]).await;
    assert_eq!(
        (a["application"]["state"].clone(), a["application"]["queue_position"].clone()),
        ("APPLICATION_STATE_QUEUED".into(), "1".into())
    );
    let apps = bytedance.json(&["application", "list", "--buyer", "bytedance"]).await;
    assert_eq!(apps["applications"][0]["state"], "APPLICATION_STATE_GRANTED");
    let v = cli.as_("auditor").json(&["audit", "verify"]).await;
    assert_eq!(v["valid"], true);
    assert!(v["entries_checked"].as_str().unwrap().parse::<u64>().unwrap() >= 8, "{v}");
    let entries = cli.as_("auditor").json(&["audit", "list", "--subject", &wave]).await;
    let actions: Vec<String> = entries["entries"].as_array().unwrap().iter().map(|e| s(&e["action"])).collect();
    let published = entries["entries"].as_array().unwrap().iter().find(|e| s(&e["action"]).contains("publish"));
    let published = published.unwrap_or_else(|| panic!("no publish entry in {actions:?}"));
    assert_eq!(published["actor"], "import_authority", "the log names the authenticated caller: {published}");

    // Paging: --limit stops early and hands back a token that continues.
    let page = cli.as_("import_authority").json(&["order", "list", "--limit", "2"]).await;
    assert_eq!(page["orders"].as_array().unwrap().len(), 2);
    let token = s(&page["next_page_token"]);
    assert!(!token.is_empty());
    let rest = cli.as_("import_authority").json(&["order", "list", "--page-token", &token]).await;
    assert_eq!(rest["orders"].as_array().unwrap().len(), 3);
    assert_eq!(rest["next_page_token"], "");

    // Table output for people.
    let out = cli.as_("import_authority").raw(&["queue"]).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("moonshot") && text.contains("POS"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_non_zero_with_the_servers_details() {
    let cluster = Cluster::start().await;
    let cli = Cli::for_cluster(&cluster);

    // Unknown order: NOT_FOUND (exit 4) with ResourceInfo and ErrorInfo.
    let (code, err) = cli.as_("import_authority").fails(&["order", "show", "ord-404"]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!(err["error"]["code"], "NOT_FOUND");
    assert_eq!(err["error"]["service"], "orders");
    assert_eq!(err["error"]["details"]["resource_info"]["resource_name"], "ord-404");
    assert_eq!(err["error"]["details"]["error_info"]["domain"], "chipgate.dev");

    // Bad input: INVALID_ARGUMENT (exit 3) with a field violation per bad field, and the request id.
    let (code, err) = cli
        .as_("buyer:tencent")
        .fails(&[
            "order",
            "place",
            "--buyer",
            "tencent",
            "--product",
            "no spaces",
            "--units",
            "0",
            "--request-id",
            "bad-1",
        ])
        .await;
    assert_eq!(code, 3, "{err}");
    assert_eq!(err["error"]["code"], "INVALID_ARGUMENT");
    assert_eq!(err["error"]["request_id"], "bad-1");
    let fields: Vec<String> =
        err["error"]["details"]["bad_request"].as_array().unwrap().iter().map(|v| s(&v["field"])).collect();
    assert!(fields.contains(&"product_sku".to_string()) && fields.contains(&"units".to_string()), "{fields:?}");

    // A rule says no: confirming an order that holds nothing is FAILED_PRECONDITION (exit 6).
    let tencent = cli.as_("buyer:tencent");
    let o = tencent.json(&["order", "place", "--buyer", "tencent", "--product", H200, "--units", "10"]).await;
    let id = s(&o["order"]["order_id"]);
    let (code, err) = tencent.fails(&["order", "confirm", &id]).await;
    assert_eq!(code, 6, "{err}");
    assert_eq!(err["error"]["code"], "FAILED_PRECONDITION");
    assert!(!err["error"]["details"]["precondition_failure"].as_array().unwrap().is_empty(), "{err}");

    // A duplicate application: ALREADY_EXISTS (exit 5).
    let apply = ["apply", "--buyer", "tencent", "--product", H200, "--quantity", "10", "--end-use", "x", "--site", "y"];
    tencent.json(&apply).await;
    let (code, err) = tencent.fails(&apply).await;
    assert_eq!(code, 5, "{err}");
    assert_eq!(err["error"]["code"], "ALREADY_EXISTS");

    // People get the details in words on stderr.
    let out = cli.as_("import_authority").raw(&["order", "show", "ord-404"]).await;
    assert_eq!(out.status.code(), Some(4));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("NOT_FOUND") && text.contains("ord-404") && text.contains("chipgate.dev"), "{text}");

    // Nobody listening: UNAVAILABLE (exit 9) naming the endpoint.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let nowhere = Cli::new(dead.clone(), dead.clone(), dead.clone());
    let (code, err) = nowhere.fails(&["--timeout", "3s", "queue"]).await;
    assert_eq!(code, 9, "{err}");
    assert_eq!(err["error"]["code"], "UNAVAILABLE");
    assert_eq!(err["error"]["retryable"], true);

    // A malformed import file places nothing and says which line is wrong.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "buyer,product,units\nbaidu,H200-SXM-141GB,lots\n").unwrap();
    let (code, err) = cli.fails(&["order", "import", bad.to_str().unwrap()]).await;
    assert_eq!(code, 3, "{err}");
    assert!(s(&err["error"]["message"]).contains("line 2"), "{err}");
    let baidu = cli.as_("import_authority").json(&["order", "list", "--buyer", "baidu"]).await;
    assert_eq!(baidu["orders"].as_array().unwrap().len(), 0);

    // Usage errors are clap's (exit 2).
    let out = cli.raw(&["order", "place", "--buyer", "x"]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_orders_and_stock_prints_json_lines() {
    let cluster = Cluster::start().await;
    let cli = Cli::for_cluster(&cluster);

    // Stock watch starts with the stock as it stands.
    let lines = cli.as_("vendor").json_lines(&["stock", "watch", H200, "--count", "1", "--for", "10s"]).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["stock"]["product_sku"], H200);

    // Order watch follows a buyer's transitions as they happen; keep placing until it has seen two.
    let orders = cluster.orders.as_ref().unwrap().url();
    let watch = tokio::process::Command::new(common::bin())
        .args(["-o", "json", "--orders", &orders])
        .args(cli.as_("buyer:zhipu").identity())
        .args(["order", "watch", "--buyer", "zhipu", "--count", "2", "--for", "20s"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let waiting = tokio::spawn(watch.wait_with_output());
    let mut placed = Vec::new();
    while !waiting.is_finished() && placed.len() < 40 {
        let o = cli
            .as_("buyer:zhipu")
            .json(&["order", "place", "--buyer", "zhipu", "--product", H200, "--units", "1"])
            .await;
        placed.push(s(&o["order"]["order_id"]));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = waiting.await.unwrap().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{text}");
    for l in &lines {
        assert_eq!(l["buyer_id"], "zhipu");
        assert!(placed.contains(&s(&l["order_id"])), "{l}");
        assert!(l["transition"]["to_state"].as_str().unwrap().starts_with("ORDER_STATE_"), "{l}");
    }
}

/// Sharing stock and "what if" through the CLI: a wave previewed before it is published, the vendor's
/// pro-rata policy set and shown, a receipt previewed and then booked as previewed; only the vendor
/// sets the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_and_allocation_policies_through_the_cli() {
    let cluster = Cluster::start().await;
    let cli = Cli::for_cluster(&cluster);
    cli.as_("export_authority").json(&["export", "grant", "--product", H200, "--reference", "BIS-1"]).await;
    let mut orders = Vec::new();
    let mut apps = Vec::new();
    for (buyer, units) in [("bytedance", "300"), ("alibaba", "100")] {
        let who = format!("buyer:{buyer}");
        let a = cli
            .as_(&who)
            .json(&[
                "apply",
                "--buyer",
                buyer,
                "--product",
                H200,
                "--quantity",
                "1000",
                "--end-use",
                "x",
                "--site",
                "y",
            ])
            .await;
        apps.push(s(&a["application"]["application_id"]));
        let o = cli
            .as_(&who)
            .json(&["order", "place", "--buyer", buyer, "--product", H200, "--units", units, "--justification", "j"])
            .await;
        orders.push(s(&o["order"]["order_id"]));
    }
    let w = cli.as_("import_authority").json(&["wave", "create", "--name", "wave 1"]).await;
    let wave = s(&w["wave"]["wave_id"]);
    for app in &apps {
        cli.as_("import_authority").json(&["wave", "grant", &wave, app, "--units", "1000"]).await;
    }
    let p = cli.as_("import_authority").json(&["wave", "preview", &wave]).await;
    let eligible: Vec<(String, String)> =
        p["buyers"].as_array().unwrap().iter().map(|b| (s(&b["buyer_id"]), s(&b["orders_backordered"]))).collect();
    assert_eq!(eligible, [("alibaba".into(), "1".into()), ("bytedance".into(), "1".into())], "{p}");
    let text =
        String::from_utf8_lossy(&cli.as_("import_authority").raw(&["wave", "preview", &wave]).await.stdout).to_string();
    assert!(text.contains("BACKORDERED") && text.contains("bytedance"), "{text}");
    cli.as_("import_authority").json(&["wave", "publish", &wave]).await;
    for id in &orders {
        cli.as_("vendor").order_until(id, WAIT, |o| o["state"] == "ORDER_STATE_BACKORDERED").await;
    }

    let set = cli
        .as_("vendor")
        .json(&["allocation", "set", H200, "--strategy", "pro-rata", "--reason", "share the shortage"])
        .await;
    assert_eq!(set["policy"]["strategy"], "ALLOCATION_STRATEGY_PRO_RATA");
    assert_eq!(set["change"]["changed_by"], "vendor");
    let (code, err) = cli.as_("buyer:bytedance").fails(&["allocation", "set", H200, "--strategy", "fifo"]).await;
    assert_eq!(code, 8, "{err}");
    // 100 units over 300 and 100 waited for: 75 and 25.
    let pv = cli.as_("vendor").json(&["supply", "preview", "--product", H200, "--units", "100"]).await;
    let shares: Vec<(String, String)> =
        pv["allocation"]["buyers"].as_array().unwrap().iter().map(|b| (s(&b["buyer_id"]), s(&b["units"]))).collect();
    assert_eq!(shares, [("bytedance".into(), "75".into()), ("alibaba".into(), "25".into())]);
    let text = String::from_utf8_lossy(
        &cli.as_("vendor").raw(&["supply", "preview", "--product", H200, "--units", "100"]).await.stdout,
    )
    .to_string();
    assert!(text.contains("PRO_RATA") && text.contains("GETS"), "{text}");
    cli.as_("vendor").json(&["supply", "receive", "--product", H200, "--units", "100"]).await;
    let o = cli.as_("vendor").order_until(&orders[0], WAIT, |o| o["held_units"] == "75").await;
    let last = o["history"].as_array().unwrap().last().unwrap().clone();
    assert!(s(&last["detail"]).contains("pro-rata share 75 of 100 units: 2 buyers waiting"), "{last}");
    cli.as_("vendor").order_until(&orders[1], WAIT, |o| o["held_units"] == "25").await;
    let shown = cli.as_("vendor").json(&["allocation", "show", H200]).await;
    assert_eq!(shown["allocated_units"], "100");
    assert_eq!(shown["changes"].as_array().unwrap().len(), 1);
    let text = String::from_utf8_lossy(&cli.as_("vendor").raw(&["allocation", "show", H200]).await.stdout).to_string();
    assert!(text.contains("PRO_RATA") && text.contains("75.0 %"), "{text}");
}
