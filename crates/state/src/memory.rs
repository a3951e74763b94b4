//! The in-process backend: the same structures and semantics as the Redis backend, kept in a mutex.
//! It serves the one-command dev cluster and fast unit tests; the conformance suite holds it to the
//! Redis backend's behaviour.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{
    Backend, BackendInfo, CommitError, Committed, GroupInfo, Guard, HashMoved, Op, Record, StateError, StateResult,
    StreamEntry, Txn,
};

/// State in process memory. Cloning shares the state.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<Mutex<Inner>>,
    /// Woken on every stream append, so blocked readers re-check.
    appended: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    strings: HashMap<String, Str>,
    zsets: HashMap<String, ZSet>,
    hashes: HashMap<String, BTreeMap<String, Vec<u8>>>,
    /// When hashes with an expiry expire (Unix ms; `Op::HSetExpireAt`). Dropped lazily, by
    /// [`Inner::purge_hashes`] before hashes are read or changed.
    hash_expiry: HashMap<String, u64>,
    sets: HashMap<String, BTreeSet<String>>,
    streams: HashMap<String, Stream>,
}

/// A string value (record, counter, lease, fence) with an optional expiry.
struct Str {
    value: StrValue,
    expires: Option<Instant>,
}

enum StrValue {
    Record(Record),
    Int(u64),
}

/// A sorted set: members ordered by (score, member), as in Redis.
#[derive(Default)]
struct ZSet {
    by_member: HashMap<String, f64>,
    ordered: BTreeSet<(Score, String)>,
}

