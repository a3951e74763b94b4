//! The chipgate state layer: every piece of shared state the three services keep, and the atomic
//! operations they need on it, behind one [`Backend`] trait with two implementations.
//!
//! * [`RedisBackend`] is what production runs, on a single Redis or a Redis Cluster: one Lua script
//!   ([`Txn`] commit) applies a transaction atomically, Redis Streams with consumer groups carry
//!   events, sorted sets hold queues and indexes. Every key of a transaction shares one hash slot
//!   (a partition's hash tag), so the same code runs on Redis Cluster; writes can wait for replicas
//!   ([`RedisOptions::min_replicas`]) and a commit re-sent by the client applies once.
//! * [`MemoryBackend`] keeps the same structures in process, for the one-command dev cluster and fast
//!   unit tests. The conformance suite (`tests/conformance.rs`) runs unchanged against both.
//!
//! The model is deliberately small: versioned *records* (opaque bytes, usually prost-encoded), sorted
//! sets, hashes, sets, counters, streams, leases with fencing tokens, and a tamper-evident audit chain.
//! Services read what they need, decide in plain Rust, and commit a [`Txn`] whose [`Guard`]s make the
//! decision safe under concurrency (optimistic concurrency on record versions). Nothing is ever
//! half-applied: a transaction whose guards fail changes nothing.

mod memory;
mod redis_backend;
mod sha256;
#[cfg(feature = "test-support")]
pub mod testing;

use std::future::Future;
use std::ops::Bound;
use std::time::Duration;

pub use memory::MemoryBackend;
pub use redis_backend::{MasterKeys, OUTCOME_UNKNOWN, RedisBackend, RedisOptions};

/// Hex SHA-256 of `data` (the digest the audit chain uses for entries).
pub fn sha256_hex(data: &[u8]) -> String {
    sha256::hex(data)
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    sha256::digest(data)
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    sha256::to_hex(bytes)
}

/// The hash that links an audit entry to the previous one: `SHA-256(prev || entry_digest)`, both given
/// as 64-character hex strings. Exposed so verifiers recompute exactly what the backends computed.
pub fn audit_link(prev_hex: &str, digest_hex: &str) -> Option<String> {
    let mut buf = Vec::with_capacity(64);
    buf.extend(sha256::decode_hex(prev_hex)?);
    buf.extend(sha256::decode_hex(digest_hex)?);
    Some(sha256::hex(&buf))
}

/// The hash that comes before the first audit entry.
pub const AUDIT_GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The cursor of a copy in pages ([`Op::ZCopyPage`]) once it is done. Before, the cursor is `>`
/// followed by the last score copied.
pub const PAGE_COPY_DONE: &str = "done";

/// A service's key space. Keys are built from parts joined by `:`, each part escaped ([`escape_part`])
/// so that different parts can never build the same key (buyer `acme`'s application for SKU `eu:H200`
/// and buyer `acme:eu`'s for `H200` are different keys) and no id can open or close a hash tag.
///
/// State is partitioned by its natural unit (a product, a buyer): [`Space::partition`] gives the keys
/// of one unit, which all share one Redis Cluster hash slot, so one unit's transaction stays in one
/// slot while different units spread over the cluster's masters. [`Space::key`] builds the keys of the
/// space's own hash slot (`{tag}`), for the little state that belongs to no unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space(&'static str);

impl Space {
    /// A space with the given hash tag (letters and digits only).
    pub const fn new(tag: &'static str) -> Self {
        Space(tag)
    }

    /// The hash tag.
    pub fn tag(&self) -> &'static str {
        self.0
    }

    /// Builds a key in the space's own slot from its parts: `Space::new("lic").key(["app", "7"])` is
    /// `{lic}:app:7`.
    pub fn key<I, S>(&self, parts: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        join(format!("{{{}}}", self.0), parts)
    }

    /// The keys of one partition unit (a product, a buyer): `Space::new("ord").partition("H200")`
    /// builds keys `{ord:H200}:…`, all in the slot of the tag `ord:H200`.
    pub fn partition(&self, unit: &str) -> Partition {
        let mut prefix = String::with_capacity(self.0.len() + unit.len() + 3);
        prefix.push('{');
        prefix.push_str(self.0);
        prefix.push(':');
        escape_part(unit, &mut prefix);
        prefix.push('}');
        Partition { prefix }
    }
}

/// The keys of one partition unit of a [`Space`]: one hash slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// `{tag:unit}`.
    prefix: String,
}

impl Partition {
    /// Builds a key of this partition from its parts (escaped like [`Space::key`]'s).
    pub fn key<I, S>(&self, parts: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        // Room for a few short parts, so building a key is one allocation (keys are built by the
        // thousand on a wave's commit path).
        let mut key = String::with_capacity(self.prefix.len() + 32);
        key.push_str(&self.prefix);
        join(key, parts)
    }

    /// The hash slot every key of the partition lives in.
    pub fn slot(&self) -> u16 {
        key_slot(&self.prefix)
    }
}

fn join<I, S>(mut key: String, parts: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    for part in parts {
        key.push(':');
        escape_part(part.as_ref(), &mut key);
    }
    key
}

/// Appends `part` to `out` with `%`, `:`, `{` and `}` percent-escaped: parts joined by `:` then
/// split back unambiguously, and no part can start or end a hash tag.
pub fn escape_part(part: &str, out: &mut String) {
    // Almost every part (ids, names, numbers) has nothing to escape: copied whole. Key building is
    // on every commit's path (a wave's batch builds thousands of keys).
    if !part.bytes().any(|b| matches!(b, b'%' | b':' | b'{' | b'}')) {
        out.push_str(part);
        return;
    }
    for c in part.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
}

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of its hash tag, or of the whole key when it
/// has none, modulo 16384), exactly as Redis computes it.
pub fn key_slot(key: &str) -> u16 {
    crc16(hash_tag(key).unwrap_or(key.as_bytes())) % 16384
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster hashes keys with.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// A record: opaque bytes and a version that every write bumps (the first write makes version 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Bumped by every write; 0 never appears (0 in a guard means "absent").
    pub version: u64,
    /// The payload, usually a prost-encoded message.
    pub data: Vec<u8>,
}

impl Record {
    /// The bytes a record is stored as, `<version>:<data>`: a record key's value in Redis, and a
    /// hash field's value on both backends ([`Txn::replace_field`]).
    pub fn stored(version: u64, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 8);
        out.extend_from_slice(version.to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(data);
        out
    }

    /// Reads what [`stored`](Self::stored) wrote (None: no version prefix).
    pub fn from_stored(mut raw: Vec<u8>) -> Option<Record> {
        let (version, colon) = Self::version_prefix(&raw)?;
        raw.drain(..=colon);
        Some(Record { version, data: raw })
    }

