//! Retry-safe mutations.
//!
//! A mutating call stores its answer under `(method, caller, request_id)` together with a fingerprint
//! of the request, in the *same atomic commit* as its effect. A retry with the same request id finds the
//! stored answer and gets it back unchanged; the same request id with a different request is refused
//! with INVALID_ARGUMENT. Two concurrent calls with one request id can't both apply: the record is
//! written with a "must not exist" guard, so the loser's commit conflicts and it replays the winner's
//! answer.
//!
//! Request ids belong to an **account**, like Stripe's idempotency keys: two accounts that happen to
//! pick the same id (`order-1`) get two independent calls, and no account can replay or even detect
//! another's. The account is the same with and without authentication wherever the call shows one
//! (see [`crate::edge::identity`]): a buyer's — named in the request where the policy table reads a
//! buyer field (PlaceOrder, SubmitApplication, ...), or by the buyer's token otherwise — is that
//! buyer (whichever of its tokens it uses, so a retry with a renewed token still replays); every
//! other call shares one account: the authorities, customs and the vendor (each mutating RPC
//! admits one of them, and the key includes the method), the services' own calls (so a replica
//! finishing a dead one's work replays its answers), and, without authentication, every call that
//! names no buyer (there is one anonymous caller). The edge runs each call inside [`ACCOUNT`].

use std::time::Duration;

use chipgate_state::{Backend, CommitError, Partition, Space, Store, Txn};
use prost::Message;
use tonic::Status;

use crate::errors;
use crate::time::now_ms;

tokio::task_local! {
    /// The account of the call being handled (set by the edge around the handler; None: the shared
    /// account).
    pub static ACCOUNT: Option<String>;
}

/// How long answers are kept for replay by default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// The idempotency records of one service.
#[derive(Clone, Copy, Debug)]
pub struct Idempotency {
    space: Space,
    ttl: Duration,
}

/// SHA-256 of a request's encoding: what tells a retry (the same request) from a different request
/// under the same request id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Its lower-case hex text (64 characters), as records written before compact ones kept it.
    pub fn hex(&self) -> String {
        chipgate_state::to_hex(&self.0)
    }

    /// The part a compact record keeps.
    fn compact(&self) -> &[u8] {
        &self.0[..FP_BYTES]
    }
}

/// The [`Fingerprint`] of a request.
pub fn fingerprint<M: Message>(msg: &M) -> Fingerprint {
    Fingerprint(chipgate_state::sha256(&msg.encode_to_vec()))
}

impl Idempotency {
    /// Records in `space`, kept for `ttl`.
    pub const fn new(space: Space, ttl: Duration) -> Self {
        Idempotency { space, ttl }
    }

    /// The key a call's record had before records moved into period hashes (scoped to the current
    /// [`ACCOUNT`], if any), in the space's own slot. Still read and guarded: see [`Self::key_in`].
    pub fn key(&self, method: &str, request_id: &str) -> String {
        self.key_in(None, method, request_id)
    }

    /// The key a call's record had before records moved into period hashes, in `partition` (the
    /// partition its effect commits in, so the answer and the effect stay one transaction in one
    /// hash slot) or in the space's own slot. Records written there by an earlier version live out
    /// their TTL after an upgrade, so lookups still read the key and new records are guarded on its
    /// absence; a later version can drop both once every such record has expired.
    pub fn key_in(&self, partition: Option<&Partition>, method: &str, request_id: &str) -> String {
        self.scoped_key(partition, "idem", method, request_id)
    }

    /// The hash that keeps the records of `method` (for the current [`ACCOUNT`]) written in
    /// `period`, in `partition` or the space's own slot. Its fields are request ids.
    pub fn period_key(&self, partition: Option<&Partition>, method: &str, period: u64) -> String {
        self.scoped_key(partition, "idh", method, &period.to_string())
    }

