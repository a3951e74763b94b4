//! Signed audit checkpoints against a real cluster (authentication on, real Redis): an auditor keeps a
//! checkpoint, decisions go on, and the log still extends it; then someone with write access to Redis
//! rewrites history the three ways that a bare hash chain can't notice — cutting entries off the end
//! and moving the head back, rewriting an entry and re-linking everything after it, deleting the whole
//! log — and each time the plain verification still passes (the weakness) while verification against
//! the kept checkpoint reports the chain and the sequence. A checkpoint with a flipped signature byte is
//! refused. Periodic checkpoints put a truncation in the metrics and logs, outside Redis.

use crate::common;

use std::io::BufRead;
use std::time::{Duration, Instant};

use chipgate_licensing::checkpoint;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_runtime::auth::Signer;
use chipgate_state::{AUDIT_GENESIS, audit_link, sha256_hex};
use chipgate_testkit::prom::scrape;
use chipgate_testkit::{BackendKind, ClusterOptions, binary, free_port};
use common::{NVL, World};
use tonic::Code;
use tonic_types::StatusExt;

const STREAM: &str = "{lic}:audit";
const HEAD: &str = "{lic}:audit:head";

/// One stored audit entry as Redis holds it.
#[derive(Clone, Debug)]
struct Raw {
    id: String,
    fields: Vec<(String, Vec<u8>)>,
}

impl Raw {
    fn get(&self, f: &str) -> Vec<u8> {
        self.fields.iter().find(|(k, _)| k == f).map(|(_, v)| v.clone()).unwrap()
    }
    fn text(&self, f: &str) -> String {
        String::from_utf8(self.get(f)).unwrap()
    }
    fn set(&mut self, f: &str, v: Vec<u8>) {
        self.fields.iter_mut().find(|(k, _)| k == f).unwrap().1 = v;
    }
}

/// Direct access to the cluster's Redis, as an operator (or an intruder) with the password has.
struct Intruder {
    conn: chipgate_state::testing::RawConnection,
}

impl Intruder {
    async fn of(w: &World) -> Self {
        // Routed by slot on a cluster, like any client of it.
        Intruder { conn: w.cluster.redis.as_ref().unwrap().connection().await.unwrap() }
    }

    async fn read(&mut self) -> (Vec<Raw>, Option<String>) {
        let reply: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg(STREAM).arg("-").arg("+").query_async(&mut self.conn).await.unwrap();
        let entries = reply
            .ids
            .iter()
            .map(|e| Raw {
                id: e.id.clone(),
                fields: ["seq", "prev", "hash", "entry"]
                    .iter()
                    .map(|f| (f.to_string(), redis::from_redis_value(e.map.get(*f).unwrap().clone()).unwrap()))
                    .collect(),
            })
            .collect();
        let head: Option<String> = redis::cmd("GET").arg(HEAD).query_async(&mut self.conn).await.unwrap();
        (entries, head)
    }

    /// Replaces the log with `entries` and its head with `head` (None: no head), keeping stream ids.
    async fn write(&mut self, entries: &[Raw], head: Option<&str>) {
        let _: () = redis::cmd("DEL").arg(STREAM).arg(HEAD).query_async(&mut self.conn).await.unwrap();
        for e in entries {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(STREAM).arg(&e.id);
            for (f, v) in &e.fields {
                cmd.arg(f).arg(v.as_slice());
            }
            let _: String = cmd.query_async(&mut self.conn).await.unwrap();
        }
        if let Some(h) = head {
            let _: () = redis::cmd("SET").arg(HEAD).arg(h).query_async(&mut self.conn).await.unwrap();
        }
    }
}

/// The head record of a chain ending at `entries`' last entry (`<seq>:<hash>`).
fn head_of(entries: &[Raw]) -> String {
    let last = entries.last().unwrap();
    format!("{}:{}", last.text("seq"), last.text("hash"))
}