    /// The version of a stored record (0 when `raw` is None; None when it has no version prefix).
    pub(crate) fn stored_version(raw: Option<&[u8]>) -> Option<u64> {
        match raw {
            None => Some(0),
            Some(raw) => Self::version_prefix(raw).map(|(version, _)| version),
        }
    }

    /// The version a stored record starts with, and where its colon is (a u64 has at most 20 digits).
    fn version_prefix(raw: &[u8]) -> Option<(u64, usize)> {
        let colon = raw.iter().take(21).position(|&b| b == b':')?;
        Some((std::str::from_utf8(&raw[..colon]).ok()?.parse::<u64>().ok()?, colon))
    }
}

/// A precondition of a [`Txn`]. If any guard fails the transaction changes nothing.
#[derive(Clone, Debug, PartialEq)]
pub enum Guard {
    /// The record at `key` has exactly this version (0: the record must not exist).
    Version {
        /// Record key.
        key: String,
        /// Expected version.
        version: u64,
    },
    /// Fencing: the highest token ever presented at `key` is at most `token`; the commit then stores
    /// `token` as the highest. A holder of an older lease is refused once a newer one has acted.
    Fence {
        /// Fence key.
        key: String,
        /// The caller's fencing token.
        token: u64,
    },
    /// The lease at `key` is still held with this token.
    Lease {
        /// Lease key.
        key: String,
        /// The token [`Backend::lease_acquire`] returned.
        token: u64,
    },
    /// The hash at `key` has no field `field` (fails as a conflict on `key`).
    NoField {
        /// Hash key.
        key: String,
        /// The field that must be absent.
        field: String,
    },
    /// Field `field` of the hash at `key` holds a record (`<version>:<data>`, as
    /// [`Txn::replace_field`] writes it) of exactly this version (0: no such field). Fails as a
    /// conflict on `key`.
    FieldVersion {
        /// Hash key.
        key: String,
        /// Field.
        field: String,
        /// Expected version.
        version: u64,
    },
}

/// A mutation of a [`Txn`].
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Writes a record, bumping its version. With a `ttl` the record disappears after it.
    Put {
        /// Record key.
        key: String,
        /// New payload.
        data: Vec<u8>,
        /// Time to live, if any.
        ttl: Option<Duration>,
    },
    /// Writes a record at a version the transaction already knows (the one after its version guard),
    /// sparing the backend a read.
    PutAt {
        /// Record key.
        key: String,
        /// The version the record gets.
        version: u64,
        /// New payload.
        data: Vec<u8>,
        /// Time to live, if any.
        ttl: Option<Duration>,
    },
    /// Deletes a key of any type.
    Delete {
        /// Key.
        key: String,
    },
    /// Adds (or re-scores) a sorted-set member.
    ZAdd {
        /// Sorted-set key.
        key: String,
        /// Member.
        member: String,
        /// Score (integers up to 2^53 are exact).
        score: f64,
    },
    /// Removes a sorted-set member.
    ZRem {
        /// Sorted-set key.
        key: String,
        /// Member.
        member: String,
    },
    /// Removes sorted-set members and, when at least one of them was there, sets a hash field in the
    /// same atomic step: a mark of *when something last left* that never moves once the set has been
    /// emptied, whoever removes (or tries to remove) members afterwards.
    ZRemStamp {
        /// Sorted-set key.
        key: String,
        /// Members to remove.
        members: Vec<String>,
        /// Hash key, field and value set when a member was removed.
        stamp: (String, String, Vec<u8>),
    },
    /// Replaces the sorted set at `key` with the union of the `sources` (a member in several gets the
    /// sum of its scores, as Redis' `ZUNIONSTORE`); no sources, or only empty ones, delete it. A
    /// server-side snapshot: the members are never copied through the client. With `count_into`
    /// (hash key, field), the snapshot's size is stored there in the same atomic step.
    ZUnionStore {
        /// Destination sorted-set key.
        key: String,
        /// Source sorted-set keys.
        sources: Vec<String>,
        /// Where to record how many members the snapshot holds.
        count_into: Option<(String, String)>,
    },
    /// Copies the next page of a sorted set into another, resuming where the previous page of the
    /// same copy stopped: the members of `source` scored above the copy's cursor (kept in hash field
    /// `progress`; none yet: from the lowest score) and at most `upto`, lowest first, at most `limit`
    /// of them, each with its score. `count_into` is increased by the members new to `key`, and the
    /// cursor moves to the last score copied, or to [`PAGE_COPY_DONE`] once a page finds fewer than
    /// `limit` members (a done copy copies nothing more). A large union taken in steps smaller than
    /// one source: each step a short script, its cursor written in the same atomic step, so a step
    /// done twice continues the copy instead of copying a page again.
    ZCopyPage {
        /// Destination sorted-set key.
        key: String,
        /// Source sorted-set key.
        source: String,
        /// Highest score copied (inclusive).
        upto: f64,
        /// Members copied at most.
        limit: u64,
        /// Hash key and field increased by the members new to `key`.
        count_into: (String, String),
        /// Hash key and field holding the copy's cursor.
        progress: (String, String),
    },
    /// Adds `delta` to an integer hash field.
    HIncr {
        /// Hash key.
        key: String,
        /// Field.
        field: String,
        /// Amount (may be negative).
        delta: i64,
    },
    /// Sets a hash field.
    HSet {
        /// Hash key.
        key: String,
        /// Field.
        field: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Sets a hash field, then makes the whole hash expire at `expire_at_ms` (Unix milliseconds):
    /// fields that share a lifetime, kept in one hash (Redis 7.0 has no per-field expiry) because a
    /// small hash costs a fraction of a key per field.
    HSetExpireAt {
        /// Hash key.
        key: String,
        /// Field.
        field: String,
        /// Value.
        value: Vec<u8>,
        /// When the hash expires (Unix milliseconds).
        expire_at_ms: u64,
    },
    /// Removes a hash field.
    HDel {
        /// Hash key.
        key: String,
        /// Field.
        field: String,
    },
    /// Adds a set member.
    SAdd {
        /// Set key.
        key: String,
        /// Member.
        member: String,
    },
    /// Removes a set member.
    SRem {
        /// Set key.
        key: String,
        /// Member.
        member: String,
    },
    /// Appends an entry to a stream; its id is returned in [`Committed::stream_ids`].
    XAdd {
        /// Stream key.
        key: String,
        /// Field/value pairs.
        fields: Vec<(String, Vec<u8>)>,
        /// Approximate cap on the stream length, if any.
        max_len: Option<u64>,
    },
    /// Removes every entry of a stream whose id is lower than `min_id` (exactly, as `XTRIM key MINID
    /// min_id`): how archived audit entries leave Redis, in the step that records how far the archive
    /// goes. Entries appended later have higher ids and are never touched.
    XTrimBefore {
        /// Stream key.
        key: String,
        /// The lowest id kept (`<ms>-<seq>`).
        min_id: String,
    },
    /// Appends an entry to a tamper-evident audit chain, not yet linked: before the transaction is
    /// committed, [`Txn::link_audit`] turns it into an [`Op::AuditLinked`] against the chain's head.
    Audit {
        /// The audit chain (see [`AuditChain`]).
        chain: AuditChain,
        /// Hex SHA-256 of `entry` (computed by the caller, recomputed by verifiers).
        digest: String,
        /// The encoded entry.
        entry: Vec<u8>,
    },
    /// Appends a linked entry: `hash = SHA-256(prev || digest)` was computed by the caller against the
    /// head at sequence `seq - 1` (the transaction guards that head's version), so the state backend
    /// does no hashing. The result is returned in [`Committed::audit`].
    AuditLinked {
        /// The audit chain.
        chain: AuditChain,
        /// This entry's sequence number.
        seq: u64,
        /// Hash of the previous entry.
        prev: String,
        /// This entry's hash.
        hash: String,
        /// The encoded entry.
        entry: Vec<u8>,
    },
}