impl ZSet {
    /// The members from the first whose score may be at or above `min`, in order: a lower bound
    /// found in the tree, not by a scan from the lowest (a long queue copied a page at a time, or
    /// read after a cursor, scanned all it had already passed on every step). Callers still check
    /// each score against `min` exactly.
    fn scored_from(&self, min: Bound<f64>) -> impl Iterator<Item = &(Score, String)> {
        let start = match min {
            // -0.0 sorts before 0.0 in the total order, and is >= 0.0 as a number.
            Bound::Included(m) => Bound::Included((Score(if m == 0.0 { -0.0 } else { m }), String::new())),
            Bound::Excluded(m) => Bound::Included((Score(m.next_up()), String::new())),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.ordered.range((start, Bound::Unbounded))
    }
}

/// f64 with a total order (scores are never NaN).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Score(f64);
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Score {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

type Id = (u64, u64);

#[derive(Default)]
struct Stream {
    entries: BTreeMap<Id, Vec<(String, Vec<u8>)>>,
    last_id: Id,
    added: u64,
    groups: HashMap<String, Group>,
}

#[derive(Default)]
struct Group {
    last_delivered: Id,
    /// Entries read by the group so far (for lag).
    delivered_total: u64,
    pending: BTreeMap<Id, Pending>,
}

struct Pending {
    consumer: String,
    delivered_at: Instant,
}

fn id_str(id: Id) -> String {
    format!("{}-{}", id.0, id.1)
}

fn parse_id(s: &str) -> StateResult<Id> {
    crate::parse_stream_id(s).ok_or_else(|| StateError::Backend(format!("bad stream id {s:?}")))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl ZSet {
    fn insert(&mut self, member: &str, score: f64) {
        if let Some(old) = self.by_member.insert(member.to_string(), score) {
            self.ordered.remove(&(Score(old), member.to_string()));
        }
        self.ordered.insert((Score(score), member.to_string()));
    }

    fn remove(&mut self, member: &str) {
        if let Some(old) = self.by_member.remove(member) {
            self.ordered.remove(&(Score(old), member.to_string()));
        }
    }
}

impl Inner {
    /// Drops the hashes whose expiry has passed, as Redis would have.
    fn purge_hashes(&mut self) {
        if self.hash_expiry.is_empty() {
            return;
        }
        let now = now_ms();
        let hashes = &mut self.hashes;
        self.hash_expiry.retain(|key, at| {
            let live = *at > now;
            if !live {
                hashes.remove(key);
            }
            live
        });
    }

    fn live_str(&mut self, key: &str) -> Option<&mut Str> {
        let expired = self.strings.get(key).is_some_and(|s| s.expires.is_some_and(|e| e <= Instant::now()));
        if expired {
            self.strings.remove(key);
        }
        self.strings.get_mut(key)
    }

    fn record_version(&mut self, key: &str) -> u64 {
        match self.live_str(key) {
            Some(Str { value: StrValue::Record(r), .. }) => r.version,
            _ => 0,
        }
    }

    fn int(&mut self, key: &str) -> Option<u64> {
        match self.live_str(key) {
            Some(Str { value: StrValue::Int(i), .. }) => Some(*i),
            _ => None,
        }
    }

    fn check(&mut self, guard: &Guard) -> Result<(), CommitError> {
        match guard {
            Guard::Version { key, version } => {
                if self.record_version(key) != *version {
                    return Err(CommitError::Conflict { key: key.clone() });
                }
            }
            Guard::Fence { key, token } => {
                if self.int(key).is_some_and(|cur| cur > *token) {
                    return Err(CommitError::Fenced { key: key.clone() });
                }
            }
            Guard::Lease { key, token } => {
                if self.int(key) != Some(*token) {
                    return Err(CommitError::LeaseLost { key: key.clone() });
                }
            }
            Guard::NoField { key, field } => {
                if self.hashes.get(key).is_some_and(|h| h.contains_key(field)) {
                    return Err(CommitError::Conflict { key: key.clone() });
                }
            }
            Guard::FieldVersion { key, field, version } => {
                let stored = self.hashes.get(key).and_then(|h| h.get(field));
                if Record::stored_version(stored.map(|v| &v[..])) != Some(*version) {
                    return Err(CommitError::Conflict { key: key.clone() });
                }
            }
        }
        Ok(())
    }

    fn xadd(&mut self, key: &str, fields: Vec<(String, Vec<u8>)>, max_len: Option<u64>) -> String {
        let stream = self.streams.entry(key.to_string()).or_default();
        let ms = now_ms();
        let id = if ms > stream.last_id.0 { (ms, 0) } else { (stream.last_id.0, stream.last_id.1 + 1) };
        stream.last_id = id;
        stream.added += 1;
        stream.entries.insert(id, fields);
        if let Some(max) = max_len {
            while stream.entries.len() as u64 > max {
                stream.entries.pop_first();
            }
        }
        id_str(id)
    }

    /// Adds `delta` to integer hash field `field` of `key` (absent or not a number: 0).
    fn hincr(&mut self, key: &str, field: &str, delta: i64) {
        let h = self.hashes.entry(key.to_string()).or_default();
        let cur =
            h.get(field).and_then(|v| std::str::from_utf8(v).ok()).and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
        h.insert(field.to_string(), (cur + delta).to_string().into_bytes());
    }

    fn apply(&mut self, op: &Op, out: &mut Committed) {
        match op {
            Op::Put { key, data, ttl } => {
                let version = self.record_version(key) + 1;
                self.strings.insert(
                    key.clone(),
                    Str {
                        value: StrValue::Record(Record { version, data: data.clone() }),
                        expires: ttl.map(|t| Instant::now() + t),
                    },
                );
            }
            Op::PutAt { key, version, data, ttl } => {
                self.strings.insert(
                    key.clone(),
                    Str {
                        value: StrValue::Record(Record { version: *version, data: data.clone() }),
                        expires: ttl.map(|t| Instant::now() + t),
                    },
                );
            }
            Op::Delete { key } => {
                self.strings.remove(key);
                self.zsets.remove(key);
                self.hashes.remove(key);
                self.hash_expiry.remove(key);
                self.sets.remove(key);
                self.streams.remove(key);
            }
            Op::ZAdd { key, member, score } => self.zsets.entry(key.clone()).or_default().insert(member, *score),
            Op::ZRem { key, member } => {
                if let Some(z) = self.zsets.get_mut(key) {
                    z.remove(member);
                    if z.by_member.is_empty() {
                        self.zsets.remove(key);
                    }
                }
            }
            Op::ZRemStamp { key, members, stamp: (hash, field, value) } => {
                let mut removed = false;
                if let Some(z) = self.zsets.get_mut(key) {
                    for m in members {
                        removed |= z.by_member.contains_key(m);
                        z.remove(m);
                    }
                    if z.by_member.is_empty() {
                        self.zsets.remove(key);
                    }
                }
                if removed {
                    self.hashes.entry(hash.clone()).or_default().insert(field.clone(), value.clone());
                }
            }
            Op::ZCopyPage { key, source, upto, limit, count_into, progress } => {
                let cursor = self.hashes.get(&progress.0).and_then(|h| h.get(&progress.1));
                let after = match cursor.map(Vec::as_slice) {
                    Some(v) if v == crate::PAGE_COPY_DONE.as_bytes() => return,
                    Some([b'>', rest @ ..]) => std::str::from_utf8(rest).ok().and_then(|s| s.parse::<f64>().ok()),
                    _ => None,
                };
                let page: Vec<(String, f64)> = match self.zsets.get(source) {
                    Some(z) => z
                        .scored_from(after.map_or(Bound::Unbounded, Bound::Excluded))
                        .filter(|(s, _)| after.is_none_or(|a| s.0 > a))
                        .take_while(|(s, _)| s.0 <= *upto)
                        .take(*limit as usize)
                        .map(|(s, m)| (m.clone(), s.0))
                        .collect(),
                    None => Vec::new(),
                };
                let cursor = match page.last() {
                    Some((_, last)) if page.len() as u64 >= *limit => format!(">{last}"),
                    _ => crate::PAGE_COPY_DONE.to_string(),
                };
                let mut added = 0i64;
                if !page.is_empty() {
                    let z = self.zsets.entry(key.clone()).or_default();
                    for (member, score) in page {
                        added += i64::from(!z.by_member.contains_key(&member));
                        z.insert(&member, score);
                    }
                }
                self.hincr(&count_into.0, &count_into.1, added);
                self.hashes.entry(progress.0.clone()).or_default().insert(progress.1.clone(), cursor.into_bytes());
            }
            Op::ZUnionStore { key, sources, count_into } => {
                let mut union: HashMap<String, f64> = HashMap::new();
                for src in sources {
                    if let Some(z) = self.zsets.get(src) {
                        for (member, score) in &z.by_member {
                            *union.entry(member.clone()).or_default() += score;
                        }
                    }
                }
                self.zsets.remove(key);
                if let Some((hash, field)) = count_into {
                    self.hashes
                        .entry(hash.clone())
                        .or_default()
                        .insert(field.clone(), union.len().to_string().into_bytes());
                }
                if !union.is_empty() {
                    let z = self.zsets.entry(key.clone()).or_default();
                    for (member, score) in &union {
                        z.insert(member, *score);
                    }
                }
            }
            Op::HIncr { key, field, delta } => self.hincr(key, field, *delta),
            Op::HSet { key, field, value } => {
                self.hashes.entry(key.clone()).or_default().insert(field.clone(), value.clone());
            }
            Op::HSetExpireAt { key, field, value, expire_at_ms } => {
                self.hashes.entry(key.clone()).or_default().insert(field.clone(), value.clone());
                // An expiry already past removes the hash at once, as PEXPIREAT does.
                if *expire_at_ms > now_ms() {
                    self.hash_expiry.insert(key.clone(), *expire_at_ms);
                } else {
                    self.hashes.remove(key);
                    self.hash_expiry.remove(key);
                }
            }
            Op::HDel { key, field } => {
                if let Some(h) = self.hashes.get_mut(key) {
                    h.remove(field);
                    if h.is_empty() {
                        self.hashes.remove(key);
                        self.hash_expiry.remove(key);
                    }
                }
            }
            Op::SAdd { key, member } => {
                self.sets.entry(key.clone()).or_default().insert(member.clone());
            }
            Op::SRem { key, member } => {
                if let Some(s) = self.sets.get_mut(key) {
                    s.remove(member);
                    if s.is_empty() {
                        self.sets.remove(key);
                    }
                }
            }
            Op::XAdd { key, fields, max_len } => {
                let id = self.xadd(key, fields.clone(), *max_len);
                out.stream_ids.push(id);
            }
            Op::XTrimBefore { key, min_id } => {
                // Checked in `commit` before any op applied.
                if let (Ok(min), Some(stream)) = (parse_id(min_id), self.streams.get_mut(key)) {
                    stream.entries = stream.entries.split_off(&min);
                }
            }
            // Refused before any op applies (see `commit`).
            Op::Audit { .. } => {}
            Op::AuditLinked { chain, seq, prev, hash, entry } => {
                self.xadd(
                    &chain.stream,
                    vec![
                        ("seq".into(), seq.to_string().into_bytes()),
                        ("prev".into(), prev.clone().into_bytes()),
                        ("hash".into(), hash.clone().into_bytes()),
                        ("entry".into(), entry.clone()),
                    ],
                    None,
                );
                // The head reads like a record whose version is the sequence number and whose payload
                // is the hash, exactly as the Redis backend's `<seq>:<hash>` string parses.
                self.strings.insert(
                    chain.head.clone(),
                    Str {
                        value: StrValue::Record(Record { version: *seq, data: hash.clone().into_bytes() }),
                        expires: None,
                    },
                );
                out.audit.push((*seq, hash.clone()));
            }
        }
    }
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        MemoryBackend::default()
    }

    fn lock(&self) -> StateResult<MutexGuard<'_, Inner>> {
        self.inner.lock().map_err(|_| StateError::Backend("memory backend poisoned by a panic".into()))
    }

    fn zset_range(&self, key: &str, start: i64, stop: i64, rev: bool) -> StateResult<Vec<(String, f64)>> {
        let inner = self.lock()?;
        let Some(z) = inner.zsets.get(key) else {
            return Ok(Vec::new());
        };
        let len = z.ordered.len() as i64;
        let norm = |i: i64| if i < 0 { (len + i).max(0) } else { i };
        let (s, e) = (norm(start), norm(stop).min(len - 1));
        if s > e || s >= len {
            return Ok(Vec::new());
        }
        let take = (e - s + 1) as usize;
        let iter: Box<dyn Iterator<Item = &(Score, String)>> =
            if rev { Box::new(z.ordered.iter().rev()) } else { Box::new(z.ordered.iter()) };
        Ok(iter.skip(s as usize).take(take).map(|(sc, m)| (m.clone(), sc.0)).collect())
    }

    fn stream_read_new(&self, key: &str, group: &str, consumer: &str, count: usize) -> StateResult<Vec<StreamEntry>> {
        let mut inner = self.lock()?;
        let Some(stream) = inner.streams.get_mut(key) else {
            return Err(StateError::Backend(format!("NOGROUP no such key {key}")));
        };
        let Some(g) = stream.groups.get_mut(group) else {
            return Err(StateError::Backend(format!("NOGROUP no such group {group}")));
        };
        let mut out = Vec::new();
        let from = (Bound::Excluded(g.last_delivered), Bound::Unbounded);
        for (id, fields) in stream.entries.range(from).take(count) {
            out.push(StreamEntry { id: id_str(*id), fields: fields.clone() });
            g.last_delivered = *id;
            g.delivered_total += 1;
            g.pending.insert(*id, Pending { consumer: consumer.to_string(), delivered_at: Instant::now() });
        }
        Ok(out)
    }

    fn stream_after(&self, key: &str, after: Id, count: usize) -> StateResult<Vec<StreamEntry>> {
        let inner = self.lock()?;
        let Some(stream) = inner.streams.get(key) else {
            return Ok(Vec::new());
        };
        Ok(stream
            .entries
            .range((Bound::Excluded(after), Bound::Unbounded))
            .take(count)
            .map(|(id, f)| StreamEntry { id: id_str(*id), fields: f.clone() })
            .collect())
    }

    /// Waits until something is appended or `deadline` passes.
    async fn wait_append(&self, deadline: Instant) -> bool {
        tokio::time::timeout_at(deadline, self.appended.notified()).await.is_ok()
    }
}

impl Backend for MemoryBackend {
    async fn get(&self, keys: &[String]) -> StateResult<Vec<Option<Record>>> {
        let mut inner = self.lock()?;
        Ok(keys
            .iter()
            .map(|k| match inner.live_str(k) {
                Some(Str { value: StrValue::Record(r), .. }) => Some(r.clone()),
                _ => None,
            })
            .collect())
    }

