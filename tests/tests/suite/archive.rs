//! Records that outlive Redis, against real services on a real Redis (authentication on, licensing
//! signing with its audit key): the audit log and closed orders are archived and removed from Redis,
//! a crash after every step loses nothing and leaves a chain that verifies, tampering with an
//! archived segment or with the live tail is found and named, GetOrder answers from the archive, and
//! many days of activity in fast time keep Redis flat while the archive grows.
//!
//! The crash and tamper tests run twice: on a directory and on S3-compatible object storage (a real
//! `moto` server, started per test like the Redis harness), through the same target abstraction.

use crate::common;

use chipgate_archive::Target;
use chipgate_archive::testing::MotoServer;
use chipgate_licensing::archive::Step as AuditStep;
use chipgate_orders::archive::Step as OrderStep;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_state::Backend;
use chipgate_testkit::ClusterOptions;
use common::{H200, NVL, World, rid};
use tonic::Code;
use tonic_types::StatusExt;

/// H200's audit chain (the customs decisions below are about H200, so they are in its partition).
const STREAM: &str = "{lic:H200-SXM-141GB}:audit";

/// The outcome of [`STREAM`]'s chain.
fn chain(v: &lpb::VerifyAuditLogResponse) -> &lpb::AuditChainVerification {
    v.chains.iter().find(|c| c.chain == STREAM).unwrap_or_else(|| panic!("no chain {STREAM}: {v:?}"))
}

/// Where a test archives: a temporary directory or a bucket on a private moto server (kept alive as
/// long as the archive).
struct Archive {
    target: Target,
    _dir: Option<tempfile::TempDir>,
    _moto: Option<MotoServer>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Dir,
    S3,
}

impl Archive {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Dir => {
                let dir = tempfile::tempdir().unwrap();
                Archive { target: Target::Dir(dir.path().to_path_buf()), _dir: Some(dir), _moto: None }
            }
            Kind::S3 => {
                let moto = MotoServer::start();
                Archive { target: moto.target("chipgate/archive"), _dir: None, _moto: Some(moto) }
            }
        }
    }

    async fn read(&self, name: &str) -> Vec<u8> {
        self.target.get(name).await.unwrap().unwrap_or_else(|| panic!("{name} is in the archive"))
    }

    /// Replaces an object behind the archiver's back (tampering).
    async fn write(&self, name: &str, bytes: &[u8]) {
        self.target.put(name, bytes.to_vec()).await.unwrap();
    }

    async fn remove(&self, name: &str) {
        self.target.delete(name).await.unwrap();
    }

    /// The data object a segment's manifest names.
    async fn data_of(&self, manifest: &str) -> String {
        chipgate_archive::Manifest::parse(manifest, &self.read(manifest).await).unwrap().data
    }

    /// Whether nothing at all was archived.
    async fn is_empty(&self) -> bool {
        self.target.list_dirs("audit").await.unwrap().is_empty()
            && self.target.list_dirs("orders").await.unwrap().is_empty()
    }
}

async fn world(archive: &Archive) -> World {
    World::with(ClusterOptions { archive: Some(archive.target.clone()), ..ClusterOptions::default() }).await
}

async fn verify(w: &mut World) -> lpb::VerifyAuditLogResponse {
    w.lic.verify_audit_log(lpb::VerifyAuditLogRequest { checkpoint: None }).await.unwrap().into_inner()
}

/// `n` licensing decisions (customs toggles), each one audit entry.
async fn decisions(w: &mut World, n: usize) {
    for i in 0..n {
        w.customs(H200, i % 2 == 0).await;
    }
}

async fn head(w: &World) -> u64 {
    chipgate_state::AuditChain { stream: STREAM.into(), head: format!("{STREAM}:head") }
        .head(&w.cluster.store)
        .await
        .unwrap()
        .0
}

/// The lease a crashed archiver left runs out (as it would after its TTL).
async fn expire_lease(w: &World, key: &str) {
    let mut conn = w.cluster.redis.as_ref().unwrap().connection().await.unwrap();
    let _: () = redis::cmd("DEL").arg(key).query_async(&mut conn).await.unwrap();
}

fn far_future() -> u64 {
    chipgate_runtime::time::now_ms() + 1000
}

#[tokio::test]
async fn a_crash_after_every_step_of_audit_archiving_loses_nothing() {
    crash_after_every_step_of_audit_archiving(Kind::Dir).await;
}