/// The keys of one audit chain: a stream of entries and a head record holding `sequence:hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditChain {
    /// Stream of entries (fields `seq`, `prev`, `hash`, `entry`).
    pub stream: String,
    /// Head: `"<seq>:<hex hash>"` of the last entry.
    pub head: String,
}

impl AuditChain {
    /// The audit chain of a space: `{tag}:audit` and `{tag}:audit:head`.
    pub fn of(space: Space) -> Self {
        AuditChain { stream: space.key(["audit"]), head: space.key(["audit", "head"]) }
    }

    /// The audit chain of one partition: `{tag:unit}:audit` and `{tag:unit}:audit:head`, so a
    /// change in the partition and its entry commit in one slot.
    pub fn in_partition(partition: &Partition) -> Self {
        AuditChain { stream: partition.key(["audit"]), head: partition.key(["audit", "head"]) }
    }

    /// The record saying how far the chain is archived (`<stream>:archived`): entries up to it were
    /// written to the archive, read back, verified and removed from the stream. It shares the
    /// stream's hash slot (the stream key starts with its partition's tag), so a trim and the record
    /// commit together whatever partition the chain lives in.
    pub fn archived_key(&self) -> String {
        format!("{}:archived", self.stream)
    }

    /// The lease that lets one replica at a time archive this chain (same slot as the stream).
    pub fn archive_lease_key(&self) -> String {
        format!("{}:archive-lease", self.stream)
    }

    /// The counter issuing fencing tokens for [`archive_lease_key`](Self::archive_lease_key).
    pub fn archive_lease_counter(&self) -> String {
        format!("{}:archive-lease-seq", self.stream)
    }

    /// The head as stored: sequence number and hash of the last entry (`(0, AUDIT_GENESIS)` when the
    /// chain is empty).
    pub async fn head<B: Backend>(&self, store: &B) -> StateResult<(u64, String)> {
        Ok(match store.get(std::slice::from_ref(&self.head)).await?.pop().flatten() {
            Some(r) => (r.version, String::from_utf8_lossy(&r.data).to_string()),
            None => (0, AUDIT_GENESIS.to_string()),
        })
    }
}