/// `entries` with entry `seq` rewritten by `edit` and every later entry re-linked, so the chain is
/// consistent again (what a careful intruder does).
fn rewrite_and_relink(entries: &[Raw], seq: usize, edit: impl Fn(&mut lpb::AuditEntry)) -> Vec<Raw> {
    let mut out = entries.to_vec();
    let mut decoded = <lpb::AuditEntry as prost::Message>::decode(out[seq - 1].get("entry").as_slice()).unwrap();
    edit(&mut decoded);
    out[seq - 1].set("entry", prost::Message::encode_to_vec(&decoded));
    for i in seq - 1..out.len() {
        let prev = if i == 0 { AUDIT_GENESIS.to_string() } else { out[i - 1].text("hash") };
        let hash = audit_link(&prev, &sha256_hex(&out[i].get("entry"))).unwrap();
        out[i].set("prev", prev.into_bytes());
        out[i].set("hash", hash.into_bytes());
    }
    out
}

/// A handful of licensing decisions (each one audit entry).
async fn decisions(w: &mut World, buyers: &[&str]) {
    for b in buyers {
        w.apply(b, NVL, 10).await;
    }
}

async fn checkpoint_now(w: &mut World) -> lpb::AuditCheckpoint {
    w.lic.get_audit_checkpoint(lpb::GetAuditCheckpointRequest {}).await.unwrap().into_inner().checkpoint.unwrap()
}

