//! Test support: a real `redis-server` started on a free loopback port in a temporary directory and
//! killed when dropped, and a real Redis Cluster (3 masters, 3 replicas) built the same way. Every
//! Redis-backed test in the workspace uses them; nothing mocks Redis.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{RedisBackend, RedisOptions, Store};

/// A private `redis-server` process.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    options: ServerOptions,
    dir: tempfile::TempDir,
}

/// Options for [`RedisServer::start_with`].
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// Turn on AOF persistence (`appendonly yes`, fsync every write), as the fault tests need.
    pub append_only: bool,
    /// ACL users, each a rule line as in `ACL SETUSER` (e.g. `chipgate on >secret ~* &* +@all`).
    /// When any are given the `default` user is switched off: every client must authenticate.
    pub acl_users: Vec<String>,
    /// Serve TLS only (no plaintext port) with this certificate chain and key (PEM files), as
    /// `rediss://`; clients are not asked for certificates.
    pub tls: Option<TlsFiles>,
}

/// A server's TLS certificate, key and the CA that signed it (PEM files).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: std::path::PathBuf,
    /// Private key.
    pub key: std::path::PathBuf,
    /// CA certificate.
    pub ca: std::path::PathBuf,
}

/// A loopback port that is free now and that the kernel will not hand out by itself: every harness
/// in the workspace (Redis servers and cluster nodes, service processes, the S3 server) takes its
/// ports here.
///
/// Why not port 0: the kernel picks it from the ephemeral range (`ip_local_port_range`), the range it
/// also gives outgoing connections. A process that a test kills and restarts on the same port can then
/// find it taken by some other test's client connection (CI saw an orders replica that never served
/// again after a kill -9). Ports are drawn at random from the 10,000 below that range, so a Redis
/// Cluster node's bus port (port + 10,000) stays below it too. Ports handed out in this process are
/// not handed out again; another process (a parallel test binary) is checked by binding.
///
/// # Panics
/// When no port in that window can be bound.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let (low, high) = unreserved_window();
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..1_000 {
        // A std hasher with fresh random keys is random enough here (no dependency for it).
        let draw = std::hash::BuildHasher::build_hasher(&std::hash::RandomState::new());
        let port = low + u16::try_from(std::hash::Hasher::finish(&draw) % u64::from(high - low)).unwrap_or(0);
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// The ports [`free_port`] draws from: the 10,000 below the kernel's ephemeral range (its first port
/// read from `/proc`, 32768 where that can't be read), never under 1024.
fn unreserved_window() -> (u16, u16) {
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32_768);
    let high = first_ephemeral.saturating_sub(10_000).max(2_048);
    (high.saturating_sub(10_000).max(1_024), high)
}

/// The `redis-server` binary: `$REDIS_SERVER` or `redis-server` on the PATH.
pub fn redis_server_binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string())
}

