//! Health tells the truth: SERVING while Redis answers, NOT_SERVING while it is unreachable, SERVING
//! again once it is back; NOT_SERVING as soon as the server starts draining.

use std::time::{Duration, Instant};

use chipgate_testkit::{Cluster, channel};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn status(url: &str, service: &str) -> Option<ServingStatus> {
    let mut c = HealthClient::new(channel(url));
    c.check(HealthCheckRequest { service: service.into() }).await.ok().map(|r| r.into_inner().status())
}

async fn wait_for(url: &str, service: &str, want: ServingStatus, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = status(url, service).await;
        if got == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "health of {service:?} stayed {got:?}, wanted {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_redis_and_draining() {
    let mut cluster = Cluster::start().await;
    let url = cluster.licensing.url();
    for service in ["", "chipgate.licensing.v1.LicensingService"] {
        wait_for(&url, service, ServingStatus::Serving, Duration::from_secs(5)).await;
    }

    cluster.redis.as_mut().unwrap().kill();
    wait_for(&url, "", ServingStatus::NotServing, Duration::from_secs(5)).await;
    wait_for(&url, "chipgate.licensing.v1.LicensingService", ServingStatus::NotServing, Duration::from_secs(5)).await;
    assert_eq!(
        status(&url, "liveness").await,
        Some(ServingStatus::Serving),
        "liveness does not follow Redis, so an outage doesn't restart every pod"
    );

    cluster.redis.as_mut().unwrap().restart();
    wait_for(&url, "", ServingStatus::Serving, Duration::from_secs(10)).await;

    cluster.licensing.running.health.set_draining().await;
    assert_eq!(status(&url, "").await, Some(ServingStatus::NotServing), "draining reports NOT_SERVING at once");
    assert_eq!(status(&url, "liveness").await, Some(ServingStatus::Serving), "a draining process is still alive");
}