/// An atomic transaction: all guards hold and every op applies, or nothing changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Txn {
    /// Preconditions.
    pub guards: Vec<Guard>,
    /// Mutations, applied in order.
    pub ops: Vec<Op>,
    /// Committed without a receipt ([`without_receipt`](Self::without_receipt)).
    receipt_free: bool,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Txn::default()
    }

    /// Commits without a receipt. A commit's receipt is what lets a copy of it re-sent by the Redis
    /// client (after a reconnect, not knowing whether the first copy ran) change nothing and answer
    /// what the first answered; it costs a key per commit in Redis for a minute (≈ 160 bytes) and two
    /// commands. A transaction that creates a record under a must-not-exist guard (a
    /// [`replace`](Self::replace) at version 0, or a hash field set under
    /// [`expect_no_field`](Self::expect_no_field)) doesn't need it: a re-sent copy fails that guard and
    /// answers [`CommitError::Conflict`] on it, applying nothing. Its caller then tells its own first
    /// copy from another writer's by what the record holds, and makes a durable write before
    /// answering from it (the copy that conflicted wrote nothing, so the replicas' acknowledgement
    /// that follows it would not cover the first). The commit is refused, before anything is sent,
    /// when the transaction creates no record that way.
    pub fn without_receipt(&mut self) -> &mut Self {
        self.receipt_free = true;
        self
    }

    /// Whether the transaction commits without a receipt ([`without_receipt`](Self::without_receipt)).
    pub fn is_receipt_free(&self) -> bool {
        self.receipt_free
    }

    /// Refuses a receipt-free transaction that creates no record under a must-not-exist guard: a
    /// re-sent copy of it could apply twice. Both backends check it, so a mistake shows in tests on
    /// the in-memory one too.
    pub(crate) fn check_receipt_free(&self) -> StateResult<()> {
        if !self.receipt_free {
            return Ok(());
        }
        let creates = self.guards.iter().any(|g| match g {
            Guard::Version { key, version: 0 } => self.ops.iter().any(|op| match op {
                Op::PutAt { key: k, version: 1, .. } => k == key,
                _ => false,
            }),
            Guard::NoField { key, field } => self.ops.iter().any(|op| match op {
                Op::HSet { key: k, field: f, .. } | Op::HSetExpireAt { key: k, field: f, .. } => k == key && f == field,
                _ => false,
            }),
            _ => false,
        });
        if creates {
            Ok(())
        } else {
            Err(StateError::Backend(
                "a transaction committed without a receipt must create a record under a must-not-exist guard \
                 (Txn::without_receipt)"
                    .into(),
            ))
        }
    }

    /// Requires the record at `key` to have `version` (0: absent).
    pub fn expect_version(&mut self, key: impl Into<String>, version: u64) -> &mut Self {
        self.guards.push(Guard::Version { key: key.into(), version });
        self
    }

    /// Requires `token` to be at least the highest token seen at `key`, and records it.
    pub fn fence(&mut self, key: impl Into<String>, token: u64) -> &mut Self {
        self.guards.push(Guard::Fence { key: key.into(), token });
        self
    }

    /// Requires the lease at `key` to be held with `token`.
    pub fn expect_lease(&mut self, key: impl Into<String>, token: u64) -> &mut Self {
        self.guards.push(Guard::Lease { key: key.into(), token });
        self
    }

    /// Writes a record.
    pub fn put(&mut self, key: impl Into<String>, data: Vec<u8>) -> &mut Self {
        self.ops.push(Op::Put { key: key.into(), data, ttl: None });
        self
    }

    /// Writes a record that expires after `ttl`.
    pub fn put_with_ttl(&mut self, key: impl Into<String>, data: Vec<u8>, ttl: Duration) -> &mut Self {
        self.ops.push(Op::Put { key: key.into(), data, ttl: Some(ttl) });
        self
    }

    /// Writes a record guarded by the version it was read at (0: must not exist yet).
    pub fn replace(&mut self, key: impl Into<String>, read_version: u64, data: Vec<u8>) -> &mut Self {
        self.replace_at(key.into(), read_version, data, None)
    }

    /// [`replace`](Self::replace) for a record that expires after `ttl` (an idempotency answer:
    /// guarded absent, so the backend need not read its version again to write it).
    pub fn replace_with_ttl(
        &mut self,
        key: impl Into<String>,
        read_version: u64,
        data: Vec<u8>,
        ttl: Duration,
    ) -> &mut Self {
        self.replace_at(key.into(), read_version, data, Some(ttl))
    }

    fn replace_at(&mut self, key: String, read_version: u64, data: Vec<u8>, ttl: Option<Duration>) -> &mut Self {
        self.expect_version(key.clone(), read_version);
        self.ops.push(Op::PutAt { key, version: read_version + 1, data, ttl });
        self
    }

    /// Deletes a key.
    pub fn delete(&mut self, key: impl Into<String>) -> &mut Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    /// Adds a sorted-set member.
    pub fn zadd(&mut self, key: impl Into<String>, member: impl Into<String>, score: f64) -> &mut Self {
        self.ops.push(Op::ZAdd { key: key.into(), member: member.into(), score });
        self
    }

    /// Removes a sorted-set member.
    pub fn zrem(&mut self, key: impl Into<String>, member: impl Into<String>) -> &mut Self {
        self.ops.push(Op::ZRem { key: key.into(), member: member.into() });
        self
    }

    /// Removes `members` from a sorted set and, only if one of them was there, sets `field` of `hash`
    /// to `value` (see [`Op::ZRemStamp`]).
    pub fn zrem_stamp(
        &mut self,
        key: impl Into<String>,
        members: Vec<String>,
        hash: impl Into<String>,
        field: impl Into<String>,
        value: Vec<u8>,
    ) -> &mut Self {
        self.ops.push(Op::ZRemStamp { key: key.into(), members, stamp: (hash.into(), field.into(), value) });
        self
    }

    /// Adds to a hash field.
    pub fn hincr(&mut self, key: impl Into<String>, field: impl Into<String>, delta: i64) -> &mut Self {
        self.ops.push(Op::HIncr { key: key.into(), field: field.into(), delta });
        self
    }

    /// Sets a hash field.
    pub fn hset(&mut self, key: impl Into<String>, field: impl Into<String>, value: Vec<u8>) -> &mut Self {
        self.ops.push(Op::HSet { key: key.into(), field: field.into(), value });
        self
    }

    /// Sets a hash field and makes the hash expire at `expire_at_ms` (Unix milliseconds).
    pub fn hset_expire_at(
        &mut self,
        key: impl Into<String>,
        field: impl Into<String>,
        value: Vec<u8>,
        expire_at_ms: u64,
    ) -> &mut Self {
        self.ops.push(Op::HSetExpireAt { key: key.into(), field: field.into(), value, expire_at_ms });
        self
    }

    /// Requires the hash at `key` to have no field `field`.
    pub fn expect_no_field(&mut self, key: impl Into<String>, field: impl Into<String>) -> &mut Self {
        self.guards.push(Guard::NoField { key: key.into(), field: field.into() });
        self
    }

    /// Requires field `field` of the hash at `key` to hold a record of `version` (0: absent).
    pub fn expect_field_version(
        &mut self,
        key: impl Into<String>,
        field: impl Into<String>,
        version: u64,
    ) -> &mut Self {
        self.guards.push(Guard::FieldVersion { key: key.into(), field: field.into(), version });
        self
    }

    /// Writes a record into field `field` of the hash at `key`, guarded by the version it was read
    /// at (0: must not exist yet), as [`replace`](Self::replace) does for a key: the field holds
    /// `<version>:<data>` ([`Record::stored`]), read back with [`Backend::hget_each`] and
    /// [`Record::from_stored`].
    ///
    /// Why: records that are many, small and never read alone (a product's quota reservations)
    /// cost a fraction of a key each as fields of a small hash, which Redis keeps packed.
    pub fn replace_field(
        &mut self,
        key: impl Into<String>,
        field: impl Into<String>,
        read_version: u64,
        data: &[u8],
    ) -> &mut Self {
        let (key, field) = (key.into(), field.into());
        self.expect_field_version(key.clone(), field.clone(), read_version);
        self.ops.push(Op::HSet { key, field, value: Record::stored(read_version + 1, data) });
        self
    }

    /// Removes a hash field.
    pub fn hdel(&mut self, key: impl Into<String>, field: impl Into<String>) -> &mut Self {
        self.ops.push(Op::HDel { key: key.into(), field: field.into() });
        self
    }

    /// Adds a set member.
    pub fn sadd(&mut self, key: impl Into<String>, member: impl Into<String>) -> &mut Self {
        self.ops.push(Op::SAdd { key: key.into(), member: member.into() });
        self
    }

    /// Replaces the sorted set at `key` with the union of `sources` (see [`Op::ZUnionStore`]).
    pub fn zunionstore(&mut self, key: impl Into<String>, sources: Vec<String>) -> &mut Self {
        self.ops.push(Op::ZUnionStore { key: key.into(), sources, count_into: None });
        self
    }

    /// Like [`zunionstore`](Self::zunionstore), also setting hash field `field` of `hash` to the
    /// snapshot's size.
    pub fn zunionstore_counted(
        &mut self,
        key: impl Into<String>,
        sources: Vec<String>,
        hash: impl Into<String>,
        field: impl Into<String>,
    ) -> &mut Self {
        let count_into = Some((hash.into(), field.into()));
        self.ops.push(Op::ZUnionStore { key: key.into(), sources, count_into });
        self
    }

    /// Copies the next page of `source` into `key` (see [`Op::ZCopyPage`]): at most `limit` members
    /// scored at most `upto`, from the cursor in hash field `progress`; hash field `count_into` is
    /// increased by the members new to `key`.
    pub fn zcopy_page(
        &mut self,
        key: impl Into<String>,
        source: impl Into<String>,
        upto: f64,
        limit: u64,
        count_into: (String, String),
        progress: (String, String),
    ) -> &mut Self {
        let limit = limit.max(1);
        self.ops.push(Op::ZCopyPage { key: key.into(), source: source.into(), upto, limit, count_into, progress });
        self
    }

    /// Removes a set member.
    pub fn srem(&mut self, key: impl Into<String>, member: impl Into<String>) -> &mut Self {
        self.ops.push(Op::SRem { key: key.into(), member: member.into() });
        self
    }

    /// Appends a stream entry.
    pub fn xadd(&mut self, key: impl Into<String>, fields: Vec<(String, Vec<u8>)>, max_len: Option<u64>) -> &mut Self {
        self.ops.push(Op::XAdd { key: key.into(), fields, max_len });
        self
    }

    /// Removes the entries of stream `key` with ids lower than `min_id` (see [`Op::XTrimBefore`]).
    pub fn xtrim_before(&mut self, key: impl Into<String>, min_id: impl Into<String>) -> &mut Self {
        self.ops.push(Op::XTrimBefore { key: key.into(), min_id: min_id.into() });
        self
    }

    /// Appends an audit entry to `chain`.
    pub fn audit(&mut self, chain: &AuditChain, entry: Vec<u8>) -> &mut Self {
        let digest = sha256_hex(&entry);
        self.ops.push(Op::Audit { chain: chain.clone(), digest, entry });
        self
    }

    /// Whether the transaction appends audit entries that still need linking.
    pub fn needs_linking(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::Audit { .. }))
    }

    /// Links this transaction's audit entries to their chains: `heads` gives each chain head's
    /// sequence number and hash as read (`(0, AUDIT_GENESIS)` for an empty chain). Each entry gets the
    /// next sequence number and `SHA-256(prev || digest)`, and the transaction is guarded by every
    /// head's version, so it commits only if nobody appended in between.
    pub fn link_audit(&mut self, heads: &[(AuditChain, u64, String)]) {
        let mut state: Vec<(AuditChain, u64, String)> = heads.to_vec();
        for (chain, seq, _) in heads {
            self.guards.push(Guard::Version { key: chain.head.clone(), version: *seq });
        }
        for op in &mut self.ops {
            if let Op::Audit { chain, digest, entry } = op {
                let Some(head) = state.iter_mut().find(|(c, _, _)| c == chain) else { continue };
                let seq = head.1 + 1;
                let prev = head.2.clone();
                let hash =
                    audit_link(&prev, digest).unwrap_or_else(|| audit_link(&prev, AUDIT_GENESIS).unwrap_or_default());
                head.1 = seq;
                head.2.clone_from(&hash);
                *op = Op::AuditLinked { chain: chain.clone(), seq, prev, hash, entry: std::mem::take(entry) };
            }
        }
    }

    /// The audit chains this transaction appends to (unlinked entries only).
    pub fn audit_chains(&self) -> Vec<AuditChain> {
        let mut out: Vec<AuditChain> = Vec::new();
        for op in &self.ops {
            if let Op::Audit { chain, .. } = op
                && !out.contains(chain)
            {
                out.push(chain.clone());
            }
        }
        out
    }

    /// True when the transaction has no ops (guards alone change nothing).
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The one hash slot every key of the transaction lives in (`None` for a transaction without
    /// keys). Every backend refuses a transaction spanning slots, as Redis Cluster does: an atomic
    /// change stays inside one partition, whatever the backend.
    ///
    /// # Errors
    /// Two keys of different slots (named in the error).
    pub fn slot(&self) -> StateResult<Option<u16>> {
        slot_of(&self.keys())
    }

    /// Every key the transaction touches, in first-use order, without repeats.
    pub fn keys(&self) -> Vec<&str> {
        let mut all: Vec<&str> = Vec::with_capacity(self.guards.len() + self.ops.len());
        for g in &self.guards {
            match g {
                Guard::Version { key, .. }
                | Guard::Fence { key, .. }
                | Guard::Lease { key, .. }
                | Guard::NoField { key, .. }
                | Guard::FieldVersion { key, .. } => all.push(key),
            }
        }
        for op in &self.ops {
            match op {
                Op::Put { key, .. }
                | Op::PutAt { key, .. }
                | Op::Delete { key }
                | Op::ZAdd { key, .. }
                | Op::ZRem { key, .. }
                | Op::HIncr { key, .. }
                | Op::HSet { key, .. }
                | Op::HSetExpireAt { key, .. }
                | Op::HDel { key, .. }
                | Op::SAdd { key, .. }
                | Op::SRem { key, .. }
                | Op::XAdd { key, .. }
                | Op::XTrimBefore { key, .. } => all.push(key),
                Op::ZRemStamp { key, stamp, .. } => {
                    all.push(key);
                    all.push(&stamp.0);
                }
                Op::ZUnionStore { key, sources, count_into, .. } => {
                    all.push(key);
                    all.extend(sources.iter().map(String::as_str));
                    all.extend(count_into.iter().map(|(h, _)| h.as_str()));
                }
                Op::ZCopyPage { key, source, count_into, progress, .. } => {
                    all.extend([key.as_str(), source, &count_into.0, &progress.0]);
                }
                Op::Audit { chain, .. } | Op::AuditLinked { chain, .. } => {
                    all.push(&chain.stream);
                    all.push(&chain.head);
                }
            }
        }
        let mut seen: std::collections::HashSet<&str, FastHash> =
            std::collections::HashSet::with_capacity_and_hasher(all.len(), FastHash);
        all.into_iter().filter(|k| seen.insert(*k)).collect()
    }
}

