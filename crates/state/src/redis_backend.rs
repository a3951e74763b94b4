//! The Redis backend: what production runs, on a single Redis or on a Redis Cluster.
//!
//! Plain reads go through one multiplexed, auto-reconnecting connection (on a cluster: one per node,
//! each command routed by its key's hash slot, MOVED and ASK redirections followed, the slot map
//! refreshed after a failover). Every transaction is one `EVALSHA` of `lua/commit.lua`, so it is
//! atomic and touches keys of one hash slot only; a node that does not know the script yet gets it
//! with `EVAL` on the same slot. Blocking stream reads (consumer groups, tails) use connections of
//! their own, because a blocked command would stall every other command pipelined behind it on a
//! shared connection.
//!
//! Durability: with [`RedisOptions::min_replicas`] above 0, every write that answers a caller
//! (commits, counters, lease grants) is followed on the same connection by `WAIT min_replicas
//! timeout`, so it is acknowledged only once that many replicas of the node that took it have it.
//! When they don't acknowledge in time the call fails with [`StateError::Unavailable`]: the write
//! may or may not survive a failover, and a retry with the same request id is safe. `WAIT` narrows
//! the window in which a failover loses acknowledged writes; it does not make Redis strongly
//! consistent (a replica that acknowledged can still lose an election to one that did not, and a
//! master cut off in a minority partition keeps accepting writes until `cluster-node-timeout`).
//!
//! Re-sends: the cluster client re-sends a command after a reconnect, so a commit can reach Redis
//! twice. Each commit carries a transaction id; the script stores a receipt under it (in the
//! transaction's own slot, for [`RedisOptions::receipt_ttl`]) and a second run finds the receipt,
//! changes nothing and answers what the first answered. A transaction that creates a record under a
//! must-not-exist guard may go without one ([`Txn::without_receipt`]): a second run fails that guard
//! and changes nothing, and its caller tells its own first run from another writer's.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, Script, ServerErrorKind, Value,
};

use crate::{
    Backend, BackendInfo, CommitError, Committed, GroupInfo, Guard, HashMoved, Op, Record, StateError, StateResult,
    StreamEntry, Txn,
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

// KEYS: from, to, lease. ARGV: token, then the fields to forget from `to`. Returns the number of
// fields `to` kept (after forgetting, before the move), then `to`'s fields and values flattened; or
// nil (false) when the lease is not held. unpack() is bounded by Lua's C stack, hence the chunks
// (of 4,000 values, as in commit.lua).
const HASH_MOVE_LUA: &str = r"#!lua
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return false end
local CHUNK = 4000
local i = 2
while i <= #ARGV do
  local j = math.min(#ARGV, i + CHUNK - 1)
  redis.call('HDEL', KEYS[2], unpack(ARGV, i, j))
  i = j + 1
end
local kept = redis.call('HLEN', KEYS[2])
local moved = redis.call('HGETALL', KEYS[1])
if #moved > 0 then
  i = 1
  while i <= #moved do
    local j = math.min(#moved, i + CHUNK - 1)
    redis.call('HSET', KEYS[2], unpack(moved, i, j))
    i = j + 1
  end
  redis.call('DEL', KEYS[1])
end
local out = redis.call('HGETALL', KEYS[2])
table.insert(out, 1, kept)
return out
";

/// What a call whose write the replicas did not acknowledge in time answers.
pub const OUTCOME_UNKNOWN: &str = "outcome unknown; retry with the same request id";

/// How the Redis backend connects, authenticates, and how quickly it gives up.
#[derive(Clone)]
pub struct RedisOptions {
    /// A command that gets no answer within this fails with [`StateError::Unavailable`] (on a
    /// cluster: including redirections and retries during a failover).
    pub response_timeout: Duration,
    /// A connection attempt that takes longer than this fails.
    pub connect_timeout: Duration,
    /// How long start-up keeps retrying an unreachable Redis (None: forever).
    pub startup_retry_for: Option<Duration>,
    /// Redis Cluster: the URL is a comma-separated list of seed nodes (any reachable one is enough
    /// to discover the rest).
    pub cluster: bool,
    /// ACL user (overrides a user in the URL).
    pub username: Option<String>,
    /// Password (overrides a password in the URL). Never logged.
    pub password: Option<String>,
    /// PEM file of the CA that signs the servers' certificates, for `rediss://` URLs (without it
    /// the system's roots are trusted).
    pub tls_ca: Option<PathBuf>,
    /// Replicas that must acknowledge each write before it answers (`WAIT`); 0 waits for none.
    pub min_replicas: u32,
    /// How long `WAIT` waits for [`min_replicas`](Self::min_replicas) acknowledgements.
    pub wait_timeout: Duration,
    /// How long a commit's receipt is kept, so a re-sent commit is recognised (longer than any
    /// client-side retry of one command can take).
    pub receipt_ttl: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            response_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_millis(500),
            startup_retry_for: None,
            cluster: false,
            username: None,
            password: None,
            tls_ca: None,
            min_replicas: 0,
            wait_timeout: Duration::from_millis(500),
            receipt_ttl: Duration::from_secs(60),
        }
    }
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("startup_retry_for", &self.startup_retry_for)
            .field("cluster", &self.cluster)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls_ca", &self.tls_ca)
            .field("min_replicas", &self.min_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .field("receipt_ttl", &self.receipt_ttl)
            .finish()
    }
}

/// The keys one master of a Redis Cluster (or the single Redis) holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasterKeys {
    /// `host:port` of the master.
    pub addr: String,
    /// The hash-slot ranges it serves (inclusive; `0..=16383` for a single Redis).
    pub slots: Vec<(u16, u16)>,
    /// Keys it holds (`DBSIZE`).
    pub keys: u64,
}

/// State on a single Redis server or a Redis Cluster.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Link,
    /// Connections for writes followed by `WAIT` (none when nothing waits). Redis holds every later
    /// command of a connection until its `WAIT` returns, so durable writes spread over a few
    /// connections of their own to wait for replicas side by side, not one after another, and
    /// never hold up reads; their response timeout includes the wait.
    writers: Vec<Link>,
    next_writer: AtomicU64,
    /// Where blocking connections come from.
    source: Source,
    blocking: Mutex<Vec<Conn>>,
    scripts: Scripts,
    options: RedisOptions,
    /// Where the single server is (`host:port`), for [`RedisBackend::master_key_counts`].
    single_addr: String,
    /// This process's part of every transaction id (random), and the counter for the rest.
    txn_nonce: u64,
    txn_seq: AtomicU64,
}

/// One connection: to a single server (reconnecting on its own) or to every node of a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A long-lived connection: a single server's (which reconnects on its own) or a cluster's, which is
/// replaced when the cluster client reports that it has no connection left.
///
/// Why: after every node of a cluster went away at once (all pods restarted, a power cut), redis-rs
/// 1.8's cluster connection can end up with an empty connection table. Its slot refresh then fails
/// at once with `ClusterConnectionNotFound` and starts again, for ever: the connection never finds
/// the restarted nodes (it only falls back to the seed nodes on other errors), every command on it
/// answers "No connections found", and its task spins a core logging the failure (seen in the kill -9
/// fault test on a cluster: one of an orders replica's write connections, 2 million log lines in a
/// minute, never recovered). A connection built anew from the client starts from the seed nodes.
#[derive(Clone)]
enum Link {
    Fixed(Conn),
    Cluster(Arc<HealingCluster>),
}

impl Link {
    /// The connection to send on now.
    fn get(&self) -> Conn {
        match self {
            Link::Fixed(c) => c.clone(),
            Link::Cluster(h) => Conn::Cluster(h.current()),
        }
    }

    /// Looks at an error a command on [`get`](Self::get)'s connection answered, and maps it.
    fn failed(&self, e: RedisError) -> StateError {
        if let Link::Cluster(h) = self {
            h.saw(&e);
        }
        unavailable(e)
    }
}

