//! What only the Redis backend does, on a real single `redis-server` and a real Redis Cluster:
//! re-sent commits apply once, `WAIT` for replicas, access control and TLS, partitions spreading
//! over the cluster's masters, and a master killed in the middle of a workload.

#![allow(clippy::unwrap_used)]
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chipgate_state::testing::{ClusterOptions, RedisCluster, RedisServer, ServerOptions, TlsFiles};
use chipgate_state::{
    AuditChain, Backend, CommitError, Committed, OUTCOME_UNKNOWN, RedisBackend, RedisOptions, Space, StateError, Txn,
};

const S: Space = Space::new("t");

/// A transaction with every kind of op that would do harm if applied twice: a guarded create, a
/// blind increment, a stream append and a linked audit entry.
async fn everything_once(store: &RedisBackend, unit: &str) -> Txn {
    let p = S.partition(unit);
    let chain = AuditChain { stream: p.key(["audit"]), head: p.key(["audit", "head"]) };
    let mut t = Txn::new();
    t.replace(p.key(["rec"]), 0, b"one".to_vec())
        .hincr(p.key(["tally"]), "n", 5)
        .put(p.key(["blind"]), b"x".to_vec())
        .xadd(p.key(["events"]), vec![("e".into(), b"1".to_vec())], None)
        .audit(&chain, b"entry".to_vec());
    let head = chain.head(store).await.unwrap();
    t.link_audit(&[(chain, head.0, head.1)]);
    t
}

async fn state_of(store: &RedisBackend, unit: &str) -> (u64, Vec<(String, Vec<u8>)>, u64, u64, u64) {
    let p = S.partition(unit);
    let rec = store.get(&[p.key(["rec"])]).await.unwrap().remove(0).unwrap();
    let blind = store.get(&[p.key(["blind"])]).await.unwrap().remove(0).unwrap();
    (
        rec.version,
        store.hgetall(&p.key(["tally"])).await.unwrap(),
        blind.version,
        store.xlen(&p.key(["events"])).await.unwrap(),
        store.xlen(&p.key(["audit"])).await.unwrap(),
    )
}