    async fn commit(&self, txn: &Txn) -> Result<Committed, CommitError> {
        txn.slot()?;
        txn.check_receipt_free()?;
        if txn.needs_linking() {
            return Err(
                StateError::Backend("audit entries must be linked (Txn::link_audit) before commit".into()).into()
            );
        }
        // A malformed trim id is refused before anything applies, as Redis refuses the script.
        for op in &txn.ops {
            if let Op::XTrimBefore { min_id, .. } = op {
                parse_id(min_id)?;
            }
        }
        let mut out = Committed::default();
        {
            let mut inner = self.lock()?;
            inner.purge_hashes();
            for g in &txn.guards {
                inner.check(g)?;
            }
            for g in &txn.guards {
                if let Guard::Fence { key, token } = g {
                    inner.strings.insert(key.clone(), Str { value: StrValue::Int(*token), expires: None });
                }
            }
            for op in &txn.ops {
                inner.apply(op, &mut out);
            }
        }
        if !out.stream_ids.is_empty() || !out.audit.is_empty() {
            self.appended.notify_waiters();
        }
        Ok(out)
    }

    async fn incr(&self, key: &str, by: u64) -> StateResult<u64> {
        let mut inner = self.lock()?;
        let cur = inner.int(key).unwrap_or(0);
        if by == 0 {
            return Ok(cur);
        }
        let next = cur + by;
        inner.strings.insert(key.to_string(), Str { value: StrValue::Int(next), expires: None });
        Ok(next)
    }