/// A cluster connection that is rebuilt from its client when it reports it has no connection to any
/// node (see [`Link`]).
struct HealingCluster {
    client: ClusterClient,
    current: std::sync::RwLock<ClusterConnection>,
    /// Whether a rebuild runs (one at a time).
    rebuilding: std::sync::atomic::AtomicBool,
    /// When the last rebuild ended: at most one a second.
    last: Mutex<Option<std::time::Instant>>,
    /// How long a rebuild may take to connect.
    connect_within: Duration,
    /// How many times it was replaced.
    replaced: AtomicU64,
}

impl HealingCluster {
    fn new(client: ClusterClient, conn: ClusterConnection, connect_within: Duration) -> Arc<Self> {
        Arc::new(HealingCluster {
            client,
            current: std::sync::RwLock::new(conn),
            rebuilding: std::sync::atomic::AtomicBool::new(false),
            last: Mutex::new(None),
            connect_within,
            replaced: AtomicU64::new(0),
        })
    }

    fn current(&self) -> ClusterConnection {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Starts a rebuild in the background when `e` says the connection has no node left (and none
    /// ran in the last second); the callers meanwhile answer UNAVAILABLE as before.
    fn saw(self: &Arc<Self>, e: &RedisError) {
        if e.kind() != ErrorKind::ClusterConnectionNotFound {
            return;
        }
        let recent = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
        if recent || self.rebuilding.swap(true, Ordering::SeqCst) {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            match tokio::time::timeout(this.connect_within, this.client.get_async_connection()).await {
                Ok(Ok(fresh)) => {
                    // The old connection's task ends once its last clone (calls still in flight) is gone.
                    *this.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                    this.replaced.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!("redis cluster connection had no node left; replaced it with a new one");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "redis cluster connection has no node left; a new one failed"),
                Err(_) => {
                    tracing::warn!("redis cluster connection has no node left; a new one did not connect in time")
                }
            }
            *this.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
            this.rebuilding.store(false, Ordering::SeqCst);
        });
    }
}

/// Where blocking connections come from (one per process: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Source {
    Single(Client),
    /// A client without an overall response timeout: blocked reads wait as long as they ask.
    Cluster(ClusterClient),
}

struct Scripts {
    commit: Script,
    lease_acquire: Script,
    lease_renew: Script,
    lease_release: Script,
    hash_move: Script,
}

/// Transient failures become [`StateError::Unavailable`], so callers get UNAVAILABLE and retry;
/// anything else is a real error.
///
/// Transient means: Redis unreachable or not answering in time; up but not serving yet (`LOADING`
/// while a persisted dataset loads); a failover in progress (`CLUSTERDOWN`, `TRYAGAIN`,
/// `MASTERDOWN`, a write reaching a demoted master (`READONLY`), redirections still pointing
/// nowhere after the client's retries (`MOVED`/`ASK`), no connection to the slot's node).
fn unavailable(e: RedisError) -> StateError {
    let transient = matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
        ) | ErrorKind::ClusterConnectionNotFound
            | ErrorKind::Io
    );
    if transient || e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        StateError::Unavailable(e.to_string())
    } else if e.kind() == ErrorKind::AuthenticationFailed {
        StateError::Backend(format!("redis refused the credentials: {e}"))
    } else {
        StateError::Backend(e.to_string())
    }
}

/// The hash tag Redis hashes `key` by (`{tag}`), if it has one.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let len = key[open + 1..].find('}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

/// A short string per hash slot whose own slot is that slot, for keys that must share a slot with
/// a key that has no hash tag (computed once, ~160k CRC16s).
fn slot_filler(slot: u16) -> &'static str {
    static TABLE: OnceLock<Vec<String>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = vec![String::new(); 16384];
        let mut missing = 16384;
        let mut n: u64 = 0;
        while missing > 0 {
            let s = format!("s{n:x}");
            let slot = usize::from(crate::key_slot(&s));
            if table[slot].is_empty() {
                table[slot] = s;
                missing -= 1;
            }
            n += 1;
        }
        table
    });
    &table[usize::from(slot % 16384)]
}

/// The receipt key of transaction `id`, in the slot of `first_key`. `%txn` can't be a part built by
/// [`crate::Space`] (escaped parts never hold a bare `%`), so it collides with no service key, and
/// it keeps the key's hash tag, so ACL key patterns that cover a service's keys cover it too.
fn receipt_key(first_key: &str, id: &str) -> String {
    match hash_tag(first_key) {
        Some(tag) => format!("{{{tag}}}:%txn:{id}"),
        None => format!("{{{}}}:%txn:{id}", slot_filler(crate::key_slot(first_key))),
    }
}

/// A `host:port` for logs and key counts.
fn addr_of(info: &ConnectionInfo) -> String {
    info.addr().to_string()
}

fn parse_url(url: &str, options: &RedisOptions) -> StateResult<ConnectionInfo> {
    let url = url.trim();
    let with_scheme = if url.contains("://") { url.to_string() } else { format!("redis://{url}") };
    let info = with_scheme
        .as_str()
        .into_connection_info()
        .map_err(|e| StateError::Backend(format!("bad redis url {}: {e}", redact(url))))?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &options.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &options.password {
        settings = settings.set_password(password);
    }
    Ok(info.set_redis_settings(settings).set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)))
}

/// The CA for `rediss://` URLs, read from `options.tls_ca`.
fn tls_certs(options: &RedisOptions) -> StateResult<Option<redis::TlsCertificates>> {
    let Some(path) = &options.tls_ca else { return Ok(None) };
    let pem = std::fs::read(path)
        .map_err(|e| StateError::Backend(format!("can't read the redis CA {}: {e}", path.display())))?;
    // rustls picks its crypto from the process default; install ring (what tonic uses) so it never
    // depends on which other crates happen to enable a provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(Some(redis::TlsCertificates { client_tls: None, root_cert: Some(pem) }))
}

fn is_tls(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. })
}

/// A process-unique random number (std's hasher keys come from the OS).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

/// An `EVALSHA`/`EVAL` of a script.
fn script_cmd(verb: &str, code: &[u8], keys: &[String], args: &(dyn Fn(&mut Cmd) + Sync)) -> Cmd {
    let mut cmd = redis::cmd(verb);
    cmd.arg(code).arg(keys.len()).arg(keys);
    args(&mut cmd);
    cmd
}