/// The hash slot every one of `keys` lives in (None for no keys), or an error naming two keys in
/// different slots.
pub(crate) fn slot_of(keys: &[&str]) -> StateResult<Option<u16>> {
    let Some((first, rest)) = keys.split_first() else { return Ok(None) };
    let slot = key_slot(first);
    let tag = hash_tag(first);
    for key in rest {
        // Keys of one partition share their tag: equal tags hash alike, no CRC needed.
        if tag.is_some() && hash_tag(key) == tag {
            continue;
        }
        let other = key_slot(key);
        if other != slot {
            return Err(StateError::Backend(format!(
                "a transaction must stay in one hash slot: {first} (slot {slot}) and {key} (slot {other})"
            )));
        }
    }
    Ok(Some(slot))
}

/// The hash tag of `key` (what Redis Cluster hashes), when it has a non-empty one.
fn hash_tag(key: &str) -> Option<&[u8]> {
    let bytes = key.as_bytes();
    let open = bytes.iter().position(|&b| b == b'{')?;
    let len = bytes[open + 1..].iter().position(|&b| b == b'}')?;
    (len > 0).then(|| &bytes[open + 1..open + 1 + len])
}

/// FNV-1a, for the sets and maps of one transaction's keys: keys are short and built by the
/// services, and the default SipHash was a measurable share of a large commit's CPU. (A set of
/// keys crafted to collide only slows the one transaction that holds them.)
#[derive(Clone, Copy, Default)]
pub(crate) struct FastHash;

