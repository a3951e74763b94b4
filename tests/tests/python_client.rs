//! A real Python gRPC client (grpcio, with stubs generated from proto/ at run time) against the three
//! services: health, reflection, a typed call path, and rich error details.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chipgate_testkit::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_works_against_every_service() {
    let cluster = Cluster::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/client_check.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--licensing", &cluster.licensing.addr.to_string()])
        .args(["--inventory", &cluster.inventory.addr.to_string()])
        .args(["--orders", &cluster.orders.as_ref().unwrap().addr.to_string()])
        .output()
        .await
        .expect("python3 must be installed (the test script installs grpcio, grpcio-tools, grpcio-health-checking, grpcio-reflection)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("rich errors: ok"), "{stdout}");
}
