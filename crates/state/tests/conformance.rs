//! The state-layer conformance suite: every test runs on the in-memory backend and on a real
//! `redis-server`, and both must behave the same.

#![allow(clippy::unwrap_used)]
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use chipgate_state::{
    AUDIT_GENESIS, AuditChain, Backend, CommitError, HashMoved, Record, Space, StateError, Store, Txn, audit_link,
    backend_tests, sha256_hex,
};

const S: Space = Space::new("t");

fn k(parts: &[&str]) -> String {
    S.key(parts)
}

async fn records_are_versioned_and_guarded(store: Store) {
    let key = k(&["rec", "1"]);
    assert_eq!(store.get(std::slice::from_ref(&key)).await.unwrap(), vec![None]);

    // Version 0 means "absent": creating works once.
    let mut t = Txn::new();
    t.replace(&key, 0, b"one".to_vec());
    store.commit(&t).await.unwrap();
    let rec = store.get(std::slice::from_ref(&key)).await.unwrap().remove(0).unwrap();
    assert_eq!((rec.version, rec.data.as_slice()), (1, &b"one"[..]));

    // The same create again conflicts, and nothing else in that transaction applies.
    let mut t = Txn::new();
    t.replace(&key, 0, b"again".to_vec()).zadd(k(&["z"]), "m", 1.0);
    match store.commit(&t).await {
        Err(CommitError::Conflict { key: bad }) => assert_eq!(bad, key),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.zcard(&k(&["z"])).await.unwrap(), 0, "a failed transaction must change nothing");

    // Writing at the version read bumps it.
    let mut t = Txn::new();
    t.replace(&key, 1, b"two:with:colons".to_vec());
    store.commit(&t).await.unwrap();
    let rec = store.get(std::slice::from_ref(&key)).await.unwrap().remove(0).unwrap();
    assert_eq!((rec.version, rec.data.as_slice()), (2, &b"two:with:colons"[..]));

    // Binary payloads survive.
    let bin: Vec<u8> = (0u8..=255).collect();
    let mut t = Txn::new();
    t.put(&key, bin.clone());
    store.commit(&t).await.unwrap();
    let rec = store.get(std::slice::from_ref(&key)).await.unwrap().remove(0).unwrap();
    assert_eq!((rec.version, rec.data), (3, bin));

    // Delete makes it absent again.
    let mut t = Txn::new();
    t.delete(&key);
    store.commit(&t).await.unwrap();
    assert_eq!(store.get(std::slice::from_ref(&key)).await.unwrap(), vec![None]);
}

/// A guard compares whole versions (12 is not 1, nor 120), and absent is version 0.
async fn version_guards_compare_whole_versions(store: Store) {
    let key = k(&["rec", "twelve"]);
    for v in 0..12 {
        let mut t = Txn::new();
        t.replace(&key, v, format!("v{}", v + 1).into_bytes());
        store.commit(&t).await.unwrap();
    }
    for wrong in [0, 1, 2, 11, 13, 120, 121] {
        let mut t = Txn::new();
        t.replace(&key, wrong, b"no".to_vec());
        assert!(matches!(store.commit(&t).await, Err(CommitError::Conflict { .. })), "guard {wrong} vs 12");
    }
    let mut t = Txn::new();
    t.replace(&key, 12, b"v13".to_vec());
    store.commit(&t).await.unwrap();
    let rec = store.get(std::slice::from_ref(&key)).await.unwrap().remove(0).unwrap();
    assert_eq!((rec.version, rec.data.as_slice()), (13, &b"v13"[..]));
    let absent = k(&["rec", "absent"]);
    let mut t = Txn::new();
    t.replace(&absent, 1, b"no".to_vec());
    assert!(matches!(store.commit(&t).await, Err(CommitError::Conflict { .. })), "guard 1 on an absent record");
    // An empty payload is still a record at its version.
    let empty = k(&["rec", "empty"]);
    let mut t = Txn::new();
    t.replace(&empty, 0, Vec::new());
    store.commit(&t).await.unwrap();
    let mut t = Txn::new();
    t.replace(&empty, 0, Vec::new());
    assert!(matches!(store.commit(&t).await, Err(CommitError::Conflict { .. })), "it exists now");
    let mut t = Txn::new();
    t.replace(&empty, 1, b"x".to_vec());
    store.commit(&t).await.unwrap();
}

/// Writes of one record within a transaction apply in order, however the backend batches them, and
/// a transaction of thousands of records writes each.
async fn record_writes_in_one_transaction_apply_in_order(store: Store) {
    let (a, b, c) = (k(&["seq", "a"]), k(&["seq", "b"]), k(&["seq", "c"]));
    let mut t = Txn::new();
    t.replace(&a, 0, b"first".to_vec()).put(&a, b"second".to_vec());
    t.replace(&b, 0, b"gone".to_vec()).delete(&b);
    t.replace(&c, 0, b"short".to_vec()).put_with_ttl(&c, b"kept".to_vec(), Duration::from_secs(60));
    store.commit(&t).await.unwrap();
    let got = store.get(&[a.clone(), b.clone(), c.clone()]).await.unwrap();
    let got: Vec<Option<(u64, Vec<u8>)>> = got.into_iter().map(|r| r.map(|r| (r.version, r.data))).collect();
    assert_eq!(got, vec![Some((2, b"second".to_vec())), None, Some((2, b"kept".to_vec()))]);

    let keys: Vec<String> = (0..2_500).map(|i| k(&["many", &i.to_string()])).collect();
    let mut t = Txn::new();
    for (i, key) in keys.iter().enumerate() {
        t.replace(key, 0, format!("record {i}").into_bytes());
    }
    store.commit(&t).await.unwrap();
    let got = store.get(&keys).await.unwrap();
    for (i, r) in got.into_iter().enumerate() {
        let r = r.unwrap_or_else(|| panic!("record {i} missing"));
        assert_eq!((r.version, r.data), (1, format!("record {i}").into_bytes()));
    }
}

async fn records_with_ttl_expire(store: Store) {
    let key = k(&["ttl"]);
    let mut t = Txn::new();
    t.put_with_ttl(&key, b"x".to_vec(), Duration::from_millis(150));
    store.commit(&t).await.unwrap();
    assert!(store.get(std::slice::from_ref(&key)).await.unwrap()[0].is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store.get(std::slice::from_ref(&key)).await.unwrap()[0].is_none());

    // Guarded and written at a known version, with a TTL: created once, at version 1, then gone.
    let guarded = k(&["ttl", "guarded"]);
    let mut t = Txn::new();
    t.replace_with_ttl(&guarded, 0, b"answer:1".to_vec(), Duration::from_millis(150)).zadd(k(&["ttl", "z"]), "m", 1.0);
    store.commit(&t).await.unwrap();
    let rec = store.get(std::slice::from_ref(&guarded)).await.unwrap().remove(0).unwrap();
    assert_eq!((rec.version, rec.data.as_slice()), (1, &b"answer:1"[..]));
    let mut t = Txn::new();
    t.replace_with_ttl(&guarded, 0, b"answer:2".to_vec(), Duration::from_secs(60)).zadd(k(&["ttl", "z"]), "n", 1.0);
    match store.commit(&t).await {
        Err(CommitError::Conflict { key: bad }) => assert_eq!(bad, guarded),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.zcard(&k(&["ttl", "z"])).await.unwrap(), 1, "a refused transaction changes nothing");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store.get(std::slice::from_ref(&guarded)).await.unwrap()[0].is_none(), "it expired");
    // Absent again: the guard lets a new one in.
    let mut t = Txn::new();
    t.replace_with_ttl(&guarded, 0, b"answer:3".to_vec(), Duration::from_secs(60));
    store.commit(&t).await.unwrap();
    let rec = store.get(std::slice::from_ref(&guarded)).await.unwrap().remove(0).unwrap();
    assert_eq!((rec.version, rec.data.as_slice()), (1, &b"answer:3"[..]));
}