/// The cluster client re-sends a command after a reconnect, so the same commit can reach Redis
/// twice. The second copy must change nothing and answer what the first answered, although its
/// version guard now fails and its increment, put and appends would apply again.
async fn a_resent_commit_changes_nothing(store: RedisBackend) {
    for unit in ["H200", "B200", "H20"] {
        let t = everything_once(&store, unit).await;
        let first = store.commit_as(&t, &format!("txn-{unit}")).await.unwrap();
        assert_eq!(first.stream_ids.len(), 1);
        assert_eq!(first.audit.len(), 1);
        let before = state_of(&store, unit).await;
        assert_eq!(before, (1, vec![("n".into(), b"5".to_vec())], 1, 1, 1));

        let again: Committed = store.commit_as(&t, &format!("txn-{unit}")).await.unwrap();
        assert_eq!(again, first, "a re-sent commit answers what the first answered");
        assert_eq!(state_of(&store, unit).await, before, "and changes nothing");

        // The same transaction as a *new* commit is another story: its guard refuses it.
        match store.commit_as(&t, &format!("other-{unit}")).await {
            Err(CommitError::Conflict { .. }) => {}
            other => panic!("a new commit of a stale transaction must conflict, got {other:?}"),
        }
        assert_eq!(state_of(&store, unit).await, before);
    }
    // Without guards, only the receipt stops a blind increment from applying twice.
    let key = S.partition("blind").key(["tally"]);
    let mut t = Txn::new();
    t.hincr(&key, "n", 1);
    store.commit_as(&t, "blind-1").await.unwrap();
    store.commit_as(&t, "blind-1").await.unwrap();
    assert_eq!(store.hgetall(&key).await.unwrap(), vec![("n".to_string(), b"1".to_vec())]);
    store.commit_as(&t, "blind-2").await.unwrap();
    assert_eq!(store.hgetall(&key).await.unwrap(), vec![("n".to_string(), b"2".to_vec())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_commit_changes_nothing_on_a_single_redis() {
    let server = RedisServer::start();
    a_resent_commit_changes_nothing(server.backend().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_commit_changes_nothing_on_a_cluster() {
    let cluster = RedisCluster::shared().await;
    a_resent_commit_changes_nothing(cluster.backend().await).await;
}

/// A receipt-free commit (`Txn::without_receipt`) re-sent by the client: the second copy fails the
/// must-not-exist guard of the record the first created and changes nothing, although it carries a
/// blind increment and a stream append; and no receipt key is left in Redis.
async fn a_resent_receipt_free_commit_conflicts_and_changes_nothing(store: RedisBackend) {
    for unit in ["H200", "B200", "H20"] {
        let p = S.partition(unit);
        let mut t = Txn::new();
        t.replace(p.key(["rec"]), 0, b"one".to_vec())
            .hincr(p.key(["tally"]), "n", 5)
            .xadd(p.key(["events"]), vec![("e".into(), b"1".to_vec())], None)
            .without_receipt();
        let first = store.commit_as(&t, &format!("free-{unit}")).await.unwrap();
        assert_eq!(first.stream_ids.len(), 1);
        match store.commit_as(&t, &format!("free-{unit}")).await {
            Err(CommitError::Conflict { key }) => {
                assert_eq!(key, p.key(["rec"]), "it conflicts on the record it created")
            }
            other => panic!("a re-sent receipt-free commit must conflict, got {other:?}"),
        }
        assert_eq!(store.hgetall(&p.key(["tally"])).await.unwrap(), vec![("n".to_string(), b"5".to_vec())]);
        assert_eq!(store.xlen(&p.key(["events"])).await.unwrap(), 1);
        assert_eq!(store.get(&[p.key(["rec"])]).await.unwrap()[0].as_ref().map(|r| r.version), Some(1));
    }
    // On an empty Redis: three keys per unit (record, tally, stream) and no receipt; a receipted
    // commit of one record leaves two keys, the record and its receipt.
    let keys = |counts: Vec<chipgate_state::MasterKeys>| counts.iter().map(|m| m.keys).sum::<u64>();
    assert_eq!(keys(store.master_key_counts().await.unwrap()), 9, "a receipt-free commit leaves no receipt");
    let mut receipted = Txn::new();
    receipted.replace(S.partition("H200").key(["other"]), 0, b"x".to_vec());
    store.commit_as(&receipted, "with-receipt").await.unwrap();
    assert_eq!(keys(store.master_key_counts().await.unwrap()), 11, "a receipted commit leaves one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_receipt_free_commit_conflicts_and_changes_nothing_on_a_single_redis() {
    let server = RedisServer::start();
    a_resent_receipt_free_commit_conflicts_and_changes_nothing(server.backend().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_receipt_free_commit_conflicts_and_changes_nothing_on_a_cluster() {
    // Emptied for this test, and held until it ends.
    let cluster = RedisCluster::shared().await;
    a_resent_receipt_free_commit_conflicts_and_changes_nothing(cluster.backend().await).await;
}

/// With `min_replicas`, a commit answers only once a replica has it; where no replica can
/// acknowledge, the caller hears UNAVAILABLE ("outcome unknown"), not success, though the master
/// applied it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_wait_for_replicas_or_say_the_outcome_is_unknown() {
    let cluster = RedisCluster::shared().await;
    // A generous timeout: this checks what is acknowledged, not how fast (the whole workspace's
    // tests share two cores).
    let durable = RedisOptions { min_replicas: 1, wait_timeout: Duration::from_secs(5), ..cluster.redis_options() };
    let store = cluster.backend_with(durable).await;
    for unit in ["H200", "B200", "H20", "L40", "MI300"] {
        let key = S.partition(unit).key(["rec"]);
        let mut t = Txn::new();
        t.replace(&key, 0, unit.as_bytes().to_vec());
        store.commit(&t).await.unwrap();
        assert_eq!(store.incr(&S.partition(unit).key(["seq"]), 1).await.unwrap(), 1);
    }

    // A single Redis has no replica: every durable write is applied but not acknowledged.
    let server = RedisServer::start();
    let options = RedisOptions { min_replicas: 1, wait_timeout: Duration::from_millis(50), ..RedisOptions::default() };
    let lonely = RedisBackend::connect(&server.url(), options).await.unwrap();
    let key = S.key(["rec"]);
    let mut t = Txn::new();
    t.replace(&key, 0, b"x".to_vec());
    match lonely.commit(&t).await {
        Err(CommitError::State(StateError::Unavailable(msg))) => assert!(msg.contains(OUTCOME_UNKNOWN), "{msg}"),
        other => panic!("expected UNAVAILABLE with an unknown outcome, got {other:?}"),
    }
    assert_eq!(lonely.get(std::slice::from_ref(&key)).await.unwrap()[0].as_ref().unwrap().version, 1);
    assert!(matches!(lonely.incr(&S.key(["seq"]), 1).await, Err(StateError::Unavailable(_))));
    // Reads and failed guards don't wait.
    assert!(lonely.get(std::slice::from_ref(&key)).await.is_ok());
    assert!(matches!(lonely.commit(&t).await, Err(CommitError::Conflict { .. })));
    // Nor does reading a counter (adding 0): it is a read, served while writes can't be acknowledged
    // (as after a failover, until the promoted master has a replica again), and it writes nothing.
    assert_eq!(lonely.incr(&S.key(["seq"]), 0).await.unwrap(), 1);
    assert_eq!(lonely.incr(&S.key(["never"]), 0).await.unwrap(), 0);
    assert_eq!(lonely.master_key_counts().await.unwrap()[0].keys, 3, "the record, its receipt and the counter");
}

/// Many partitions land on every master, and a multi-partition read (one MGET per slot) returns
/// each record in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_spread_over_every_master() {
    let cluster = RedisCluster::shared().await;
    let store = cluster.backend().await;
    let units: Vec<String> = (0..30).map(|i| format!("SKU-{i}")).collect();
    for u in &units {
        let mut t = Txn::new();
        t.replace(S.partition(u).key(["rec"]), 0, u.as_bytes().to_vec());
        store.commit(&t).await.unwrap();
    }
    let mut keys: Vec<String> = units.iter().map(|u| S.partition(u).key(["rec"])).collect();
    keys.insert(7, S.partition("nobody").key(["rec"]));
    let got = store.get(&keys).await.unwrap();
    assert!(got[7].is_none());
    for (i, u) in units.iter().enumerate() {
        let at = if i < 7 { i } else { i + 1 };
        assert_eq!(got[at].as_ref().unwrap().data, u.as_bytes());
    }
    let counts = store.master_key_counts().await.unwrap();
    assert_eq!(counts.len(), 3, "{counts:?}");
    let slots: u32 = counts.iter().flat_map(|m| &m.slots).map(|(lo, hi)| u32::from(hi - lo) + 1).sum();
    assert_eq!(slots, 16384, "the masters serve every slot once: {counts:?}");
    for m in &counts {
        assert!(m.keys > 0, "master {} holds none of 30 partitions: {counts:?}", m.addr);
    }
    // Each commit leaves a record and a short-lived receipt.
    assert_eq!(counts.iter().map(|m| m.keys).sum::<u64>(), 2 * units.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_tells_the_truth_on_a_cluster() {
    let mut cluster = RedisCluster::start();
    let store = cluster.backend().await;
    store.ping().await.unwrap();
    assert!(store.info().await.unwrap().used_memory.unwrap() > 0);
    let victim = cluster.masters()[1];
    let killed = Instant::now();
    cluster.kill(victim);
    // Until the replica takes over, a third of the slots has no master: not healthy.
    match store.ping().await {
        Err(StateError::Unavailable(_)) => {}
        other => panic!("a cluster with a dead master must not look healthy: {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "the replica did not take over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("health back {:?} after kill -9 of a master", killed.elapsed());
    assert!(!cluster.masters().contains(&victim));
    // Writes on every master work again with the same backend.
    for i in 0..30 {
        let mut t = Txn::new();
        t.put(S.partition(&format!("SKU-{i}")).key(["after"]), b"1".to_vec());
        store.commit(&t).await.unwrap();
    }
    eprintln!("writes on every slot {:?} after the kill", killed.elapsed());
}

fn acl_server() -> RedisServer {
    RedisServer::start_with(ServerOptions {
        acl_users: vec![
            "chipgate on >s3cret-pass ~* &* +@all".into(),
            // A service's own user: its keys only (`{t}` and `{t:…}` partitions), no admin commands
            // but INFO (health figures), as the README recommends.
            "svc-t on >t-pass ~{t}* ~{t:* +@all -@dangerous +info".into(),
        ],
        ..ServerOptions::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_users_authenticate_and_wrong_passwords_are_a_clear_error() {
    let server = acl_server();
    let port = server.port();
    let quick = || RedisOptions { startup_retry_for: Some(Duration::from_secs(2)), ..RedisOptions::default() };

    // From the options (as --redis-username / --redis-password-file give them) and from the URL.
    let by_options =
        RedisOptions { username: Some("chipgate".into()), password: Some("s3cret-pass".into()), ..quick() };
    for store in [
        RedisBackend::connect(&server.url(), by_options).await.unwrap(),
        RedisBackend::connect(&format!("redis://chipgate:s3cret-pass@127.0.0.1:{port}/0"), quick()).await.unwrap(),
    ] {
        let mut t = Txn::new();
        t.put(S.key(["acl"]), b"ok".to_vec());
        store.commit(&t).await.unwrap();
        store.ping().await.unwrap();
    }

    for (url, what) in [
        (format!("redis://chipgate:wrong-pass@127.0.0.1:{port}/0"), "a wrong password"),
        (format!("redis://nobody:s3cret-pass@127.0.0.1:{port}/0"), "an unknown user"),
        (server.url(), "no credentials"),
    ] {
        let started = Instant::now();
        let err = match RedisBackend::connect(&url, RedisOptions::default()).await {
            Err(e) => e,
            Ok(store) => match store.ping().await {
                Err(e) => e,
                Ok(()) => panic!("{what} was let in"),
            },
        };
        let msg = err.to_string();
        assert!(matches!(err, StateError::Backend(_)), "{what}: not retryable, got {err:?}");
        assert!(
            msg.contains("WRONGPASS") || msg.contains("NOAUTH") || msg.contains("refused"),
            "{what}: the error says why: {msg}"
        );
        assert!(!msg.contains("wrong-pass") && !msg.contains("s3cret"), "{what}: the password leaked: {msg}");
        assert!(started.elapsed() < Duration::from_secs(5), "{what}: refused credentials are not retried forever");
    }

    // A user limited to one service's keys commits in its partitions (receipts included), and is
    // refused, clearly, elsewhere.
    let limited = RedisOptions { username: Some("svc-t".into()), password: Some("t-pass".into()), ..quick() };
    let store = RedisBackend::connect(&server.url(), limited).await.unwrap();
    store.ping().await.unwrap();
    store.info().await.unwrap();
    assert_eq!(store.incr(&S.partition("H200").key(["seq"]), 1).await.unwrap(), 1);
    let lease = S.partition("H200").key(["lease"]);
    let token = store.lease_acquire(&lease, &S.partition("H200").key(["fence"]), Duration::from_secs(5)).await.unwrap();
    assert!(store.lease_release(&lease, token.unwrap()).await.unwrap());
    let mut t = Txn::new();
    t.put(S.partition("H200").key(["x"]), b"1".to_vec()).hincr(S.partition("H200").key(["n"]), "n", 1);
    store.commit(&t).await.unwrap();
    let mut other = Txn::new();
    other.put(Space::new("inv").key(["x"]), b"1".to_vec());
    match store.commit(&other).await {
        Err(CommitError::State(StateError::Backend(msg))) => {
            assert!(msg.contains("NOPERM") || msg.contains("permission"), "{msg}")
        }
        res => panic!("another service's keys must be refused, got {res:?}"),
    }
}

/// A cluster whose nodes require a password: the client authenticates on every node it discovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_a_password() {
    let cluster = tokio::task::spawn_blocking(|| {
        RedisCluster::start_with(ClusterOptions { password: Some("cluster-pass".into()), ..ClusterOptions::default() })
    })
    .await
    .unwrap();
    let store = cluster.backend().await;
    for unit in ["H200", "B200", "H20", "L40"] {
        let mut t = Txn::new();
        t.put(S.partition(unit).key(["x"]), b"1".to_vec());
        store.commit(&t).await.unwrap();
    }
    store.ping().await.unwrap();
    assert_eq!(store.master_key_counts().await.unwrap().len(), 3);
    let wrong = RedisOptions {
        password: Some("nope".into()),
        startup_retry_for: Some(Duration::from_secs(1)),
        ..cluster.redis_options()
    };
    let err = match RedisBackend::connect(&cluster.url(), wrong).await {
        Err(e) => e,
        Ok(store) => store.ping().await.expect_err("a wrong password must not be let in"),
    };
    assert!(!err.to_string().contains("nope"), "the password leaked: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_ca_file() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "chipgate redis test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let files = TlsFiles {
        cert: dir.path().join("redis.crt"),
        key: dir.path().join("redis.key"),
        ca: dir.path().join("ca.crt"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    std::fs::write(&files.ca, ca_cert.pem()).unwrap();
    let server = RedisServer::start_with(ServerOptions { tls: Some(files.clone()), ..ServerOptions::default() });
    assert!(server.url().starts_with("rediss://"));

    let options = RedisOptions {
        tls_ca: Some(files.ca.clone()),
        startup_retry_for: Some(Duration::from_secs(5)),
        ..RedisOptions::default()
    };
    let store = RedisBackend::connect(&server.url(), options.clone()).await.unwrap();
    let mut t = Txn::new();
    t.put(S.key(["tls"]), b"secret".to_vec());
    store.commit(&t).await.unwrap();
    assert_eq!(store.get(&[S.key(["tls"])]).await.unwrap()[0].as_ref().unwrap().data, b"secret");

    // Without our CA the server's certificate is not trusted; a CA with a plaintext URL is a
    // configuration mistake, said at once.
    let untrusted = RedisOptions { startup_retry_for: Some(Duration::from_millis(300)), ..RedisOptions::default() };
    assert!(RedisBackend::connect(&server.url(), untrusted).await.is_err());
    let plain = server.url().replace("rediss://", "redis://");
    match RedisBackend::connect(&plain, options).await {
        Err(StateError::Backend(msg)) => assert!(msg.contains("rediss"), "{msg}"),
        other => panic!("expected a configuration error, got {:?}", other.err()),
    }
}

/// What one partition's writer knows: the versions acknowledged to it, and those whose outcome it
/// was told is unknown.
#[derive(Default, Debug)]
struct Ledger {
    acknowledged: Vec<u64>,
    unknown: u64,
    unavailable_reads: u64,
    failures: Vec<String>,
}

/// One writer per partition, each commit taking the partition's record from version v to v + 1,
/// appending v + 1 to its stream and adding 1 to its tally. Unavailable answers are re-read,
/// never guessed.
async fn write_partition(store: RedisBackend, unit: String, stop: Arc<AtomicBool>) -> Ledger {
    let p = S.partition(&unit);
    let (rec, events, tally) = (p.key(["rec"]), p.key(["events"]), p.key(["tally"]));
    let mut ledger = Ledger::default();
    while !stop.load(Ordering::Relaxed) {
        let version = match store.get(std::slice::from_ref(&rec)).await {
            Ok(mut r) => r.remove(0).map(|r| r.version).unwrap_or(0),
            Err(StateError::Unavailable(_)) => {
                ledger.unavailable_reads += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => {
                ledger.failures.push(format!("read: {e}"));
                break;
            }
        };
        let next = version + 1;
        let mut t = Txn::new();
        t.replace(&rec, version, next.to_string().into_bytes())
            .xadd(&events, vec![("v".into(), next.to_string().into_bytes())], None)
            .hincr(&tally, "n", 1);
        match store.commit(&t).await {
            Ok(_) => ledger.acknowledged.push(next),
            Err(CommitError::State(StateError::Unavailable(_))) => {
                ledger.unknown += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(CommitError::Conflict { .. }) => {
                // Only after an unknown outcome: the earlier attempt did apply.
                if ledger.unknown == 0 {
                    ledger.failures.push(format!("conflict at {version} with a single writer"));
                }
            }
            Err(e) => {
                ledger.failures.push(format!("commit: {e}"));
                break;
            }
        }
    }
    ledger
}

/// kill -9 of a master in the middle of a workload on 12 partitions: its replica takes over, the
/// same backend (no reconnect by hand) carries on, every call in between answers UNAVAILABLE or the
/// truth, and with `min_replicas = 1` every acknowledged commit is still there afterwards, applied
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_workload_loses_no_acknowledged_commit() {
    let mut cluster = RedisCluster::start_with(ClusterOptions::default());
    eprintln!("cluster startup: {:?}", cluster.startup_time());
    let options = RedisOptions {
        min_replicas: 1,
        wait_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(1000),
        ..cluster.redis_options()
    };
    let store = cluster.backend_with(options).await;
    let units: Vec<String> = (0..12).map(|i| format!("SKU-{i}")).collect();
    let victim = cluster.master_of_slot(S.partition(&units[0]).slot());
    let on_victim: Vec<&String> =
        units.iter().filter(|u| cluster.master_of_slot(S.partition(u).slot()) == victim).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> =
        units.iter().map(|u| tokio::spawn(write_partition(store.clone(), u.clone(), stop.clone()))).collect();

    tokio::time::sleep(Duration::from_millis(800)).await;
    let promotion =
        tokio::task::block_in_place(|| cluster.kill_and_wait_for_failover(victim, Duration::from_secs(30))).unwrap();
    eprintln!("failover: {promotion:?}");

    // The new master has no replica until the old one comes back as its replica: with
    // min_replicas 1 its partitions answer UNAVAILABLE meanwhile. Bring it back, as Kubernetes
    // restarts a pod.
    let restarted = Instant::now();
    tokio::task::block_in_place(|| cluster.restart(victim));
    eprintln!("old master back as a replica, in sync after {:?}", restarted.elapsed());

    // The same backend commits on the promoted master's partitions again.
    let recovered_at = Instant::now();
    let probe = S.partition(on_victim[0]).key(["probe"]);
    loop {
        let mut t = Txn::new();
        t.put(&probe, b"after".to_vec());
        match store.commit(&t).await {
            Ok(_) => break,
            Err(CommitError::State(StateError::Unavailable(_))) => {
                assert!(recovered_at.elapsed() < Duration::from_secs(30), "the backend did not recover");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("after the failover: {e}"),
        }
    }
    eprintln!("first durable commit on the promoted master {:?} after its restart", recovered_at.elapsed());

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut total_acked = 0;
    let mut total_unknown = 0;
    let mut per_unit = BTreeMap::new();
    for (unit, w) in units.iter().zip(writers) {
        let ledger = w.await.unwrap();
        assert!(ledger.failures.is_empty(), "{unit}: {:?}", ledger.failures);
        let p = S.partition(unit);
        let version = store.get(&[p.key(["rec"])]).await.unwrap()[0].as_ref().map(|r| r.version).unwrap_or(0);
        let events = store.xrange(&p.key(["events"]), None, 100_000).await.unwrap();
        let seen: Vec<u64> =
            events.iter().map(|e| std::str::from_utf8(e.field("v").unwrap()).unwrap().parse().unwrap()).collect();
        let tally = store.hgetall(&p.key(["tally"])).await.unwrap();
        // Every acknowledged version is there; each applied commit appended once and counted once.
        let last_acked = ledger.acknowledged.last().copied().unwrap_or(0);
        assert!(version >= last_acked, "{unit}: acknowledged {last_acked}, found {version}");
        for v in &ledger.acknowledged {
            assert!(seen.contains(v), "{unit}: acknowledged commit {v} is lost");
        }
        assert_eq!(seen, (1..=version).collect::<Vec<_>>(), "{unit}: each version appended exactly once");
        let n = if version == 0 { Vec::new() } else { vec![("n".to_string(), version.to_string().into_bytes())] };
        assert_eq!(tally, n, "{unit}: each applied commit counted once");
        total_acked += ledger.acknowledged.len();
        total_unknown += ledger.unknown + ledger.unavailable_reads;
        per_unit.insert(unit.clone(), (ledger.acknowledged.len(), ledger.unknown, ledger.unavailable_reads));
    }
    eprintln!(
        "acknowledged commits: {total_acked}, unavailable answers: {total_unknown}, per partition (acknowledged, unknown commits, unavailable reads): {per_unit:?}"
    );
    assert!(total_unknown > 0, "the failover went unnoticed: the test did not test it");
    for u in &on_victim {
        assert!(per_unit[*u].0 > 0, "{u} never committed");
    }
}

/// A read spanning partitions from the moment a master dies until its replica has taken over: every
/// answer is the records or UNAVAILABLE, never another error. (The cluster client's own split of a
/// multi-slot `MGET` leaves out the slots whose node it has no connection to, then fails the whole
/// read with a client error, "Mismatch in the number of multi-slot results", which callers would
/// get as INTERNAL.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_across_partitions_while_a_master_is_down_is_unavailable_not_an_error() {
    let mut cluster = RedisCluster::start();
    // Each write waits for a replica, as the services run (--redis-min-replicas defaults to 1 on a
    // cluster): without it, a write acknowledged just before the kill may not have reached the
    // replica that is promoted, and the read after the failover would rightly miss it.
    let durable = RedisOptions { min_replicas: 1, wait_timeout: Duration::from_secs(5), ..cluster.redis_options() };
    let store = cluster.backend_with(durable).await;
    let units: Vec<String> = (0..12).map(|i| format!("SKU-{i}")).collect();
    for u in &units {
        let mut t = Txn::new();
        t.replace(S.partition(u).key(["rec"]), 0, u.as_bytes().to_vec());
        store.commit(&t).await.unwrap();
    }
    let keys: Vec<String> = units.iter().map(|u| S.partition(u).key(["rec"])).collect();
    let victim = cluster.master_of_slot(S.partition(&units[0]).slot());
    let killed = cluster.kill_master(victim).unwrap();
    let (mut unavailable, mut answered) = (0, 0);
    loop {
        // A read of the dead master's partition alone, as a busy service makes: the client finds
        // its connection broken and repairs it in the background.
        let _ = store.get(&keys[..1]).await;
        match store.get(&keys).await {
            Ok(got) => {
                answered += 1;
                for (u, r) in units.iter().zip(got) {
                    let r = r.unwrap_or_else(|| panic!("{u}'s acknowledged record is gone after the failover"));
                    assert_eq!(r.data, u.as_bytes());
                }
            }
            Err(StateError::Unavailable(_)) => unavailable += 1,
            Err(e) => panic!("a read while a master is down must answer UNAVAILABLE: {e}"),
        }
        let promoted = tokio::task::block_in_place(|| cluster.wait_for_failover(&killed, Duration::ZERO));
        if promoted.is_ok() && answered > 0 {
            break;
        }
        assert!(killed.at.elapsed() < Duration::from_secs(30), "no failover, or no read answered after it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("reads across partitions: {unavailable} UNAVAILABLE, {answered} answered");
    assert!(unavailable > 0, "no read noticed the dead master");
}

/// Every node of the cluster lost at once and the cluster built again on the same addresses (pods
/// whose volumes were lost, then the bootstrap job): while no node serves slots every call answers
/// UNAVAILABLE and health says so; once the cluster is built again the backend works on every
/// connection, reads and each write connection, without a restart of the process. (A cluster
/// connection left with no node at all is replaced by the backend: see the unit test
/// `a_cluster_connection_with_no_node_left_is_replaced`; the kill -9 fault test on a cluster is
/// where it showed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_cluster_is_rebuilt_every_connection_works_again() {
    let mut cluster = RedisCluster::start();
    let durable = RedisOptions {
        min_replicas: 1,
        wait_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_millis(500),
        ..cluster.redis_options()
    };
    let store = cluster.backend_with(durable).await;
    let units: Vec<String> = (0..8).map(|i| format!("SKU-{i}")).collect();
    let write = |u: &String, n: u64| {
        let mut t = Txn::new();
        t.put(S.partition(u).key(["n"]), n.to_string().into_bytes());
        t
    };
    for u in &units {
        store.commit(&write(u, 1)).await.unwrap();
    }
    tokio::task::block_in_place(|| cluster.restart_all_empty());
    // Calls while the nodes serve no slots: every one fails, and the connections refresh their
    // slot maps from nodes that have none.
    let empty_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < empty_until {
        for u in &units {
            match store.commit(&write(u, 2)).await {
                Err(CommitError::State(StateError::Unavailable(_))) => {}
                other => panic!("a commit while no node serves slots must answer UNAVAILABLE: {other:?}"),
            }
        }
        assert!(store.ping().await.is_err(), "health while no node serves slots");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::block_in_place(|| cluster.recreate());
    // Every unit's write, four times in a row, goes round the write connections.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pending: Vec<&String> = units.iter().collect();
    let mut failures = 0usize;
    let mut last = String::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for u in pending {
            for _ in 0..4 {
                if let Err(e) = store.commit(&write(u, 3)).await {
                    failures += 1;
                    last = e.to_string();
                    still.push(u);
                    break;
                }
            }
        }
        pending = still;
        assert!(
            Instant::now() < deadline,
            "writes still fail 20 s after the cluster was rebuilt ({failures} failures, the last: {last}): {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.ping().await.expect("health after the cluster was rebuilt");
    for u in &units {
        let got = store.get(&[S.partition(u).key(["n"])]).await.expect("a read after the rebuild");
        assert_eq!(got[0].as_ref().map(|r| r.data.clone()), Some(b"3".to_vec()), "{u}");
    }
    eprintln!("after the rebuild: {failures} failed writes before every connection worked");
}