    async fn zrange(&self, key: &str, start: i64, stop: i64, rev: bool) -> StateResult<Vec<(String, f64)>> {
        self.zset_range(key, start, stop, rev)
    }

    async fn zrange_by_score(
        &self,
        key: &str,
        min: Bound<f64>,
        max: Bound<f64>,
        limit: usize,
    ) -> StateResult<Vec<(String, f64)>> {
        let inner = self.lock()?;
        let Some(z) = inner.zsets.get(key) else {
            return Ok(Vec::new());
        };
        let above = |s: f64| match min {
            Bound::Included(m) => s >= m,
            Bound::Excluded(m) => s > m,
            Bound::Unbounded => true,
        };
        let below = |s: f64| match max {
            Bound::Included(m) => s <= m,
            Bound::Excluded(m) => s < m,
            Bound::Unbounded => true,
        };
        Ok(z.scored_from(min)
            .skip_while(|(s, _)| !above(s.0))
            .take_while(|(s, _)| below(s.0))
            .take(limit)
            .map(|(s, m)| (m.clone(), s.0))
            .collect())
    }

    async fn zrank(&self, key: &str, member: &str) -> StateResult<Option<u64>> {
        let inner = self.lock()?;
        let Some(z) = inner.zsets.get(key) else {
            return Ok(None);
        };
        let Some(score) = z.by_member.get(member) else {
            return Ok(None);
        };
        Ok(Some(z.ordered.range(..(Score(*score), member.to_string())).count() as u64))
    }