#[tokio::test]
async fn a_crash_after_every_step_of_audit_archiving_loses_nothing_on_s3() {
    crash_after_every_step_of_audit_archiving(Kind::S3).await;
}

async fn crash_after_every_step_of_audit_archiving(kind: Kind) {
    let archive = Archive::new(kind);
    let mut w = world(&archive).await;
    assert_eq!(
        STREAM,
        chipgate_licensing::keys::Part::Product(&chipgate_domain::ids::Sku::from_trusted(H200)).audit().stream
    );
    let lic = w.cluster.licensing_service.clone();
    for step in [AuditStep::Written, AuditStep::Verified, AuditStep::Trimmed] {
        decisions(&mut w, 5).await;
        let total = head(&w).await;
        let (_, e) = lic.archive_audit(far_future(), 4, Some(step)).await.expect_err("stopped");
        assert!(e.describe().contains("crash test"), "{}", e.describe());
        let v = verify(&mut w).await;
        assert!(v.valid, "after a crash at {step:?}: {v:?}");
        assert_eq!(chain(&v).entries_checked, total, "every entry is in Redis or the archive after {step:?}");
        // The dead archiver's lease still stands: another replica skips the chain until it runs out.
        // (Every chain the crashed run reached keeps its lease; H200's is one of them.)
        let busy = lic.archive_audit(far_future(), 4, None).await.expect("a run");
        assert!(busy.busy >= 1 && busy.records == 0, "{busy:?}");
        for c in &v.chains {
            expire_lease(&w, &format!("{}:archive-lease", c.chain)).await;
        }
    }
    // An unfinished segment that doesn't check (a torn manifest) is never replaced: the run stops
    // and names it, and Redis keeps every entry.
    let base = chain(&verify(&mut w).await).archived_sequence;
    let next = chipgate_archive::segment::audit_manifest(STREAM, base + 1);
    archive.write(&next, b"{\"format\": \"chipgate-arch").await;
    let (run, e) = lic.archive_audit(far_future(), 4, None).await.expect_err("refused");
    assert_eq!(run.records, 0, "{run:?}");
    assert!(e.describe().contains(&next) && e.describe().contains("never replaced"), "{}", e.describe());
    assert_eq!(archive.read(&next).await, b"{\"format\": \"chipgate-arch", "left as it was");
    archive.remove(&next).await;
    // A torn write of the next segment's data (a data object without its manifest) is an orphan
    // the next run writes beside.
    let data = chipgate_archive::segment::data_name(&next, &chipgate_state::sha256_hex(b"half a segm"));
    archive.write(&data, b"half a segm").await;
    let run = lic.archive_audit(far_future(), 4, None).await.expect("finishes");
    assert!(run.records > 0 && run.segments > 0, "{run:?}");
    let total = head(&w).await;
    let v = verify(&mut w).await;
    assert!(v.valid, "{v:?}");
    assert_eq!(v.archive, archive.target.url());
    assert_eq!((chain(&v).archived_sequence, chain(&v).entries_checked), (total, total));
    assert!(chain(&v).segments_checked >= 4, "{v:?}");
    assert_eq!(w.cluster.store.xlen(STREAM).await.unwrap(), 0, "everything archived left Redis");
    // The log goes on in Redis from the archived base, and a checkpoint taken now still verifies.
    decisions(&mut w, 3).await;
    let cp = w.lic.get_audit_checkpoint(lpb::GetAuditCheckpointRequest {}).await.unwrap().into_inner().checkpoint;
    let v = w.lic.verify_audit_log(lpb::VerifyAuditLogRequest { checkpoint: cp }).await.unwrap().into_inner();
    assert!(v.valid && v.extends_checkpoint, "{v:?}");
    assert_eq!(chain(&v).entries_checked, total + 3);
}

#[tokio::test]
async fn verification_names_a_tampered_segment_and_a_tampered_live_tail() {
    tampered_segment_and_live_tail(Kind::Dir).await;
}

#[tokio::test]
async fn verification_names_a_tampered_segment_and_a_tampered_live_tail_on_s3() {
    tampered_segment_and_live_tail(Kind::S3).await;
}

