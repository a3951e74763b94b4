//! The Redis backend: what production runs.
//!
//! Plain reads go through one multiplexed, auto-reconnecting connection. Every transaction is one
//! `EVALSHA` of `lua/commit.lua`, so it is atomic and touches keys of one hash slot only. Blocking
//! stream reads (consumer groups, tails) use connections of their own, because a blocked command would
//! stall every other command pipelined behind it on a shared connection.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, RedisError, Script, Value};

use crate::{
    Backend, BackendInfo, CommitError, Committed, GroupInfo, Guard, Op, Record, StateError, StateResult, StreamEntry,
    Txn,
};

const COMMIT_LUA: &str = include_str!("../lua/commit.lua");

const LEASE_ACQUIRE_LUA: &str = r"#!lua
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
";

const LEASE_RENEW_LUA: &str = r"#!lua
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

const LEASE_RELEASE_LUA: &str = r"#!lua
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// How the Redis backend connects and how quickly it gives up.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// A command that gets no answer within this fails with [`StateError::Unavailable`].
    pub response_timeout: Duration,
    /// A connection attempt that takes longer than this fails.
    pub connect_timeout: Duration,
    /// How long start-up keeps retrying an unreachable Redis (None: forever).
    pub startup_retry_for: Option<Duration>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            response_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_millis(500),
            startup_retry_for: None,
        }
    }
}

/// State on a Redis server (or a Redis Cluster node per hash slot).
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    client: Client,
    blocking: Mutex<Vec<MultiplexedConnection>>,
    scripts: Scripts,
    options: RedisOptions,
}

struct Scripts {
    commit: Script,
    lease_acquire: Script,
    lease_renew: Script,
    lease_release: Script,
}

/// Transient failures (Redis unreachable, or up but not answering yet) become
/// [`StateError::Unavailable`], so callers get UNAVAILABLE and retry; anything else is a real error.
///
/// A Redis that restarts with persistence answers `LOADING` until its dataset is back in memory;
/// `TRYAGAIN`, `CLUSTERDOWN` and `MASTERDOWN` are the Cluster and failover equivalents.
fn unavailable(e: RedisError) -> StateError {
    use redis::{ErrorKind, ServerErrorKind};
    let busy = matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
        )
    );
    if busy || e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        StateError::Unavailable(e.to_string())
    } else {
        StateError::Backend(e.to_string())
    }
}

impl RedisBackend {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/0`). An unreachable server is retried with a
    /// warning every attempt, with backoff up to 5 s, for `options.startup_retry_for`.
    pub async fn connect(url: &str, options: RedisOptions) -> StateResult<Self> {
        // TCP_NODELAY: commands are small and latency-bound; Nagle's algorithm (redis-rs's default)
        // would hold them back waiting for ACKs.
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| StateError::Backend(format!("bad redis url {}: {e}", redact(url))))?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client =
            Client::open(info).map_err(|e| StateError::Backend(format!("bad redis url {}: {e}", redact(url))))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(options.response_timeout))
            .set_connection_timeout(Some(options.connect_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(200);
        let conn = loop {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                Ok(conn) => break conn,
                Err(e) => {
                    let waited = started.elapsed();
                    if options.startup_retry_for.is_some_and(|limit| waited >= limit) {
                        return Err(unavailable(e));
                    }
                    tracing::warn!(redis_url = %redact(url), error = %e, retry_in = ?delay,
                        "redis is unreachable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        tracing::info!(redis_url = %redact(url), "connected to redis");
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                conn,
                client,
                blocking: Mutex::new(Vec::new()),
                scripts: Scripts {
                    commit: Script::new(COMMIT_LUA),
                    lease_acquire: Script::new(LEASE_ACQUIRE_LUA),
                    lease_renew: Script::new(LEASE_RENEW_LUA),
                    lease_release: Script::new(LEASE_RELEASE_LUA),
                },
                options,
            }),
        })
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> StateResult<T> {
        let mut conn = self.inner.conn.clone();
        cmd.query_async(&mut conn).await.map_err(unavailable)
    }

    /// Runs a blocking command on a connection of its own (taken from a small pool).
    async fn blocking_query(&self, cmd: &redis::Cmd, block: Duration) -> StateResult<Value> {
        let pooled = self.inner.blocking.lock().map_err(|_| StateError::Backend("poisoned pool".into()))?.pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.inner.options.connect_timeout))
                    .set_response_timeout(None);
                self.inner.client.get_multiplexed_async_connection_with_config(&cfg).await.map_err(unavailable)?
            }
        };
        // The server answers a blocked read after `block` at the latest; anything much later means the
        // connection is gone.
        let limit = block + self.inner.options.response_timeout;
        match tokio::time::timeout(limit, cmd.query_async::<Value>(&mut conn)).await {
            Ok(Ok(v)) => {
                if let Ok(mut pool) = self.inner.blocking.lock()
                    && pool.len() < 16
                {
                    pool.push(conn);
                }
                Ok(v)
            }
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(StateError::Unavailable(format!("blocking read got no answer within {limit:?}"))),
        }
    }
}

/// `redis://user:secret@host` → `redis://user:***@host`, so passwords never reach the logs.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..]),
                None => format!("{}***{}", &url[..scheme + 3], &url[at..]),
            }
        }
        _ => url.to_string(),
    }
}

