//! The CLI against a cluster with authentication on: `--as` mints the right token from the signing
//! key, and a call refused for want of the right token (UNAUTHENTICATED, PERMISSION_DENIED) says which
//! callers the RPC admits, from the services' own policy table. Usage mistakes exit 2.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chipgate_testkit::{Cluster, ClusterOptions};
use common::Cli;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_callers_the_rpc_admits_and_as_picks_the_role() {
    let cluster = Cluster::start_with(ClusterOptions { auth: true, ..ClusterOptions::default() }).await;
    // This test passes the key and the party itself.
    let cli = Cli { signing_key: None, ..Cli::for_cluster(&cluster) };
    let key = cluster.auth_dir.as_ref().unwrap().path().join("signing.pem");
    let key = key.to_str().unwrap();

    // No token at all.
    let (code, err) = cli.fails(&["queue"]).await;
    assert_eq!(code, 8, "{err}");
    assert_eq!(err["error"]["code"], "UNAUTHENTICATED");
    assert_eq!(err["error"]["rpc"], "/chipgate.licensing.v1.LicensingService/ListQueue");
    assert_eq!(err["error"]["allowed_callers"], json!(["import_authority", "auditor"]));

    // The wrong role: told who may, for people too.
    let (code, err) = cli.fails(&["--signing-key", key, "--as", "buyer:bytedance", "queue"]).await;
    assert_eq!((code, err["error"]["code"].as_str().unwrap()), (8, "PERMISSION_DENIED"), "{err}");
    assert_eq!(err["error"]["allowed_callers"], json!(["import_authority", "auditor"]));
    let out = cli.raw(&["--signing-key", key, "--as", "vendor", "customs", "set", "H200-SXM-141GB", "open"]).await;
    assert_eq!(out.status.code(), Some(8));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("SetImportPolicy admits: customs") && text.contains("--as customs"), "{text}");
    let (_, err) = cli
        .fails(&[
            "--signing-key",
            key,
            "--as",
            "vendor",
            "order",
            "place",
            "--buyer",
            "x",
            "--product",
            "p",
            "--units",
            "1",
        ])
        .await;
    assert_eq!(err["error"]["allowed_callers"], json!(["buyer (for its own buyer id)"]));

    // The right role.
    let q = cli.json(&["--signing-key", key, "--as", "import_authority", "queue"]).await;
    assert_eq!(q["total_queued"], "0");
    let o = cli
        .json(&[
            "--signing-key",
            key,
            "--as",
            "buyer:moonshot",
            "order",
            "place",
            "--buyer",
            "moonshot",
            "--product",
            "H200-SXM-141GB",
            "--units",
            "1",
        ])
        .await;
    assert_eq!(o["order"]["buyer_id"], "moonshot");

    // Usage mistakes: exit 2, nothing sent.
    for args in [
        vec!["--signing-key", key, "--as", "emperor", "queue"],
        vec!["--signing-key", key, "--as", "buyer", "queue"],
        vec!["--signing-key", key, "--as", "vendor:acme", "queue"],
        vec!["--signing-key", "/nonexistent/signing.pem", "--as", "vendor", "queue"],
    ] {
        let out = cli.raw(&args).await;
        let code = out.status.code();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            code == Some(2) || (code == Some(3) && args[1].starts_with("/nonexistent")),
            "{args:?}: {code:?} {text}"
        );
    }
    let out = tokio::process::Command::new(common::bin())
        .args(["--orders", "127.0.0.1:50053", "order", "show", "ord-1"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a URL without its scheme is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("use http://127.0.0.1:50053"));
}