fn spawn(port: u16, dir: &std::path::Path, options: &ServerOptions) -> Result<Child, String> {
    let mut cmd = Command::new(redis_server_binary());
    cmd.arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--dir")
        .arg(dir)
        .arg("--save")
        .arg("")
        .arg("--daemonize")
        .arg("no")
        .arg("--loglevel")
        .arg("warning")
        .arg("--logfile")
        .arg(dir.join("redis.log"));
    if options.append_only {
        cmd.arg("--appendonly").arg("yes").arg("--appendfsync").arg("always");
    } else {
        cmd.arg("--appendonly").arg("no");
    }
    if !options.acl_users.is_empty() {
        cmd.arg("--user").arg("default").arg("off");
        for rule in &options.acl_users {
            cmd.arg("--user");
            cmd.args(rule.split_whitespace());
        }
    }
    if let Some(tls) = &options.tls {
        // Port 0 turns the plaintext port off; `port` then carries TLS.
        cmd.arg("--port").arg("0").arg("--tls-port").arg(port.to_string());
        cmd.arg("--tls-cert-file").arg(&tls.cert).arg("--tls-key-file").arg(&tls.key);
        cmd.arg("--tls-ca-cert-file").arg(&tls.ca).arg("--tls-auth-clients").arg("no");
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut child =
        cmd.spawn().map_err(|e| format!("can't start {}: {e} (install redis-server)", redis_server_binary()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server exited with {status} on port {port}"));
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("redis-server did not listen on {port} within 10 s"))
}

impl RedisServer {
    /// Starts a server without persistence.
    ///
    /// # Panics
    /// When `redis-server` can't be started (tests can't run without it).
    pub fn start() -> Self {
        Self::start_with(ServerOptions::default())
    }

    /// Starts a server with options.
    ///
    /// # Panics
    /// When `redis-server` can't be started.
    pub fn start_with(options: ServerOptions) -> Self {
        let dir = tempfile::Builder::new().prefix("chipgate-redis").tempdir().expect("create temp dir");
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            match spawn(port, dir.path(), &options) {
                Ok(child) => {
                    return RedisServer { child: Some(child), port, options, dir };
                }
                Err(e) => last_err = e,
            }
        }
        panic!("{last_err}");
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/0` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// The data directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A connected backend.
    ///
    /// # Panics
    /// When it can't connect.
    pub async fn backend(&self) -> RedisBackend {
        let options = RedisOptions { startup_retry_for: Some(Duration::from_secs(10)), ..RedisOptions::default() };
        RedisBackend::connect(&self.url(), options).await.expect("connect to test redis")
    }

    /// A connected [`Store`].
    pub async fn store(&self) -> Store {
        Store::Redis(self.backend().await)
    }

    /// Kills the server at once (SIGKILL), as a crash would. Its data directory stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data directory (after [`kill`](Self::kill)); with
    /// AOF on, it comes back with every acknowledged write.
    ///
    /// # Panics
    /// When it can't be restarted.
    pub fn restart(&mut self) {
        self.kill();
        match spawn(self.port, self.dir.path(), &self.options) {
            Ok(child) => self.child = Some(child),
            Err(e) => panic!("restart redis-server: {e}"),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options for [`RedisCluster::start_with`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Masters (each serving a third, a quarter, … of the hash slots).
    pub masters: usize,
    /// Replicas per master.
    pub replicas_per_master: usize,
    /// `cluster-node-timeout`: how long a master may be unreachable before its replica takes over.
    pub node_timeout: Duration,
    /// AOF persistence on every node (`appendfsync always`).
    pub append_only: bool,
    /// `requirepass`/`masterauth` on every node.
    pub password: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            masters: 3,
            replicas_per_master: 1,
            node_timeout: Duration::from_millis(1000),
            append_only: false,
            password: None,
        }
    }
}

struct ClusterNode {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

/// A private Redis Cluster: `masters × (1 + replicas_per_master)` `redis-server` processes with
/// `--cluster-enabled yes` on free loopback ports, each in its own directory of one temporary
/// directory, joined by `redis-cli --cluster create`. Every process is killed when it is dropped.
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    options: ClusterOptions,
    /// Removed on drop (None for the shared cluster, whose watchdog removes it).
    dir: Option<tempfile::TempDir>,
    startup: Duration,
}

/// A replica's promotion after its master died (see [`RedisCluster::wait_for_failover`]).
#[derive(Clone, Debug)]
pub struct Promotion {
    /// Port of the node that died.
    pub dead: u16,
    /// Port of the replica that took over its slots.
    pub new_master: u16,
    /// From the kill until every live node reports `cluster_state:ok` with the new master in place.
    pub took: Duration,
}

/// A master killed by [`RedisCluster::kill_master`].
#[derive(Clone, Debug)]
pub struct KilledMaster {
    /// Its port.
    pub port: u16,
    /// The ports of its replicas when it died: one of them should take over its slots.
    pub replicas: Vec<u16>,
    /// When it was killed.
    pub at: Instant,
}

/// The nodes of a cluster as one node sees them (`CLUSTER NODES`).
#[derive(Clone, Debug)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Port.
    pub port: u16,
    /// Whether it is a master.
    pub master: bool,
    /// Whether it is flagged failed (`fail`) or unreachable.
    pub failed: bool,
    /// Its master's id (replicas).
    pub master_id: Option<String>,
    /// Whether it serves any slot.
    pub has_slots: bool,
}

fn spawn_cluster_node(node: &ClusterNode, options: &ClusterOptions) -> Result<Child, String> {
    let mut cmd = Command::new(redis_server_binary());
    cmd.arg("--port")
        .arg(node.port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--dir")
        .arg(&node.dir)
        .arg("--cluster-enabled")
        .arg("yes")
        .arg("--cluster-config-file")
        .arg("nodes.conf")
        .arg("--cluster-node-timeout")
        .arg(options.node_timeout.as_millis().to_string())
        // A replica takes over however long it was disconnected: in a test the alternative is a
        // cluster that stays down.
        .arg("--cluster-replica-validity-factor")
        .arg("0")
        .arg("--cluster-allow-replica-migration")
        .arg("no")
        // Replicas sync at once instead of waiting 5 s for more replicas to share the transfer.
        .arg("--repl-diskless-sync")
        .arg("yes")
        .arg("--repl-diskless-sync-delay")
        .arg("0")
        .arg("--save")
        .arg("")
        .arg("--daemonize")
        .arg("no")
        .arg("--loglevel")
        .arg("warning")
        .arg("--logfile")
        .arg(node.dir.join("redis.log"));
    if options.append_only {
        cmd.arg("--appendonly").arg("yes").arg("--appendfsync").arg("always");
    } else {
        cmd.arg("--appendonly").arg("no");
    }
    if let Some(pw) = &options.password {
        cmd.arg("--requirepass").arg(pw).arg("--masterauth").arg(pw);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut child =
        cmd.spawn().map_err(|e| format!("can't start {}: {e} (install redis-server)", redis_server_binary()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server exited with {status} on port {}", node.port));
        }
        if std::net::TcpStream::connect(("127.0.0.1", node.port)).is_ok() {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("redis-server did not listen on {} within 10 s", node.port))
}

/// The `redis-cli` binary: `$REDIS_CLI` or `redis-cli` on the PATH.
pub fn redis_cli_binary() -> String {
    std::env::var("REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_string())
}

impl RedisCluster {
    /// Starts 3 masters with a replica each.
    ///
    /// # Panics
    /// When the cluster can't be started (tests can't run without it).
    pub fn start() -> Self {
        Self::start_with(ClusterOptions::default())
    }

    /// Starts a cluster and waits until it serves every slot and every replica is in sync.
    ///
    /// # Panics
    /// When the cluster can't be started.
    pub fn start_with(options: ClusterOptions) -> Self {
        let started = Instant::now();
        let dir = tempfile::Builder::new().prefix("chipgate-redis-cluster").tempdir().expect("create temp dir");
        let count = options.masters * (1 + options.replicas_per_master);
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            let mut last_err = String::new();
            let mut started_node = None;
            for _attempt in 0..5 {
                let port = free_port();
                if nodes.iter().any(|n: &ClusterNode| n.port == port) {
                    continue;
                }
                let node_dir = dir.path().join(port.to_string());
                std::fs::create_dir_all(&node_dir).expect("create node dir");
                let mut node = ClusterNode { port, dir: node_dir, child: None };
                match spawn_cluster_node(&node, &options) {
                    Ok(child) => {
                        node.child = Some(child);
                        started_node = Some(node);
                        break;
                    }
                    Err(e) => last_err = e,
                }
            }
            match started_node {
                Some(n) => nodes.push(n),
                None => panic!("{last_err}"),
            }
        }
        let mut cluster = RedisCluster { nodes, options, dir: Some(dir), startup: Duration::ZERO };
        cluster.recreate();
        cluster.startup = started.elapsed();
        cluster
    }

    /// Joins the running nodes into a cluster (`redis-cli --cluster create`) and waits until it is
    /// ready: at start, and again on nodes started empty (after
    /// [`restart_all_empty`](Self::restart_all_empty)), as a bootstrap job would.
    ///
    /// # Panics
    /// When the cluster can't be created.
    pub fn recreate(&self) {
        let mut cmd = Command::new(redis_cli_binary());
        cmd.arg("--cluster").arg("create");
        for n in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        cmd.arg("--cluster-replicas").arg(self.options.replicas_per_master.to_string()).arg("--cluster-yes");
        if let Some(pw) = &self.options.password {
            cmd.arg("-a").arg(pw).arg("--no-auth-warning");
        }
        let out = cmd.stdin(Stdio::null()).output().expect("run redis-cli --cluster create (install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_ready(Duration::from_secs(30)).unwrap_or_else(|e| panic!("redis cluster not ready: {e}"));
    }

    /// Kills every node and starts each again on its port with nothing: no data, no cluster
    /// configuration (as pods whose volumes were lost). The nodes then serve no slots, and
    /// `CLUSTER SLOTS` answers an empty list, until [`recreate`](Self::recreate).
    ///
    /// # Panics
    /// When a node can't be started again.
    pub fn restart_all_empty(&mut self) {
        self.kill_all();
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(&node.dir);
            std::fs::create_dir_all(&node.dir).expect("create node dir");
        }
        self.spawn_stopped();
    }

    /// How long [`start_with`](Self::start_with) took (processes, cluster creation, replicas in sync).
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The ports of every node, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:<port>` of every node, comma-separated: the seed list a client takes
    /// (`--redis-url` with `--redis-cluster`).
    pub fn url(&self) -> String {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// The password every node requires, if any.
    pub fn password(&self) -> Option<&str> {
        self.options.password.as_deref()
    }

    /// Options for a backend on this cluster.
    pub fn redis_options(&self) -> RedisOptions {
        RedisOptions {
            cluster: true,
            password: self.options.password.clone(),
            startup_retry_for: Some(Duration::from_secs(10)),
            ..RedisOptions::default()
        }
    }

    /// A connected backend.
    ///
    /// # Panics
    /// When it can't connect.
    pub async fn backend(&self) -> RedisBackend {
        self.backend_with(self.redis_options()).await
    }

    /// A connected backend with options (`cluster` is set).
    ///
    /// # Panics
    /// When it can't connect.
    pub async fn backend_with(&self, options: RedisOptions) -> RedisBackend {
        RedisBackend::connect(&self.url(), RedisOptions { cluster: true, ..options })
            .await
            .expect("connect to the test redis cluster")
    }

    /// A connected [`Store`].
    pub async fn store(&self) -> Store {
        Store::Redis(self.backend().await)
    }

    /// A plain connection to one node.
    fn node_conn(&self, port: u16) -> redis::RedisResult<redis::Connection> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(format!("redis://127.0.0.1:{port}"))?;
        if let Some(pw) = &self.options.password {
            let settings = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(settings);
        }
        redis::Client::open(info)?.get_connection_with_timeout(Duration::from_millis(500))
    }

    fn node_query(&self, port: u16, cmd: &redis::Cmd) -> Result<String, String> {
        let mut conn = self.node_conn(port).map_err(|e| format!("node {port}: {e}"))?;
        cmd.query::<String>(&mut conn).map_err(|e| format!("node {port}: {e}"))
    }

    fn running_ports(&self) -> Vec<u16> {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.port).collect()
    }

    /// The cluster as node `port` sees it.
    ///
    /// # Errors
    /// When the node does not answer.
    pub fn nodes_seen_by(&self, port: u16) -> Result<Vec<NodeView>, String> {
        let text = self.node_query(port, redis::cmd("CLUSTER").arg("NODES"))?;
        let mut out = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                continue;
            }
            let port =
                f[1].split('@').next().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok()).unwrap_or(0);
            let flags: Vec<&str> = f[2].split(',').collect();
            out.push(NodeView {
                id: f[0].to_string(),
                port,
                master: flags.contains(&"master"),
                failed: flags.iter().any(|x| *x == "fail" || *x == "fail?") || f[7] == "disconnected",
                master_id: (f[3] != "-").then(|| f[3].to_string()),
                has_slots: f.len() > 8,
            });
        }
        Ok(out)
    }

    /// Ports of the masters serving slots, as the first running node sees them.
    ///
    /// # Panics
    /// When no node answers.
    pub fn masters(&self) -> Vec<u16> {
        let port = *self.running_ports().first().expect("a running node");
        let mut m: Vec<u16> = self
            .nodes_seen_by(port)
            .expect("CLUSTER NODES")
            .into_iter()
            .filter(|n| n.master && n.has_slots && !n.failed)
            .map(|n| n.port)
            .collect();
        m.sort_unstable();
        m
    }

    /// The port of the master serving `slot` (see [`crate::key_slot`]).
    ///
    /// # Panics
    /// When no node answers.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        let port = *self.running_ports().first().expect("a running node");
        let mut conn = self.node_conn(port).expect("connect to a node");
        let slots: redis::Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn).expect("CLUSTER SLOTS");
        if let redis::Value::Array(ranges) = slots {
            for r in ranges {
                if let redis::Value::Array(items) = r
                    && let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi)), Some(redis::Value::Array(m))) =
                        (items.first(), items.get(1), items.get(2))
                    && (*lo..=*hi).contains(&i64::from(slot))
                    && let Some(redis::Value::Int(p)) = m.get(1)
                {
                    return u16::try_from(*p).expect("a port");
                }
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// Every running node reports `cluster_state:ok`, sees no running node as failed, and is either
    /// a master serving slots with every running replica of it attached and online, or a replica
    /// whose link to its master is up and not syncing.
    fn ready(&self) -> Result<(), String> {
        let running = self.running_ports();
        for &port in &running {
            let info = self.node_query(port, redis::cmd("CLUSTER").arg("INFO"))?;
            if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                return Err(format!("node {port}: cluster_state is not ok"));
            }
            let view = self.nodes_seen_by(port)?;
            if let Some(bad) = view.iter().find(|n| n.failed && running.contains(&n.port)) {
                return Err(format!("node {port} sees running node {} as failed", bad.port));
            }
            let me = view.iter().find(|n| n.port == port).ok_or_else(|| format!("node {port} does not see itself"))?;
            let repl = self.node_query(port, redis::cmd("INFO").arg("replication"))?;
            if me.master {
                if !me.has_slots {
                    return Err(format!("node {port} is a master without slots (not a replica yet)"));
                }
                let live_replicas =
                    view.iter().filter(|r| r.master_id.as_deref() == Some(&me.id) && running.contains(&r.port)).count();
                let online = repl.lines().filter(|l| l.starts_with("slave") && l.contains("state=online")).count();
                if online < live_replicas {
                    return Err(format!("master {port}: {online} of {live_replicas} replicas online"));
                }
            } else {
                let up = repl.lines().any(|l| l.trim() == "master_link_status:up");
                let syncing = repl.lines().any(|l| l.trim() == "master_sync_in_progress:1");
                if !up || syncing {
                    return Err(format!("replica {port}: link to its master is not up"));
                }
            }
        }
        Ok(())
    }

    fn wait_ready(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            match self.ready() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The process id of node `port`, while it runs.
    pub fn pid(&self, port: u16) -> Option<u32> {
        self.nodes.iter().find(|n| n.port == port).and_then(|n| n.child.as_ref()).map(Child::id)
    }

    /// Kills node `port` at once (SIGKILL), as a crash would. Its directory (and `nodes.conf`) stays.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port)
            && let Some(mut child) = node.child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills every node.
    pub fn kill_all(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Kills the master of `dead`'s slots (SIGKILL) and waits until its replica has taken over and
    /// the cluster serves every slot again.
    ///
    /// # Errors
    /// When no replica takes over within `within`.
    pub fn kill_and_wait_for_failover(&mut self, dead: u16, within: Duration) -> Result<Promotion, String> {
        let killed = self.kill_master(dead)?;
        self.wait_for_failover(&killed, within)
    }

    /// Kills master `port` (SIGKILL), as a crash would, and returns at once: its replicas (read from
    /// a live node just before the kill) are the candidates for [`wait_for_failover`](Self::wait_for_failover),
    /// and the caller can keep working through the failover meanwhile.
    ///
    /// # Errors
    /// When no other node runs, or `port` is not a master with a replica.
    pub fn kill_master(&mut self, port: u16) -> Result<KilledMaster, String> {
        let live = self.running_ports().into_iter().find(|p| *p != port).ok_or("no other node runs")?;
        let view = self.nodes_seen_by(live)?;
        let me = view.iter().find(|n| n.port == port).ok_or_else(|| format!("{port} is not a node of this cluster"))?;
        if !me.master || !me.has_slots {
            return Err(format!("{port} is not a master serving slots"));
        }
        let replicas: Vec<u16> =
            view.iter().filter(|n| n.master_id.as_deref() == Some(&me.id)).map(|n| n.port).collect();
        if replicas.is_empty() {
            return Err(format!("master {port} has no replica to take over"));
        }
        let at = Instant::now();
        self.kill(port);
        Ok(KilledMaster { port, replicas, at })
    }

    /// Waits until one of the killed master's replicas is a master serving slots and every running
    /// node reports `cluster_state:ok` (polling every 20 ms; [`Promotion::took`] counts from the kill).
    ///
    /// # Errors
    /// When that does not happen within `within` of the kill.
    pub fn wait_for_failover(&self, killed: &KilledMaster, within: Duration) -> Result<Promotion, String> {
        let deadline = killed.at + within;
        loop {
            let promoted = self.running_ports().first().and_then(|p| self.nodes_seen_by(*p).ok()).and_then(|view| {
                view.into_iter().find(|n| killed.replicas.contains(&n.port) && n.master && n.has_slots).map(|n| n.port)
            });
            if let Some(new_master) = promoted {
                let all_ok = self.running_ports().iter().all(|p| {
                    self.node_query(*p, redis::cmd("CLUSTER").arg("INFO"))
                        .is_ok_and(|i| i.lines().any(|l| l.trim() == "cluster_state:ok"))
                });
                if all_ok {
                    return Ok(Promotion { dead: killed.port, new_master, took: killed.at.elapsed() });
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no replica of {} took over within {within:?}", killed.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts node `port` again (after [`kill`](Self::kill)) with its directory and `nodes.conf`: a
    /// master that lost its slots meanwhile rejoins as a replica of the one that took them. Waits
    /// until the cluster is ready again (replicas in sync).
    ///
    /// # Panics
    /// When it can't be restarted or the cluster does not become ready within 30 s.
    pub fn restart(&mut self, port: u16) {
        self.kill(port);
        let options = self.options.clone();
        let node = self.nodes.iter_mut().find(|n| n.port == port).expect("a node of this cluster");
        match spawn_cluster_node(node, &options) {
            Ok(child) => node.child = Some(child),
            Err(e) => panic!("restart redis-server: {e}"),
        }
        self.wait_ready(Duration::from_secs(30)).unwrap_or_else(|e| panic!("redis cluster not ready: {e}"));
    }

    /// Starts every node that is not running (after [`kill_all`](Self::kill_all), or kills) and
    /// waits until the cluster is ready.
    ///
    /// # Panics
    /// When a node can't be restarted or the cluster does not become ready within 30 s.
    pub fn restart_all(&mut self) {
        self.spawn_stopped();
        self.wait_ready(Duration::from_secs(30)).unwrap_or_else(|e| panic!("redis cluster not ready: {e}"));
    }

    /// Starts every node that is not running, with what its directory holds.
    fn spawn_stopped(&mut self) {
        let options = self.options.clone();
        for node in self.nodes.iter_mut().filter(|n| n.child.is_none()) {
            match spawn_cluster_node(node, &options) {
                Ok(child) => node.child = Some(child),
                Err(e) => panic!("restart redis-server: {e}"),
            }
        }
    }

    /// Deletes every key on every master (and so on the replicas).
    ///
    /// # Errors
    /// When a master does not answer.
    pub fn flush_all(&self) -> Result<(), String> {
        for port in self.masters() {
            self.node_query(port, &redis::cmd("FLUSHALL"))?;
        }
        Ok(())
    }

    /// The cluster every test of this process shares, started on first use, for tests that don't
    /// break nodes. Holding the returned lease serialises them (each starts on an empty cluster).
    /// The nodes outlive nothing: a watchdog process kills them and removes their directory when
    /// this process exits, however it exits.
    ///
    /// # Panics
    /// When the cluster can't be started or emptied.
    pub async fn shared() -> SharedCluster {
        static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let guard = LOCK.lock().await;
        let cluster = tokio::task::spawn_blocking(|| {
            let cluster = SHARED.get_or_init(|| {
                let mut cluster = RedisCluster::start();
                cluster.leave_to_watchdog();
                tracing::info!(startup = ?cluster.startup_time(), "shared test redis cluster started");
                cluster
            });
            cluster.flush_all().unwrap_or_else(|e| panic!("empty the shared redis cluster: {e}"));
            cluster
        })
        .await
        .expect("start the shared redis cluster");
        SharedCluster { cluster, _guard: guard }
    }

    /// Hands the processes and the directory to a watchdog `sh` that waits for this process to end
    /// (its stdin, a pipe only this process holds, reaches end of file) and then kills and removes
    /// them: statics are never dropped.
    fn leave_to_watchdog(&mut self) {
        let pids: Vec<String> =
            self.nodes.iter().filter_map(|n| n.child.as_ref()).map(|c| c.id().to_string()).collect();
        let dir = self.dir.take().map(tempfile::TempDir::keep);
        let script = format!(
            "read _; kill -9 {} 2>/dev/null; {}",
            pids.join(" "),
            dir.map(|d| format!("rm -rf '{}'", d.display())).unwrap_or_default()
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the redis cluster watchdog");
        // The pipe must stay open for the life of the process: keep its write end in a static, and
        // reap the watchdog when it is done.
        static WATCHDOG: OnceLock<Mutex<Vec<std::process::ChildStdin>>> = OnceLock::new();
        if let Some(stdin) = child.stdin.take()
            && let Ok(mut w) = WATCHDOG.get_or_init(|| Mutex::new(Vec::new())).lock()
        {
            w.push(stdin);
        }
        std::thread::spawn(move || child.wait());
    }
}

static SHARED: OnceLock<RedisCluster> = OnceLock::new();

/// The shared test cluster, held by one test at a time ([`RedisCluster::shared`]).
pub struct SharedCluster {
    cluster: &'static RedisCluster,
    _guard: tokio::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for SharedCluster {
    type Target = RedisCluster;
    fn deref(&self) -> &RedisCluster {
        self.cluster
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Where a test's Redis runs: one server, or a cluster.
pub enum RedisDeployment {
    /// A single `redis-server`.
    Single(RedisServer),
    /// A Redis Cluster.
    Cluster(RedisCluster),
}

impl RedisDeployment {
    /// The URL a service takes (`REDIS_URL`; a comma-separated seed list for a cluster).
    pub fn url(&self) -> String {
        match self {
            RedisDeployment::Single(s) => s.url(),
            RedisDeployment::Cluster(c) => c.url(),
        }
    }

    /// Environment for a service process: `REDIS_URL`, and `CHIPGATE_REDIS_CLUSTER=true` for a
    /// cluster.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![("REDIS_URL".to_string(), self.url())];
        if matches!(self, RedisDeployment::Cluster(_)) {
            env.push(("CHIPGATE_REDIS_CLUSTER".to_string(), "true".to_string()));
        }
        env
    }

    /// Whether it is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisDeployment::Cluster(_))
    }

    /// The single server, if it is one.
    pub fn single(&mut self) -> Option<&mut RedisServer> {
        match self {
            RedisDeployment::Single(s) => Some(s),
            RedisDeployment::Cluster(_) => None,
        }
    }

    /// The cluster, if it is one.
    pub fn cluster(&mut self) -> Option<&mut RedisCluster> {
        match self {
            RedisDeployment::Single(_) => None,
            RedisDeployment::Cluster(c) => Some(c),
        }
    }

    /// A connected [`Store`].
    pub async fn store(&self) -> Store {
        match self {
            RedisDeployment::Single(s) => s.store().await,
            RedisDeployment::Cluster(c) => c.store().await,
        }
    }

    /// A raw connection for tests that reach past the services (tampering, inspecting streams):
    /// commands go to the node serving their key's slot on a cluster.
    ///
    /// # Errors
    /// When Redis can't be reached.
    pub async fn connection(&self) -> redis::RedisResult<RawConnection> {
        match self {
            RedisDeployment::Single(s) => {
                Ok(RawConnection::Single(redis::Client::open(s.url())?.get_multiplexed_async_connection().await?))
            }
            RedisDeployment::Cluster(c) => {
                let urls: Vec<String> = c.ports().iter().map(|p| format!("redis://127.0.0.1:{p}")).collect();
                let mut builder = redis::cluster::ClusterClientBuilder::new(urls);
                if let Some(pw) = c.password() {
                    builder = builder.password(pw);
                }
                Ok(RawConnection::Cluster(builder.build()?.get_async_connection().await?))
            }
        }
    }

    /// The process ids of the server (every running node of a cluster).
    pub fn pids(&self) -> Vec<u32> {
        match self {
            RedisDeployment::Single(s) => s.pid().into_iter().collect(),
            RedisDeployment::Cluster(c) => c.ports().iter().filter_map(|p| c.pid(*p)).collect(),
        }
    }

    /// The server's process id (a cluster's first node's), while it runs.
    pub fn pid(&self) -> Option<u32> {
        match self {
            RedisDeployment::Single(s) => s.pid(),
            RedisDeployment::Cluster(c) => c.ports().first().and_then(|p| c.pid(*p)),
        }
    }

    /// Kills the server (every node of a cluster) at once, as a crash would.
    pub fn kill(&mut self) {
        match self {
            RedisDeployment::Single(s) => s.kill(),
            RedisDeployment::Cluster(c) => c.kill_all(),
        }
    }

    /// Starts the server (every stopped node of a cluster) again with its data.
    ///
    /// # Panics
    /// When it can't be restarted.
    pub fn restart(&mut self) {
        match self {
            RedisDeployment::Single(s) => s.restart(),
            RedisDeployment::Cluster(c) => c.restart_all(),
        }
    }
}

/// A raw connection to a [`RedisDeployment`] (see [`RedisDeployment::connection`]).
pub enum RawConnection {
    /// To the single server.
    Single(redis::aio::MultiplexedConnection),
    /// To every node of a cluster, routing by slot.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for RawConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RawConnection::Single(c) => c.req_packed_command(cmd),
            RawConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RawConnection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RawConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RawConnection::Single(c) => c.get_db(),
            RawConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// Runs each named `async fn(Store)` three times: on a fresh [`crate::MemoryBackend`], on a fresh
/// real `redis-server`, and on the process's shared Redis Cluster (emptied first; tests on it take
/// turns). This is how the conformance suites hold every backend to the same behaviour.
///
/// ```ignore
/// async fn counts_up(store: Store) { ... }
/// chipgate_state::backend_tests!(counts_up);
/// ```
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod memory_backend {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Store::memory()).await
                }
            )*
        }
        mod redis_backend {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let server = $crate::testing::RedisServer::start();
                    super::$name(server.store().await).await
                }
            )*
        }
        mod redis_cluster_backend {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let cluster = $crate::testing::RedisCluster::shared().await;
                    super::$name(cluster.store().await).await
                }
            )*
        }
    };
}