/// The hasher [`FastHash`] builds.
pub(crate) struct Fnv(u64);

impl std::hash::BuildHasher for FastHash {
    type Hasher = Fnv;
    fn build_hasher(&self) -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// What a committed transaction produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// The id of each appended stream entry, in op order.
    pub stream_ids: Vec<String>,
    /// The sequence number and hash of each appended audit entry, in op order.
    pub audit: Vec<(u64, String)>,
}

/// Why a transaction changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// A version guard failed: someone else changed `key` since it was read. Re-read and retry.
    #[error("concurrent change to {key}")]
    Conflict {
        /// The key whose version changed.
        key: String,
    },
    /// A fence guard failed: a newer lease holder has already acted.
    #[error("fenced off at {key}: a newer token was already presented")]
    Fenced {
        /// The fence key.
        key: String,
    },
    /// A lease guard failed: the lease expired or was taken by someone else.
    #[error("lease {key} is no longer held")]
    LeaseLost {
        /// The lease key.
        key: String,
    },
    /// The backend failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// A failure of the backend itself (as opposed to a guard).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The backend can't be reached or didn't answer in time. Retrying later may work.
    #[error("state backend unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something unexpected.
    #[error("state backend error: {0}")]
    Backend(String),
}

impl StateError {
    /// Whether a consumer-group read or claim failed because the group (or its stream) does not
    /// exist (`NOGROUP`). Groups are created without waiting for replicas, so a Redis failover
    /// right after a group was created can lose it; its consumers then create it again.
    pub fn is_missing_group(&self) -> bool {
        matches!(self, StateError::Backend(m) if m.contains("NOGROUP"))
    }
}

/// Result alias for backend calls.
pub type StateResult<T> = Result<T, StateError>;

/// One stream entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamEntry {
    /// Stream id (`<ms>-<seq>`).
    pub id: String,
    /// Field/value pairs.
    pub fields: Vec<(String, Vec<u8>)>,
}

impl StreamEntry {
    /// The value of a field.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(f, _)| f == name).map(|(_, v)| v.as_slice())
    }
}

/// Pending-entries summary of a consumer group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupInfo {
    /// Whether the group exists (all else is 0/None when it doesn't).
    pub exists: bool,
    /// Entries delivered to a consumer and not yet acknowledged.
    pub pending: u64,
    /// Entries not yet delivered to the group (None when the backend can't tell).
    pub lag: Option<u64>,
}

/// Server-side figures of a backend, for benchmarks and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// Bytes of memory the backend uses for data (Redis `used_memory`), when known.
    pub used_memory: Option<u64>,
}

/// What [`Backend::hash_move`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HashMoved {
    /// Fields the destination held before the move, once `forget` was deleted (for a product's
    /// marks: work an earlier lease holder left unfinished).
    pub kept: usize,
    /// The destination's fields after the move, sorted by field.
    pub fields: Vec<(String, Vec<u8>)>,
}

/// The operations every chipgate service needs from its state backend.
///
/// Implementations must behave identically; `tests/conformance.rs` holds them to it.
pub trait Backend: Clone + Send + Sync + 'static {
    /// Reads records; `None` where a key holds no record.
    fn get(&self, keys: &[String]) -> impl Future<Output = StateResult<Vec<Option<Record>>>> + Send;

    /// Applies a transaction atomically (see [`Txn`]).
    fn commit(&self, txn: &Txn) -> impl Future<Output = Result<Committed, CommitError>> + Send;

    /// Adds `by` to an integer counter and returns the new value (ids are allocated this way).
    /// Adding 0 reads the counter: it writes nothing (a missing counter stays missing and reads 0),
    /// so it does not wait for replicas either.
    fn incr(&self, key: &str, by: u64) -> impl Future<Output = StateResult<u64>> + Send;

    /// Sorted-set members by rank, `start..=stop` (negative counts from the end, as in Redis), lowest
    /// score first or, with `rev`, highest first.
    fn zrange(
        &self,
        key: &str,
        start: i64,
        stop: i64,
        rev: bool,
    ) -> impl Future<Output = StateResult<Vec<(String, f64)>>> + Send;

    /// Sorted-set members with scores in the given bounds, lowest first, at most `limit`.
    fn zrange_by_score(
        &self,
        key: &str,
        min: Bound<f64>,
        max: Bound<f64>,
        limit: usize,
    ) -> impl Future<Output = StateResult<Vec<(String, f64)>>> + Send;

    /// 0-based rank of a member (lowest score first).
    fn zrank(&self, key: &str, member: &str) -> impl Future<Output = StateResult<Option<u64>>> + Send;

    /// Number of members of a sorted set.
    fn zcard(&self, key: &str) -> impl Future<Output = StateResult<u64>> + Send;

    /// All fields of a hash.
    fn hgetall(&self, key: &str) -> impl Future<Output = StateResult<Vec<(String, Vec<u8>)>>> + Send;

    /// The value of each `(hash key, field)`, in order (None: no such field), in one round trip
    /// when the keys share a slot.
    fn hget_each(&self, fields: &[(String, String)]) -> impl Future<Output = StateResult<Vec<Option<Vec<u8>>>>> + Send;

    /// All members of a set, sorted.
    fn smembers(&self, key: &str) -> impl Future<Output = StateResult<Vec<String>>> + Send;

    /// The record at `key`, then the members of set `set` (sorted), read in that order in one
    /// round trip when both are in one slot (two reads in that order otherwise). The order is the
    /// point: a writer that adds to the set and moves the record in one commit is either seen in
    /// the set or has moved the record past the version read, so a commit guarded on that version
    /// can't land without knowing the member (a product's waves epoch and its unsettled waves).
    fn get_then_members(
        &self,
        key: &str,
        set: &str,
    ) -> impl Future<Output = StateResult<(Option<Record>, Vec<String>)>> + Send;

    /// Stream entries with ids strictly after `after` (or from the start when `None`), oldest first.
    fn xrange(
        &self,
        key: &str,
        after: Option<&str>,
        count: usize,
    ) -> impl Future<Output = StateResult<Vec<StreamEntry>>> + Send;

    /// Number of entries in a stream.
    fn xlen(&self, key: &str) -> impl Future<Output = StateResult<u64>> + Send;

    /// Id of the last entry ever added to a stream (`0-0` when none).
    fn xlast_id(&self, key: &str) -> impl Future<Output = StateResult<String>> + Send;

    /// Creates a consumer group reading from the beginning of the stream (and the stream itself), if
    /// it does not exist yet.
    fn group_ensure(&self, key: &str, group: &str) -> impl Future<Output = StateResult<()>> + Send;

    /// Delivers entries never delivered to the group before to `consumer`, waiting up to `block` for
    /// at least one. Delivered entries stay pending until acknowledged.
    fn read_group(
        &self,
        key: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Option<Duration>,
    ) -> impl Future<Output = StateResult<Vec<StreamEntry>>> + Send;

    /// Acknowledges entries; returns how many were pending.
    fn ack(&self, key: &str, group: &str, ids: &[String]) -> impl Future<Output = StateResult<u64>> + Send;

    /// Takes over entries pending longer than `min_idle` (their consumer died or stalled) for
    /// `consumer`, oldest first.
    fn autoclaim(
        &self,
        key: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> impl Future<Output = StateResult<Vec<StreamEntry>>> + Send;

    /// Pending count and lag of a consumer group.
    fn group_info(&self, key: &str, group: &str) -> impl Future<Output = StateResult<GroupInfo>> + Send;

    /// Entries after `after` (exclusive), waiting up to `block` for one: a plain tail of the stream.
    fn tail(
        &self,
        key: &str,
        after: &str,
        count: usize,
        block: Duration,
    ) -> impl Future<Output = StateResult<Vec<StreamEntry>>> + Send;

    /// Takes the lease at `key` for `ttl` if nobody holds it, returning a fencing token from the
    /// counter at `fence_counter` (strictly increasing per counter).
    fn lease_acquire(
        &self,
        key: &str,
        fence_counter: &str,
        ttl: Duration,
    ) -> impl Future<Output = StateResult<Option<u64>>> + Send;

    /// Extends a held lease; false if it is no longer held with `token`.
    fn lease_renew(&self, key: &str, token: u64, ttl: Duration) -> impl Future<Output = StateResult<bool>> + Send;

    /// Gives a lease up; false if it was no longer held with `token`.
    fn lease_release(&self, key: &str, token: u64) -> impl Future<Output = StateResult<bool>> + Send;

    /// In one atomic step, while the lease at `lease` is held with `token`: deletes the fields
    /// `forget` from hash `to`, moves every field of hash `from` into `to` (`from`'s value wins),
    /// and returns `to`'s fields as they are then ([`HashMoved`]). None when the lease is not held
    /// (nothing changed). A field set in `from` after the step is left for the next one, never
    /// lost: this is how a product's round takes its marks (read and moved in one round trip, not
    /// two). Durable like a commit: it waits for the replicas a commit waits for.
    fn hash_move(
        &self,
        from: &str,
        to: &str,
        forget: &[String],
        lease: &str,
        token: u64,
    ) -> impl Future<Output = StateResult<Option<HashMoved>>> + Send;

    /// Checks the backend answers.
    fn ping(&self) -> impl Future<Output = StateResult<()>> + Send;

    /// Server-side figures.
    fn info(&self) -> impl Future<Output = StateResult<BackendInfo>> + Send;
}