async fn tampered_segment_and_live_tail(kind: Kind) {
    let archive = Archive::new(kind);
    let mut w = world(&archive).await;
    let lic = w.cluster.licensing_service.clone();
    decisions(&mut w, 8).await;
    // A checkpoint an auditor keeps before anything is archived: it must still verify afterwards,
    // through the archive.
    let kept = w.lic.get_audit_checkpoint(lpb::GetAuditCheckpointRequest {}).await.unwrap().into_inner().checkpoint;
    lic.archive_audit(far_future(), 3, None).await.expect("archives");
    decisions(&mut w, 3).await;
    let v = w.lic.verify_audit_log(lpb::VerifyAuditLogRequest { checkpoint: kept.clone() }).await.unwrap().into_inner();
    assert!(v.valid && v.extends_checkpoint, "{v:?}");
    let segments = chain(&v).segments_checked;
    assert!(segments >= 3, "{v:?}");

    // One byte of the second segment's data flipped.
    let second = chipgate_archive::segment::audit_manifest(STREAM, 4);
    let data = archive.data_of(&second).await;
    let original = archive.read(&data).await;
    let mut bytes = original.clone();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    archive.write(&data, &bytes).await;
    let v = verify(&mut w).await;
    assert!(!v.valid);
    assert_eq!(v.bad_segment, second, "{v:?}");
    assert_eq!(v.bad_chain, STREAM);
    assert!(v.problem.contains("SHA-256"), "{}", v.problem);
    archive.write(&data, &original).await;
    assert!(verify(&mut w).await.valid);
    // The data object gone altogether: named too.
    archive.remove(&data).await;
    let v = verify(&mut w).await;
    assert!(!v.valid && v.bad_segment == second && v.problem.contains("missing"), "{v:?}");
    archive.write(&data, &original).await;

    // A segment removed from the archive: the gap is named at the next one.
    let first = chipgate_archive::segment::audit_manifest(STREAM, 1);
    let kept_manifest = archive.read(&first).await;
    archive.remove(&first).await;
    let v = verify(&mut w).await;
    assert!(!v.valid && v.bad_segment == second, "{v:?}");
    assert!(v.problem.contains("entries 1 to 3 are missing"), "{}", v.problem);
    archive.write(&first, &kept_manifest).await;

    // The live tail altered in Redis: its first entry removed.
    let mut conn = w.cluster.redis.as_ref().unwrap().connection().await.unwrap();
    let live = w.cluster.store.xrange(STREAM, None, 10).await.unwrap();
    let _: () = redis::cmd("XDEL").arg(STREAM).arg(&live[0].id).query_async(&mut conn).await.unwrap();
    let v = verify(&mut w).await;
    let base = chain(&v).archived_sequence;
    assert!(base >= 6 && !v.valid, "{v:?}");
    assert_eq!((v.bad_chain.as_str(), v.first_bad_sequence, v.bad_segment.as_str()), (STREAM, base + 1, ""), "{v:?}");
    assert!(v.problem.contains("missing"), "{}", v.problem);

    // The archived base moved back in Redis (as if the archive had never been taken): the archived
    // entries are then missing from Redis, at entry 1.
    let _: () = redis::cmd("DEL").arg(format!("{STREAM}:archived")).query_async(&mut conn).await.unwrap();
    let v = verify(&mut w).await;
    assert!(!v.valid && v.first_bad_sequence == 1, "{v:?}");
}

#[tokio::test]
async fn a_live_chain_that_does_not_verify_is_not_archived() {
    live_chain_that_does_not_verify(Kind::Dir).await;
}

#[tokio::test]
async fn a_live_chain_that_does_not_verify_is_not_archived_on_s3() {
    live_chain_that_does_not_verify(Kind::S3).await;
}

async fn live_chain_that_does_not_verify(kind: Kind) {
    let archive = Archive::new(kind);
    let mut w = world(&archive).await;
    let lic = w.cluster.licensing_service.clone();
    decisions(&mut w, 4).await;
    let live = w.cluster.store.xrange(STREAM, None, 10).await.unwrap();
    let mut conn = w.cluster.redis.as_ref().unwrap().connection().await.unwrap();
    let _: () = redis::cmd("XDEL").arg(STREAM).arg(&live[1].id).query_async(&mut conn).await.unwrap();
    let (run, e) = lic.archive_audit(far_future(), 100, None).await.expect_err("refused");
    assert_eq!(run.records, 0);
    assert!(e.describe().contains("does not verify"), "{}", e.describe());
    assert!(archive.is_empty().await, "nothing was written");
}

