//! Graceful shutdown of a real service process: with calls in flight and an idle client connected,
//! SIGTERM turns health NOT_SERVING at once, the in-flight calls finish successfully, and the
//! process exits cleanly within its bound (drain delay + shutdown grace).
//!
//! The calls are kept in flight by pausing Redis (`CLIENT PAUSE`), so they are genuinely inside the
//! handler, waiting on state, when the signal arrives.

use std::time::{Duration, Instant};

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_state::testing::RedisServer;
use chipgate_testkit::{binary, channel, free_port};
use tokio::io::AsyncBufReadExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn status(health_url: &str) -> Option<ServingStatus> {
    let mut h = HealthClient::new(channel(health_url));
    h.check(HealthCheckRequest { service: String::new() }).await.ok().map(|r| r.into_inner().status())
}

/// The keys an operator gives the services: a signing key whose public half they verify tokens
/// with, and licensing's audit key, as files in a directory.
struct OperatorKeys {
    dir: tempfile::TempDir,
    signer: chipgate_runtime::auth::Signer,
    public: std::path::PathBuf,
    audit: std::path::PathBuf,
}

impl OperatorKeys {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let signer = chipgate_runtime::auth::Signer::generate().unwrap();
        let public = dir.path().join("public.pem");
        std::fs::write(&public, signer.public_pem()).unwrap();
        let audit = dir.path().join(chipgate_testkit::AUDIT_SIGNING_KEY_FILE);
        std::fs::write(&audit, chipgate_runtime::auth::Signer::generate().unwrap().private_pem()).unwrap();
        OperatorKeys { dir, signer, public, audit }
    }
}

/// A licensing process run as an operator runs it (authentication on, its keys), with a health port,
/// a drain delay of 300 ms and the given shutdown grace; returned once it is SERVING.
struct Licensing {
    child: tokio::process::Child,
    pid: u32,
    url: String,
    health_url: String,
}