async fn sorted_sets_order_by_score_then_member(store: Store) {
    let z = k(&["queue"]);
    let mut t = Txn::new();
    t.zadd(&z, "c", 3.0).zadd(&z, "a", 1.0).zadd(&z, "b", 2.0).zadd(&z, "b2", 2.0);
    store.commit(&t).await.unwrap();
    let all = store.zrange(&z, 0, -1, false).await.unwrap();
    let names: Vec<&str> = all.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(names, ["a", "b", "b2", "c"]);
    let rev = store.zrange(&z, 0, 1, true).await.unwrap();
    assert_eq!(rev, vec![("c".to_string(), 3.0), ("b2".to_string(), 2.0)]);
    assert_eq!(store.zrange(&z, 1, 2, false).await.unwrap().len(), 2);
    assert_eq!(store.zrange(&z, 10, 20, false).await.unwrap(), vec![]);
    assert_eq!(store.zrank(&z, "b2").await.unwrap(), Some(2));
    assert_eq!(store.zrank(&z, "nope").await.unwrap(), None);
    assert_eq!(store.zcard(&z).await.unwrap(), 4);
    let mid = store.zrange_by_score(&z, Bound::Excluded(1.0), Bound::Included(3.0), 2).await.unwrap();
    assert_eq!(mid, vec![("b".to_string(), 2.0), ("b2".to_string(), 2.0)]);
    let open = store.zrange_by_score(&z, Bound::Unbounded, Bound::Excluded(2.0), 10).await.unwrap();
    assert_eq!(open, vec![("a".to_string(), 1.0)]);
    // Lower bounds at a score two members share, and between scores.
    let names_from = |r: Vec<(String, f64)>| r.into_iter().map(|(m, _)| m).collect::<Vec<_>>();
    let at = store.zrange_by_score(&z, Bound::Included(2.0), Bound::Unbounded, 10).await.unwrap();
    assert_eq!(names_from(at), ["b", "b2", "c"]);
    let above = store.zrange_by_score(&z, Bound::Excluded(2.0), Bound::Unbounded, 10).await.unwrap();
    assert_eq!(names_from(above), ["c"]);
    let between = store.zrange_by_score(&z, Bound::Included(1.5), Bound::Excluded(3.0), 10).await.unwrap();
    assert_eq!(names_from(between), ["b", "b2"]);
    // Re-scoring moves a member; large integer scores stay exact.
    let mut t = Txn::new();
    t.zadd(&z, "a", 9_007_199_254_740_000.0).zrem(&z, "c");
    store.commit(&t).await.unwrap();
    let all = store.zrange(&z, 0, -1, false).await.unwrap();
    assert_eq!(all.last().unwrap(), &("a".to_string(), 9_007_199_254_740_000.0));
    assert_eq!(store.zcard(&z).await.unwrap(), 3);
}

/// A snapshot of sorted sets taken inside a transaction is exactly their union at that moment, and
/// replaces what the destination held; a snapshot of nothing deletes it.
async fn sorted_sets_snapshot_into_one(store: Store) {
    let (a, b, snap) = (k(&["q", "a"]), k(&["q", "b"]), k(&["snap"]));
    let mut t = Txn::new();
    t.zadd(&a, "o1", 1.0).zadd(&a, "o3", 3.0).zadd(&b, "o2", 2.0).zadd(&snap, "stale", 0.0);
    store.commit(&t).await.unwrap();
    let tally = k(&["tally"]);
    let mut t = Txn::new();
    t.zunionstore_counted(&snap, vec![a.clone(), b.clone(), k(&["q", "empty"])], &tally, "size").zadd(&a, "o4", 4.0);
    store.commit(&t).await.unwrap();
    assert_eq!(store.hgetall(&tally).await.unwrap(), vec![("size".to_string(), b"3".to_vec())], "counted at once");
    let got = store.zrange(&snap, 0, -1, false).await.unwrap();
    assert_eq!(got, vec![("o1".into(), 1.0), ("o2".into(), 2.0), ("o3".into(), 3.0)], "o4 came after");
    let mut t = Txn::new();
    t.zrem(&snap, "o2");
    store.commit(&t).await.unwrap();
    assert_eq!(store.zcard(&snap).await.unwrap(), 2);
    assert_eq!(store.zcard(&b).await.unwrap(), 1, "the sources are untouched");
    let mut t = Txn::new();
    t.zunionstore(&snap, vec![k(&["q", "empty"])]);
    store.commit(&t).await.unwrap();
    assert_eq!(store.zcard(&snap).await.unwrap(), 0);
    let mut t = Txn::new();
    t.zadd(&snap, "x", 1.0);
    store.commit(&t).await.unwrap();
    let mut t = Txn::new();
    t.zunionstore(&snap, vec![]);
    store.commit(&t).await.unwrap();
    assert_eq!(store.zcard(&snap).await.unwrap(), 0);
}