/// Places an order and cancels it: a closed order.
async fn closed_order(w: &mut World, buyer: &str, sku: &str) -> String {
    let o = w.place(buyer, sku, 10).await;
    w.ord
        .cancel_order(opb::CancelOrderRequest {
            request_id: rid("cancel"),
            order_id: o.order_id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    o.order_id
}

#[tokio::test]
async fn closed_orders_are_archived_crash_safely_and_read_back() {
    closed_orders_archived(Kind::Dir).await;
}

#[tokio::test]
async fn closed_orders_are_archived_crash_safely_and_read_back_on_s3() {
    closed_orders_archived(Kind::S3).await;
}

async fn closed_orders_archived(kind: Kind) {
    let archive = Archive::new(kind);
    let mut w = world(&archive).await;
    let ord = w.cluster.orders_service.clone().unwrap();
    let mut ids = Vec::new();
    let mut before = Vec::new();
    for step in [OrderStep::Written, OrderStep::Verified, OrderStep::Trimmed] {
        for i in 0..3 {
            ids.push(closed_order(&mut w, &format!("buyer{i}"), if i == 2 { NVL } else { H200 }).await);
        }
        let open = w.place("open-buyer", H200, 5).await;
        // As each answers now (from Redis, or from the archive after an earlier step's trim).
        before = w.orders(&ids).await.into_iter().map(|o| opb::Order { archived_in: String::new(), ..o }).collect();
        let (run, e) = ord.archive_orders(far_future(), 2, Some(step)).await.expect_err("stopped");
        assert!(e.describe().contains("crash test"), "{}", e.describe());
        if step != OrderStep::Written {
            // The segments the previous crashed run left uncommitted are finished (not rewritten).
            assert!(run.segments >= 1 && run.records >= 1, "after a crash at {step:?}: {run:?}");
        }
        // Every order still answers, from Redis or the archive, as it was.
        let now = w.orders(&ids).await;
        for (a, b) in before.iter().zip(&now) {
            assert_eq!(opb::Order { archived_in: String::new(), ..b.clone() }, *a, "after a crash at {step:?}");
        }
        assert_eq!(w.order(&open.order_id).await.archived_in, "", "open orders are never archived");
        for sku in [H200, NVL] {
            expire_lease(&w, &chipgate_orders::keys::archive_lease(&chipgate_domain::ids::Sku::from_trusted(sku)))
                .await;
        }
    }
    let run = ord.archive_orders(far_future(), 2, None).await.expect("finishes");
    assert!(run.records > 0 && run.redis_bytes_freed > 0, "{run:?}");
    let now = w.orders(&ids).await;
    for (a, b) in before.iter().zip(&now) {
        assert!(b.archived_in.starts_with("orders/"), "{} answers from the archive: {b:?}", b.order_id);
        assert_eq!(opb::Order { archived_in: String::new(), ..b.clone() }, *a);
    }
    // Gone from Redis with its indexes; ListOrders lists what Redis holds.
    for id in &ids {
        assert!(
            w.cluster
                .store
                .get(&[chipgate_orders::keys::order(&chipgate_domain::ids::OrderId::from_trusted(id.as_str()))])
                .await
                .unwrap()[0]
                .is_none()
        );
    }
    let cancelled = w
        .cluster
        .store
        .zcard(&chipgate_orders::keys::orders_in(
            &chipgate_domain::ids::Sku::from_trusted(H200),
            chipgate_domain::orders::OrderStatus::Cancelled,
        ))
        .await
        .unwrap();
    assert_eq!(cancelled, 0);
    let listed = w.all_orders().await;
    assert!(listed.iter().all(|o| !ids.contains(&o.order_id)), "{listed:?}");
    // Each product's segments chain and check.
    for sku in [H200, NVL] {
        let p = chipgate_archive::orders::verify_product(&archive.target, sku, None).await.unwrap();
        assert!(p.orders > 0, "{sku}: {p:?}");
    }

    // The segment holding an order removed from the archive: NOT_FOUND that says where it went.
    let lost = &now[0];
    archive.remove(&lost.archived_in).await;
    let err = w.ord.get_order(opb::GetOrderRequest { order_id: lost.order_id.clone() }).await.expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.get_details_error_info().unwrap().reason, "ORDER_ARCHIVED");
    assert!(err.message().contains("--archive"), "{}", err.message());
    // An order that never existed is a plain NOT_FOUND.
    let err = w.ord.get_order(opb::GetOrderRequest { order_id: format!("ord-{H200}-99999") }).await.expect_err("none");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.get_details_error_info().unwrap().reason, "NOT_FOUND");
}