/// A backend chosen at run time: the services hold one of these.
#[derive(Clone)]
pub enum Store {
    /// Redis (production).
    Redis(RedisBackend),
    /// In process (dev cluster, unit tests).
    Memory(MemoryBackend),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Redis(_) => f.write_str("Store::Redis"),
            Store::Memory(_) => f.write_str("Store::Memory"),
        }
    }
}

impl Store {
    /// A fresh in-memory store.
    pub fn memory() -> Self {
        Store::Memory(MemoryBackend::new())
    }

    /// Connects to Redis, retrying with a log line until it answers or `give_up_after` passes.
    pub async fn connect_redis(url: &str, options: RedisOptions) -> StateResult<Self> {
        Ok(Store::Redis(RedisBackend::connect(url, options).await?))
    }

    /// "redis", "redis-cluster" or "memory".
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Redis(r) if r.is_cluster() => "redis-cluster",
            Store::Redis(_) => "redis",
            Store::Memory(_) => "memory",
        }
    }

    /// How many keys each Redis master holds and which hash slots it serves (see
    /// [`RedisBackend::master_key_counts`]): whether partitioned state spreads over a cluster.
    ///
    /// # Errors
    /// On the in-memory backend, which has no masters, and when a master does not answer.
    pub async fn master_key_counts(&self) -> StateResult<Vec<MasterKeys>> {
        match self {
            Store::Redis(r) => r.master_key_counts().await,
            Store::Memory(_) => Err(StateError::Backend("the in-memory backend has no Redis masters".into())),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            Store::Redis($b) => $e,
            Store::Memory($b) => $e,
        }
    };
}

