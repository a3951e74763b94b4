//! Running the real `chipgate` binary against a cluster, as a user would.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const H200: &str = "H200-SXM-141GB";

/// The `chipgate` binary built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_chipgate")
}

#[allow(unused_imports)] // not every test file that includes this module picks ports
pub use chipgate_testkit::free_port;

/// The CLI pointed at one cluster.
#[derive(Clone)]
pub struct Cli {
    pub licensing: String,
    pub inventory: String,
    pub orders: String,
    /// The cluster's signing key (authentication on): `--as` mints tokens from it.
    pub signing_key: Option<String>,
    /// The party the commands act as (`--as`).
    pub party: Option<String>,
    /// Extra environment for the process (e.g. the AWS_* settings of an S3 archive).
    pub env: Vec<(String, String)>,
}

impl Cli {
    pub fn new(licensing: String, inventory: String, orders: String) -> Self {
        Cli { licensing, inventory, orders, signing_key: None, party: None, env: Vec::new() }
    }

    pub fn for_cluster(c: &chipgate_testkit::Cluster) -> Self {
        let orders = c.orders.as_ref().expect("the harness runs orders in process");
        let mut cli = Cli::new(c.licensing.url(), c.inventory.url(), orders.url());
        cli.signing_key = c.auth_dir.as_ref().map(|d| d.path().join("signing.pem").display().to_string());
        cli
    }

    /// The same CLI acting as `party` (`import_authority`, `vendor`, `buyer:bytedance`, ...).
    pub fn as_(&self, party: &str) -> Self {
        Cli { party: Some(party.to_string()), ..self.clone() }
    }

    /// The flags that say who the CLI acts as.
    pub fn identity(&self) -> Vec<String> {
        match (&self.signing_key, &self.party) {
            (Some(k), Some(p)) => vec!["--signing-key".to_string(), k.clone(), "--as".to_string(), p.clone()],
            _ => Vec::new(),
        }
    }

    /// Runs `chipgate <args>` with the cluster's endpoints (no output format forced).
    pub async fn raw(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(bin())
            .args(["--licensing", &self.licensing, "--inventory", &self.inventory, "--orders", &self.orders])
            .args(self.identity())
            .args(args)
            .env_remove("CHIPGATE_OUTPUT")
            .env_remove("CHIPGATE_REQUEST_ID")
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true)
            .output()
            .await
            .expect("run chipgate")
    }

    /// Runs `chipgate -o json <args>`, which must succeed, and parses its one JSON document.
    pub async fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.raw(&all).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "chipgate {args:?} failed ({:?}):\n{}\n{stdout}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("chipgate {args:?} printed no JSON document ({e}):\n{stdout}"))
    }

    /// Runs `chipgate -o json <args>`, which must print JSON lines; returns them.
    pub async fn json_lines(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.raw(&all).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "chipgate {args:?} failed:\n{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
            .collect()
    }

    /// Runs `chipgate -o json <args>`, which must fail; returns its exit code and the error document
    /// it printed on stderr (stdout must stay empty).
    pub async fn fails(&self, args: &[&str]) -> (i32, Value) {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.raw(&all).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "chipgate {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(out.stdout.is_empty(), "a failure prints nothing on stdout: {}", String::from_utf8_lossy(&out.stdout));
        let err: Value =
            serde_json::from_str(&stderr).unwrap_or_else(|e| panic!("stderr is not the JSON error ({e}):\n{stderr}"));
        (out.status.code().unwrap(), err)
    }

    /// Polls `chipgate order show ID` until `check` holds (or fails after `within`).
    pub async fn order_until(&self, id: &str, within: Duration, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let o = self.json(&["order", "show", id]).await;
            if check(&o["order"]) {
                return o["order"].clone();
            }
            assert!(Instant::now() < deadline, "order {id} never got there; it stands at {o:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The condition names an order waits on.
pub fn reasons(order: &Value) -> Vec<String> {
    order["reasons"].as_array().unwrap().iter().map(|r| r["condition"].as_str().unwrap().to_string()).collect()
}