/// A copy in pages continues from its cursor, lowest scores first, up to its bound: each page counts
/// only the members new to the destination, a member that left the destination after its page stays
/// out, a member added to the source below the cursor is not copied, and once a page comes up short
/// the copy is done and copies nothing more. A source written earlier in the same transaction counts,
/// and a page larger than one `ZADD` call takes (4,000 arguments) is copied whole.
async fn sorted_sets_copied_in_pages(store: Store) {
    let (q, big, snap, tally, cursors) =
        (k(&["q", "a"]), k(&["q", "big"]), k(&["snap"]), k(&["tally"]), k(&["cursors"]));
    let mut t = Txn::new();
    for i in 1..=7u32 {
        t.zadd(&q, format!("s{i}"), f64::from(i));
    }
    t.zadd(&q, "late", 100.0).zadd(&snap, "sentinel", 0.0).zadd(&snap, "s5", 5.0);
    for i in 0..2_500u32 {
        t.zadd(&big, format!("b{i:05}"), 10_000.0 + f64::from(i));
    }
    store.commit(&t).await.unwrap();
    let field = |store: Store, key: String, name: &'static str| async move {
        let h = store.hgetall(&key).await.unwrap();
        h.into_iter().find(|(f, _)| f == name).map(|(_, v)| String::from_utf8(v).unwrap())
    };
    let page = |limit: u64| {
        let mut t = Txn::new();
        t.zcopy_page(&snap, &q, 50.0, limit, (tally.clone(), "n".into()), (cursors.clone(), "a".into()));
        t
    };
    store.commit(&page(3)).await.unwrap();
    assert_eq!(field(store.clone(), tally.clone(), "n").await.as_deref(), Some("3"));
    assert_eq!(field(store.clone(), cursors.clone(), "a").await.as_deref(), Some(">3"));
    // s2 is evaluated (it leaves the snapshot and its queue); s0 joins the queue below the cursor.
    let mut t = Txn::new();
    t.zrem(&snap, "s2").zrem(&q, "s2").zadd(&q, "s0", 0.5);
    store.commit(&t).await.unwrap();
    // The next page: s4 and s6 are new, s5 was there already.
    store.commit(&page(3)).await.unwrap();
    assert_eq!(field(store.clone(), tally.clone(), "n").await.as_deref(), Some("5"));
    assert_eq!(field(store.clone(), cursors.clone(), "a").await.as_deref(), Some(">6"));
    // The last page holds s7 only ("late" is above the bound): the copy is done.
    store.commit(&page(3)).await.unwrap();
    assert_eq!(field(store.clone(), cursors.clone(), "a").await.as_deref(), Some(chipgate_state::PAGE_COPY_DONE));
    // Done: a repeated step copies nothing.
    store.commit(&page(3)).await.unwrap();
    assert_eq!(field(store.clone(), tally.clone(), "n").await.as_deref(), Some("6"));
    let got: Vec<String> = store.zrange(&snap, 0, -1, false).await.unwrap().into_iter().map(|(m, _)| m).collect();
    assert_eq!(got, ["sentinel", "s1", "s3", "s4", "s5", "s6", "s7"]);
    // A page of a source written in the same transaction, larger than one ZADD call.
    let mut t = Txn::new();
    t.zadd(&big, "b-first", 1.0).zcopy_page(
        &snap,
        &big,
        f64::from(u32::MAX),
        3_000,
        (tally.clone(), "n".into()),
        (cursors.clone(), "big".into()),
    );
    store.commit(&t).await.unwrap();
    assert_eq!(field(store.clone(), tally.clone(), "n").await.as_deref(), Some("2507"));
    assert_eq!(field(store.clone(), cursors.clone(), "big").await.as_deref(), Some(chipgate_state::PAGE_COPY_DONE));
    assert_eq!(store.zcard(&snap).await.unwrap(), 2_508, "the sentinel, six of q and 2,501 of big");
    assert_eq!(store.zcard(&q).await.unwrap(), 8, "the sources are untouched");
}

/// A removal stamps its hash only when a member was there, so a stamp never moves once the set is
/// empty; members added earlier in the same transaction count (batched writes keep their order).
async fn removals_stamp_only_when_something_left(store: Store) {
    let (z, h) = (k(&["pending"]), k(&["tally"]));
    let mut t = Txn::new();
    t.zadd(&z, "o1", 1.0).zadd(&z, "o2", 2.0);
    store.commit(&t).await.unwrap();

    let mut t = Txn::new();
    t.zrem_stamp(&z, vec!["o1".into(), "other".into()], &h, "last", b"10".to_vec());
    store.commit(&t).await.unwrap();
    assert_eq!(store.hgetall(&h).await.unwrap(), vec![("last".to_string(), b"10".to_vec())]);
    assert_eq!(store.zrange(&z, 0, -1, false).await.unwrap(), vec![("o2".to_string(), 2.0)]);

    // Nothing of these is in the set: no stamp.
    let mut t = Txn::new();
    t.zrem_stamp(&z, vec!["o1".into(), "o9".into()], &h, "last", b"20".to_vec());
    store.commit(&t).await.unwrap();
    assert_eq!(store.hgetall(&h).await.unwrap(), vec![("last".to_string(), b"10".to_vec())]);

    // The last member leaves: stamped, and the set is gone.
    let mut t = Txn::new();
    t.zrem_stamp(&z, vec!["o2".into()], &h, "last", b"30".to_vec());
    store.commit(&t).await.unwrap();
    assert_eq!(store.hgetall(&h).await.unwrap(), vec![("last".to_string(), b"30".to_vec())]);
    assert_eq!(store.zcard(&z).await.unwrap(), 0);

    // Later removals from the empty set leave the stamp where it is; none at all is no-op too.
    let mut t = Txn::new();
    t.zrem_stamp(&z, vec!["o2".into()], &h, "last", b"40".to_vec()).zrem_stamp(&z, vec![], &h, "last", b"41".to_vec());
    store.commit(&t).await.unwrap();
    assert_eq!(store.hgetall(&h).await.unwrap(), vec![("last".to_string(), b"30".to_vec())]);

    // A member added earlier in the same transaction is there to be removed.
    let mut t = Txn::new();
    t.zadd(&z, "o3", 3.0).zrem_stamp(&z, vec!["o3".into()], &h, "last", b"50".to_vec());
    store.commit(&t).await.unwrap();
    assert_eq!(store.hgetall(&h).await.unwrap(), vec![("last".to_string(), b"50".to_vec())]);
    assert_eq!(store.zcard(&z).await.unwrap(), 0);
}

async fn hashes_sets_and_counters(store: Store) {
    let h = k(&["stats"]);
    let mut t = Txn::new();
    t.hincr(&h, "held", 5).hincr(&h, "held", -2).hset(&h, "name", b"wave-1".to_vec()).hset(&h, "gone", b"x".to_vec());
    t.hdel(&h, "gone");
    store.commit(&t).await.unwrap();
    assert_eq!(
        store.hgetall(&h).await.unwrap(),
        vec![("held".to_string(), b"3".to_vec()), ("name".to_string(), b"wave-1".to_vec())]
    );
    let s = k(&["dirty"]);
    let mut t = Txn::new();
    t.sadd(&s, "b").sadd(&s, "a").sadd(&s, "c").srem(&s, "c");
    store.commit(&t).await.unwrap();
    assert_eq!(store.smembers(&s).await.unwrap(), vec!["a".to_string(), "b".to_string()]);
    assert_eq!(store.incr(&k(&["seq"]), 1).await.unwrap(), 1);
    assert_eq!(store.incr(&k(&["seq"]), 10).await.unwrap(), 11);
    // Adding 0 reads.
    assert_eq!(store.incr(&k(&["seq"]), 0).await.unwrap(), 11);
    assert_eq!(store.incr(&k(&["no-seq"]), 0).await.unwrap(), 0);
}

async fn streams_append_in_transactions(store: Store) {
    let st = k(&["events"]);
    assert_eq!(store.xlast_id(&st).await.unwrap(), "0-0");
    let mut t = Txn::new();
    t.xadd(&st, vec![("e".into(), b"one".to_vec())], None).xadd(&st, vec![("e".into(), b"two".to_vec())], None);
    let c = store.commit(&t).await.unwrap();
    assert_eq!(c.stream_ids.len(), 2);
    assert!(chipgate_state::parse_stream_id(&c.stream_ids[0]) < chipgate_state::parse_stream_id(&c.stream_ids[1]));
    assert_eq!(store.xlen(&st).await.unwrap(), 2);
    assert_eq!(store.xlast_id(&st).await.unwrap(), c.stream_ids[1]);
    let all = store.xrange(&st, None, 10).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.field("e").unwrap().to_vec()).collect::<Vec<_>>(),
        vec![b"one".to_vec(), b"two".to_vec()]
    );
    let after = store.xrange(&st, Some(&c.stream_ids[0]), 10).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].id, c.stream_ids[1]);
}

