//! The audit log's checkpoints: the cost of `GetAuditCheckpoint` (a read of every chain's head and an
//! Ed25519 signature) and of `VerifyAuditLog` over N entries, without and with a kept checkpoint (a
//! full recomputation of the chain either way). The N entries are written straight into Redis with
//! their chain fields computed here, as licensing would have linked them, so seeding takes seconds.

use std::time::{Duration, Instant};

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_runtime::auth::Role;
use chipgate_state::{AUDIT_GENESIS, audit_link, sha256_hex};
use chipgate_testkit::Cluster;

use crate::Args;

/// Entries per pipeline while seeding.
const PIPELINE: usize = 1000;
/// Checkpoints taken to measure one.
const CHECKPOINTS: usize = 200;
/// Full verifications timed each way.
const VERIFICATIONS: usize = 3;

/// Results of the audit benchmark.
pub struct AuditResult {
    /// Entries in the log.
    pub entries: u64,
    /// GetAuditCheckpoint latencies, sorted.
    pub checkpoint: Vec<Duration>,
    /// VerifyAuditLog without a checkpoint, mean.
    pub verify: Duration,
    /// VerifyAuditLog with a checkpoint pinned half way, mean.
    pub verify_with_checkpoint: Duration,
    /// Every verification was valid and extended the checkpoint, and the checkpoint covered every entry.
    pub correct: bool,
}

impl AuditResult {
    /// A checkpoint's latency at quantile `q`, in ms.
    pub fn checkpoint_ms(&self, q: f64) -> f64 {
        let i = ((self.checkpoint.len() as f64 - 1.0) * q).round() as usize;
        self.checkpoint.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }

    /// Entries verified per second (without a checkpoint).
    pub fn verify_rate(&self) -> f64 {
        self.entries as f64 / self.verify.as_secs_f64().max(1e-9)
    }
}

/// Writes `n` linked entries and the head into the cluster's Redis; returns the hash at `n / 2`.
async fn seed(cluster: &Cluster, n: u64) -> (u64, String) {
    let redis = cluster.redis.as_ref().expect("a redis-backed cluster");
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect redis");
    let (mut prev, mut half) = (AUDIT_GENESIS.to_string(), (0, AUDIT_GENESIS.to_string()));
    let mut seq = 0u64;
    while seq < n {
        let mut p = redis::pipe();
        for _ in 0..PIPELINE.min((n - seq) as usize) {
            seq += 1;
            let entry = format!("bench decision {seq}: buyer-{} applied for 10 x H200", seq % 100).into_bytes();
            let hash = audit_link(&prev, &sha256_hex(&entry)).expect("hex digests");
            p.cmd("XADD")
                .arg("{lic}:audit")
                .arg("*")
                .arg("seq")
                .arg(seq)
                .arg("prev")
                .arg(&prev)
                .arg("hash")
                .arg(&hash)
                .arg("entry")
                .arg(entry)
                .ignore();
            if seq == n / 2 {
                half = (seq, hash.clone());
            }
            prev = hash;
        }
        let _: () = p.query_async(&mut conn).await.expect("seed the audit log");
    }
    let _: () = redis::cmd("SET")
        .arg("{lic}:audit:head")
        .arg(format!("{n}:{prev}"))
        .query_async(&mut conn)
        .await
        .expect("head");
    half
}

/// Runs the audit benchmark.
pub async fn run(args: &Args) -> AuditResult {
    // Authentication on: licensing then signs checkpoints with its audit key, as in production.
    let cluster = Cluster::start().await;
    let n = args.audit_entries.max(2);
    let half = seed(&cluster, n).await;
    let channel = Cluster::authed(&cluster.licensing.url(), &cluster.token(Role::Auditor));
    let mut lic = LicensingServiceClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let mut correct = true;

    let mut checkpoint = Vec::with_capacity(CHECKPOINTS);
    let mut last = None;
    for _ in 0..CHECKPOINTS {
        let started = Instant::now();
        let cp = lic.get_audit_checkpoint(lpb::GetAuditCheckpointRequest {}).await.map(|r| r.into_inner().checkpoint);
        checkpoint.push(started.elapsed());
        match cp {
            Ok(Some(cp)) => last = Some(cp),
            _ => correct = false,
        }
    }
    checkpoint.sort();
    let mut pinned = last.unwrap_or_default();
    correct &= pinned.chains.first().map(|c| c.sequence) == Some(n) && pinned.signature.len() == 64;

    let timed = |with: Option<lpb::AuditCheckpoint>| {
        let mut lic = lic.clone();
        async move {
            let mut total = Duration::ZERO;
            let mut ok = true;
            for _ in 0..VERIFICATIONS {
                let started = Instant::now();
                let mut req = tonic::Request::new(lpb::VerifyAuditLogRequest { checkpoint: with.clone() });
                req.set_timeout(Duration::from_secs(600));
                let r = lic.verify_audit_log(req).await;
                total += started.elapsed();
                ok &= r.is_ok_and(|r| {
                    let r = r.into_inner();
                    r.valid && r.entries_checked == n && (with.is_none() || r.extends_checkpoint)
                });
            }
            (total / VERIFICATIONS as u32, ok)
        }
    };
    let (verify, ok) = timed(None).await;
    correct &= ok;
    // A checkpoint the auditor kept half way: taken as the service would have signed it then.
    if let Some(c) = pinned.chains.first_mut() {
        (c.sequence, c.head_hash) = half;
    }
    let key = cluster.audit_key.clone();
    let pinned = chipgate_licensing::checkpoint::make(pinned.chains, chipgate_runtime::time::now_ms(), key.as_ref())
        .expect("a well-formed checkpoint");
    let (verify_with_checkpoint, ok) = timed(Some(pinned)).await;
    correct &= ok;
    cluster.stop().await;
    AuditResult { entries: n, checkpoint, verify, verify_with_checkpoint, correct }
}