fn parse_record(key: &str, raw: Vec<u8>) -> StateResult<Record> {
    let colon = raw
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| StateError::Backend(format!("record {key} has no version prefix")))?;
    let version = std::str::from_utf8(&raw[..colon])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| StateError::Backend(format!("record {key} has a bad version prefix")))?;
    let mut data = raw;
    data.drain(..=colon);
    Ok(Record { version, data })
}

fn bytes_of(v: Value) -> StateResult<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        Value::Okay => Ok(b"OK".to_vec()),
        other => Err(StateError::Backend(format!("expected a string, got {other:?}"))),
    }
}

fn string_of(v: Value) -> StateResult<String> {
    String::from_utf8(bytes_of(v)?).map_err(|_| StateError::Backend("expected utf-8".into()))
}

fn array_of(v: Value) -> StateResult<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(StateError::Backend(format!("expected an array, got {other:?}"))),
    }
}

/// Parses `[[id, [f, v, ...]], ...]`.
fn parse_entries(v: Value) -> StateResult<Vec<StreamEntry>> {
    let mut out = Vec::new();
    for item in array_of(v)? {
        let mut parts = array_of(item)?.into_iter();
        let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
            // XAUTOCLAIM on Redis 6.2 reports deleted entries as nil; skip them.
            continue;
        };
        if matches!(fields, Value::Nil) {
            continue;
        }
        let id = string_of(id)?;
        let mut flat = array_of(fields)?.into_iter();
        let mut pairs = Vec::new();
        while let (Some(f), Some(val)) = (flat.next(), flat.next()) {
            pairs.push((string_of(f)?, bytes_of(val)?));
        }
        out.push(StreamEntry { id, fields: pairs });
    }
    Ok(out)
}

/// Parses the XREAD/XREADGROUP reply `[[key, entries]]` (nil on timeout).
fn parse_read_reply(v: Value) -> StateResult<Vec<StreamEntry>> {
    let mut out = Vec::new();
    match v {
        Value::Nil => {}
        Value::Map(pairs) => {
            for (_, entries) in pairs {
                out.extend(parse_entries(entries)?);
            }
        }
        other => {
            for stream in array_of(other)? {
                let mut parts = array_of(stream)?.into_iter();
                let _key = parts.next();
                if let Some(entries) = parts.next() {
                    out.extend(parse_entries(entries)?);
                }
            }
        }
    }
    Ok(out)
}

fn score_arg(b: Bound<f64>, low: bool) -> String {
    match b {
        Bound::Included(x) => format_score(x),
        Bound::Excluded(x) => format!("({}", format_score(x)),
        Bound::Unbounded => (if low { "-inf" } else { "+inf" }).to_string(),
    }
}

/// Scores are integers in practice; print them without exponent or trailing `.0`.
fn format_score(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 9.0e15 { format!("{}", x as i64) } else { format!("{x}") }
}

fn parse_scored(v: Value) -> StateResult<Vec<(String, f64)>> {
    let items = array_of(v)?;
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let Some(first) = it.next() {
        // RESP2 flattens WITHSCORES into [m, s, m, s]; RESP3 nests [[m, s], ...].
        let (member, score) = match first {
            Value::Array(pair) => {
                let mut p = pair.into_iter();
                (p.next().unwrap_or(Value::Nil), p.next().unwrap_or(Value::Nil))
            }
            m => (m, it.next().unwrap_or(Value::Nil)),
        };
        let score = match score {
            Value::Double(d) => d,
            s => string_of(s)?.parse::<f64>().map_err(|e| StateError::Backend(format!("bad score: {e}")))?,
        };
        out.push((string_of(member)?, score));
    }
    Ok(out)
}

