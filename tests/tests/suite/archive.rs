//! Records that outlive Redis, against real services on a real Redis (authentication on, licensing
//! signing with its audit key): the audit log and closed orders are archived into a directory and
//! removed from Redis, a crash after every step loses nothing and leaves a chain that verifies,
//! tampering with an archived segment or with the live tail is found and named, GetOrder answers
//! from the archive, and many days of activity in fast time keep Redis flat while the archive grows.

use crate::common;

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

async fn world(dir: &std::path::Path) -> World {
    World::with(ClusterOptions { archive: Some(dir.to_path_buf()), ..ClusterOptions::default() }).await
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
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
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
    // A torn write of the next segment (a data object without its manifest) is replaced.
    let base = chain(&verify(&mut w).await).archived_sequence;
    let (data, _) = chipgate_archive::segment::audit_names(STREAM, base + 1);
    std::fs::create_dir_all(dir.path().join(&data).parent().unwrap()).unwrap();
    std::fs::write(dir.path().join(&data), b"half a segm").unwrap();
    let run = lic.archive_audit(far_future(), 4, None).await.expect("finishes");
    assert!(run.records > 0 && run.segments > 0, "{run:?}");
    let total = head(&w).await;
    let v = verify(&mut w).await;
    assert!(v.valid, "{v:?}");
    assert_eq!(v.archive, format!("file://{}", dir.path().display()));
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
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
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
    let (_, second) = chipgate_archive::segment::audit_names(STREAM, 4);
    let (data, _) = chipgate_archive::segment::audit_names(STREAM, 4);
    let path = dir.path().join(&data);
    let original = std::fs::read(&path).unwrap();
    let mut bytes = original.clone();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let v = verify(&mut w).await;
    assert!(!v.valid);
    assert_eq!(v.bad_segment, second, "{v:?}");
    assert_eq!(v.bad_chain, STREAM);
    assert!(v.problem.contains("SHA-256"), "{}", v.problem);
    std::fs::write(&path, &original).unwrap();
    assert!(verify(&mut w).await.valid);

    // A segment removed from the archive: the gap is named at the next one.
    let (_, first) = chipgate_archive::segment::audit_names(STREAM, 1);
    let kept_manifest = std::fs::read(dir.path().join(&first)).unwrap();
    std::fs::remove_file(dir.path().join(&first)).unwrap();
    let v = verify(&mut w).await;
    assert!(!v.valid && v.bad_segment == second, "{v:?}");
    assert!(v.problem.contains("entries 1 to 3 are missing"), "{}", v.problem);
    std::fs::write(dir.path().join(&first), kept_manifest).unwrap();

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
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    let lic = w.cluster.licensing_service.clone();
    decisions(&mut w, 4).await;
    let live = w.cluster.store.xrange(STREAM, None, 10).await.unwrap();
    let mut conn = w.cluster.redis.as_ref().unwrap().connection().await.unwrap();
    let _: () = redis::cmd("XDEL").arg(STREAM).arg(&live[1].id).query_async(&mut conn).await.unwrap();
    let (run, e) = lic.archive_audit(far_future(), 100, None).await.expect_err("refused");
    assert_eq!(run.records, 0);
    assert!(e.describe().contains("does not verify"), "{}", e.describe());
    assert!(std::fs::read_dir(dir.path()).map(|d| d.count()).unwrap_or(0) == 0, "nothing was written");
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
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    let ord = w.cluster.orders_service.clone().unwrap();
    let mut ids = Vec::new();
    let mut before = Vec::new();
    for step in [OrderStep::Written, OrderStep::Verified, OrderStep::Trimmed] {
        for i in 0..3 {
            ids.push(closed_order(&mut w, &format!("buyer{i}"), if i == 2 { NVL } else { H200 }).await);
        }
        let open = w.place("open-buyer", H200, 5).await;
        before = w.orders(&ids).await;
        let (_, e) = ord.archive_orders(far_future(), 2, Some(step)).await.expect_err("stopped");
        assert!(e.describe().contains("crash test"), "{}", e.describe());
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
        let target = chipgate_archive::Target::Dir(dir.path().to_path_buf());
        let p = chipgate_archive::orders::verify_product(&target, sku, None).await.unwrap();
        assert!(p.orders > 0, "{sku}: {p:?}");
    }

    // The segment holding an order removed from the archive: NOT_FOUND that says where it went.
    let lost = &now[0];
    std::fs::remove_file(dir.path().join(&lost.archived_in)).unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    let lic = w.cluster.licensing_service.clone();
    let ord = w.cluster.orders_service.clone().unwrap();
    let mut day_end = Vec::new();
    let mut redis_bytes = Vec::new();
    let mut archive_bytes = Vec::new();
    let mut conn = w.cluster.redis.as_ref().unwrap().connection().await.unwrap();
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
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("{lic*}:audit").query_async(&mut conn).await.unwrap();
        let scan: Vec<String> = redis::cmd("KEYS").arg("{ord:*").query_async(&mut conn).await.unwrap();
        keys.extend(
            scan.into_iter().filter(|k| k.contains(":order:") || k.contains(":buyer:") || k.contains(":state:")),
        );
        let mut bytes = 0u64;
        for k in &keys {
            let n: Option<u64> = redis::cmd("MEMORY").arg("USAGE").arg(k).query_async(&mut conn).await.unwrap();
            bytes += n.unwrap_or(0);
        }
        redis_bytes.push(bytes);
        archive_bytes.push(dir_bytes(dir.path()));
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

fn dir_bytes(p: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    total
}
