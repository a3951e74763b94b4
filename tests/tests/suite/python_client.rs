//! A real Python gRPC client (grpcio, with stubs generated from proto/ at run time) against the three
//! services with authentication on: health, reflection, tokens per party, a typed call path, and rich
//! error details.

use chipgate_runtime::auth::Role;
use chipgate_testkit::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_works_against_every_service() {
    let cluster = Cluster::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/client_check.py");
    let tokens = tempfile::tempdir().unwrap();
    for role in [Role::ImportAuthority, Role::ExportAuthority, Role::Vendor] {
        std::fs::write(tokens.path().join(format!("{}.jwt", role.as_str())), cluster.token(role)).unwrap();
    }
    std::fs::write(tokens.path().join("buyer-iflytek.jwt"), cluster.buyer_token("iflytek")).unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--licensing", &cluster.licensing.addr.to_string()])
        .args(["--inventory", &cluster.inventory.addr.to_string()])
        .args(["--orders", &cluster.orders.as_ref().unwrap().addr.to_string()])
        .args(["--token-dir", &tokens.path().display().to_string()])
        .output()
        .await
        .expect("python3 must be installed (the test script installs grpcio, grpcio-tools, grpcio-health-checking, grpcio-reflection)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("tokens, licensing → inventory → orders, rich errors: ok"), "{stdout}");
}
