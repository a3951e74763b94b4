//! The README's command-line walk-through, run as written against a fresh `chipgate dev` (real
//! process, authentication on): each party acts with `--as`, and the order reaches RESERVED,
//! CONFIRMED and SHIPPED. The commands are read out of README.md, so the README can't drift.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{bin, free_port};

/// The first ```sh block after the "### Walk-through" heading: one command per line.
fn walk_through() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let section = readme.split("### Walk-through").nth(1).expect("README.md has a '### Walk-through' section");
    let block = section.split("```sh\n").nth(1).and_then(|b| b.split("\n```").next()).expect("a ```sh block in it");
    block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walk_through_takes_an_order_to_shipped() {
    let lines = walk_through();
    assert!(lines.len() >= 10 && lines.iter().all(|l| l.starts_with("chipgate ")), "{lines:#?}");

    let auth = tempfile::tempdir().unwrap();
    let auth_dir = auth.path().join("dev");
    let (lp, ip, op) = (free_port(), free_port(), free_port());
    let _dev = tokio::process::Command::new(bin())
        .args(["dev", "--auth-dir", auth_dir.to_str().unwrap()])
        .args(["--licensing-port", &lp.to_string(), "--inventory-port", &ip.to_string()])
        .args(["--orders-port", &op.to_string()])
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chipgate dev");

    // The shell the reader has: `chipgate` on PATH, the dev cluster's endpoints and signing key.
    let bin_dir = std::path::Path::new(bin()).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let run = |line: String| {
        let path = path.clone();
        let key = auth_dir.join("signing.pem");
        async move {
            tokio::process::Command::new("bash")
                .args(["-c", &line])
                .env("PATH", path)
                .env("CHIPGATE_LICENSING_URL", format!("http://127.0.0.1:{lp}"))
                .env("CHIPGATE_INVENTORY_URL", format!("http://127.0.0.1:{ip}"))
                .env("CHIPGATE_ORDERS_URL", format!("http://127.0.0.1:{op}"))
                .env("CHIPGATE_SIGNING_KEY", key)
                .env_remove("CHIPGATE_OUTPUT")
                .env_remove("CHIPGATE_TOKEN")
                .env_remove("CHIPGATE_TOKEN_FILE")
                .env_remove("CHIPGATE_AS")
                .output()
                .await
                .unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run("chipgate --as auditor products".into()).await.status.success() {
        assert!(Instant::now() < deadline, "chipgate dev never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for line in &lines {
        let out = run(line.clone()).await;
        assert!(
            out.status.success(),
            "README line failed ({:?}): {line}\n{}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Where the order went, read back as the auditor.
    let out = run("chipgate -o json --as auditor order show ord-H200-SXM-141GB-1".into()).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let order: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let order = &order["order"];
    assert_eq!(order["state"], "ORDER_STATE_SHIPPED", "{order:#}");
    let reached: Vec<&str> =
        order["history"].as_array().unwrap().iter().map(|t| t["to_state"].as_str().unwrap()).collect();
    for state in
        ["ORDER_STATE_AWAITING_LICENSE", "ORDER_STATE_BACKORDERED", "ORDER_STATE_RESERVED", "ORDER_STATE_CONFIRMED"]
    {
        assert!(reached.contains(&state), "{state} missing from {reached:?}");
    }
}