impl Backend for RedisBackend {
    async fn get(&self, keys: &[String]) -> StateResult<Vec<Option<Record>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<Vec<u8>>> = self.query(redis::cmd("MGET").arg(keys)).await?;
        raw.into_iter().zip(keys).map(|(r, k)| r.map(|bytes| parse_record(k, bytes)).transpose()).collect()
    }

    async fn commit(&self, txn: &Txn) -> Result<Committed, CommitError> {
        if txn.guards.is_empty() && txn.ops.is_empty() {
            return Ok(Committed::default());
        }
        txn.slot()?;
        if txn.needs_linking() {
            return Err(
                StateError::Backend("audit entries must be linked (Txn::link_audit) before commit".into()).into()
            );
        }
        let keys = txn.keys();
        let index: HashMap<&str, usize> = keys.iter().enumerate().map(|(i, k)| (*k, i + 1)).collect();
        let idx = |k: &str| index.get(k).copied().unwrap_or(0).to_string();
        let mut inv = self.inner.scripts.commit.prepare_invoke();
        for k in &keys {
            inv.key(*k);
        }
        inv.arg(txn.guards.len()).arg(txn.ops.len());
        for g in &txn.guards {
            match g {
                Guard::Version { key, version } => inv.arg("v").arg(idx(key)).arg(*version),
                Guard::Fence { key, token } => inv.arg("f").arg(idx(key)).arg(*token),
                Guard::Lease { key, token } => inv.arg("l").arg(idx(key)).arg(*token),
            };
        }
        for op in &txn.ops {
            match op {
                Op::Put { key, data, ttl } => {
                    let ttl_ms = ttl.map(|t| t.as_millis().max(1)).unwrap_or(0);
                    inv.arg("put").arg(idx(key)).arg(ttl_ms.to_string()).arg(data.as_slice())
                }
                Op::PutAt { key, version, data } => inv.arg("putat").arg(idx(key)).arg(*version).arg(data.as_slice()),
                Op::Delete { key } => inv.arg("del").arg(idx(key)),
                Op::ZAdd { key, member, score } => {
                    inv.arg("zadd").arg(idx(key)).arg(format_score(*score)).arg(member.as_str())
                }
                Op::ZRem { key, member } => inv.arg("zrem").arg(idx(key)).arg(member.as_str()),
                Op::ZUnionStore { key, sources, count_into } => {
                    inv.arg("zunion").arg(idx(key)).arg(sources.len());
                    for s in sources {
                        inv.arg(idx(s));
                    }
                    match count_into {
                        Some((hash, field)) => inv.arg(idx(hash)).arg(field.as_str()),
                        None => inv.arg("0").arg(""),
                    }
                }
                Op::HIncr { key, field, delta } => inv.arg("hincr").arg(idx(key)).arg(field.as_str()).arg(*delta),
                Op::HSet { key, field, value } => {
                    inv.arg("hset").arg(idx(key)).arg(field.as_str()).arg(value.as_slice())
                }
                Op::HDel { key, field } => inv.arg("hdel").arg(idx(key)).arg(field.as_str()),
                Op::SAdd { key, member } => inv.arg("sadd").arg(idx(key)).arg(member.as_str()),
                Op::SRem { key, member } => inv.arg("srem").arg(idx(key)).arg(member.as_str()),
                Op::XAdd { key, fields, max_len } => {
                    inv.arg("xadd").arg(idx(key)).arg(max_len.unwrap_or(0)).arg(fields.len());
                    for (f, v) in fields {
                        inv.arg(f.as_str()).arg(v.as_slice());
                    }
                    &mut inv
                }
                Op::Audit { .. } => &mut inv,
                Op::AuditLinked { chain, seq, prev, hash, entry } => inv
                    .arg("alink")
                    .arg(idx(&chain.stream))
                    .arg(idx(&chain.head))
                    .arg(*seq)
                    .arg(prev.as_str())
                    .arg(hash.as_str())
                    .arg(entry.as_slice()),
            };
        }
        let mut conn = self.inner.conn.clone();
        let reply: Value = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        let mut parts = array_of(reply)?.into_iter();
        let status = string_of(parts.next().unwrap_or(Value::Nil))?;
        match status.as_str() {
            "ok" => {
                let mut committed = Committed::default();
                let mut results = parts;
                for op in &txn.ops {
                    match op {
                        Op::XAdd { .. } => {
                            committed.stream_ids.push(string_of(results.next().unwrap_or(Value::Nil))?);
                        }
                        Op::AuditLinked { .. } => {
                            let r = string_of(results.next().unwrap_or(Value::Nil))?;
                            let (seq, hash) = r
                                .split_once(':')
                                .and_then(|(s, h)| Some((s.parse::<u64>().ok()?, h.to_string())))
                                .ok_or_else(|| StateError::Backend(format!("bad audit result {r:?}")))?;
                            committed.audit.push((seq, hash));
                        }
                        _ => {}
                    }
                }
                Ok(committed)
            }
            "conflict" | "fenced" | "lease" => {
                let key = string_of(parts.next().unwrap_or(Value::Nil))?;
                Err(match status.as_str() {
                    "conflict" => CommitError::Conflict { key },
                    "fenced" => CommitError::Fenced { key },
                    _ => CommitError::LeaseLost { key },
                })
            }
            other => Err(StateError::Backend(format!("commit script answered {other:?}")).into()),
        }
    }

    async fn incr(&self, key: &str, by: u64) -> StateResult<u64> {
        self.query(redis::cmd("INCRBY").arg(key).arg(by)).await
    }

    async fn zrange(&self, key: &str, start: i64, stop: i64, rev: bool) -> StateResult<Vec<(String, f64)>> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(key).arg(start).arg(stop);
        if rev {
            cmd.arg("REV");
        }
        cmd.arg("WITHSCORES");
        parse_scored(self.query(&cmd).await?)
    }

    async fn zrange_by_score(
        &self,
        key: &str,
        min: Bound<f64>,
        max: Bound<f64>,
        limit: usize,
    ) -> StateResult<Vec<(String, f64)>> {
        let cmd = redis::cmd("ZRANGE")
            .arg(key)
            .arg(score_arg(min, true))
            .arg(score_arg(max, false))
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES")
            .to_owned();
        parse_scored(self.query(&cmd).await?)
    }

    async fn zrank(&self, key: &str, member: &str) -> StateResult<Option<u64>> {
        self.query(redis::cmd("ZRANK").arg(key).arg(member)).await
    }

    async fn zcard(&self, key: &str) -> StateResult<u64> {
        self.query(redis::cmd("ZCARD").arg(key)).await
    }

    async fn hgetall(&self, key: &str) -> StateResult<Vec<(String, Vec<u8>)>> {
        let v: Value = self.query(redis::cmd("HGETALL").arg(key)).await?;
        let mut out = Vec::new();
        match v {
            Value::Map(pairs) => {
                for (f, val) in pairs {
                    out.push((string_of(f)?, bytes_of(val)?));
                }
            }
            other => {
                let mut it = array_of(other)?.into_iter();
                while let (Some(f), Some(val)) = (it.next(), it.next()) {
                    out.push((string_of(f)?, bytes_of(val)?));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn smembers(&self, key: &str) -> StateResult<Vec<String>> {
        let mut members: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(key)).await?;
        members.sort();
        Ok(members)
    }

    async fn xrange(&self, key: &str, after: Option<&str>, count: usize) -> StateResult<Vec<StreamEntry>> {
        let start = after.map(|a| format!("({a}")).unwrap_or_else(|| "-".to_string());
        let v: Value = self.query(redis::cmd("XRANGE").arg(key).arg(start).arg("+").arg("COUNT").arg(count)).await?;
        parse_entries(v)
    }

    async fn xlen(&self, key: &str) -> StateResult<u64> {
        self.query(redis::cmd("XLEN").arg(key)).await
    }

    async fn xlast_id(&self, key: &str) -> StateResult<String> {
        let v: Value = self.query(redis::cmd("XREVRANGE").arg(key).arg("+").arg("-").arg("COUNT").arg(1)).await?;
        Ok(parse_entries(v)?.pop().map(|e| e.id).unwrap_or_else(|| "0-0".to_string()))
    }

    async fn group_ensure(&self, key: &str, group: &str) -> StateResult<()> {
        let r: Result<Value, StateError> =
            self.query(redis::cmd("XGROUP").arg("CREATE").arg(key).arg(group).arg("0").arg("MKSTREAM")).await;
        match r {
            Ok(_) => Ok(()),
            Err(StateError::Backend(msg)) if msg.contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn read_group(
        &self,
        key: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Option<Duration>,
    ) -> StateResult<Vec<StreamEntry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(group).arg(consumer).arg("COUNT").arg(count);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(key).arg(">");
        let v = match block {
            Some(b) => self.blocking_query(&cmd, b).await?,
            None => self.query(&cmd).await?,
        };
        parse_read_reply(v)
    }

    async fn ack(&self, key: &str, group: &str, ids: &[String]) -> StateResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.query(redis::cmd("XACK").arg(key).arg(group).arg(ids)).await
    }

    async fn autoclaim(
        &self,
        key: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StateResult<Vec<StreamEntry>> {
        let v: Value = self
            .query(
                redis::cmd("XAUTOCLAIM")
                    .arg(key)
                    .arg(group)
                    .arg(consumer)
                    .arg(min_idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        let mut parts = array_of(v)?.into_iter();
        let _cursor = parts.next();
        parse_entries(parts.next().unwrap_or(Value::Nil))
    }

    async fn group_info(&self, key: &str, group: &str) -> StateResult<GroupInfo> {
        let v: Value = self.query(redis::cmd("XINFO").arg("GROUPS").arg(key)).await?;
        for g in array_of(v)? {
            let mut fields: HashMap<String, Value> = HashMap::new();
            match g {
                Value::Map(pairs) => {
                    for (f, val) in pairs {
                        fields.insert(string_of(f)?, val);
                    }
                }
                other => {
                    let mut it = array_of(other)?.into_iter();
                    while let (Some(f), Some(val)) = (it.next(), it.next()) {
                        fields.insert(string_of(f)?, val);
                    }
                }
            }
            let name = fields.remove("name").map(string_of).transpose()?;
            if name.as_deref() != Some(group) {
                continue;
            }
            let num = |v: Option<Value>| -> Option<u64> {
                match v? {
                    Value::Int(i) => u64::try_from(i).ok(),
                    Value::BulkString(b) => std::str::from_utf8(&b).ok()?.parse().ok(),
                    _ => None,
                }
            };
            return Ok(GroupInfo {
                pending: num(fields.remove("pending")).unwrap_or(0),
                lag: num(fields.remove("lag")),
            });
        }
        Ok(GroupInfo::default())
    }

    async fn tail(&self, key: &str, after: &str, count: usize, block: Duration) -> StateResult<Vec<StreamEntry>> {
        let cmd = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(key)
            .arg(after)
            .to_owned();
        parse_read_reply(self.blocking_query(&cmd, block).await?)
    }

    async fn lease_acquire(&self, key: &str, fence_counter: &str, ttl: Duration) -> StateResult<Option<u64>> {
        let mut conn = self.inner.conn.clone();
        let token: u64 = self
            .inner
            .scripts
            .lease_acquire
            .key(key)
            .key(fence_counter)
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok((token > 0).then_some(token))
    }

    async fn lease_renew(&self, key: &str, token: u64, ttl: Duration) -> StateResult<bool> {
        let mut conn = self.inner.conn.clone();
        let ok: u64 = self
            .inner
            .scripts
            .lease_renew
            .key(key)
            .arg(token)
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(ok == 1)
    }

    async fn lease_release(&self, key: &str, token: u64) -> StateResult<bool> {
        let mut conn = self.inner.conn.clone();
        let ok: u64 =
            self.inner.scripts.lease_release.key(key).arg(token).invoke_async(&mut conn).await.map_err(unavailable)?;
        Ok(ok == 1)
    }

    async fn ping(&self) -> StateResult<()> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    async fn info(&self) -> StateResult<BackendInfo> {
        let text: String = self.query(redis::cmd("INFO").arg("memory")).await?;
        let used_memory = text.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok());
        Ok(BackendInfo { used_memory })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://:hunter2@db:6379/0"), "redis://:***@db:6379/0");
        assert_eq!(redact("redis://app:hunter2@db:6379"), "redis://app:***@db:6379");
        assert_eq!(redact("redis://db:6379"), "redis://db:6379");
    }

    #[test]
    fn a_loading_or_failing_over_redis_is_unavailable_not_an_internal_error() {
        use redis::{ErrorKind, ServerErrorKind};
        for kind in [
            ServerErrorKind::BusyLoading,
            ServerErrorKind::TryAgain,
            ServerErrorKind::ClusterDown,
            ServerErrorKind::MasterDown,
        ] {
            let e = RedisError::from((ErrorKind::Server(kind), "transient"));
            assert!(matches!(unavailable(e), StateError::Unavailable(_)), "{kind:?}");
        }
        let e = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "bad"));
        assert!(matches!(unavailable(e), StateError::Backend(_)));
    }

    #[test]
    fn parses_versioned_records() {
        let r = parse_record("k", b"12:a:b".to_vec()).expect("valid");
        assert_eq!(r, Record { version: 12, data: b"a:b".to_vec() });
        assert!(parse_record("k", b"nope".to_vec()).is_err());
        assert!(parse_record("k", b"x1:data".to_vec()).is_err());
    }

    #[test]
    fn formats_scores_without_exponents() {
        assert_eq!(format_score(1.0), "1");
        assert_eq!(format_score(9_007_199_254_740_000.0), "9007199254740000");
        assert_eq!(format_score(1.5), "1.5");
    }
}