async fn verify(w: &mut World, cp: Option<&lpb::AuditCheckpoint>) -> lpb::VerifyAuditLogResponse {
    w.lic.verify_audit_log(lpb::VerifyAuditLogRequest { checkpoint: cp.cloned() }).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_checkpoint_catches_truncation_rewrites_and_deletion_that_the_chain_alone_does_not() {
    let mut w = World::start().await;
    let key = w.cluster.audit_key.clone().expect("the harness gives licensing an audit key");
    // Desk decisions only (an export authorisation would start H200's own chain): one chain here.
    w.apply("sensetime", NVL, 10).await;
    decisions(&mut w, &["bytedance", "alibaba", "tencent", "baidu", "moonshot"]).await;

    // The auditor keeps a checkpoint: signed, covering the one chain at entry 6.
    let cp = checkpoint_now(&mut w).await;
    assert_eq!(cp.key_id, checkpoint::key_id(&key.public_key()));
    assert_eq!(cp.signature.len(), 64);
    assert_eq!(chipgate_runtime::auth::public_key_from_pem(&cp.public_key_pem).unwrap(), key.public_key());
    assert_eq!(cp.chains.len(), 1);
    assert_eq!((cp.chains[0].chain.as_str(), cp.chains[0].sequence), (STREAM, 6));
    assert_eq!(checkpoint::check(&cp, Some(&key)), Ok(true), "it verifies offline with the public key");
    let mut intruder = Intruder::of(&w).await;
    let (at_checkpoint, _) = intruder.read().await;
    assert_eq!(cp.chains[0].head_hash, at_checkpoint[5].text("hash"));

    // Decisions go on; the log extends the checkpoint.
    decisions(&mut w, &["zhipu", "minimax", "stepfun"]).await;
    let v = verify(&mut w, Some(&cp)).await;
    assert!(v.valid && v.extends_checkpoint && v.checkpoint_signed, "{v:?}");
    assert_eq!(v.entries_checked, 9);
    assert_eq!(v.chains.len(), 1);
    assert_eq!((v.chains[0].chain.as_str(), v.chains[0].checkpoint_sequence), (STREAM, 6));
    let (intact, intact_head) = intruder.read().await;
    assert_eq!(intact.len(), 9);
    let intact_head = intact_head.unwrap();

    // 1. Cut entries 5..9 off (below the checkpoint's 6) and move the head back to entry 4.
    let cut = &intact[..4];
    intruder.write(cut, Some(&head_of(cut))).await;
    let plain = verify(&mut w, None).await;
    assert!(plain.valid, "the chain alone can't tell: {plain:?}");
    assert_eq!(plain.entries_checked, 4);
    let v = verify(&mut w, Some(&cp)).await;
    assert!(!v.valid && !v.extends_checkpoint, "{v:?}");
    assert_eq!((v.bad_chain.as_str(), v.first_bad_sequence), (STREAM, 5));
    assert!(v.problem.contains("entries 5 to 6 were removed"), "{}", v.problem);
    assert!(!v.chains[0].valid);

    // Cutting only what came after the checkpoint is not history the checkpoint vouched for.
    let after = &intact[..7];
    intruder.write(after, Some(&head_of(after))).await;
    let v = verify(&mut w, Some(&cp)).await;
    assert!(v.valid && v.extends_checkpoint, "{v:?}");

    // 2. Rewrite entry 3 (someone else decided it) and re-link 4..9: a consistent chain again.
    let forged = rewrite_and_relink(&intact, 3, |e| e.actor = "someone-else".into());
    assert_ne!(forged[2].get("entry"), intact[2].get("entry"));
    intruder.write(&forged, Some(&head_of(&forged))).await;
    let plain = verify(&mut w, None).await;
    assert!(plain.valid, "the re-linked chain verifies on its own: {plain:?}");
    let v = verify(&mut w, Some(&cp)).await;
    assert!(!v.valid && !v.extends_checkpoint, "{v:?}");
    assert_eq!((v.bad_chain.as_str(), v.first_bad_sequence), (STREAM, 6));
    assert!(v.problem.contains("rewritten"), "{}", v.problem);
    // Rewriting only entries after the checkpoint keeps the vouched-for history intact.
    let late = rewrite_and_relink(&intact, 8, |e| e.subject = "nothing".into());
    intruder.write(&late, Some(&head_of(&late))).await;
    let v = verify(&mut w, Some(&cp)).await;
    assert!(v.extends_checkpoint, "{v:?}");

    // 3. Delete the whole log (stream and head).
    intruder.write(&[], None).await;
    let plain = verify(&mut w, None).await;
    assert!(plain.valid && plain.entries_checked == 0, "an empty log verifies on its own: {plain:?}");
    let v = verify(&mut w, Some(&cp)).await;
    assert!(!v.valid && !v.extends_checkpoint, "{v:?}");
    assert_eq!((v.bad_chain.as_str(), v.first_bad_sequence), (STREAM, 1));
    assert!(v.problem.contains("entries 1 to 6 were removed"), "{}", v.problem);

    // Restored as it was, it extends the checkpoint again (the checks above were about the tampering).
    intruder.write(&intact, Some(&intact_head)).await;
    let v = verify(&mut w, Some(&cp)).await;
    assert!(v.valid && v.extends_checkpoint, "{v:?}");

    // A checkpoint (signed by the service) covering a chain the log no longer has at all: reported.
    let mut more = cp.chains.clone();
    more.push(lpb::AuditChainHead { chain: "{lic}:audit:gone".into(), sequence: 3, head_hash: "ab".repeat(32) });
    let wider = checkpoint::make(more, 1_000, Some(&key)).unwrap();
    let v = verify(&mut w, Some(&wider)).await;
    assert!(!v.valid && !v.extends_checkpoint, "{v:?}");
    assert_eq!((v.bad_chain.as_str(), v.first_bad_sequence), ("{lic}:audit:gone", 1));
    assert!(v.chains[0].valid, "the chain that is there still verifies: {v:?}");

    // A checkpoint with one flipped signature byte is refused, with the field and a reason.
    let mut flipped = cp.clone();
    flipped.signature[17] ^= 0x20;
    let err = w.lic.verify_audit_log(lpb::VerifyAuditLogRequest { checkpoint: Some(flipped) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let details = err.get_error_details();
    assert_eq!(details.error_info().unwrap().reason, "CHECKPOINT_BAD_SIGNATURE");
    assert_eq!(details.bad_request().unwrap().field_violations[0].field, "checkpoint.signature");
    // So is one whose head was moved back by hand with the root fixed up to match, and one with its
    // signature stripped, and one signed by another key.
    let mut moved = cp.clone();
    moved.chains[0].sequence = 4;
    moved.chains[0].head_hash = intact[3].text("hash");
    moved.root = checkpoint::root(&moved.chains).unwrap();
    let mut stripped = cp.clone();
    stripped.signature.clear();
    stripped.key_id.clear();
    let theirs = checkpoint::make(cp.chains.clone(), 1_000, Some(&Signer::generate().unwrap())).unwrap();
    for (bad, reason) in
        [(moved, "CHECKPOINT_BAD_SIGNATURE"), (stripped, "CHECKPOINT_UNSIGNED"), (theirs, "CHECKPOINT_UNKNOWN_KEY")]
    {
        let err = w.lic.verify_audit_log(lpb::VerifyAuditLogRequest { checkpoint: Some(bad) }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.get_error_details().error_info().unwrap().reason, reason, "{err:?}");
    }
    w.cluster.stop().await;
}

/// Scrapes licensing's metrics until `check` holds.
async fn scrape_until(url: &str, what: &str, check: impl Fn(&chipgate_testkit::prom::Scrape) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = scrape(url).await.expect("scrape parses");
        if check(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: never held; last scrape: {:#?}", s.samples);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_checkpoints_show_a_truncation_in_the_metrics() {
    let options =
        ClusterOptions { audit_checkpoint_every: Some(Duration::from_millis(100)), ..ClusterOptions::default() };
    let mut w = World::with(options).await;
    let url = w.cluster.licensing.metrics_url();
    // Desk decisions only (an export authorisation would start H200's own chain): one chain here.
    w.apply("sensetime", NVL, 10).await;
    decisions(&mut w, &["bytedance", "alibaba", "tencent"]).await;
    let mut intruder = Intruder::of(&w).await;
    let (entries, _) = intruder.read().await;
    let digest = checkpoint::short_digest(&entries[3].text("hash")) as f64;
    let chain = [("chain", STREAM)];
    scrape_until(&url, "the gauges show entry 4 and its head", |s| {
        s.get("chipgate_audit_chain_sequence", &chain) == Some(4.0)
            && s.get("chipgate_audit_chain_head_digest", &chain) == Some(digest)
            && s.value("chipgate_audit_checkpoints_total", &[]) >= 1.0
    })
    .await;
    let first = scrape(&url).await.unwrap();
    assert_eq!(first.value("chipgate_audit_chain_rollbacks_total", &chain), 0.0, "nothing went backwards yet");
    assert!(first.value("chipgate_audit_checkpoint_time_seconds", &[]) > 1.7e9);

    // Cut the last two entries and move the head back: the next checkpoint sees the chain go backwards.
    let cut = &entries[..2];
    intruder.write(cut, Some(&head_of(cut))).await;
    let back = checkpoint::short_digest(&entries[1].text("hash")) as f64;
    scrape_until(&url, "the rollback is counted and the gauges moved back", |s| {
        s.value("chipgate_audit_chain_rollbacks_total", &chain) >= 1.0
            && s.get("chipgate_audit_chain_sequence", &chain) == Some(2.0)
            && s.get("chipgate_audit_chain_head_digest", &chain) == Some(back)
    })
    .await;
    w.cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_audit_key_checkpoints_are_unsigned_and_say_so() {
    // Dev mode only: authentication off, no audit key.
    let options = ClusterOptions { backend: BackendKind::Memory, auth: false, ..ClusterOptions::default() };
    let mut w = World::with(options).await;
    assert!(w.cluster.audit_key.is_none());
    // Desk decisions only (an export authorisation would start H200's own chain): one chain here.
    w.apply("sensetime", NVL, 10).await;
    let cp = checkpoint_now(&mut w).await;
    assert!(cp.signature.is_empty() && cp.key_id.is_empty() && cp.public_key_pem.is_empty(), "{cp:?}");
    assert_eq!(cp.chains[0].sequence, 1);
    let v = verify(&mut w, Some(&cp)).await;
    assert!(v.valid && v.extends_checkpoint && !v.checkpoint_signed, "{v:?}");
    // A signed checkpoint can't be checked by a service without the key: refused, not trusted.
    let signed = checkpoint::make(cp.chains.clone(), 1_000, Some(&Signer::generate().unwrap())).unwrap();
    let err = w.lic.verify_audit_log(lpb::VerifyAuditLogRequest { checkpoint: Some(signed) }).await.unwrap_err();
    assert_eq!(err.get_error_details().error_info().unwrap().reason, "CHECKPOINT_UNKNOWN_KEY");
    w.cluster.stop().await;
}

/// The licensing binary as an operator starts it, with json logs on stdout.
fn licensing(redis_url: &str, env: &[(&str, String)]) -> std::process::Child {
    let mut cmd = std::process::Command::new(binary("chipgate-licensing"));
    cmd.env("CHIPGATE_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("REDIS_URL", redis_url)
        .env("CHIPGATE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env_remove("CHIPGATE_INSECURE_NO_AUTH")
        .env_remove("CHIPGATE_AUTH_PUBLIC_KEY")
        .env_remove("CHIPGATE_AUDIT_SIGNING_KEY_FILE")
        .env_remove("CHIPGATE_AUDIT_CHECKPOINT_EVERY")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start chipgate-licensing")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_to_start_without_its_audit_key_and_logs_checkpoints_that_verify_offline() {
    let redis = chipgate_state::testing::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let token_key = Signer::generate().unwrap();
    let public = dir.path().join("public.pem");
    std::fs::write(&public, token_key.public_pem()).unwrap();
    let auth = ("CHIPGATE_AUTH_PUBLIC_KEY", public.display().to_string());

    // Authentication on and no audit key: refused, as a missing token key is.
    let out = licensing(&redis.url(), std::slice::from_ref(&auth)).wait_with_output().unwrap();
    assert!(!out.status.success());
    let logs = String::from_utf8_lossy(&out.stdout);
    assert!(logs.contains("--audit-signing-key"), "{logs}");

    // With the key: a checkpoint every 200 ms in the logs, each one checkable with the public key alone.
    let audit_key = Signer::generate().unwrap();
    let key_file = dir.path().join("audit-signing.pem");
    std::fs::write(&key_file, audit_key.private_pem()).unwrap();
    let mut child = licensing(
        &redis.url(),
        &[
            auth,
            ("CHIPGATE_AUDIT_SIGNING_KEY_FILE", key_file.display().to_string()),
            ("CHIPGATE_AUDIT_CHECKPOINT_EVERY", "200ms".into()),
        ],
    );
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut found = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if v["message"] == "audit checkpoint" {
                found.push(v);
                if found.len() == 2 {
                    break;
                }
            }
        }
        found
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "no checkpoints in the logs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let found = reader.join().unwrap();
    assert_eq!(found.len(), 2, "the process ended before logging two checkpoints");
    let line = &found[1];
    assert_eq!(line["key_id"], checkpoint::key_id(&audit_key.public_key()));
    assert_eq!(line["signed"], true);
    // Rebuild the checkpoint from the log line's fields and check it as an auditor would.
    let s = |f: &str| line[f].as_str().unwrap_or_else(|| panic!("{f} in {line}")).to_string();
    let chains: Vec<lpb::AuditChainHead> = s("chains")
        .split(' ')
        .map(|c| {
            let (chain, rest) = c.split_once('=').unwrap();
            let (seq, head) = rest.split_once(':').unwrap();
            lpb::AuditChainHead { chain: chain.into(), sequence: seq.parse().unwrap(), head_hash: head.into() }
        })
        .collect();
    assert_eq!(
        chains,
        vec![lpb::AuditChainHead { chain: STREAM.into(), sequence: 0, head_hash: AUDIT_GENESIS.into() }]
    );
    let (secs, nanos) = s("checkpoint_time").split_once('.').map(|(a, b)| (a.to_string(), b.to_string())).unwrap();
    let signature: Vec<u8> = (0..s("signature").len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s("signature")[i..i + 2], 16).unwrap())
        .collect();
    let cp = lpb::AuditCheckpoint {
        chains,
        root: s("root"),
        time: Some(prost_types::Timestamp { seconds: secs.parse().unwrap(), nanos: nanos.parse().unwrap() }),
        key_id: s("key_id"),
        signature,
        public_key_pem: String::new(),
    };
    assert_eq!(checkpoint::check(&cp, Some(&audit_key)), Ok(true));
    let mut later = cp.clone();
    later.chains[0].sequence = 1;
    later.chains[0].head_hash = "ab".repeat(32);
    later.root = checkpoint::root(&later.chains).unwrap();
    assert_eq!(checkpoint::check(&later, Some(&audit_key)).unwrap_err().reason, "CHECKPOINT_BAD_SIGNATURE");
}