    /// `family:method[:account]:last`, in `partition` or the space's own slot; the account (the
    /// current [`ACCOUNT`]) is length-prefixed, so no (account, last) pair can spell another's key.
    fn scoped_key(&self, partition: Option<&Partition>, family: &str, method: &str, last: &str) -> String {
        let scoped = ACCOUNT.try_with(Clone::clone).ok().flatten().map(|a| format!("@{}:{a}", a.len()));
        let mut parts = vec![family, method];
        if let Some(s) = &scoped {
            parts.push(s);
        }
        parts.push(last);
        match partition {
            Some(p) => p.key(parts),
            None => self.space.key(parts),
        }
    }

    /// The length of a period in ms: the TTL (a record is kept for one to two periods).
    fn period_ms(&self) -> u64 {
        (self.ttl.as_millis() as u64).max(1)
    }

    /// The period a record written now goes into (see [`period_key`](Self::period_key)).
    pub fn current_period(&self) -> u64 {
        now_ms() / self.period_ms()
    }

    /// The periods whose hashes may hold a live record at `now_ms`: the previous one (a record
    /// written then is younger than the TTL until the current period ends), the current one, and
    /// the next one within [`CLOCK_SKEW_MS`] of its start (a replica whose clock runs ahead may
    /// already write there).
    fn periods(&self, now_ms: u64) -> Vec<u64> {
        let len = self.period_ms();
        let p = now_ms / len;
        let mut out = Vec::with_capacity(3);
        if p > 0 {
            out.push(p - 1);
        }
        out.push(p);
        if (p + 1) * len - now_ms <= CLOCK_SKEW_MS {
            out.push(p + 1);
        }
        out
    }