async fn consumer_groups_deliver_once_and_reclaim(store: Store) {
    let st = k(&["events"]);
    store.group_ensure(&st, "orders").await.unwrap();
    store.group_ensure(&st, "orders").await.unwrap(); // idempotent
    for i in 0..3 {
        let mut t = Txn::new();
        t.xadd(&st, vec![("n".into(), i.to_string().into_bytes())], None);
        store.commit(&t).await.unwrap();
    }
    let first = store.read_group(&st, "orders", "a", 2, None).await.unwrap();
    assert_eq!(first.len(), 2);
    let second = store.read_group(&st, "orders", "b", 10, None).await.unwrap();
    assert_eq!(second.len(), 1, "entries go to one consumer only");
    assert!(store.read_group(&st, "orders", "a", 10, None).await.unwrap().is_empty());
    let info = store.group_info(&st, "orders").await.unwrap();
    assert_eq!(info.pending, 3);
    assert_eq!(info.lag, Some(0));

    // Consumer a acknowledges one, then "dies" holding the other.
    assert_eq!(store.ack(&st, "orders", std::slice::from_ref(&first[0].id)).await.unwrap(), 1);
    assert_eq!(store.ack(&st, "orders", std::slice::from_ref(&first[0].id)).await.unwrap(), 0);
    // Too early to claim.
    assert!(store.autoclaim(&st, "orders", "c", Duration::from_secs(60), 10).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(120)).await;
    let claimed = store.autoclaim(&st, "orders", "c", Duration::from_millis(100), 10).await.unwrap();
    let ids: Vec<&str> = claimed.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, vec![first[1].id.as_str(), second[0].id.as_str()]);
    assert_eq!(claimed[0].field("n"), Some(&b"1"[..]));
    let ids: Vec<String> = claimed.iter().map(|e| e.id.clone()).collect();
    assert_eq!(store.ack(&st, "orders", &ids).await.unwrap(), 2);
    assert_eq!(store.group_info(&st, "orders").await.unwrap().pending, 0);
}

/// A group that does not exist (never created, or lost in a Redis failover): reads and claims fail
/// with an error that says so, its figures say it doesn't exist, and creating it again delivers the
/// stream from its start.
async fn a_missing_group_says_so(store: Store) {
    let st = k(&["lost"]);
    let info = store.group_info(&st, "orders").await.unwrap();
    assert!(!info.exists, "no stream, no group: {info:?}");
    let mut t = Txn::new();
    t.xadd(&st, vec![("n".into(), b"1".to_vec())], None);
    store.commit(&t).await.unwrap();
    assert!(!store.group_info(&st, "orders").await.unwrap().exists);
    let read = store.read_group(&st, "orders", "a", 10, None).await.expect_err("no group");
    assert!(read.is_missing_group(), "{read}");
    let claim = store.autoclaim(&st, "orders", "a", Duration::ZERO, 10).await.expect_err("no group");
    assert!(claim.is_missing_group(), "{claim}");
    assert!(!StateError::Unavailable("NOGROUP".into()).is_missing_group(), "only the backend's own answer");
    store.group_ensure(&st, "orders").await.unwrap();
    let info = store.group_info(&st, "orders").await.unwrap();
    assert!(info.exists && info.pending == 0 && info.lag == Some(1), "{info:?}");
    assert_eq!(store.read_group(&st, "orders", "a", 10, None).await.unwrap().len(), 1);
}

async fn blocking_reads_wake_on_append(store: Store) {
    let st = k(&["wake"]);
    store.group_ensure(&st, "g").await.unwrap();
    let writer = store.clone();
    let st2 = st.clone();
    let handle = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut t = Txn::new();
        t.xadd(&st2, vec![("x".into(), b"1".to_vec())], None);
        writer.commit(&t).await.unwrap();
    });
    let started = std::time::Instant::now();
    let got = store.read_group(&st, "g", "c", 10, Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(4), "woke on the append, not the timeout");
    handle.await.unwrap();

    // A plain tail also sees new entries after a given id.
    let last = store.xlast_id(&st).await.unwrap();
    assert!(store.tail(&st, &last, 10, Duration::from_millis(50)).await.unwrap().is_empty());
    let writer = store.clone();
    let st2 = st.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut t = Txn::new();
        t.xadd(&st2, vec![("x".into(), b"2".to_vec())], None);
        writer.commit(&t).await.unwrap();
    });
    let got = store.tail(&st, &last, 10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].field("x"), Some(&b"2"[..]));
}

async fn leases_and_fences(store: Store) {
    let lease = k(&["lease", "H200"]);
    let counter = k(&["fence", "H200"]);
    let t1 = store.lease_acquire(&lease, &counter, Duration::from_secs(5)).await.unwrap().expect("free lease");
    assert!(store.lease_acquire(&lease, &counter, Duration::from_secs(5)).await.unwrap().is_none());
    assert!(!store.lease_release(&lease, t1 + 100).await.unwrap(), "only the holder releases");
    assert!(store.lease_renew(&lease, t1, Duration::from_secs(5)).await.unwrap());

    // A commit guarded by the lease works while it is held.
    let mut t = Txn::new();
    t.expect_lease(&lease, t1).put(k(&["guarded"]), b"1".to_vec());
    store.commit(&t).await.unwrap();

    assert!(store.lease_release(&lease, t1).await.unwrap());
    let mut t = Txn::new();
    t.expect_lease(&lease, t1).put(k(&["guarded"]), b"2".to_vec());
    assert!(matches!(store.commit(&t).await, Err(CommitError::LeaseLost { .. })));

    // Tokens only grow.
    let t2 = store.lease_acquire(&lease, &counter, Duration::from_millis(100)).await.unwrap().expect("free again");
    assert!(t2 > t1);
    // An expired lease can be taken by someone else.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(!store.lease_renew(&lease, t2, Duration::from_secs(1)).await.unwrap());
    let t3 = store.lease_acquire(&lease, &counter, Duration::from_secs(5)).await.unwrap().expect("expired");
    assert!(t3 > t2);

    // Fences: newer tokens pass and are remembered; older ones are refused.
    let fence = k(&["fence-seen", "H200"]);
    let mut t = Txn::new();
    t.fence(&fence, t3).put(k(&["f"]), b"new".to_vec());
    store.commit(&t).await.unwrap();
    let mut t = Txn::new();
    t.fence(&fence, t3).put(k(&["f"]), b"same".to_vec());
    store.commit(&t).await.unwrap();
    let mut t = Txn::new();
    t.fence(&fence, t2).put(k(&["f"]), b"stale".to_vec());
    assert!(matches!(store.commit(&t).await, Err(CommitError::Fenced { .. })));
    let rec = store.get(&[k(&["f"])]).await.unwrap().remove(0).unwrap();
    assert_eq!(rec.data, b"same");
}