    async fn zcard(&self, key: &str) -> StateResult<u64> {
        Ok(self.lock()?.zsets.get(key).map(|z| z.by_member.len() as u64).unwrap_or(0))
    }

    async fn hgetall(&self, key: &str) -> StateResult<Vec<(String, Vec<u8>)>> {
        let mut inner = self.lock()?;
        inner.purge_hashes();
        Ok(inner.hashes.get(key).map(|h| h.iter().map(|(f, v)| (f.clone(), v.clone())).collect()).unwrap_or_default())
    }

    async fn hget_each(&self, fields: &[(String, String)]) -> StateResult<Vec<Option<Vec<u8>>>> {
        let mut inner = self.lock()?;
        inner.purge_hashes();
        Ok(fields.iter().map(|(k, f)| inner.hashes.get(k).and_then(|h| h.get(f)).cloned()).collect())
    }

    async fn smembers(&self, key: &str) -> StateResult<Vec<String>> {
        Ok(self.lock()?.sets.get(key).map(|s| s.iter().cloned().collect()).unwrap_or_default())
    }

    async fn get_then_members(&self, key: &str, set: &str) -> StateResult<(Option<Record>, Vec<String>)> {
        // One lock: no commit lands between the two reads.
        let mut inner = self.lock()?;
        let record = match inner.live_str(key) {
            Some(Str { value: StrValue::Record(r), .. }) => Some(r.clone()),
            _ => None,
        };
        let members = inner.sets.get(set).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        Ok((record, members))
    }

