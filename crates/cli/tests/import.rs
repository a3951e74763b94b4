//! `chipgate order import` against a cluster with authentication on: every row is placed as its own
//! buyer (tokens minted from the signing key), a re-import of the same file places nothing twice, and
//! a token the cluster refuses stops the import at the first refusal, told once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chipgate_runtime::auth::Role;
use chipgate_testkit::{Cluster, ClusterOptions};
use common::Cli;
use serde_json::Value;

fn ids(v: &Value) -> Vec<String> {
    v["orders"].as_array().unwrap().iter().map(|o| o["order_id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_places_each_row_as_its_buyer_once_and_stops_at_a_refused_token() {
    let cluster = Cluster::start_with(ClusterOptions { auth: true, ..ClusterOptions::default() }).await;
    let cli = Cli::for_cluster(&cluster);
    let key = cluster.auth_dir.as_ref().unwrap().path().join("signing.pem");
    let key = key.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Two buyers; a quoted justification that spans two lines.
    let demand = dir.path().join("demand.csv");
    std::fs::write(
        &demand,
        "buyer,product,units,justification\n\
         bytedance,H200-SXM-141GB,30,\"Doubao training,\nphase 2\"\n\
         moonshot,H200-SXM-141GB,10,Kimi\n",
    )
    .unwrap();
    let demand = demand.to_str().unwrap();
    let first = cli.json(&["--signing-key", key, "order", "import", demand]).await;
    assert_eq!((first["placed"].clone(), first["failed"].clone()), (2.into(), 0.into()), "{first}");
    assert_eq!(first["as_each_rows_buyer"], true);
    let buyers: Vec<&str> =
        first["orders"].as_array().unwrap().iter().map(|o| o["buyer_id"].as_str().unwrap()).collect();
    assert_eq!(buyers, ["bytedance", "moonshot"]);
    assert_eq!(
        first["orders"][1]["request_id"].as_str().unwrap(),
        format!("{}-4", first["request_id_prefix"].as_str().unwrap())
    );

    // The same file again, no --request-id: the ids come from its content, so nothing new.
    let again = cli.json(&["--signing-key", key, "order", "import", demand]).await;
    assert_eq!(ids(&again), ids(&first), "a re-import replays the first answers");
    let auditor = cluster.token(Role::Auditor);
    let all = cli.json(&["--token", &auditor, "order", "list"]).await;
    assert_eq!(all["orders"].as_array().unwrap().len(), 2, "no order placed twice");
    let shown = cli.json(&["--token", &auditor, "order", "show", &ids(&first)[0]]).await;
    assert_eq!(shown["order"]["justification"], "Doubao training,\nphase 2");

    // One buyer's token for rows of another: refused once, and the import stops there.
    let mixed = dir.path().join("mixed.csv");
    let mut text = "buyer,product,units\nbytedance,H200-SXM-141GB,5\n".to_string();
    for _ in 0..6 {
        text.push_str("moonshot,H200-SXM-141GB,5\n");
    }
    std::fs::write(&mixed, text).unwrap();
    let token = cluster.buyer_token("bytedance");
    let out = cli
        .raw(&["-o", "json", "--token", &token, "order", "import", mixed.to_str().unwrap(), "--concurrency", "1"])
        .await;
    assert_eq!(out.status.code(), Some(11), "a check failed: rows not placed");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["placed"], 1, "{report}");
    assert_eq!(report["failed"], 1, "only the first refusal is tried: {report}");
    assert_eq!(report["not_attempted"], 5, "{report}");
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{report}");
    assert_eq!(errors[0]["error"]["code"], "PERMISSION_DENIED");
    assert_eq!(errors[0]["lines"], serde_json::json!([3]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_with_a_token_per_buyer() {
    let cluster = Cluster::start_with(ClusterOptions { auth: true, ..ClusterOptions::default() }).await;
    let cli = Cli::for_cluster(&cluster);
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    std::fs::write(tokens.join("buyer-zhipu.jwt"), cluster.buyer_token("zhipu")).unwrap();
    let demand = dir.path().join("demand.csv");
    std::fs::write(&demand, "buyer,product,units\nzhipu,H200-SXM-141GB,7\nstepfun,H200-SXM-141GB,3\n").unwrap();
    let demand = demand.to_str().unwrap();
    let tokens = tokens.to_str().unwrap();

    // A buyer without a token: named, nothing placed.
    let (code, err) = cli.fails(&["order", "import", demand, "--buyer-tokens", tokens]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("buyer-stepfun.jwt"), "{err}");
    let auditor = cluster.token(Role::Auditor);
    assert!(cli.json(&["--token", &auditor, "order", "list"]).await["orders"].as_array().unwrap().is_empty());

    std::fs::write(dir.path().join("tokens/buyer-stepfun.jwt"), cluster.buyer_token("stepfun")).unwrap();
    let report = cli.json(&["order", "import", demand, "--buyer-tokens", tokens]).await;
    assert_eq!(report["placed"], 2, "{report}");
    let buyers: Vec<&str> =
        report["orders"].as_array().unwrap().iter().map(|o| o["buyer_id"].as_str().unwrap()).collect();
    assert_eq!(buyers, ["zhipu", "stepfun"]);
}