async fn audit_chain_links_every_entry(store: Store) {
    let chain = AuditChain::of(S);
    let entries: Vec<Vec<u8>> = vec![b"first".to_vec(), b"second".to_vec(), (0u8..200).collect()];
    let mut expected_prev = AUDIT_GENESIS.to_string();
    // Unlinked entries are refused by the backend.
    let mut t = Txn::new();
    t.audit(&chain, b"unlinked".to_vec());
    assert!(store.commit(&t).await.is_err());
    for (i, e) in entries.iter().enumerate() {
        let mut t = Txn::new();
        t.audit(&chain, e.clone()).put(k(&["subject", &i.to_string()]), b"x".to_vec());
        let (seq, hash) = chain.head(&store).await.unwrap();
        assert_eq!((seq, hash.as_str()), (i as u64, expected_prev.as_str()));
        t.link_audit(&[(chain.clone(), seq, hash)]);
        let c = store.commit(&t).await.unwrap();
        let expected = audit_link(&expected_prev, &sha256_hex(e)).unwrap();
        assert_eq!(c.audit, vec![(i as u64 + 1, expected.clone())]);
        expected_prev = expected;
    }
    let stored = store.xrange(&chain.stream, None, 100).await.unwrap();
    assert_eq!(stored.len(), 3);
    let mut prev = AUDIT_GENESIS.to_string();
    for (i, s) in stored.iter().enumerate() {
        assert_eq!(s.field("seq").unwrap(), (i + 1).to_string().as_bytes());
        assert_eq!(s.field("prev").unwrap(), prev.as_bytes());
        assert_eq!(s.field("entry").unwrap(), entries[i].as_slice());
        let hash = std::str::from_utf8(s.field("hash").unwrap()).unwrap().to_string();
        assert_eq!(hash, audit_link(&prev, &sha256_hex(&entries[i])).unwrap());
        prev = hash;
    }
    // The head reads as a record: version = sequence, data = hash.
    let head = store.get(std::slice::from_ref(&chain.head)).await.unwrap().remove(0).unwrap();
    assert_eq!(head.version, 3);
    assert_eq!(head.data, prev.as_bytes());

    // An entry linked against a head that moved on is refused (nothing half-applied), so two writers
    // can never fork the chain.
    let mut stale = Txn::new();
    stale.audit(&chain, b"late".to_vec()).put(k(&["late"]), b"x".to_vec());
    stale.link_audit(&[(chain.clone(), 2, "0".repeat(64))]);
    assert!(matches!(store.commit(&stale).await, Err(CommitError::Conflict { .. })));
    assert!(store.get(&[k(&["late"])]).await.unwrap()[0].is_none());
    assert_eq!(store.xlen(&chain.stream).await.unwrap(), 3);
}

/// Archived audit entries leave the stream exactly up to an id, with the record saying how far, in
/// one transaction; later entries, the head and appends after the trim are untouched.
async fn streams_trim_exactly_before_an_id(store: Store) {
    let chain = AuditChain::of(S);
    assert_eq!(chipgate_state::key_slot(&chain.archived_key()), chipgate_state::key_slot(&chain.stream));
    assert_eq!(chipgate_state::key_slot(&chain.archive_lease_key()), chipgate_state::key_slot(&chain.stream));
    for i in 0..5u8 {
        let mut t = Txn::new();
        t.audit(&chain, vec![i]);
        let (seq, hash) = chain.head(&store).await.unwrap();
        t.link_audit(&[(chain.clone(), seq, hash)]);
        store.commit(&t).await.unwrap();
    }
    let all = store.xrange(&chain.stream, None, 100).await.unwrap();
    let mut t = Txn::new();
    t.xtrim_before(&chain.stream, &all[3].id).put(chain.archived_key(), b"3".to_vec());
    store.commit(&t).await.unwrap();
    let left = store.xrange(&chain.stream, None, 100).await.unwrap();
    assert_eq!(left, all[3..].to_vec());
    assert_eq!(chain.head(&store).await.unwrap().0, 5);
    // An id past the last entry empties the stream; appending goes on with the head.
    let (ms, n) = chipgate_state::parse_stream_id(&all[4].id).unwrap();
    let mut t = Txn::new();
    t.xtrim_before(&chain.stream, format!("{ms}-{}", n + 1));
    store.commit(&t).await.unwrap();
    assert_eq!(store.xlen(&chain.stream).await.unwrap(), 0);
    let mut t = Txn::new();
    t.audit(&chain, vec![9]);
    let (seq, hash) = chain.head(&store).await.unwrap();
    t.link_audit(&[(chain.clone(), seq, hash)]);
    assert_eq!(store.commit(&t).await.unwrap().audit[0].0, 6);
    assert_eq!(store.xlen(&chain.stream).await.unwrap(), 1);
    // A malformed id is refused and changes nothing.
    let mut bad = Txn::new();
    bad.put(k(&["untouched"]), b"x".to_vec()).xtrim_before(&chain.stream, "not-an-id");
    assert!(store.commit(&bad).await.is_err());
    assert!(store.get(&[k(&["untouched"])]).await.unwrap()[0].is_none());
}