/// Fast time: each "day" has licensing decisions and closed orders; archiving runs with a retention
/// of two days (the cutoff is the end of the day two days back). Redis holds at most about three
/// days' records whatever the number of days, while the archive grows every day.
#[tokio::test]
async fn many_days_in_fast_time_keep_redis_flat_while_the_archive_grows() {
    const DAYS: usize = 12;
    const RETENTION_DAYS: usize = 2;
    let archive = Archive::new(Kind::Dir);
    let dir = archive._dir.as_ref().unwrap().path().to_path_buf();
    let mut w = world(&archive).await;
    let lic = w.cluster.licensing_service.clone();
    let ord = w.cluster.orders_service.clone().unwrap();
    let mut day_end = Vec::new();
    let mut redis_bytes = Vec::new();
    let mut archive_bytes = Vec::new();
    for day in 0..DAYS {
        decisions(&mut w, 20).await;
        for i in 0..20 {
            closed_order(&mut w, &format!("buyer{}", i % 4), H200).await;
        }
        day_end.push(chipgate_runtime::time::now_ms());
        if day >= RETENTION_DAYS {
            let cutoff = day_end[day - RETENTION_DAYS];
            lic.archive_audit(cutoff, 1000, None).await.expect("audit archived");
            ord.archive_orders(cutoff, 1000, None).await.expect("orders archived");
        }
        // What the archive is responsible for: the audit stream, the order records and their
        // indexes (MEMORY USAGE, what Redis itself counts). Request answers kept for retries (24 h
        // in real time, by TTL) are not part of it and are reported apart.
        let bytes = memory_usage(&w, &["{lic*}:audit", "{ord:*"], |k| {
            k.ends_with(":audit") || k.contains(":order:") || k.contains(":buyer:") || k.contains(":state:")
        })
        .await;
        redis_bytes.push(bytes);
        archive_bytes.push(dir_bytes(&dir));
    }
    let used = w.cluster.store.info().await.unwrap().used_memory.unwrap_or(0);
    println!("redis bytes held for archivable records per day: {redis_bytes:?}");
    println!("archive bytes per day: {archive_bytes:?}; redis used_memory at the end: {used}");
    let steady = &redis_bytes[RETENTION_DAYS + 1..];
    let first = steady[0];
    assert!(steady.iter().all(|b| *b <= first + first / 5), "Redis grows: {redis_bytes:?}");
    assert!(redis_bytes[DAYS - 1] < redis_bytes[RETENTION_DAYS] * 2, "{redis_bytes:?}");
    assert!(
        archive_bytes.windows(2).skip(RETENTION_DAYS).all(|p| p[1] > p[0]),
        "the archive grows daily: {archive_bytes:?}"
    );
    let v = verify(&mut w).await;
    assert!(v.valid, "{v:?}");
    assert_eq!(chain(&v).entries_checked, head(&w).await);
}

/// The summed `MEMORY USAGE` of the keys matching `patterns` that `keep` keeps: `SCAN` (never
/// `KEYS`, which blocks a server) on every node that holds keys — the server, or each master of a
/// Redis Cluster, where keys are spread over the masters by slot and each node scans its own.
async fn memory_usage(w: &World, patterns: &[&str], keep: impl Fn(&str) -> bool) -> u64 {
    use chipgate_state::testing::RedisDeployment;
    let urls: Vec<String> = match w.cluster.redis.as_ref().unwrap() {
        RedisDeployment::Single(s) => vec![s.url()],
        RedisDeployment::Cluster(c) => {
            let auth = c.password().map(|p| format!(":{p}@")).unwrap_or_default();
            c.masters().into_iter().map(|port| format!("redis://{auth}127.0.0.1:{port}")).collect()
        }
    };
    let mut total = 0u64;
    for url in urls {
        let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
        for pattern in patterns {
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                for k in keys.iter().filter(|k| keep(k)) {
                    let n: Option<u64> = redis::cmd("MEMORY").arg("USAGE").arg(k).query_async(&mut conn).await.unwrap();
                    total += n.unwrap_or(0);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
    total
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    total
}