    async fn xrange(&self, key: &str, after: Option<&str>, count: usize) -> StateResult<Vec<StreamEntry>> {
        let inner = self.lock()?;
        let Some(stream) = inner.streams.get(key) else {
            return Ok(Vec::new());
        };
        let lower = match after {
            Some(a) => Bound::Excluded(parse_id(a)?),
            None => Bound::Unbounded,
        };
        Ok(stream
            .entries
            .range((lower, Bound::Unbounded))
            .take(count)
            .map(|(id, f)| StreamEntry { id: id_str(*id), fields: f.clone() })
            .collect())
    }

    async fn xlen(&self, key: &str) -> StateResult<u64> {
        Ok(self.lock()?.streams.get(key).map(|s| s.entries.len() as u64).unwrap_or(0))
    }

    async fn xlast_id(&self, key: &str) -> StateResult<String> {
        let inner = self.lock()?;
        Ok(inner
            .streams
            .get(key)
            .and_then(|s| s.entries.keys().next_back().copied())
            .map(id_str)
            .unwrap_or_else(|| "0-0".to_string()))
    }

    async fn group_ensure(&self, key: &str, group: &str) -> StateResult<()> {
        let mut inner = self.lock()?;
        inner.streams.entry(key.to_string()).or_default().groups.entry(group.to_string()).or_default();
        Ok(())
    }