async fn optimistic_increments_lose_nothing_under_concurrency(store: Store) {
    let key = k(&["counter"]);
    let tasks = 8;
    let per_task = 25;
    let retries = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let store = store.clone();
        let key = key.clone();
        let retries = retries.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                loop {
                    let cur = store.get(std::slice::from_ref(&key)).await.unwrap().remove(0);
                    let (ver, n) = match cur {
                        Some(r) => (r.version, String::from_utf8(r.data).unwrap().parse::<u64>().unwrap()),
                        None => (0, 0),
                    };
                    let mut t = Txn::new();
                    t.replace(&key, ver, (n + 1).to_string().into_bytes());
                    match store.commit(&t).await {
                        Ok(_) => break,
                        Err(CommitError::Conflict { .. }) => {
                            retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let rec = store.get(std::slice::from_ref(&key)).await.unwrap().remove(0).unwrap();
    assert_eq!(String::from_utf8(rec.data).unwrap(), (tasks * per_task).to_string());
    assert_eq!(rec.version, (tasks * per_task) as u64);
}

/// Many sorted-set writes in one transaction (Redis runs runs of them as one call) end as they would
/// one by one: the last write of a member wins, writes to other keys in between change nothing of
/// that, a snapshot or a delete in the middle sees exactly the writes before it, and batches far
/// larger than one call's argument limit all land.
async fn sorted_set_writes_in_one_transaction_apply_in_order(store: Store) {
    let (a, b, snap) = (k(&["many", "a"]), k(&["many", "b"]), k(&["many", "snap"]));
    let mut t = Txn::new();
    t.zadd(&a, "x", 1.0).zadd(&b, "x", 5.0).zrem(&a, "x").zadd(&a, "y", 2.0).zadd(&a, "x", 3.0);
    t.zadd(&b, "gone", 1.0).zrem(&b, "gone").zadd(&b, "gone", 2.0).zrem(&b, "gone");
    // The snapshot sees a and b as they stand here; the writes after it don't reach it.
    t.zunionstore(&snap, vec![a.clone(), b.clone()]);
    t.zadd(&a, "late", 9.0).zrem(&a, "y");
    store.commit(&t).await.unwrap();
    assert_eq!(store.zrange(&a, 0, -1, false).await.unwrap(), vec![("x".into(), 3.0), ("late".into(), 9.0)]);
    assert_eq!(store.zrange(&b, 0, -1, false).await.unwrap(), vec![("x".into(), 5.0)]);
    assert_eq!(
        store.zrange(&snap, 0, -1, false).await.unwrap(),
        vec![("y".into(), 2.0), ("x".into(), 8.0)],
        "x is in both (3 + 5), y was still there, late was not yet"
    );
    // A delete in the middle clears the writes before it only.
    let mut t = Txn::new();
    t.zadd(&a, "before", 1.0).delete(&a).zadd(&a, "after", 1.0);
    store.commit(&t).await.unwrap();
    assert_eq!(store.zrange(&a, 0, -1, false).await.unwrap(), vec![("after".into(), 1.0)]);
    // 5,000 members in, every other one out again: larger than one call takes.
    let big = k(&["many", "big"]);
    let mut t = Txn::new();
    for i in 0..5_000u32 {
        t.zadd(&big, format!("m{i:05}"), f64::from(i));
    }
    store.commit(&t).await.unwrap();
    let mut t = Txn::new();
    for i in (0..5_000u32).step_by(2) {
        t.zrem(&big, format!("m{i:05}"));
    }
    store.commit(&t).await.unwrap();
    assert_eq!(store.zcard(&big).await.unwrap(), 2_500);
    assert_eq!(store.zrange(&big, 0, 0, false).await.unwrap(), vec![("m00001".into(), 1.0)]);
    assert_eq!(store.zrange(&big, 0, 0, true).await.unwrap(), vec![("m04999".into(), 4_999.0)]);
}

async fn hashes_move_in_one_step_under_a_lease(store: Store) {
    let (from, to) = (k(&["dirty", "H200"]), k(&["working", "H200"]));
    let lease = k(&["lease", "H200"]);
    let token =
        store.lease_acquire(&lease, &k(&["fence", "H200"]), Duration::from_secs(5)).await.unwrap().expect("free");
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, Vec<u8>)> {
        v.iter().map(|(f, x)| (f.to_string(), x.as_bytes().to_vec())).collect()
    };
    let mut t = Txn::new();
    t.hset(&from, "a", b"1".to_vec()).hset(&from, "b", b"2".to_vec());
    t.hset(&to, "b", b"old".to_vec()).hset(&to, "c", b"3".to_vec()).hset(&to, "d", b"4".to_vec());
    store.commit(&t).await.unwrap();

    // Forgotten fields go first, then the source's fields move in (its value wins) and it is gone.
    let forget = vec!["c".to_string(), "absent".to_string()];
    let got = store.hash_move(&from, &to, &forget, &lease, token).await.unwrap();
    assert_eq!(got, Some(HashMoved { kept: 2, fields: pairs(&[("a", "1"), ("b", "2"), ("d", "4")]) }));
    assert_eq!(store.hgetall(&from).await.unwrap(), vec![]);
    assert_eq!(store.hgetall(&to).await.unwrap(), pairs(&[("a", "1"), ("b", "2"), ("d", "4")]));

    // A field forgotten and set again in the source since comes back with its new value.
    let mut t = Txn::new();
    t.hset(&from, "a", b"again".to_vec());
    store.commit(&t).await.unwrap();
    let got = store.hash_move(&from, &to, &["a".to_string(), "b".to_string()], &lease, token).await.unwrap();
    assert_eq!(got, Some(HashMoved { kept: 1, fields: pairs(&[("a", "again"), ("d", "4")]) }));

    // Without the lease nothing changes.
    let mut t = Txn::new();
    t.hset(&from, "e", b"5".to_vec());
    store.commit(&t).await.unwrap();
    assert_eq!(store.hash_move(&from, &to, &["d".to_string()], &lease, token + 1).await.unwrap(), None);
    assert_eq!(store.hgetall(&from).await.unwrap(), pairs(&[("e", "5")]));
    assert_eq!(store.hgetall(&to).await.unwrap(), pairs(&[("a", "again"), ("d", "4")]));

    // Forgotten first, then moved in: a field both forgotten and in the source stays.
    let everything: Vec<String> = ["a", "d", "e"].iter().map(|f| f.to_string()).collect();
    let got = store.hash_move(&from, &to, &everything, &lease, token).await.unwrap();
    assert_eq!(got, Some(HashMoved { kept: 0, fields: pairs(&[("e", "5")]) }));
    // Forgetting everything with nothing to move leaves no hash.
    let got = store.hash_move(&from, &to, &everything, &lease, token).await.unwrap();
    assert_eq!(got, Some(HashMoved::default()));
    assert_eq!(store.hgetall(&to).await.unwrap(), vec![]);

    // Thousands of fields each way (over the script's chunk of 4,000 values).
    let mut t = Txn::new();
    for i in 0..5_000u32 {
        t.hset(&from, format!("f{i:05}"), b"x".to_vec());
    }
    store.commit(&t).await.unwrap();
    let got = store.hash_move(&from, &to, &[], &lease, token).await.unwrap().expect("held");
    assert_eq!((got.kept, got.fields.len()), (0, 5_000));
    let forget: Vec<String> = (0..4_500u32).map(|i| format!("f{i:05}")).collect();
    let got = store.hash_move(&from, &to, &forget, &lease, token).await.unwrap().expect("held");
    assert_eq!((got.kept, got.fields.len()), (500, 500));
    assert_eq!(got.fields[0].0, "f04500");
}

/// A record and then a set, read in one step: never a set older than the record (a writer that adds
/// a member and moves the record in one commit is seen in the set whenever its version is), whether
/// the two share a slot or not. Across slots the two reads are apart, and reading them the other
/// way round fails here; in one slot Redis runs one connection's pipeline in order, and the race a
/// reversed pipeline would open is too narrow for this to see.
async fn a_record_then_a_set_are_read_in_that_order(store: Store) {
    let unit = S.partition("p1");
    let pairs = [(unit.key(["epoch"]), unit.key(["members"])), (k(&["epoch"]), S.partition("p2").key(["members"]))];
    for (key, set) in pairs {
        assert_eq!(store.get_then_members(&key, &set).await.unwrap(), (None, vec![]));
        let writer = {
            let (store, key, set) = (store.clone(), key.clone(), set.clone());
            tokio::spawn(async move {
                for v in 0..60u64 {
                    // One commit in one slot; across slots the member lands first.
                    let mut t = Txn::new();
                    t.sadd(&set, format!("m{v:03}"));
                    if chipgate_state::key_slot(&key) != chipgate_state::key_slot(&set) {
                        store.commit(&t).await.unwrap();
                        t = Txn::new();
                    }
                    t.replace(&key, v, v.to_string().into_bytes());
                    store.commit(&t).await.unwrap();
                }
            })
        };
        let mut reads = 0;
        loop {
            let done = writer.is_finished();
            let (record, members) = store.get_then_members(&key, &set).await.unwrap();
            let version = record.map_or(0, |r| r.version);
            assert!(
                members.len() as u64 >= version,
                "{key}: version {version} read with only {} members",
                members.len()
            );
            assert!(members.windows(2).all(|w| w[0] < w[1]), "sorted");
            reads += 1;
            if done {
                break;
            }
        }
        writer.await.unwrap();
        let (record, members) = store.get_then_members(&key, &set).await.unwrap();
        assert_eq!((record.map(|r| r.version), members.len()), (Some(60), 60), "after {reads} reads");
    }
}

/// A transaction committed without a receipt must create a record under a must-not-exist guard
/// (what makes a re-sent copy of it conflict instead of applying twice); one that doesn't is refused
/// before anything applies, by every backend. One that does commits once: again, it conflicts on
/// that record.
async fn receipt_free_commits_must_create_a_guarded_record(store: Store) {
    let rec = k(&["free", "rec"]);
    let tally = k(&["free", "tally"]);
    let refused = |r: Result<chipgate_state::Committed, CommitError>| match r {
        Err(CommitError::State(StateError::Backend(m))) => assert!(m.contains("without a receipt"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    };
    // No guard at all.
    let mut t = Txn::new();
    t.hincr(&tally, "n", 1).put(&rec, b"x".to_vec()).without_receipt();
    refused(store.commit(&t).await);
    // A must-not-exist guard on a key it doesn't create.
    let mut t = Txn::new();
    t.expect_version(k(&["free", "other"]), 0).hincr(&tally, "n", 1).without_receipt();
    refused(store.commit(&t).await);
    // A replace of a record that exists already (a re-sent copy would find its own write).
    let mut t = Txn::new();
    t.replace(&rec, 3, b"x".to_vec()).without_receipt();
    refused(store.commit(&t).await);
    assert_eq!(store.hgetall(&tally).await.unwrap(), vec![], "a refused transaction changes nothing");

    let mut t = Txn::new();
    t.replace(&rec, 0, b"one".to_vec()).hincr(&tally, "n", 1).without_receipt();
    assert!(t.is_receipt_free());
    store.commit(&t).await.unwrap();
    match store.commit(&t).await {
        Err(CommitError::Conflict { key }) => assert_eq!(key, rec),
        other => panic!("committed again, it must conflict on the record it created, got {other:?}"),
    }
    assert_eq!(store.hgetall(&tally).await.unwrap(), vec![("n".to_string(), b"1".to_vec())]);
}

/// Unix milliseconds now.
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Hash fields set under a must-be-absent guard: the guard holds once per field (a second write of
/// the field conflicts on the hash, whatever else the transaction does), fields are read back by
/// `hget_each` in the order asked (absent: None), and the whole hash goes at its expiry. Such a
/// transaction may go without a receipt; one whose guarded field it doesn't set may not.
async fn hash_fields_guarded_absent_expire_with_their_hash(store: Store) {
    let h = k(&["hf", "bucket"]);
    let tally = k(&["hf", "tally"]);
    let later = unix_ms() + 60_000;
    let mut t = Txn::new();
    t.expect_no_field(&h, "a").hset_expire_at(&h, "a", b"one".to_vec(), later).hincr(&tally, "n", 1);
    t.without_receipt();
    store.commit(&t).await.unwrap();
    match store.commit(&t).await {
        Err(CommitError::Conflict { key }) => assert_eq!(key, h),
        other => panic!("the field exists: expected a conflict, got {other:?}"),
    }
    let mut t = Txn::new();
    t.expect_no_field(&h, "b").hset_expire_at(&h, "b", b"two".to_vec(), later);
    store.commit(&t).await.unwrap();
    let asked = [(h.clone(), "b".to_string()), (h.clone(), "c".to_string()), (h.clone(), "a".to_string())];
    assert_eq!(store.hget_each(&asked).await.unwrap(), vec![Some(b"two".to_vec()), None, Some(b"one".to_vec())]);
    assert_eq!(store.hgetall(&tally).await.unwrap(), vec![("n".to_string(), b"1".to_vec())], "applied once");
    assert_eq!(store.hget_each(&[]).await.unwrap(), Vec::<Option<Vec<u8>>>::new());

    // A guard on a field the transaction doesn't set: no receipt-free commit.
    let mut t = Txn::new();
    t.expect_no_field(&h, "d").hset(&h, "e", b"x".to_vec()).without_receipt();
    match store.commit(&t).await {
        Err(CommitError::State(StateError::Backend(m))) => assert!(m.contains("without a receipt"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Expiry: the whole hash, every field, at the time given.
    let soon = k(&["hf", "soon"]);
    let mut t = Txn::new();
    t.hset_expire_at(&soon, "x", b"1".to_vec(), unix_ms() + 300).hset(&soon, "y", b"2".to_vec());
    store.commit(&t).await.unwrap();
    assert_eq!(store.hgetall(&soon).await.unwrap().len(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gone = [(soon.clone(), "x".to_string()), (soon.clone(), "y".to_string())];
    assert_eq!(store.hget_each(&gone).await.unwrap(), vec![None, None]);
    assert_eq!(store.hgetall(&soon).await.unwrap(), vec![]);
    // Once it has expired, the field may be created again.
    let mut t = Txn::new();
    t.expect_no_field(&soon, "x").hset_expire_at(&soon, "x", b"3".to_vec(), later);
    store.commit(&t).await.unwrap();
    // An expiry already past removes the hash at once.
    let mut t = Txn::new();
    t.hset_expire_at(&soon, "z", b"4".to_vec(), unix_ms() - 1);
    store.commit(&t).await.unwrap();
    assert_eq!(store.hgetall(&soon).await.unwrap(), vec![]);
}

/// Records kept as hash fields (`Txn::replace_field`): created under a version-0 guard, read back
/// with their version (`hget_each`, `Record::from_stored`), replaced only at the version read, and
/// removed under a version guard; a failed guard changes nothing in the transaction, and a field
/// that isn't a record fails every version guard. Runs of one hash's fields and fields of
/// several hashes are read back in the order asked.
async fn records_as_hash_fields_are_versioned_and_guarded(store: Store) {
    let (h, other, tally) = (k(&["rf", "bucket", "0"]), k(&["rf", "bucket", "1"]), k(&["rf", "tally"]));
    let read = |fields: &[(&String, &str)]| {
        let asked: Vec<(String, String)> = fields.iter().map(|(k, f)| (k.to_string(), f.to_string())).collect();
        let store = store.clone();
        async move {
            store
                .hget_each(&asked)
                .await
                .unwrap()
                .into_iter()
                .map(|v| v.and_then(Record::from_stored))
                .collect::<Vec<_>>()
        }
    };
    let rec = |version: u64, data: &[u8]| Some(Record { version, data: data.to_vec() });

    let mut t = Txn::new();
    t.replace_field(&h, "7", 0, b"first").replace_field(&other, "7", 0, b"elsewhere").hincr(&tally, "n", 1);
    store.commit(&t).await.unwrap();
    assert_eq!(read(&[(&h, "7"), (&other, "7"), (&h, "8")]).await, vec![rec(1, b"first"), rec(1, b"elsewhere"), None]);

    // Created again from "absent": a conflict on the hash, and nothing else in it applies.
    match store.commit(&t).await {
        Err(CommitError::Conflict { key }) => assert!(key == h || key == other, "{key}"),
        other => panic!("the field exists: expected a conflict, got {other:?}"),
    }
    assert_eq!(store.hgetall(&tally).await.unwrap(), vec![("n".to_string(), b"1".to_vec())]);

    // Replaced at the version read; a writer still holding version 1 then conflicts.
    let mut t = Txn::new();
    t.replace_field(&h, "7", 1, b"second").replace_field(&h, "8", 0, b"new");
    store.commit(&t).await.unwrap();
    let mut stale = Txn::new();
    stale.replace_field(&h, "7", 1, b"lost update").hincr(&tally, "n", 1);
    match store.commit(&stale).await {
        Err(CommitError::Conflict { key }) => assert_eq!(key, h),
        other => panic!("a stale version: expected a conflict, got {other:?}"),
    }
    assert_eq!(read(&[(&h, "8"), (&h, "7")]).await, vec![rec(1, b"new"), rec(2, b"second")]);
    assert_eq!(store.hgetall(&tally).await.unwrap(), vec![("n".to_string(), b"1".to_vec())]);

    // Many fields of one hash in one transaction (the Redis script checks them with one read and
    // writes them with one command): one stale field among them fails the whole, nothing written;
    // with every version as read, every field is written.
    let run: Vec<String> = (10..30).map(|n| n.to_string()).collect();
    let mut t = Txn::new();
    for f in &run {
        t.replace_field(&h, f, 0, f.as_bytes());
    }
    store.commit(&t).await.unwrap();
    let each = |data: &'static [u8], stale_at: Option<usize>| {
        let mut t = Txn::new();
        for (i, f) in run.iter().enumerate() {
            t.replace_field(&h, f, if Some(i) == stale_at { 2 } else { 1 }, data);
        }
        t.hincr(&tally, "n", 1);
        t
    };
    for stale_at in [0, 13, 19] {
        match store.commit(&each(b"lost", Some(stale_at))).await {
            Err(CommitError::Conflict { key }) => assert_eq!(key, h),
            other => panic!("field {stale_at} stale: expected a conflict, got {other:?}"),
        }
    }
    let asked: Vec<(&String, &str)> = run.iter().map(|f| (&h, f.as_str())).collect();
    let first: Vec<_> = run.iter().map(|f| rec(1, f.as_bytes())).collect();
    assert_eq!(read(&asked).await, first);
    store.commit(&each(b"run", None)).await.unwrap();
    assert_eq!(read(&asked).await, vec![rec(2, b"run"); run.len()]);
    assert_eq!(store.hgetall(&tally).await.unwrap(), vec![("n".to_string(), b"2".to_vec())]);

    // Runs longer than one script call takes at once (4,000 arguments) are split without losing a
    // field or pairing a field with another's value.
    let big = k(&["rf", "big"]);
    let many: Vec<String> = (0..4_500).map(|n| format!("f{n}")).collect();
    let mut t = Txn::new();
    for f in &many {
        t.replace_field(&big, f, 0, f.as_bytes());
    }
    store.commit(&t).await.unwrap();
    let mut t = Txn::new();
    for f in &many {
        t.replace_field(&big, f, 1, f.as_bytes());
    }
    t.expect_field_version(&big, &many[4_499], 0);
    assert!(matches!(store.commit(&t).await, Err(CommitError::Conflict { .. })), "the last of 4,501 guards fails");
    let all = store.hgetall(&big).await.unwrap();
    assert_eq!(all.len(), many.len());
    assert!(all.iter().all(|(f, v)| Record::from_stored(v.clone()) == rec(1, f.as_bytes())), "every field its own");

    // Versions compare whole: 2 is not 20, 12 or 0.
    for wrong in [0, 12, 20] {
        let mut t = Txn::new();
        t.expect_field_version(&h, "7", wrong).hincr(&tally, "n", 1);
        assert!(matches!(store.commit(&t).await, Err(CommitError::Conflict { .. })), "version {wrong}");
    }

    // Removed under its version; then it is absent again (version 0), and may be created anew.
    let mut t = Txn::new();
    t.expect_field_version(&h, "7", 2).hdel(&h, "7");
    store.commit(&t).await.unwrap();
    assert_eq!(read(&[(&h, "7")]).await, vec![None]);
    let mut t = Txn::new();
    t.replace_field(&h, "7", 0, b"again");
    store.commit(&t).await.unwrap();
    assert_eq!(read(&[(&h, "7")]).await, vec![rec(1, b"again")]);

    // A field that isn't a record fails every version guard, 0 included.
    let mut t = Txn::new();
    t.hset(&h, "plain", b"no version".to_vec());
    store.commit(&t).await.unwrap();
    for v in [0, 1] {
        let mut t = Txn::new();
        t.replace_field(&h, "plain", v, b"x");
        assert!(matches!(store.commit(&t).await, Err(CommitError::Conflict { .. })), "version {v}");
    }
}

/// Guards that records are absent, one after another (a batch creating or assuming absent hundreds
/// of records), hold only when every one of them does; the conflict names the first present one in
/// the transaction's order, and nothing applies. Longer runs than one script call takes still check
/// every key.
async fn runs_of_records_guarded_absent_fail_on_their_first_present_one(store: Store) {
    let present = |name: &str| {
        let store = store.clone();
        let key = k(&["abs", name]);
        async move {
            let mut t = Txn::new();
            t.put(&key, b"here".to_vec());
            store.commit(&t).await.unwrap();
            key
        }
    };
    let p = present("p").await;
    let q = present("q").await;
    let z = k(&["abs", "z"]);
    for (run, first) in [(vec!["a", "b", "p", "c", "q"], &p), (vec!["q", "a", "p"], &q)] {
        let mut t = Txn::new();
        t.expect_version(k(&["abs", "other"]), 0);
        for name in &run {
            t.expect_version(k(&["abs", name]), 0);
        }
        t.zadd(&z, "m", 1.0);
        match store.commit(&t).await {
            Err(CommitError::Conflict { key }) => assert_eq!(&key, first, "{run:?}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(store.zcard(&z).await.unwrap(), 0, "a failed transaction must change nothing");
    }

    // 4,500 records created under absence guards, one of them (far into the run) present.
    let n = 4_500;
    let key = |i: usize| k(&["abs", "many", &i.to_string()]);
    let late = {
        let mut t = Txn::new();
        t.put(key(4_200), b"here".to_vec());
        store.commit(&t).await.unwrap();
        key(4_200)
    };
    let mut t = Txn::new();
    for i in 0..n {
        t.replace(key(i), 0, i.to_string().into_bytes());
    }
    match store.commit(&t).await {
        Err(CommitError::Conflict { key }) => assert_eq!(key, late),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.get(&[key(0), key(4_199)]).await.unwrap(), vec![None, None], "nothing created");
    // Without it, every one is created, each with its own value.
    let mut t = Txn::new();
    t.delete(&late);
    store.commit(&t).await.unwrap();
    let mut t = Txn::new();
    for i in 0..n {
        t.replace(key(i), 0, i.to_string().into_bytes());
    }
    store.commit(&t).await.unwrap();
    let got = store.get(&[key(0), key(4_200), key(n - 1)]).await.unwrap();
    let got: Vec<(u64, Vec<u8>)> = got.into_iter().map(|r| r.map(|r| (r.version, r.data)).unwrap()).collect();
    assert_eq!(got, vec![(1, b"0".to_vec()), (1, b"4200".to_vec()), (1, (n - 1).to_string().into_bytes())]);
}

backend_tests!(
    runs_of_records_guarded_absent_fail_on_their_first_present_one,
    records_as_hash_fields_are_versioned_and_guarded,
    hash_fields_guarded_absent_expire_with_their_hash,
    sorted_set_writes_in_one_transaction_apply_in_order,
    sorted_sets_snapshot_into_one,
    sorted_sets_copied_in_pages,
    removals_stamp_only_when_something_left,
    records_are_versioned_and_guarded,
    version_guards_compare_whole_versions,
    record_writes_in_one_transaction_apply_in_order,
    records_with_ttl_expire,
    sorted_sets_order_by_score_then_member,
    hashes_sets_and_counters,
    a_record_then_a_set_are_read_in_that_order,
    streams_append_in_transactions,
    consumer_groups_deliver_once_and_reclaim,
    a_missing_group_says_so,
    blocking_reads_wake_on_append,
    leases_and_fences,
    hashes_move_in_one_step_under_a_lease,
    audit_chain_links_every_entry,
    streams_trim_exactly_before_an_id,
    optimistic_increments_lose_nothing_under_concurrency,
    receipt_free_commits_must_create_a_guarded_record,
);