impl RedisBackend {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/0`, or with `options.cluster` a comma-separated
    /// list of seed nodes `redis://10.0.0.1:6379,redis://10.0.0.2:6379`). User and password come from
    /// the URL (`redis://user:password@host`) or `options`; `rediss://` connects with TLS.
    ///
    /// An unreachable server is retried with a warning every attempt, with backoff up to 5 s, for
    /// `options.startup_retry_for`. Credentials Redis refuses fail at once.
    pub async fn connect(url: &str, options: RedisOptions) -> StateResult<Self> {
        let certs = tls_certs(&options)?;
        let (conn, writers, source, single_addr) = if options.cluster {
            let seeds: Vec<ConnectionInfo> = url
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| parse_url(s, &options))
                .collect::<StateResult<_>>()?;
            if seeds.is_empty() {
                return Err(StateError::Backend("no redis cluster seed nodes given".into()));
            }
            if certs.is_some() && !seeds.iter().all(is_tls) {
                return Err(StateError::Backend("a redis CA was given but the seed URLs are not rediss://".into()));
            }
            let client = cluster_client(&seeds, &options, certs.clone(), Some(options.response_timeout))?;
            let blocking = cluster_client(&seeds, &options, certs.clone(), None)?;
            let connect_within = options.connect_timeout.max(options.response_timeout);
            let conn = retry_startup(url, &options, || client.get_async_connection()).await?;
            let conn = Link::Cluster(HealingCluster::new(client, conn, connect_within));
            let mut writers = Vec::new();
            if options.min_replicas > 0 {
                let durable = options.response_timeout + options.wait_timeout;
                let client = cluster_client(&seeds, &options, certs, Some(durable))?;
                for _ in 0..DURABLE_CONNECTIONS {
                    let c = retry_startup(url, &options, || client.get_async_connection()).await?;
                    writers.push(Link::Cluster(HealingCluster::new(client.clone(), c, connect_within)));
                }
            }
            (conn, writers, Source::Cluster(blocking), String::new())
        } else {
            let info = parse_url(url, &options)?;
            if certs.is_some() && !is_tls(&info) {
                return Err(StateError::Backend("a redis CA was given but the URL is not rediss://".into()));
            }
            let addr = addr_of(&info);
            let client = match certs {
                Some(certs) => Client::build_with_tls(info, certs),
                None => Client::open(info),
            }
            .map_err(|e| StateError::Backend(format!("bad redis url {}: {e}", redact(url))))?;
            let config = |timeout: Duration| {
                ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(options.connect_timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500))
            };
            let plain = config(options.response_timeout);
            let conn =
                retry_startup(url, &options, || ConnectionManager::new_with_config(client.clone(), plain.clone()))
                    .await?;
            let mut writers = Vec::new();
            if options.min_replicas > 0 {
                let durable = config(options.response_timeout + options.wait_timeout);
                for _ in 0..DURABLE_CONNECTIONS {
                    let connect = || ConnectionManager::new_with_config(client.clone(), durable.clone());
                    writers.push(Link::Fixed(Conn::Single(retry_startup(url, &options, connect).await?)));
                }
            }
            (Link::Fixed(Conn::Single(conn)), writers, Source::Single(client), addr)
        };
        tracing::info!(redis_url = %redact(url), cluster = options.cluster, min_replicas = options.min_replicas,
            "connected to redis");
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                conn,
                writers,
                next_writer: AtomicU64::new(0),
                source,
                blocking: Mutex::new(Vec::new()),
                scripts: Scripts {
                    commit: Script::new(COMMIT_LUA),
                    lease_acquire: Script::new(LEASE_ACQUIRE_LUA),
                    lease_renew: Script::new(LEASE_RENEW_LUA),
                    lease_release: Script::new(LEASE_RELEASE_LUA),
                    hash_move: Script::new(HASH_MOVE_LUA),
                },
                options,
                single_addr,
                txn_nonce: random_u64(),
                txn_seq: AtomicU64::new(0),
            }),
        })
    }

    /// Whether this backend talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.conn, Link::Cluster(_))
    }

    /// How many of its cluster connections were replaced because they had no node left (see
    /// `Link`); always 0 on a single Redis.
    pub fn connections_replaced(&self) -> u64 {
        std::iter::once(&self.inner.conn)
            .chain(&self.inner.writers)
            .map(|l| match l {
                Link::Cluster(h) => h.replaced.load(Ordering::SeqCst),
                Link::Fixed(_) => 0,
            })
            .sum()
    }

    /// The options it was connected with.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> StateResult<T> {
        let mut conn = self.inner.conn.get();
        cmd.query_async(&mut conn).await.map_err(|e| self.inner.conn.failed(e))
    }

    /// Runs a script with its keys (routed by their slot), followed on the same connection by
    /// `WAIT` when `durable` and [`RedisOptions::min_replicas`] ask for it. A node that does not
    /// know the script gets it with `EVAL`, on the node that answered `NOSCRIPT` (the same slot).
    ///
    /// The reply, and how many replicas acknowledged (None when no `WAIT` was sent). One pipeline
    /// keeps the `WAIT` on the connection the write went through: `WAIT` counts the replicas that
    /// have everything *this connection* wrote, and a fresh connection has written nothing.
    async fn run_script(
        &self,
        script: &Script,
        code: &str,
        keys: &[String],
        args: &(dyn Fn(&mut Cmd) + Sync),
        durable: bool,
    ) -> StateResult<(Value, Option<i64>)> {
        let wait = (durable && self.inner.options.min_replicas > 0).then_some(self.inner.options.min_replicas);
        let link = if wait.is_some() { self.writer() } else { &self.inner.conn };
        let mut conn = link.get();
        let mut load = false;
        loop {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            if load {
                pipe.add_command(script_cmd("EVAL", code.as_bytes(), keys, args));
            } else {
                pipe.add_command(script_cmd("EVALSHA", script.get_hash().as_bytes(), keys, args));
            }
            if let Some(n) = wait {
                pipe.cmd("WAIT").arg(n).arg(self.inner.options.wait_timeout.as_millis().max(1) as u64);
            }
            let mut replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(|e| link.failed(e))?;
            let acks = match (wait, replies.len()) {
                (Some(_), 2) => match replies.pop() {
                    Some(Value::Int(n)) => Some(n),
                    Some(Value::ServerError(e)) => return Err(unavailable(e.into())),
                    other => return Err(StateError::Backend(format!("WAIT answered {other:?}"))),
                },
                (None, 1) => None,
                (_, n) => return Err(StateError::Backend(format!("expected one reply per command, got {n}"))),
            };
            match replies.pop() {
                Some(Value::ServerError(e)) if !load && e.kind() == Some(ServerErrorKind::NoScript) => load = true,
                Some(Value::ServerError(e)) => return Err(unavailable(e.into())),
                Some(v) => return Ok((v, acks)),
                None => return Err(StateError::Backend("no reply to a script".into())),
            }
        }
    }

    /// Checks the replicas acknowledged a write that answers a caller.
    fn check_acks(&self, acks: Option<i64>) -> StateResult<()> {
        match acks {
            Some(n) if n < i64::from(self.inner.options.min_replicas) => {
                tracing::warn!(
                    acknowledged = n,
                    wanted = self.inner.options.min_replicas,
                    "redis replicas did not acknowledge a write in time"
                );
                Err(StateError::Unavailable(format!(
                    "{n} of {} redis replicas acknowledged the write within {:?}; {OUTCOME_UNKNOWN}",
                    self.inner.options.min_replicas, self.inner.options.wait_timeout
                )))
            }
            _ => Ok(()),
        }
    }

    /// Runs a write command followed by `WAIT` (when [`RedisOptions::min_replicas`] asks for it)
    /// in one pipeline, and checks the acknowledgements.
    async fn durable_query<T: redis::FromRedisValue>(&self, cmd: Cmd) -> StateResult<T> {
        if self.inner.options.min_replicas == 0 {
            return self.query(&cmd).await;
        }
        let mut pipe = redis::pipe();
        pipe.add_command(cmd)
            .cmd("WAIT")
            .arg(self.inner.options.min_replicas)
            .arg(self.inner.options.wait_timeout.as_millis().max(1) as u64);
        let link = self.writer();
        let mut conn = link.get();
        let (value, acks): (T, i64) = pipe.query_async(&mut conn).await.map_err(|e| link.failed(e))?;
        self.check_acks(Some(acks))?;
        Ok(value)
    }

    /// The next connection for a write followed by `WAIT` (round robin).
    fn writer(&self) -> &Link {
        let n = self.inner.next_writer.fetch_add(1, Ordering::Relaxed) as usize;
        match self.inner.writers.len() {
            0 => &self.inner.conn,
            len => &self.inner.writers[n % len],
        }
    }

    /// A fresh transaction id: unique per process (random part) and per commit (counter).
    fn next_txn_id(&self) -> String {
        let seq = self.inner.txn_seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{seq:x}", self.inner.txn_nonce)
    }

    /// Commits `txn` as transaction `id`. [`Backend::commit`] picks a fresh id per call; a second
    /// commit with the same id (within [`RedisOptions::receipt_ttl`]) is what a re-send by the
    /// client looks like to Redis: it changes nothing and answers what the first answered. Tools and
    /// tests use this to replay a commit exactly.
    pub async fn commit_as(&self, txn: &Txn, id: &str) -> Result<Committed, CommitError> {
        if txn.guards.is_empty() && txn.ops.is_empty() {
            return Ok(Committed::default());
        }
        let touched = txn.keys();
        crate::slot_of(&touched)?;
        txn.check_receipt_free()?;
        if txn.needs_linking() {
            return Err(
                StateError::Backend("audit entries must be linked (Txn::link_audit) before commit".into()).into()
            );
        }
        // A script that fails halfway keeps what it already wrote, so a malformed trim id is refused
        // here, before anything is sent.
        for op in &txn.ops {
            if let Op::XTrimBefore { min_id, .. } = op
                && crate::parse_stream_id(min_id).is_none()
            {
                return Err(StateError::Backend(format!("bad stream id {min_id:?}")).into());
            }
        }
        // The keys once (their slot was checked above), each op naming its key by 1-based index.
        let index: HashMap<&str, usize, crate::FastHash> =
            touched.iter().enumerate().map(|(i, k)| (*k, i + 1)).collect();
        let idx = |k: &str| index.get(k).copied().unwrap_or(0);
        let mut keys: Vec<String> = touched.iter().map(|k| k.to_string()).collect();
        // The receipt is the last key; index 0 tells the script there is none.
        let receipt_index = if txn.is_receipt_free() {
            0
        } else {
            keys.push(receipt_key(&keys[0], id));
            keys.len()
        };
        let receipt_ttl = self.inner.options.receipt_ttl.as_millis().max(1) as u64;
        // The arguments go straight into the command (no buffer per argument: a wave's batch has
        // about ten thousand of them).
        let steps = script_steps(&txn.ops);
        let guards = guard_steps(&txn.guards);
        let args = |cmd: &mut Cmd| {
            cmd.arg(receipt_index).arg(receipt_ttl).arg(guards.len()).arg(steps.len());
            for g in &guards {
                let (kind, key, n) = match g {
                    GuardStep::One(Guard::Version { key, version }) => ("v", key, *version),
                    GuardStep::One(Guard::Fence { key, token }) => ("f", key, *token),
                    GuardStep::One(Guard::Lease { key, token }) => ("l", key, *token),
                    GuardStep::One(Guard::NoField { key, field }) => {
                        cmd.arg("h").arg(idx(key)).arg(field.as_str());
                        continue;
                    }
                    // guard_steps puts every field guard in a run; one on its own is a run of one.
                    GuardStep::One(Guard::FieldVersion { key, field, version }) => {
                        cmd.arg("hvs").arg(idx(key)).arg(1).arg(field.as_str()).arg(*version);
                        continue;
                    }
                    GuardStep::FieldVersions(key, fields) => {
                        cmd.arg("hvs").arg(idx(key)).arg(fields.len());
                        for (field, version) in fields {
                            cmd.arg(*field).arg(*version);
                        }
                        continue;
                    }
                    GuardStep::Absent(absent) => {
                        cmd.arg("abs").arg(idx(absent[0])).arg(absent.len());
                        for key in absent {
                            cmd.arg(idx(key));
                        }
                        continue;
                    }
                };
                cmd.arg(kind).arg(idx(key)).arg(n);
            }
            for step in &steps {
                let op = match step {
                    Step::Op(op) => *op,
                    Step::ZAdds(key, members) => {
                        cmd.arg("zadds").arg(idx(key)).arg(members.len());
                        for (score, member) in members {
                            cmd.arg(Score(*score)).arg(*member);
                        }
                        continue;
                    }
                    Step::ZRems(key, members) => {
                        cmd.arg("zrems").arg(idx(key)).arg(members.len());
                        for member in members {
                            cmd.arg(*member);
                        }
                        continue;
                    }
                    Step::HSets(key, fields) => {
                        cmd.arg("hsets").arg(idx(key)).arg(fields.len());
                        for (field, value) in fields {
                            cmd.arg(*field).arg(*value);
                        }
                        continue;
                    }
                };
                match op {
                    Op::Put { key, data, ttl } => {
                        let ttl_ms = ttl.map(|t| t.as_millis().max(1)).unwrap_or(0) as u64;
                        cmd.arg("put").arg(idx(key)).arg(ttl_ms).arg(&data[..]);
                    }
                    Op::PutAt { key, version, data, ttl: None } => {
                        cmd.arg("putat").arg(idx(key)).arg(Versioned(*version, data));
                    }
                    Op::PutAt { key, version, data, ttl: Some(ttl) } => {
                        let ttl_ms = ttl.as_millis().max(1) as u64;
                        cmd.arg("putatpx").arg(idx(key)).arg(ttl_ms).arg(Versioned(*version, data));
                    }
                    Op::Delete { key } => {
                        cmd.arg("del").arg(idx(key));
                    }
                    // Sent in runs (script_steps).
                    Op::ZAdd { .. } | Op::ZRem { .. } => {}
                    Op::ZRemStamp { key, members, stamp: (hash, field, value) } => {
                        cmd.arg("zremstamp").arg(idx(key)).arg(members.len());
                        for m in members {
                            cmd.arg(m.as_str());
                        }
                        cmd.arg(idx(hash)).arg(field.as_str()).arg(&value[..]);
                    }
                    Op::ZUnionStore { key, sources, count_into } => {
                        cmd.arg("zunion").arg(idx(key)).arg(sources.len());
                        for x in sources {
                            cmd.arg(idx(x));
                        }
                        match count_into {
                            Some((hash, field)) => cmd.arg(idx(hash)).arg(field.as_str()),
                            None => cmd.arg("0").arg(""),
                        };
                    }
                    Op::ZCopyPage { key, source, upto, limit, count_into, progress } => {
                        cmd.arg("zcopypage").arg(idx(key)).arg(idx(source)).arg(*upto).arg(*limit);
                        cmd.arg(idx(&count_into.0)).arg(count_into.1.as_str());
                        cmd.arg(idx(&progress.0)).arg(progress.1.as_str());
                    }
                    Op::HIncr { key, field, delta } => {
                        cmd.arg("hincr").arg(idx(key)).arg(field.as_str()).arg(*delta);
                    }
                    // Sent as steps (script_steps).
                    Op::HSet { .. } => {}
                    Op::HSetExpireAt { key, field, value, expire_at_ms } => {
                        cmd.arg("hsetx").arg(idx(key)).arg(field.as_str()).arg(&value[..]).arg(*expire_at_ms);
                    }
                    Op::HDel { key, field } => {
                        cmd.arg("hdel").arg(idx(key)).arg(field.as_str());
                    }
                    Op::SAdd { key, member } => {
                        cmd.arg("sadd").arg(idx(key)).arg(member.as_str());
                    }
                    Op::SRem { key, member } => {
                        cmd.arg("srem").arg(idx(key)).arg(member.as_str());
                    }
                    Op::XAdd { key, fields, max_len } => {
                        cmd.arg("xadd").arg(idx(key)).arg(max_len.unwrap_or(0)).arg(fields.len());
                        for (f, v) in fields {
                            cmd.arg(f.as_str()).arg(&v[..]);
                        }
                    }
                    Op::XTrimBefore { key, min_id } => {
                        cmd.arg("xtrim").arg(idx(key)).arg(min_id.as_str());
                    }
                    Op::Audit { .. } => {}
                    Op::AuditLinked { chain, seq, prev, hash, entry } => {
                        cmd.arg("alink")
                            .arg(idx(&chain.stream))
                            .arg(idx(&chain.head))
                            .arg(*seq)
                            .arg(prev.as_str())
                            .arg(hash.as_str())
                            .arg(&entry[..]);
                    }
                }
            }
        };
        let (reply, acks) = self.run_script(&self.inner.scripts.commit, COMMIT_LUA, &keys, &args, true).await?;
        let mut parts = array_of(reply)?.into_iter();
        let status = string_of(parts.next().unwrap_or(Value::Nil))?;
        match status.as_str() {
            "ok" | "dup" => {
                if status == "dup" {
                    tracing::debug!(txn = id, "a re-sent commit found its receipt; nothing applied twice");
                }
                // Only a commit that changed something waits for replicas: a re-sent one may be
                // the first answer the caller sees, so it waits too.
                self.check_acks(acks)?;
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

    /// Runs a blocking command on a connection of its own (taken from a small pool).
    async fn blocking_query(&self, cmd: &redis::Cmd, block: Duration) -> StateResult<Value> {
        let pooled = self.inner.blocking.lock().map_err(|_| StateError::Backend("poisoned pool".into()))?.pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => match &self.inner.source {
                Source::Single(client) => {
                    let cfg = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(self.inner.options.connect_timeout))
                        .set_response_timeout(None);
                    Conn::Plain(client.get_multiplexed_async_connection_with_config(&cfg).await.map_err(unavailable)?)
                }
                Source::Cluster(client) => {
                    let connect = client.get_async_connection();
                    match tokio::time::timeout(self.inner.options.response_timeout, connect).await {
                        Ok(conn) => Conn::Cluster(conn.map_err(unavailable)?),
                        Err(_) => {
                            return Err(StateError::Unavailable("no connection to the redis cluster in time".into()));
                        }
                    }
                }
            },
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

    /// One `MGET`, checked to answer once per key.
    async fn mget(&self, keys: &[String]) -> StateResult<Vec<Option<Vec<u8>>>> {
        let raw: Vec<Option<Vec<u8>>> = self.query(redis::cmd("MGET").arg(keys)).await?;
        if raw.len() != keys.len() {
            return Err(StateError::Backend(format!("MGET of {} keys answered {}", keys.len(), raw.len())));
        }
        Ok(raw)
    }

    /// Reads keys of several slots with one `MGET` per slot, side by side, and puts the answers back
    /// in the keys' order. The cluster client could split a multi-slot `MGET` itself, but while a
    /// master is down it leaves out the slots whose node it has no connection to and then fails the
    /// whole read with a client error ("Mismatch in the number of multi-slot results"), which callers
    /// would get as INTERNAL. A command per slot is routed, redirected and retried like any other,
    /// and fails UNAVAILABLE like any other.
    async fn mget_by_slot(&self, keys: &[String]) -> StateResult<Vec<Option<Vec<u8>>>> {
        let mut by_slot: std::collections::BTreeMap<u16, Vec<usize>> = std::collections::BTreeMap::new();
        for (i, k) in keys.iter().enumerate() {
            by_slot.entry(crate::key_slot(k)).or_default().push(i);
        }
        if by_slot.len() == 1 {
            return self.mget(keys).await;
        }
        let mut reads = tokio::task::JoinSet::new();
        for (_, at) in by_slot {
            let (backend, slot_keys) = (self.clone(), at.iter().map(|i| keys[*i].clone()).collect::<Vec<_>>());
            reads.spawn(async move { (at, backend.mget(&slot_keys).await) });
        }
        let mut out = vec![None; keys.len()];
        // An early return drops `reads`, which aborts the reads still running.
        while let Some(done) = reads.join_next().await {
            let (at, values) = done.map_err(|e| StateError::Backend(format!("a read of one slot failed: {e}")))?;
            for (i, v) in at.into_iter().zip(values?) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// The masters serving slots, as a node of the cluster sees them (`CLUSTER SLOTS`): address and
    /// slot ranges, ordered by their first slot.
    async fn cluster_masters(&self, c: &ClusterConnection) -> StateResult<Vec<MasterNode>> {
        let mut c = c.clone();
        let slots: Value =
            redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c).await.map_err(|e| self.inner.conn.failed(e))?;
        let mut masters: Vec<MasterNode> = Vec::new();
        for range in array_of(slots)? {
            let mut it = array_of(range)?.into_iter();
            let (Some(Value::Int(lo)), Some(Value::Int(hi)), Some(master)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let mut m = array_of(master)?.into_iter();
            let (Some(host), Some(Value::Int(port))) = (m.next(), m.next()) else { continue };
            let (host, port) = (string_of(host)?, u16::try_from(port).unwrap_or(0));
            let range = (u16::try_from(lo).unwrap_or(0), u16::try_from(hi).unwrap_or(0));
            match masters.iter_mut().find(|m| m.host == host && m.port == port) {
                Some(m) => m.slots.push(range),
                None => masters.push(MasterNode { host, port, slots: vec![range] }),
            }
        }
        for m in &mut masters {
            m.slots.sort_unstable();
        }
        masters.sort_by(|a, b| a.slots.first().cmp(&b.slots.first()));
        Ok(masters)
    }

    /// Sends `cmd` to each master serving slots, on its own connection: no fallback to one of its
    /// replicas (which the client does for ordinary commands while a master is unreachable).
    async fn on_each_master(
        &self,
        c: &ClusterConnection,
        cmd: &Cmd,
    ) -> StateResult<Vec<(String, Vec<(u16, u16)>, Value)>> {
        let mut out = Vec::new();
        for MasterNode { host, port, slots: ranges } in self.cluster_masters(c).await? {
            let mut conn = c.clone();
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port });
            let v = conn.route_command(cmd.clone(), routing).await.map_err(|e| match self.inner.conn.failed(e) {
                StateError::Unavailable(m) => StateError::Unavailable(format!("redis master {host}:{port}: {m}")),
                other => other,
            })?;
            if let Value::ServerError(e) = v {
                return Err(unavailable(e.into()));
            }
            out.push((format!("{host}:{port}"), ranges, v));
        }
        Ok(out)
    }

    /// How many keys each master holds and which slots it serves: shows whether partitioned state
    /// spreads over a cluster's masters. A single Redis is one master serving every slot. Counts
    /// include commit receipts (see [`RedisOptions::receipt_ttl`]).
    pub async fn master_key_counts(&self) -> StateResult<Vec<MasterKeys>> {
        match self.inner.conn.get() {
            Conn::Cluster(c) => {
                let mut out = Vec::new();
                for (addr, slots, v) in self.on_each_master(&c, &redis::cmd("DBSIZE")).await? {
                    let keys: u64 = redis::from_redis_value(v).map_err(|e| StateError::Backend(e.to_string()))?;
                    out.push(MasterKeys { addr, slots, keys });
                }
                Ok(out)
            }
            _ => {
                let keys: u64 = self.query(&redis::cmd("DBSIZE")).await?;
                Ok(vec![MasterKeys { addr: self.inner.single_addr.clone(), slots: vec![(0, 16383)], keys }])
            }
        }
    }
}

/// A master serving slots, from `CLUSTER SLOTS`.
struct MasterNode {
    host: String,
    port: u16,
    slots: Vec<(u16, u16)>,
}

/// Connections (per node) that carry writes followed by `WAIT`.
const DURABLE_CONNECTIONS: usize = 4;

/// A cluster client. With a `timeout`, every call (redirections and retries included) ends within
/// it, as callers expect; without, only each attempt is bounded (by a day: for blocking reads).
fn cluster_client(
    seeds: &[ConnectionInfo],
    options: &RedisOptions,
    certs: Option<redis::TlsCertificates>,
    timeout: Option<Duration>,
) -> StateResult<ClusterClient> {
    let mut b = ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(options.connect_timeout)
        .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
        // During a failover the old master refuses connections and the others answer MOVED or
        // CLUSTERDOWN until the replica takes over: retry quickly, within the overall bound.
        .retries(8)
        .min_retry_wait(10)
        .max_retry_wait(300);
    b = match timeout {
        Some(t) => b.response_timeout(t).overall_response_timeout(Some(t)),
        None => b.response_timeout(Duration::from_secs(24 * 3600)).overall_response_timeout(None),
    };
    if let Some(user) = &options.username {
        b = b.username(user);
    }
    if let Some(password) = &options.password {
        b = b.password(password);
    }
    if let Some(certs) = certs {
        b = b.certs(certs);
    }
    b.build().map_err(|e| StateError::Backend(format!("bad redis cluster configuration: {e}")))
}

/// Retries start-up connection attempts while Redis is unreachable (not when it refuses us).
async fn retry_startup<T, F, Fut>(url: &str, options: &RedisOptions, mut connect: F) -> StateResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match connect().await {
            Ok(conn) => return Ok(conn),
            Err(e) => {
                let refused = matches!(e.kind(), ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig)
                    || e.code() == Some("WRONGPASS")
                    || e.code() == Some("NOPERM")
                    || e.code() == Some("NOAUTH");
                if refused {
                    return Err(StateError::Backend(format!(
                        "redis at {} refused the connection: {e} (check the user and password)",
                        redact(url)
                    )));
                }
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
    }
}

/// `redis://user:secret@host` → `redis://user:***@host` (each of a comma-separated list), so
/// passwords never reach the logs.
pub(crate) fn redact(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
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
    Record::from_stored(raw).ok_or_else(|| StateError::Backend(format!("record {key} has no version prefix")))
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

/// One step of the commit script: an op of the transaction, or a run of consecutive writes to one
/// sorted set.
enum Step<'a> {
    Op(&'a Op),
    ZAdds(&'a str, Vec<(f64, &'a str)>),
    ZRems(&'a str, Vec<&'a str>),
    /// Consecutive sets of one hash's fields, in order (one `HSET` in the script).
    HSets(&'a str, Vec<(&'a str, &'a [u8])>),
}

/// The steps the commit script runs for `ops`. Sorted-set writes are sent in runs: consecutive adds
/// (or removals) of one key become one step, so a wave's commit, thousands of members written into
/// a handful of sets (the state indexes, the queues), costs the script one command per run instead
/// of one per member, and no kind and key per member. Writes to one key keep their order (a run per
/// kind, in order), writes to different keys commute, and every run is sent before an op that reads
/// or deletes sorted sets (zremstamp, zunion, zcopypage, del), so the outcome is that of the ops one by one.
/// Consecutive sets of one hash's fields become one step too (a wave's batch writes each order's
/// quota reservation into one of a few hashes), without reordering anything.
fn script_steps(ops: &[Op]) -> Vec<Step<'_>> {
    let mut steps = Vec::with_capacity(ops.len());
    // The sorted sets with runs not sent yet, in first-write order, each with its runs.
    let mut held: Vec<Vec<Step<'_>>> = Vec::new();
    let mut at: HashMap<&str, usize, crate::FastHash> = HashMap::default();
    for op in ops {
        // A score: an add; none: a removal.
        let (key, member, score) = match op {
            Op::ZAdd { key, member, score } => (key.as_str(), member.as_str(), Some(*score)),
            Op::ZRem { key, member } => (key.as_str(), member.as_str(), None),
            Op::Delete { .. } | Op::ZRemStamp { .. } | Op::ZUnionStore { .. } | Op::ZCopyPage { .. } => {
                steps.extend(held.drain(..).flatten());
                at.clear();
                steps.push(Step::Op(op));
                continue;
            }
            Op::HSet { key, field, value } => {
                match steps.last_mut() {
                    Some(Step::HSets(k, fields)) if *k == key.as_str() => fields.push((field.as_str(), &value[..])),
                    _ => steps.push(Step::HSets(key.as_str(), vec![(field.as_str(), &value[..])])),
                }
                continue;
            }
            _ => {
                steps.push(Step::Op(op));
                continue;
            }
        };
        let i = *at.entry(key).or_insert_with(|| {
            held.push(Vec::new());
            held.len() - 1
        });
        let runs = &mut held[i];
        match (runs.last_mut(), score) {
            (Some(Step::ZAdds(_, members)), Some(score)) => members.push((score, member)),
            (Some(Step::ZRems(_, members)), None) => members.push(member),
            (_, Some(score)) => runs.push(Step::ZAdds(key, vec![(score, member)])),
            (_, None) => runs.push(Step::ZRems(key, vec![member])),
        }
    }
    steps.extend(held.drain(..).flatten());
    steps
}

/// A guard as the commit script checks it: on its own, a run of consecutive version guards on
/// fields of one hash (one `HMGET` in the script instead of an `HGET` per field; every field guard
/// is in a run, of one or more), or a run of consecutive guards that records don't exist (one
/// `EXISTS` over all their keys instead of a read each; every such guard is in a run: a batch that
/// creates or assumes absent hundreds of records has them one after another).
enum GuardStep<'a> {
    One(&'a Guard),
    FieldVersions(&'a str, Vec<(&'a str, u64)>),
    Absent(Vec<&'a str>),
}

/// The guards of a transaction as the script checks them (see [`GuardStep`]). Guards only read
/// until every one has held, so grouping them changes no outcome.
fn guard_steps(guards: &[Guard]) -> Vec<GuardStep<'_>> {
    let mut out: Vec<GuardStep<'_>> = Vec::with_capacity(guards.len());
    for g in guards {
        match (g, out.last_mut()) {
            (Guard::FieldVersion { key, field, version }, Some(GuardStep::FieldVersions(k, fields)))
                if *k == key.as_str() =>
            {
                fields.push((field.as_str(), *version));
            }
            (Guard::FieldVersion { key, field, version }, _) => {
                out.push(GuardStep::FieldVersions(key.as_str(), vec![(field.as_str(), *version)]));
            }
            (Guard::Version { key, version: 0 }, Some(GuardStep::Absent(keys))) => keys.push(key.as_str()),
            (Guard::Version { key, version: 0 }, _) => out.push(GuardStep::Absent(vec![key.as_str()])),
            (g, _) => out.push(GuardStep::One(g)),
        }
    }
    out
}

/// Scores are integers in practice; print them without exponent or trailing `.0`.
fn format_score(x: f64) -> String {
    Score(x).to_string()
}

/// A sorted-set score as [`format_score`] prints it, written straight into a command (a wave's
/// commit has one per order).
struct Score(f64);

impl std::fmt::Display for Score {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let x = self.0;
        if x.fract() == 0.0 && x.abs() < 9.0e15 { write!(f, "{}", x as i64) } else { write!(f, "{x}") }
    }
}