async fn start_licensing(
    redis: &RedisServer,
    public: &std::path::Path,
    audit: &std::path::Path,
    grace: &str,
) -> Licensing {
    let (port, health_port) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{port}");
    let health_url = format!("http://127.0.0.1:{health_port}");
    let child = tokio::process::Command::new(binary("chipgate-licensing"))
        .env("CHIPGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("CHIPGATE_HEALTH_LISTEN", format!("127.0.0.1:{health_port}"))
        .env("REDIS_URL", redis.url())
        .env_remove("CHIPGATE_INSECURE_NO_AUTH")
        .env("CHIPGATE_AUTH_PUBLIC_KEY", public)
        .env("CHIPGATE_AUDIT_SIGNING_KEY_FILE", audit)
        .env("CHIPGATE_DRAIN_DELAY", "300ms")
        .env("CHIPGATE_SHUTDOWN_GRACE", grace)
        .env("CHIPGATE_REDIS_TIMEOUT", "10s")
        .env("CHIPGATE_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start chipgate-licensing");
    let pid = child.id().expect("pid");
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&health_url).await != Some(ServingStatus::Serving) {
        assert!(Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Licensing { child, pid, url, health_url }
}

fn sigterm(pid: u32) {
    let ok = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_health_not_serving_lets_in_flight_calls_finish_and_exits_in_time() {
    let redis = RedisServer::start();
    // Run as an operator does: authentication on (the public key, licensing's audit key); the
    // clients carry an auditor's token (reads only).
    let OperatorKeys { dir: _keys, signer, public, audit } = OperatorKeys::new();
    let token = signer.mint_role(chipgate_runtime::auth::Role::Auditor, Duration::from_secs(3600));
    let licensing = |url: &str| LicensingServiceClient::new(chipgate_testkit::Cluster::authed(url, &token));
    let Licensing { mut child, pid, url, health_url } = start_licensing(&redis, &public, &audit, "5s").await;
    // An idle client: connected, one call made, then nothing.
    let mut idle = licensing(&url);
    idle.list_queue(lpb::ListQueueRequest::default()).await.unwrap();

    // Pause Redis for 2.5 s and start calls that will wait on it.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let pause_ms = 2500u64;
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(pause_ms)
        .arg("ALL")
        .query_async::<()>(&mut admin)
        .await
        .expect("CLIENT PAUSE");
    let paused_at = Instant::now();
    let mut in_flight = Vec::new();
    for _ in 0..4 {
        let mut c = licensing(&url);
        in_flight.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(lpb::ListApplicationsRequest { page_size: 10, ..Default::default() });
            req.set_timeout(Duration::from_secs(15));
            c.list_applications(req).await.map(|_| Instant::now())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // SIGTERM: health turns NOT_SERVING at once.
    let signalled = Instant::now();
    sigterm(pid);
    let mut saw_not_serving = false;
    for _ in 0..20 {
        if status(&health_url).await == Some(ServingStatus::NotServing) {
            saw_not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(saw_not_serving, "health NOT_SERVING right after SIGTERM");
    assert!(signalled.elapsed() < Duration::from_secs(1));

    // The in-flight calls finish, successfully, after Redis comes back.
    for call in in_flight {
        let done = call.await.unwrap().expect("an in-flight call completes during the drain");
        assert!(done.duration_since(paused_at) >= Duration::from_millis(pause_ms - 500), "it really was in flight");
    }
    // And the process exits cleanly within drain delay + grace (the idle client doesn't hold it).
    let exit =
        tokio::time::timeout(Duration::from_secs(8), child.wait()).await.expect("exited within the bound").unwrap();
    assert!(exit.success(), "clean exit: {exit:?}");
    assert!(signalled.elapsed() < Duration::from_secs(8));
    drop(idle);
}

/// Health/Watch streams never end by themselves: on SIGTERM a watcher sees NOT_SERVING, then its
/// stream ends cleanly once the drain delay has passed (it watches again, elsewhere), so open watchers
/// don't hold the process for its whole shutdown grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_health_watchers_cleanly_instead_of_waiting_out_the_grace() {
    let redis = RedisServer::start();
    let OperatorKeys { dir: _keys, public, audit, .. } = OperatorKeys::new();
    let grace = Duration::from_secs(20);
    let Licensing { mut child, pid, url, health_url } =
        start_licensing(&redis, &public, &audit, &format!("{}s", grace.as_secs())).await;
    let mut watches = Vec::new();
    for u in [&url, &health_url] {
        let mut h = HealthClient::new(channel(u));
        let mut w = h.watch(HealthCheckRequest { service: String::new() }).await.expect("watch").into_inner();
        let first = w.message().await.expect("a message").expect("not ended");
        assert_eq!(first.status(), ServingStatus::Serving);
        watches.push(w);
    }
    let signalled = Instant::now();
    sigterm(pid);
    for w in &mut watches {
        let mut saw_not_serving = false;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), w.message()).await.expect("ended well before the grace")
            {
                Ok(Some(m)) => saw_not_serving |= m.status() == ServingStatus::NotServing,
                Ok(None) => break,
                Err(s) => panic!("a clean end (OK), not {s:?}"),
            }
        }
        assert!(saw_not_serving, "the watcher was told NOT_SERVING before its stream ended");
    }
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exited").unwrap();
    assert!(exit.success(), "clean exit: {exit:?}");
    assert!(signalled.elapsed() < grace / 2, "exited {:?} after SIGTERM, not after the grace", signalled.elapsed());
    drop(watches);
}

/// A service that can't reach Redis at startup still stops at once on SIGTERM (it used to wait out
/// its connection attempts: a pod would hang for its whole termination grace period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_service_still_waiting_for_redis() {
    // Configured as an operator runs them: authentication on, the public key, licensing's audit key,
    // orders' service token.
    let OperatorKeys { dir: keys, signer, public, audit } = OperatorKeys::new();
    chipgate_testkit::write_service_token(&signer, keys.path());
    let token = keys.path().join(chipgate_testkit::SERVICE_TOKEN_FILE);
    for bin in ["chipgate-licensing", "chipgate-inventory", "chipgate-orders"] {
        // A free port nobody listens on: every connection attempt is refused.
        let nowhere = format!("redis://127.0.0.1:{}", free_port());
        let mut child = tokio::process::Command::new(binary(bin))
            .env("CHIPGATE_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("REDIS_URL", nowhere)
            .env_remove("CHIPGATE_INSECURE_NO_AUTH")
            .env("CHIPGATE_AUTH_PUBLIC_KEY", &public)
            .env("CHIPGATE_AUDIT_SIGNING_KEY_FILE", &audit)
            .env("CHIPGATE_SERVICE_TOKEN_FILE", &token)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the service");
        let pid = child.id().expect("pid");
        // Inside its connection attempts once it says it retries (its logs go to stdout); a fixed
        // pause instead raced the process's start on a loaded machine.
        let mut logs = tokio::io::BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let retrying = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = logs.next_line().await.expect("read the logs") {
                if line.contains("redis is unreachable; retrying") {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or_else(|_| panic!("{bin} never said it retries Redis"));
        assert!(retrying, "{bin} closed its logs before retrying Redis");
        // The rest of its logs are drained so a full pipe never blocks it.
        tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
        assert!(child.try_wait().expect("status").is_none(), "{bin} gave up on its own instead of retrying");
        let signalled = Instant::now();
        let ok = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
        assert!(ok.success());
        let exit = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{bin} ignored SIGTERM while waiting for Redis"))
            .expect("exit status");
        assert!(exit.success(), "{bin} exited with {exit}");
        assert!(signalled.elapsed() < Duration::from_secs(2), "{bin} took {:?} to stop", signalled.elapsed());
    }
}