impl Backend for Store {
    async fn get(&self, keys: &[String]) -> StateResult<Vec<Option<Record>>> {
        dispatch!(self, b => b.get(keys).await)
    }
    async fn commit(&self, txn: &Txn) -> Result<Committed, CommitError> {
        dispatch!(self, b => b.commit(txn).await)
    }
    async fn incr(&self, key: &str, by: u64) -> StateResult<u64> {
        dispatch!(self, b => b.incr(key, by).await)
    }
    async fn zrange(&self, key: &str, start: i64, stop: i64, rev: bool) -> StateResult<Vec<(String, f64)>> {
        dispatch!(self, b => b.zrange(key, start, stop, rev).await)
    }
    async fn zrange_by_score(
        &self,
        key: &str,
        min: Bound<f64>,
        max: Bound<f64>,
        limit: usize,
    ) -> StateResult<Vec<(String, f64)>> {
        dispatch!(self, b => b.zrange_by_score(key, min, max, limit).await)
    }
    async fn zrank(&self, key: &str, member: &str) -> StateResult<Option<u64>> {
        dispatch!(self, b => b.zrank(key, member).await)
    }
    async fn zcard(&self, key: &str) -> StateResult<u64> {
        dispatch!(self, b => b.zcard(key).await)
    }
    async fn hgetall(&self, key: &str) -> StateResult<Vec<(String, Vec<u8>)>> {
        dispatch!(self, b => b.hgetall(key).await)
    }
    async fn hget_each(&self, fields: &[(String, String)]) -> StateResult<Vec<Option<Vec<u8>>>> {
        dispatch!(self, b => b.hget_each(fields).await)
    }
    async fn smembers(&self, key: &str) -> StateResult<Vec<String>> {
        dispatch!(self, b => b.smembers(key).await)
    }
    async fn get_then_members(&self, key: &str, set: &str) -> StateResult<(Option<Record>, Vec<String>)> {
        dispatch!(self, b => b.get_then_members(key, set).await)
    }
    async fn xrange(&self, key: &str, after: Option<&str>, count: usize) -> StateResult<Vec<StreamEntry>> {
        dispatch!(self, b => b.xrange(key, after, count).await)
    }
    async fn xlen(&self, key: &str) -> StateResult<u64> {
        dispatch!(self, b => b.xlen(key).await)
    }
    async fn xlast_id(&self, key: &str) -> StateResult<String> {
        dispatch!(self, b => b.xlast_id(key).await)
    }
    async fn group_ensure(&self, key: &str, group: &str) -> StateResult<()> {
        dispatch!(self, b => b.group_ensure(key, group).await)
    }
    async fn read_group(
        &self,
        key: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Option<Duration>,
    ) -> StateResult<Vec<StreamEntry>> {
        dispatch!(self, b => b.read_group(key, group, consumer, count, block).await)
    }
    async fn ack(&self, key: &str, group: &str, ids: &[String]) -> StateResult<u64> {
        dispatch!(self, b => b.ack(key, group, ids).await)
    }
    async fn autoclaim(
        &self,
        key: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StateResult<Vec<StreamEntry>> {
        dispatch!(self, b => b.autoclaim(key, group, consumer, min_idle, count).await)
    }
    async fn group_info(&self, key: &str, group: &str) -> StateResult<GroupInfo> {
        dispatch!(self, b => b.group_info(key, group).await)
    }
    async fn tail(&self, key: &str, after: &str, count: usize, block: Duration) -> StateResult<Vec<StreamEntry>> {
        dispatch!(self, b => b.tail(key, after, count, block).await)
    }
    async fn lease_acquire(&self, key: &str, fence_counter: &str, ttl: Duration) -> StateResult<Option<u64>> {
        dispatch!(self, b => b.lease_acquire(key, fence_counter, ttl).await)
    }
    async fn lease_renew(&self, key: &str, token: u64, ttl: Duration) -> StateResult<bool> {
        dispatch!(self, b => b.lease_renew(key, token, ttl).await)
    }
    async fn lease_release(&self, key: &str, token: u64) -> StateResult<bool> {
        dispatch!(self, b => b.lease_release(key, token).await)
    }
    async fn hash_move(
        &self,
        from: &str,
        to: &str,
        forget: &[String],
        lease: &str,
        token: u64,
    ) -> StateResult<Option<HashMoved>> {
        dispatch!(self, b => b.hash_move(from, to, forget, lease, token).await)
    }
    async fn ping(&self) -> StateResult<()> {
        dispatch!(self, b => b.ping().await)
    }
    async fn info(&self) -> StateResult<BackendInfo> {
        dispatch!(self, b => b.info().await)
    }
}

/// Parses a stream id `<ms>-<seq>` into its two numbers.
pub fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_ones_redis_computes() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        assert_eq!(key_slot("{user1000}.following"), key_slot("{user1000}.followers"));
        assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}"), "an empty tag hashes the whole key");
        assert_ne!(key_slot("foo{}{bar}"), key_slot("bar"));
        assert_eq!(key_slot("foo{{bar}}zap"), key_slot("{bar"));
    }

    #[test]
    fn slot_of_agrees_with_the_slot_of_every_key() {
        let keys = ["{ord:A}:o:1", "{ord:A}:state:X", "{ord:A}", "x{ord:A}y"];
        assert_eq!(slot_of(&keys).expect("one slot"), Some(key_slot("{ord:A}")));
        // Same slot without a tag (the whole key hashes), and one key's tag equal to another's text.
        assert_eq!(slot_of(&["ord:A", "{ord:A}"]).expect("same slot"), Some(key_slot("ord:A")));
        let err = slot_of(&["{ord:A}:o:1", "{ord:B}:o:1"]).expect_err("two slots");
        assert!(err.to_string().contains("{ord:B}:o:1"), "{err}");
        assert!(slot_of(&["{ord:A}:o:1", "{}{ord:A}"]).is_err(), "an empty tag hashes the whole key");
        assert_eq!(slot_of(&[]).expect("no keys"), None);
        // Many partitions: the verdict is the one a key-by-key comparison gives.
        for i in 0..200 {
            let (a, b) = (format!("{{ord:P{i}}}:o:1"), format!("{{lic:P{}}}:resv:2", i * 7));
            let same = key_slot(&a) == key_slot(&b);
            assert_eq!(slot_of(&[a.as_str(), b.as_str()]).is_ok(), same, "{a} {b}");
        }
    }

    #[test]
    fn escaping_copies_plain_parts_whole_and_escapes_the_rest() {
        let mut out = String::from("k");
        escape_part("buyer-7.x_y", &mut out);
        escape_part("a:{b}%", &mut out);
        assert_eq!(out, "kbuyer-7.x_ya%3A%7Bb%7D%25");
    }

    #[test]
    fn a_partition_keeps_its_keys_in_one_slot_and_units_spread() {
        let ord = Space::new("ord");
        let h200 = ord.partition("H200");
        assert_eq!(h200.key(["order", "ord-1"]), "{ord:H200}:order:ord-1");
        assert_eq!(key_slot(&h200.key(["backlog"])), h200.slot());
        assert_eq!(key_slot(&h200.key(["a:{b}"])), h200.slot(), "ids can't escape the partition's tag");
        let slots: std::collections::HashSet<u16> =
            (0..64).map(|i| ord.partition(&format!("SKU-{i}")).slot()).collect();
        assert!(slots.len() > 60, "64 units land on {} slots", slots.len());
    }

    /// Every pair of different part lists builds different keys, whatever the ids contain.
    #[test]
    fn keys_are_injective() {
        let alphabet = ["a", ":", "%", "{", "}", "%3A", "b:c", ""];
        let mut seen: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
        let space = Space::new("lic");
        for x in alphabet {
            for y in alphabet {
                for z in alphabet {
                    for parts in [vec![x, y], vec![x, y, z], vec![format!("{x}{y}").leak() as &str, z]] {
                        let key = space.key(&parts);
                        let owned: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
                        if let Some(other) = seen.get(&key) {
                            assert_eq!(other, &owned, "{key} built from {other:?} and {owned:?}");
                        }
                        seen.insert(key.clone(), owned);
                        assert_eq!(key_slot(&key), key_slot("{lic}"));
                    }
                    let a = space.partition(&format!("{x}{y}")).key([z]);
                    let b = space.partition(x).key([format!("{y}{z}")]);
                    assert!(a != b || (y.is_empty() && z.is_empty()) || format!("{x}{y}") == x, "{a}");
                }
            }
        }
    }

    #[test]
    fn a_transaction_stays_in_one_slot() {
        let ord = Space::new("ord");
        let (a, b) = (ord.partition("H200"), ord.partition("H100"));
        let mut t = Txn::new();
        t.put(a.key(["x"]), vec![1]).zadd(a.key(["q"]), "m", 1.0);
        assert_eq!(t.slot().expect("one slot"), Some(a.slot()));
        t.put(b.key(["y"]), vec![2]);
        let err = t.slot().expect_err("two slots");
        assert!(err.to_string().contains("one hash slot"), "{err}");
        assert_eq!(Txn::new().slot().expect("no keys"), None);
    }
}