impl redis::ToRedisArgs for Score {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self);
    }
}

/// A record as Redis stores it, `<version>:<data>`, written as one argument straight into the
/// command: the script stores it as it comes, with no concatenation in Lua (a copy of every record
/// into a new Lua string) and one argument fewer per record.
struct Versioned<'a>(u64, &'a [u8]);

impl redis::ToRedisArgs for Versioned<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        let mut w = out.writer_for_next_arg();
        // Writing into the command's own buffer: it cannot fail.
        let _ = write!(w, "{}:", self.0);
        let _ = w.write_all(self.1);
    }
}

/// The fields of a hash as `HGETALL` answers them (a map in RESP3, a flat array in RESP2 and from
/// scripts), sorted by field.
fn parse_hash(v: Value) -> StateResult<Vec<(String, Vec<u8>)>> {
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
    /// On a cluster, keys of several slots are read with one `MGET` per slot, side by side, and the
    /// answers put back in order ([`RedisBackend::mget_by_slot`]).
    async fn get(&self, keys: &[String]) -> StateResult<Vec<Option<Record>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let raw = if self.is_cluster() { self.mget_by_slot(keys).await? } else { self.mget(keys).await? };
        raw.into_iter().zip(keys).map(|(r, k)| r.map(|bytes| parse_record(k, bytes)).transpose()).collect()
    }

    async fn commit(&self, txn: &Txn) -> Result<Committed, CommitError> {
        let id = self.next_txn_id();
        self.commit_as(txn, &id).await
    }

    /// Durable like a commit (an id handed out must never be handed out again after a failover);
    /// a re-sent `INCRBY` may skip a number, never repeat one. Adding 0 is a plain `GET`: a read
    /// (e.g. ListOrders finding how many ids a product has handed out) must not wait for replicas,
    /// or it fails whenever writes can't be acknowledged, as on a promoted master without a replica.
    async fn incr(&self, key: &str, by: u64) -> StateResult<u64> {
        if by == 0 {
            let v: Option<u64> = self.query(redis::cmd("GET").arg(key)).await?;
            return Ok(v.unwrap_or(0));
        }
        self.durable_query(redis::cmd("INCRBY").arg(key).arg(by).to_owned()).await
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
        parse_hash(v)
    }

    async fn hget_each(&self, fields: &[(String, String)]) -> StateResult<Vec<Option<Vec<u8>>>> {
        let Some((first, _)) = fields.first() else { return Ok(Vec::new()) };
        let slot = crate::key_slot(first);
        if self.is_cluster() && fields.iter().any(|(k, _)| crate::key_slot(k) != slot) {
            // Perhaps several nodes: one read each.
            let mut out = Vec::with_capacity(fields.len());
            for (key, field) in fields {
                out.push(self.query(redis::cmd("HGET").arg(key).arg(field)).await?);
            }
            return Ok(out);
        }
        // Consecutive fields of one hash in one HMGET (a batch's quota reservations are a few
        // hashes of many fields each): one command per run, not per field.
        let mut pipe = redis::pipe();
        let mut runs = Vec::new();
        let mut at = 0;
        while at < fields.len() {
            let key = &fields[at].0;
            let len = fields[at..].iter().take_while(|(k, _)| k == key).count();
            let cmd = pipe.cmd("HMGET").arg(key);
            for (_, field) in &fields[at..at + len] {
                cmd.arg(field);
            }
            runs.push(len);
            at += len;
        }
        let mut conn = self.inner.conn.get();
        let answers: Vec<Vec<Option<Vec<u8>>>> =
            pipe.query_async(&mut conn).await.map_err(|e| self.inner.conn.failed(e))?;
        if answers.len() != runs.len() || answers.iter().zip(&runs).any(|(a, n)| a.len() != *n) {
            return Err(StateError::Backend("HMGET answered a different number of fields than asked".into()));
        }
        Ok(answers.into_iter().flatten().collect())
    }

    async fn smembers(&self, key: &str) -> StateResult<Vec<String>> {
        let mut members: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(key)).await?;
        members.sort();
        Ok(members)
    }

    async fn get_then_members(&self, key: &str, set: &str) -> StateResult<(Option<Record>, Vec<String>)> {
        if crate::key_slot(key) != crate::key_slot(set) {
            // Two nodes, perhaps: one read after the other keeps the order.
            let record = self.get(&[key.to_string()]).await?.pop().flatten();
            return Ok((record, self.smembers(set).await?));
        }
        // A pipeline on one connection runs its commands in order, on the node of their slot.
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("SMEMBERS").arg(set);
        let mut conn = self.inner.conn.get();
        let (raw, mut members): (Option<Vec<u8>>, Vec<String>) =
            pipe.query_async(&mut conn).await.map_err(|e| self.inner.conn.failed(e))?;
        members.sort();
        Ok((raw.map(|bytes| parse_record(key, bytes)).transpose()?, members))
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
        let v: Value = match self.query(redis::cmd("XINFO").arg("GROUPS").arg(key)).await {
            Ok(v) => v,
            // No stream, no group (as the in-memory backend answers).
            Err(StateError::Backend(m)) if m.contains("no such key") => return Ok(GroupInfo::default()),
            Err(e) => return Err(e),
        };
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
                exists: true,
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

    /// Durable like a commit: a fencing token handed out must never be handed out again. A re-sent
    /// acquire that already applied finds the lease taken and answers None (nobody holds it twice).
    async fn lease_acquire(&self, key: &str, fence_counter: &str, ttl: Duration) -> StateResult<Option<u64>> {
        let keys = [key.to_string(), fence_counter.to_string()];
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let args = |c: &mut Cmd| {
            c.arg(ttl_ms);
        };
        let (v, acks) =
            self.run_script(&self.inner.scripts.lease_acquire, LEASE_ACQUIRE_LUA, &keys, &args, true).await?;
        let token: u64 = redis::from_redis_value(v).map_err(|e| StateError::Backend(e.to_string()))?;
        if token > 0 {
            self.check_acks(acks)?;
        }
        Ok((token > 0).then_some(token))
    }

    async fn lease_renew(&self, key: &str, token: u64, ttl: Duration) -> StateResult<bool> {
        let keys = [key.to_string()];
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let args = |c: &mut Cmd| {
            c.arg(token).arg(ttl_ms);
        };
        let (v, _) = self.run_script(&self.inner.scripts.lease_renew, LEASE_RENEW_LUA, &keys, &args, false).await?;
        let ok: u64 = redis::from_redis_value(v).map_err(|e| StateError::Backend(e.to_string()))?;
        Ok(ok == 1)
    }

    async fn lease_release(&self, key: &str, token: u64) -> StateResult<bool> {
        let keys = [key.to_string()];
        let args = |c: &mut Cmd| {
            c.arg(token);
        };
        let (v, _) = self.run_script(&self.inner.scripts.lease_release, LEASE_RELEASE_LUA, &keys, &args, false).await?;
        let ok: u64 = redis::from_redis_value(v).map_err(|e| StateError::Backend(e.to_string()))?;
        Ok(ok == 1)
    }

    async fn hash_move(
        &self,
        from: &str,
        to: &str,
        forget: &[String],
        lease: &str,
        token: u64,
    ) -> StateResult<Option<HashMoved>> {
        let keys = [from.to_string(), to.to_string(), lease.to_string()];
        let args = |c: &mut Cmd| {
            c.arg(token);
            for f in forget {
                c.arg(f);
            }
        };
        let (v, acks) = self.run_script(&self.inner.scripts.hash_move, HASH_MOVE_LUA, &keys, &args, true).await?;
        // The script's `false` (lease not held): nil in RESP2, a boolean in RESP3 (`protocol=resp3`).
        if matches!(v, Value::Nil | Value::Boolean(false)) {
            return Ok(None);
        }
        self.check_acks(acks)?;
        let mut items = array_of(v)?;
        if items.is_empty() {
            return Err(StateError::Backend("hash move answered nothing".into()));
        }
        let kept = match items.remove(0) {
            Value::Int(n) => usize::try_from(n).unwrap_or(0),
            other => return Err(StateError::Backend(format!("hash move answered {other:?}"))),
        };
        Ok(Some(HashMoved { kept, fields: parse_hash(Value::Array(items))? }))
    }

    /// On a cluster, healthy means every master serving slots answers on its own connection and
    /// the cluster serves every slot (`cluster_state:ok`): while a master is down and before its
    /// replica takes over, a share of the keys can't be written, and health says so.
    async fn ping(&self) -> StateResult<()> {
        match self.inner.conn.get() {
            Conn::Cluster(mut c) => {
                self.on_each_master(&c, &redis::cmd("PING")).await?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.inner.conn.failed(e))?;
                if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    return Err(StateError::Unavailable("the redis cluster is not serving every slot".into()));
                }
                Ok(())
            }
            _ => {
                let _: String = self.query(&redis::cmd("PING")).await?;
                Ok(())
            }
        }
    }

    /// On a cluster, `used_memory` is the sum over the masters.
    async fn info(&self) -> StateResult<BackendInfo> {
        let used = |text: &str| -> Option<u64> {
            text.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok())
        };
        match self.inner.conn.get() {
            Conn::Cluster(c) => {
                let mut total = 0;
                for (_, _, text) in self.on_each_master(&c, redis::cmd("INFO").arg("memory")).await? {
                    total += used(&string_of(text)?).unwrap_or(0);
                }
                Ok(BackendInfo { used_memory: Some(total) })
            }
            _ => {
                let text: String = self.query(redis::cmd("INFO").arg("memory")).await?;
                Ok(BackendInfo { used_memory: used(&text) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster connection that answers "No connections found" is replaced by one built from the
    /// seed nodes, at most once a second, and the backend keeps working on it. (How a connection
    /// gets there: see `Link`; the fault tests on a cluster met it.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_connection_with_no_node_left_is_replaced() {
        let cluster = crate::testing::RedisCluster::start();
        let backend = cluster.backend().await;
        assert!(matches!(backend.inner.conn, Link::Cluster(_)), "a cluster link");
        let lost = || RedisError::from((ErrorKind::ClusterConnectionNotFound, "No connections found"));
        // Other errors leave it alone (the client repairs those itself).
        backend.inner.conn.failed(RedisError::from((ErrorKind::Io, "broken pipe")));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(backend.connections_replaced(), 0);
        assert!(matches!(backend.inner.conn.failed(lost()), StateError::Unavailable(_)));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while backend.connections_replaced() == 0 {
            assert!(std::time::Instant::now() < deadline, "not replaced within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The same error again within the second: no second rebuild.
        backend.inner.conn.failed(lost());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(backend.connections_replaced(), 1);
        backend.ping().await.expect("the new connection serves");
        let _: String = backend.query(&redis::cmd("PING")).await.expect("a command on the new connection");
    }

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
    fn a_failover_in_progress_is_unavailable_and_bad_credentials_are_not() {
        for kind in [ServerErrorKind::ReadOnly, ServerErrorKind::Moved, ServerErrorKind::Ask] {
            let e = RedisError::from((ErrorKind::Server(kind), "redirect"));
            assert!(matches!(unavailable(e), StateError::Unavailable(_)), "{kind:?}");
        }
        let e = RedisError::from((ErrorKind::ClusterConnectionNotFound, "no connection to the slot's node"));
        assert!(matches!(unavailable(e), StateError::Unavailable(_)));
        let e = RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        assert!(matches!(unavailable(e), StateError::Unavailable(_)));
        let e = RedisError::from((ErrorKind::AuthenticationFailed, "WRONGPASS"));
        assert!(matches!(unavailable(e), StateError::Backend(m) if m.contains("credentials")));
    }

    #[test]
    fn receipts_share_their_transactions_slot_and_no_service_key() {
        let unit = crate::Space::new("ord").partition("H200");
        let key = unit.key(["order", "o-1"]);
        let receipt = receipt_key(&key, "abc1");
        assert_eq!(receipt, "{ord:H200}:%txn:abc1");
        assert_eq!(crate::key_slot(&receipt), unit.slot());
        // Escaped parts never hold a bare `%`, so no key a Space builds can be a receipt.
        let mut escaped = String::new();
        crate::escape_part("%txn", &mut escaped);
        assert_ne!(escaped, "%txn");
        // Keys without a hash tag get a receipt in their own slot all the same.
        for k in ["plain", "foo{}{bar}", "x{", "}{"] {
            let r = receipt_key(k, "id");
            assert_eq!(crate::key_slot(&r), crate::key_slot(k), "{k} -> {r}");
        }
        assert_eq!(hash_tag("{a:b}:c"), Some("a:b"));
        assert_eq!(hash_tag("foo{}{bar}"), None);
    }

    #[test]
    fn options_never_print_the_password() {
        let o = RedisOptions { password: Some("hunter2".into()), ..RedisOptions::default() };
        assert!(!format!("{o:?}").contains("hunter2"));
        assert_eq!(redact("redis://a:pw1@h1:1,redis://a:pw2@h2:2"), "redis://a:***@h1:1,redis://a:***@h2:2");
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

    /// The script's steps as text: `+key:member@score`, `-key:member`, or an op's kind and key.
    fn steps_of(txn: &Txn) -> Vec<String> {
        script_steps(&txn.ops)
            .iter()
            .map(|s| match s {
                Step::ZAdds(k, m) => {
                    format!("+{k}:{}", m.iter().map(|(s, m)| format!("{m}@{s}")).collect::<Vec<_>>().join(","))
                }
                Step::ZRems(k, m) => format!("-{k}:{}", m.join(",")),
                Step::HSets(k, f) => format!(
                    "hset {k}:{}",
                    f.iter().map(|(f, v)| format!("{f}={}", String::from_utf8_lossy(v))).collect::<Vec<_>>().join(",")
                ),
                Step::Op(Op::Delete { key }) => format!("del {key}"),
                Step::Op(Op::ZUnionStore { key, .. }) => format!("zunion {key}"),
                Step::Op(Op::HIncr { key, .. }) => format!("hincr {key}"),
                Step::Op(op) => format!("{op:?}"),
            })
            .collect()
    }

    #[test]
    fn sorted_set_writes_go_in_runs_per_key_in_order_and_before_readers() {
        let mut t = Txn::new();
        t.zadd("a", "1", 1.0).zrem("b", "x").zadd("a", "2", 2.0).hincr("h", "f", 1).zrem("a", "1").zadd("a", "3", 3.0);
        t.zadd("b", "y", 5.0).zunionstore("u", vec!["a".into(), "b".into()]).zadd("a", "4", 4.0).delete("b");
        t.zrem("b", "z");
        assert_eq!(
            steps_of(&t),
            [
                // Other ops go at once; the runs wait for the next reader of sorted sets.
                "hincr h",
                // a first (first written), each key's runs in its own order.
                "+a:1@1,2@2",
                "-a:1",
                "+a:3@3",
                "-b:x",
                "+b:y@5",
                "zunion u",
                "+a:4@4",
                "del b",
                "-b:z",
            ]
        );
    }

    #[test]
    fn consecutive_sets_of_one_hash_go_as_one_step_in_order() {
        let mut t = Txn::new();
        t.hset("h", "1", b"a".to_vec()).hset("h", "2", b"b".to_vec()).zadd("z", "m", 1.0).hset("h", "3", b"c".to_vec());
        t.hset("g", "1", b"x".to_vec()).hset("h", "4", b"d".to_vec()).hincr("h", "n", 1).hset("h", "5", b"e".to_vec());
        assert_eq!(
            steps_of(&t),
            [
                // A held sorted-set run doesn't cut a hash's run (different keys commute).
                "hset h:1=a,2=b,3=c",
                "hset g:1=x",
                "hset h:4=d",
                "hincr h",
                "hset h:5=e",
                "+z:m@1",
            ]
        );
    }

    #[test]
    fn consecutive_field_guards_of_one_hash_are_checked_together() {
        let mut t = Txn::new();
        t.expect_field_version("h", "1", 0).expect_field_version("h", "2", 3).expect_version("k", 1);
        t.expect_field_version("h", "3", 1).expect_field_version("g", "1", 2).expect_field_version("g", "2", 0);
        t.expect_field_version("h", "4", 5);
        let shown: Vec<String> = guard_steps(&t.guards)
            .iter()
            .map(|g| match g {
                GuardStep::One(Guard::Version { key, version }) => format!("v {key}@{version}"),
                GuardStep::One(other) => format!("{other:?}"),
                GuardStep::FieldVersions(key, fields) => format!(
                    "hvs {key}:{}",
                    fields.iter().map(|(f, v)| format!("{f}@{v}")).collect::<Vec<_>>().join(",")
                ),
                GuardStep::Absent(keys) => format!("abs {}", keys.join(",")),
            })
            .collect();
        assert_eq!(shown, ["hvs h:1@0,2@3", "v k@1", "hvs h:3@1", "hvs g:1@2,2@0", "hvs h:4@5"]);
    }

    #[test]
    fn consecutive_guards_that_records_are_absent_are_checked_together() {
        let mut t = Txn::new();
        t.expect_version("a", 0).expect_version("b", 0).expect_version("k", 2).expect_version("c", 0);
        t.expect_field_version("h", "1", 0).expect_version("d", 0).expect_version("e", 0);
        let shown: Vec<String> = guard_steps(&t.guards)
            .iter()
            .map(|g| match g {
                GuardStep::One(Guard::Version { key, version }) => format!("v {key}@{version}"),
                GuardStep::One(other) => format!("{other:?}"),
                GuardStep::FieldVersions(key, fields) => format!("hvs {key}:{}", fields.len()),
                GuardStep::Absent(keys) => format!("abs {}", keys.join(",")),
            })
            .collect();
        assert_eq!(shown, ["abs a,b", "v k@2", "abs c", "hvs h:1", "abs d,e"]);
    }
}