    async fn read_group(
        &self,
        key: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Option<Duration>,
    ) -> StateResult<Vec<StreamEntry>> {
        let deadline = Instant::now() + block.unwrap_or_default();
        loop {
            // Register interest before checking, so an append between the check and the wait is not
            // missed.
            let notified = self.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.stream_read_new(key, group, consumer, count)?;
            if !got.is_empty() || block.is_none() || Instant::now() >= deadline {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn ack(&self, key: &str, group: &str, ids: &[String]) -> StateResult<u64> {
        let mut inner = self.lock()?;
        let Some(g) = inner.streams.get_mut(key).and_then(|s| s.groups.get_mut(group)) else {
            return Ok(0);
        };
        let mut n = 0;
        for id in ids {
            if g.pending.remove(&parse_id(id)?).is_some() {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn autoclaim(
        &self,
        key: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StateResult<Vec<StreamEntry>> {
        let mut inner = self.lock()?;
        let Some(stream) = inner.streams.get_mut(key) else {
            return Ok(Vec::new());
        };
        let Some(g) = stream.groups.get_mut(group) else {
            return Err(StateError::Backend(format!("NOGROUP no such group {group}")));
        };
        let now = Instant::now();
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (id, p) in g.pending.iter_mut() {
            if out.len() >= count {
                break;
            }
            if now.duration_since(p.delivered_at) < min_idle {
                continue;
            }
            match stream.entries.get(id) {
                Some(fields) => {
                    p.consumer = consumer.to_string();
                    p.delivered_at = now;
                    out.push(StreamEntry { id: id_str(*id), fields: fields.clone() });
                }
                // Deleted (trimmed) entries leave the pending list, as in Redis 7.
                None => gone.push(*id),
            }
        }
        for id in gone {
            g.pending.remove(&id);
        }
        Ok(out)
    }

    async fn group_info(&self, key: &str, group: &str) -> StateResult<GroupInfo> {
        let inner = self.lock()?;
        let Some(stream) = inner.streams.get(key) else {
            return Ok(GroupInfo::default());
        };
        let Some(g) = stream.groups.get(group) else {
            return Ok(GroupInfo::default());
        };
        Ok(GroupInfo {
            exists: true,
            pending: g.pending.len() as u64,
            lag: Some(stream.added.saturating_sub(g.delivered_total)),
        })
    }

    async fn tail(&self, key: &str, after: &str, count: usize, block: Duration) -> StateResult<Vec<StreamEntry>> {
        let after = parse_id(after)?;
        let deadline = Instant::now() + block;
        loop {
            let notified = self.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.stream_after(key, after, count)?;
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            if !self.wait_append(deadline).await {
                return self.stream_after(key, after, count);
            }
        }
    }

    async fn lease_acquire(&self, key: &str, fence_counter: &str, ttl: Duration) -> StateResult<Option<u64>> {
        let mut inner = self.lock()?;
        if inner.live_str(key).is_some() {
            return Ok(None);
        }
        let token = inner.int(fence_counter).unwrap_or(0) + 1;
        inner.strings.insert(fence_counter.to_string(), Str { value: StrValue::Int(token), expires: None });
        inner.strings.insert(key.to_string(), Str { value: StrValue::Int(token), expires: Some(Instant::now() + ttl) });
        Ok(Some(token))
    }

    async fn lease_renew(&self, key: &str, token: u64, ttl: Duration) -> StateResult<bool> {
        let mut inner = self.lock()?;
        match inner.live_str(key) {
            Some(s) if matches!(s.value, StrValue::Int(t) if t == token) => {
                s.expires = Some(Instant::now() + ttl);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn lease_release(&self, key: &str, token: u64) -> StateResult<bool> {
        let mut inner = self.lock()?;
        if inner.int(key) == Some(token) {
            inner.strings.remove(key);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    async fn hash_move(
        &self,
        from: &str,
        to: &str,
        forget: &[String],
        lease: &str,
        token: u64,
    ) -> StateResult<Option<HashMoved>> {
        let mut inner = self.lock()?;
        if inner.int(lease) != Some(token) {
            return Ok(None);
        }
        inner.purge_hashes();
        inner.hash_expiry.remove(from);
        let moved = inner.hashes.remove(from).unwrap_or_default();
        let dest = inner.hashes.entry(to.to_string()).or_default();
        for f in forget {
            dest.remove(f);
        }
        let kept = dest.len();
        dest.extend(moved);
        let fields = dest.iter().map(|(f, v)| (f.clone(), v.clone())).collect();
        if dest.is_empty() {
            inner.hashes.remove(to);
        }
        Ok(Some(HashMoved { kept, fields }))
    }

    async fn ping(&self) -> StateResult<()> {
        self.lock().map(|_| ())
    }

    async fn info(&self) -> StateResult<BackendInfo> {
        Ok(BackendInfo { used_memory: None })
    }
}