    /// The stored answer of an earlier call with this request id, if any.
    ///
    /// # Errors
    /// INVALID_ARGUMENT when the earlier call had a different request; UNAVAILABLE/INTERNAL when the
    /// store fails.
    pub async fn lookup<R: Message + Default>(
        &self,
        store: &Store,
        partition: Option<&Partition>,
        method: &str,
        request_id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Option<R>, Status> {
        Ok(self.find(store, partition, method, request_id, fingerprint).await?.map(|(_, answer)| answer))
    }

    /// [`lookup`](Self::lookup) for a caller whose own commit conflicted on the record: the record
    /// is written again (the same bytes, where it is, its expiry unchanged) before its answer is
    /// returned. The call that stored it may not have answered yet, or never will (a commit re-sent
    /// after a reconnect finds its own first copy's record, see `Txn::without_receipt`), and only a
    /// write on the caller's own connection is followed by the replicas' acknowledgement (`WAIT`,
    /// see the state layer's durability) that covers the record: nothing is answered that a
    /// failover could lose.
    ///
    /// The write is unguarded: every writer of an existing record writes the bytes it read, so
    /// concurrent retries (a client sending one call eight times at once) can't undo each other,
    /// and none has to wait for another.
    ///
    /// # Errors
    /// As [`lookup`](Self::lookup).
    pub async fn lookup_durable<R: Message + Default>(
        &self,
        store: &Store,
        partition: Option<&Partition>,
        method: &str,
        request_id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Option<R>, Status> {
        let Some((found, answer)) = self.find(store, partition, method, request_id, fingerprint).await? else {
            return Ok(None);
        };
        let mut t = Txn::new();
        match found {
            Found::Period(period, data) => {
                let expires = (period + 2) * self.period_ms();
                t.hset_expire_at(self.period_key(partition, method, period), request_id, data, expires);
            }
            Found::Legacy(data) => {
                t.put_with_ttl(self.key_in(partition, method, request_id), data, self.ttl);
            }
        }
        match store.commit(&t).await {
            Ok(_) => Ok(Some(answer)),
            Err(CommitError::State(e)) => Err(errors::from_state(request_id, &e)),
            Err(e) => Err(errors::internal(request_id, e)),
        }
    }

    /// Where the record of this request id is, and its answer, checked against the request's
    /// fingerprint. The period hashes and the key of a record written before them are read at once.
    async fn find<R: Message + Default>(
        &self,
        store: &Store,
        partition: Option<&Partition>,
        method: &str,
        request_id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Option<(Found, R)>, Status> {
        let periods = self.periods(now_ms());
        let fields: Vec<(String, String)> =
            periods.iter().map(|p| (self.period_key(partition, method, *p), request_id.to_string())).collect();
        let legacy = [self.key_in(partition, method, request_id)];
        let (in_periods, old) = tokio::try_join!(store.hget_each(&fields), store.get(&legacy))
            .map_err(|e| errors::from_state(request_id, &e))?;
        let found = match periods.iter().zip(in_periods).find_map(|(p, v)| v.map(|v| (*p, v))) {
            Some((p, data)) => Found::Period(p, data),
            None => match old.into_iter().next().flatten() {
                Some(rec) => Found::Legacy(rec.data),
                None => return Ok(None),
            },
        };
        let data = match &found {
            Found::Period(_, d) | Found::Legacy(d) => d,
        };
        let Some((same, body)) = stored(data, fingerprint) else {
            return Err(errors::internal(request_id, format!("idempotency record of {request_id:?} is truncated")));
        };
        if !same {
            return Err(errors::invalid_argument(
                "request_id",
                format!(
                    "request_id {request_id:?} was already used for a different {method} request; use a new \
                     request_id for a new request"
                ),
            ));
        }
        let answer =
            R::decode(body).map_err(|e| errors::internal(request_id, format!("stored answer undecodable: {e}")))?;
        Ok(Some((found, answer)))
    }

    /// Adds the answer to `txn`, guarded so only one call with this request id can ever commit: a
    /// field of the current period's hash, guarded absent there, in the other periods a live record
    /// may be in, and under the key of a record written before period hashes.
    ///
    /// A record is a field of a hash per (partition, method, account, period of the TTL's length)
    /// rather than a key of its own: a small hash keeps its fields packed (Redis's listpack, up to
    /// 128 fields of up to 64 bytes), ≈ 75 bytes per record against ≈ 260 for a key with a TTL.
    /// A record longer than [`PACKED_VALUE_MAX`] keeps a key of its own.
    /// Redis 7.0 expires keys, not fields, so the whole hash expires at the end of the period after
    /// its own: every record is kept at least the TTL and at most twice it.
    pub fn record<R: Message>(
        &self,
        txn: &mut Txn,
        partition: Option<&Partition>,
        method: &str,
        request_id: &str,
        fingerprint: &Fingerprint,
        answer: &R,
    ) {
        let mut data = Vec::with_capacity(1 + FP_BYTES + answer.encoded_len());
        data.push(COMPACT);
        data.extend_from_slice(fingerprint.compact());
        answer.encode(&mut data).unwrap_or_default();
        let now = now_ms();
        let len = self.period_ms();
        let current = now / len;
        for p in self.periods(now) {
            txn.expect_no_field(self.period_key(partition, method, p), request_id);
        }
        let key = self.key_in(partition, method, request_id);
        if data.len() <= PACKED_VALUE_MAX {
            txn.expect_version(key, 0);
            txn.hset_expire_at(self.period_key(partition, method, current), request_id, data, (current + 2) * len);
        } else {
            // Too long to be packed: a field would cost as much as a key, and would make a hash of
            // many large answers, one key too big to move between Redis Cluster nodes quickly.
            txn.replace_with_ttl(key, 0, data, self.ttl);
        }
    }
}

/// Where a record was found: in a period's hash (which period), or under the key of a record
/// written before period hashes; with its bytes.
enum Found {
    Period(u64, Vec<u8>),
    Legacy(Vec<u8>),
}

/// The longest record kept as a field of its period's hash: Redis keeps a hash packed while every
/// value is at most `hash-max-listpack-value` bytes (64 by default). A longer answer (a batch's,
/// a wave's) gets a key of its own, as every record had before period hashes; both are read and
/// guarded alike.
const PACKED_VALUE_MAX: usize = 64;

/// How far the clocks of the services' replicas may disagree: a record written by a replica whose
/// clock runs this much ahead, in what it takes for the next period, is still found.
pub const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// First byte of a compact record; a record written before them starts with its fingerprint's hex
/// text, never a zero byte.
const COMPACT: u8 = 0;
/// Bytes of the fingerprint a compact record keeps: the first 128 bits of the SHA-256. They only
/// tell a retry (the same request) from a different request under the same id, which an honest
/// client can't hit by chance and a dishonest one could only do to its own request ids.
const FP_BYTES: usize = 16;
/// Bytes of a fingerprint in the records written before compact ones (its hex text).
const FP_HEX: usize = 64;

/// Whether a stored record was written for the request of `fingerprint`, and its answer's bytes:
/// compact records (a [`COMPACT`] byte, [`FP_BYTES`] of the fingerprint) and those written before
/// them (the fingerprint's [`FP_HEX`] hex characters), which live out their TTL after an upgrade.
/// None when the record is too short to be either.
fn stored<'a>(data: &'a [u8], fingerprint: &Fingerprint) -> Option<(bool, &'a [u8])> {
    if data.first() == Some(&COMPACT) {
        let fp = data.get(1..=FP_BYTES)?;
        return Some((fp == fingerprint.compact(), &data[1 + FP_BYTES..]));
    }
    let (fp, body) = (data.get(..FP_HEX)?, data.get(FP_HEX..)?);
    Some((fp == fingerprint.hex().as_bytes(), body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replays_and_refuses_mismatches() {
        let store = Store::memory();
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let req_a = prost_types::Duration { seconds: 1, nanos: 0 };
        let req_b = prost_types::Duration { seconds: 2, nanos: 0 };
        let answer = prost_types::Timestamp { seconds: 42, nanos: 0 };
        let fa = fingerprint(&req_a);
        assert!(idem.lookup::<prost_types::Timestamp>(&store, None, "M", "r1", &fa).await.expect("lookup").is_none());

        let mut t = Txn::new();
        idem.record(&mut t, None, "M", "r1", &fa, &answer);
        store.commit(&t).await.expect("first commit");
        // A second commit of the same request id conflicts: only one can apply.
        assert!(store.commit(&t).await.is_err());

        let replay = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "r1", &fa).await.expect("lookup");
        assert_eq!(replay, Some(answer));
        let err = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "r1", &fingerprint(&req_b)).await;
        assert_eq!(err.expect_err("mismatch").code(), tonic::Code::InvalidArgument);
        // Another method with the same request id is independent.
        assert!(idem.lookup::<prost_types::Timestamp>(&store, None, "N", "r1", &fa).await.expect("lookup").is_none());
    }

    /// The record of (method, request id) in the current period's hash.
    async fn in_period(store: &Store, idem: &Idempotency, method: &str, id: &str) -> Option<Vec<u8>> {
        let key = idem.period_key(None, method, idem.current_period());
        store.hget_each(&[(key, id.to_string())]).await.expect("hget").remove(0)
    }

    /// A record keeps 17 bytes of fingerprint (was 64) in its period's hash, and those written
    /// before under keys of their own (compact, or with the fingerprint's hex text) are still
    /// replayed, still refuse a different request, and still keep the request id from a new call.
    #[tokio::test]
    async fn records_are_compact_and_those_written_before_still_replay() {
        let store = Store::memory();
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let answer = prost_types::Timestamp { seconds: 42, nanos: 0 };
        let (fa, fb) = (
            fingerprint(&prost_types::Duration { seconds: 1, nanos: 0 }),
            fingerprint(&prost_types::Duration { seconds: 2, nanos: 0 }),
        );
        let mut t = Txn::new();
        idem.record(&mut t, None, "M", "new", &fa, &answer);
        store.commit(&t).await.expect("commit");
        let data = in_period(&store, &idem, "M", "new").await.expect("stored in the period's hash");
        assert_eq!(data.len(), 1 + FP_BYTES + answer.encoded_len());
        assert_eq!(store.get(&[idem.key("M", "new")]).await.expect("get"), vec![None], "no key of its own");
        // As earlier versions wrote them, under keys of their own: the hex fingerprint, then the
        // answer; and compact.
        let mut hex = fa.hex().into_bytes();
        answer.encode(&mut hex).expect("encode");
        let mut t = Txn::new();
        t.put(idem.key("M", "hex"), hex).put_with_ttl(idem.key("M", "keyed"), data, DEFAULT_TTL);
        store.commit(&t).await.expect("commit");
        for id in ["new", "hex", "keyed"] {
            let replay = idem.lookup::<prost_types::Timestamp>(&store, None, "M", id, &fa).await.expect("lookup");
            assert_eq!(replay, Some(answer), "{id}");
            let err = idem.lookup::<prost_types::Timestamp>(&store, None, "M", id, &fb).await;
            assert_eq!(err.expect_err("a different request").code(), tonic::Code::InvalidArgument, "{id}");
        }
        // A new call can't take a request id an earlier version's record holds.
        let mut t = Txn::new();
        idem.record(&mut t, None, "M", "keyed", &fa, &answer);
        assert!(matches!(store.commit(&t).await, Err(CommitError::Conflict { .. })));
        assert_eq!(in_period(&store, &idem, "M", "keyed").await, None);
        // Cut short: an error, not a replay of half an answer.
        let mut t = Txn::new();
        t.put(idem.key("M", "cut"), vec![COMPACT, 1, 2]);
        store.commit(&t).await.expect("commit");
        let err = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "cut", &fa).await;
        assert_eq!(err.expect_err("truncated").code(), tonic::Code::Internal);
    }

    /// An answer too long to be packed keeps a key of its own, and is replayed and guarded as well.
    #[tokio::test]
    async fn long_answers_keep_a_key_of_their_own() {
        let store = Store::memory();
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let long = prost_types::Any { type_url: "x".repeat(100), value: vec![] };
        let fa = fingerprint(&prost_types::Duration { seconds: 1, nanos: 0 });
        let mut t = Txn::new();
        idem.record(&mut t, None, "M", "big", &fa, &long);
        t.without_receipt();
        store.commit(&t).await.expect("commit");
        assert_eq!(in_period(&store, &idem, "M", "big").await, None);
        assert!(store.get(&[idem.key("M", "big")]).await.expect("get")[0].is_some(), "a key of its own");
        let replay = idem.lookup_durable::<prost_types::Any>(&store, None, "M", "big", &fa).await;
        assert_eq!(replay.expect("replay"), Some(long.clone()));
        let mut t = Txn::new();
        idem.record(&mut t, None, "M", "big", &fa, &long);
        assert!(matches!(store.commit(&t).await, Err(CommitError::Conflict { .. })));
    }

    /// The periods a record may be in: the previous and the current, and the next when it starts
    /// within the clock skew.
    #[test]
    fn records_are_looked_for_in_the_periods_they_may_be_in() {
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let len = DEFAULT_TTL.as_millis() as u64;
        assert_eq!(idem.periods(7 * len + len / 2), vec![6, 7]);
        assert_eq!(idem.periods(7 * len), vec![6, 7]);
        assert_eq!(idem.periods(8 * len - CLOCK_SKEW_MS - 1), vec![6, 7]);
        assert_eq!(idem.periods(8 * len - CLOCK_SKEW_MS), vec![6, 7, 8]);
        assert_eq!(idem.periods(8 * len - 1), vec![6, 7, 8]);
        assert_eq!(idem.periods(5), vec![0]);
    }

    /// A record written in the previous period (or by a replica whose clock is ahead, in the next)
    /// is found and keeps its request id from a new call; one two periods old has expired with its
    /// hash.
    #[tokio::test]
    async fn records_of_neighbouring_periods_count_and_older_ones_expire() {
        let store = Store::memory();
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let len = idem.period_ms();
        let answer = prost_types::Timestamp { seconds: 42, nanos: 0 };
        let fa = fingerprint(&prost_types::Duration { seconds: 1, nanos: 0 });
        let mut t = Txn::new();
        idem.record(&mut t, None, "M", "x", &fa, &answer);
        let data = in_period_data(&t);
        let now = idem.current_period();
        let mut t = Txn::new();
        t.hset_expire_at(idem.period_key(None, "M", now - 1), "yesterday", data.clone(), (now + 1) * len);
        t.hset_expire_at(idem.period_key(None, "M", now - 2), "older", data, now * len);
        store.commit(&t).await.expect("commit");
        let replay = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "yesterday", &fa).await;
        assert_eq!(replay.expect("lookup"), Some(answer));
        let mut t = Txn::new();
        idem.record(&mut t, None, "M", "yesterday", &fa, &answer);
        assert!(matches!(store.commit(&t).await, Err(CommitError::Conflict { .. })));
        let gone = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "older", &fa).await;
        assert_eq!(gone.expect("lookup"), None, "expired with its hash");
    }

    /// What `redis-cli` prints for `args` against `server`, trimmed.
    fn redis_cli(server: &chipgate_state::testing::RedisServer, args: &[&str]) -> String {
        let out = std::process::Command::new(chipgate_state::testing::redis_cli_binary())
            .args(["-p", &server.port().to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The bytes a transaction's record holds (its one hash write).
    fn in_period_data(t: &Txn) -> Vec<u8> {
        t.ops
            .iter()
            .find_map(|op| match op {
                chipgate_state::Op::HSetExpireAt { value, .. } => Some(value.clone()),
                _ => None,
            })
            .expect("a record")
    }

    /// A caller answering from a record its own commit conflicted on writes it again first (so the
    /// replicas' acknowledgement of that write covers it), unchanged; a different request under the
    /// id is refused without a write, and an absent record is just absent. Eight retries at once
    /// all answer. Counted on a real Redis (`INFO commandstats`), where the write is what matters.
    #[tokio::test]
    async fn a_durable_lookup_writes_the_record_again_before_answering() {
        let server = chipgate_state::testing::RedisServer::start();
        let store = server.store().await;
        let hsets = || {
            redis_cli(&server, &["INFO", "commandstats"])
                .lines()
                .find_map(|l| l.strip_prefix("cmdstat_hset:calls=")?.split(',').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let answer = prost_types::Timestamp { seconds: 42, nanos: 0 };
        let fa = fingerprint(&prost_types::Duration { seconds: 1, nanos: 0 });
        let fb = fingerprint(&prost_types::Duration { seconds: 2, nanos: 0 });
        assert_eq!(
            idem.lookup_durable::<prost_types::Timestamp>(&store, None, "M", "r1", &fa).await.expect("absent"),
            None
        );
        let mut t = Txn::new();
        idem.record(&mut t, None, "M", "r1", &fa, &answer);
        store.commit(&t).await.expect("commit");
        let data = in_period(&store, &idem, "M", "r1").await.expect("stored");
        let before = hsets();
        assert_eq!(
            idem.lookup::<prost_types::Timestamp>(&store, None, "M", "r1", &fa).await.expect("replay"),
            Some(answer)
        );
        assert_eq!(hsets(), before, "a plain lookup writes nothing");
        let replay = idem.lookup_durable::<prost_types::Timestamp>(&store, None, "M", "r1", &fa).await;
        assert_eq!(replay.expect("replay"), Some(answer));
        assert_eq!(hsets(), before + 1, "written again");
        assert_eq!(in_period(&store, &idem, "M", "r1").await, Some(data.clone()), "unchanged");
        let err = idem.lookup_durable::<prost_types::Timestamp>(&store, None, "M", "r1", &fb).await;
        assert_eq!(err.expect_err("a different request").code(), tonic::Code::InvalidArgument);
        assert_eq!(hsets(), before + 1, "a refused request writes nothing");
        let mut replays = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let store = store.clone();
            replays.spawn(
                async move { idem.lookup_durable::<prost_types::Timestamp>(&store, None, "M", "r1", &fa).await },
            );
        }
        while let Some(r) = replays.join_next().await {
            assert_eq!(r.expect("task").expect("concurrent replay"), Some(answer));
        }
        assert_eq!(hsets(), before + 9);
        assert_eq!(in_period(&store, &idem, "M", "r1").await, Some(data));
    }

    /// An account's records of a period share one small hash, which Redis keeps packed.
    #[tokio::test]
    async fn an_accounts_records_share_a_packed_hash() {
        let server = chipgate_state::testing::RedisServer::start();
        let store = server.store().await;
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let answer = prost_types::Timestamp { seconds: 42, nanos: 0 };
        let key = ACCOUNT
            .scope(Some("buyer-7".into()), async {
                for i in 0..100 {
                    let fp = fingerprint(&prost_types::Duration { seconds: i, nanos: 0 });
                    let mut t = Txn::new();
                    idem.record(&mut t, None, "PlaceOrder", &format!("req-{i:04}-5f0c8a2e"), &fp, &answer);
                    t.without_receipt();
                    store.commit(&t).await.expect("commit");
                }
                idem.period_key(None, "PlaceOrder", idem.current_period())
            })
            .await;
        let cli = |args: &[&str]| redis_cli(&server, args);
        assert_eq!(cli(&["HLEN", &key]), "100");
        assert_eq!(cli(&["OBJECT", "ENCODING", &key]), "listpack");
        let ttl_ms: u64 = cli(&["PTTL", &key]).parse().expect("a TTL");
        let len = idem.period_ms();
        assert!(ttl_ms > len && ttl_ms <= 2 * len, "expires at the end of the next period: {ttl_ms}");
    }

    #[tokio::test]
    async fn request_ids_are_each_accounts_own() {
        let store = Store::memory();
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let answer = prost_types::Timestamp { seconds: 7, nanos: 0 };
        let fp = fingerprint(&prost_types::Duration { seconds: 1, nanos: 0 });
        let other_fp = fingerprint(&prost_types::Duration { seconds: 2, nanos: 0 });
        ACCOUNT
            .scope(Some("buyer:alpha".into()), async {
                let mut t = Txn::new();
                idem.record(&mut t, None, "M", "order-1", &fp, &answer);
                store.commit(&t).await.expect("alpha's call");
                let replay = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "order-1", &fp).await;
                assert_eq!(replay.expect("lookup"), Some(answer));
            })
            .await;
        // Beta's "order-1", even with another body, is a new call: no replay, no refusal, no hint.
        ACCOUNT
            .scope(Some("buyer:beta".into()), async {
                let seen = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "order-1", &other_fp).await;
                assert_eq!(seen.expect("lookup"), None);
            })
            .await;
        // Outside any account (the shared one) alpha's record is not among them.
        assert_eq!(
            idem.lookup::<prost_types::Timestamp>(&store, None, "M", "order-1", &fp).await.expect("lookup"),
            None
        );
        assert_ne!(
            ACCOUNT.sync_scope(Some("a:b".into()), || idem.key("M", "c")),
            ACCOUNT.sync_scope(Some("a".into()), || idem.key("M", "b:c")),
            "accounts are length-prefixed"
        );
    }
}
