//! A cluster of real processes for the fault tests: a private `redis-server` (or Redis Cluster) with AOF persistence and
//! the three service binaries (`chipgate-licensing`, `chipgate-inventory`, one or more
//! `chipgate-orders` replicas), each on a fixed loopback port so that it can be killed with SIGKILL,
//! paused with SIGSTOP and started again where its clients expect it.
//!
//! Signals other than SIGKILL are sent with the `kill` command (no unsafe code, no new dependency).
//! Every process writes its logs to a file in the cluster's temporary directory; set
//! `CHIPGATE_KEEP_FAULT_LOGS=1` to keep that directory after the test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chipgate_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_proto::orders::v1::order_service_client::OrderServiceClient;
use chipgate_runtime::auth::{Role, Signer};
use chipgate_state::Store;
use chipgate_state::testing::{
    ClusterOptions as RedisClusterOptions, RedisCluster, RedisDeployment, RedisServer, ServerOptions,
};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::{DEFAULT_CATALOGUE, InventoryClient, LicensingClient, OrdersClient, Parties, binary, channel, free_port};

/// Sends `signal` (e.g. "STOP", "CONT") to `pid` with the `kill` command.
///
/// # Panics
/// When `kill` can't be run or refuses.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// The health of the server at `url` (None: it does not answer within a second).
pub async fn health(url: &str) -> Option<ServingStatus> {
    let mut c = HealthClient::new(channel(url));
    let call = c.check(HealthCheckRequest { service: String::new() });
    match tokio::time::timeout(Duration::from_secs(1), call).await {
        Ok(Ok(r)) => Some(r.into_inner().status()),
        _ => None,
    }
}

/// One service binary run as a child process on a fixed loopback port.
pub struct ServiceProcess {
    name: &'static str,
    addr: SocketAddr,
    env: Vec<(String, String)>,
    args: Vec<String>,
    logs: PathBuf,
    child: Option<Child>,
    starts: usize,
    paused: bool,
}

impl ServiceProcess {
    fn new(name: &'static str, env: Vec<(String, String)>, args: Vec<String>, logs: PathBuf) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        ServiceProcess { name, addr, env, args, logs, child: None, starts: 0, paused: false }
    }

    /// The binary's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How many times it was started (1 for a process that never restarted).
    pub fn starts(&self) -> usize {
        self.starts
    }

    /// Whether it is paused (SIGSTOP).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Sets (or replaces) an environment variable for the process's next start, e.g. to restart a
    /// replica with another setting.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Drops an environment variable [`set_env`](Self::set_env) set, for the next start.
    pub fn remove_env(&mut self, key: &str) {
        self.env.retain(|(k, _)| k != key);
    }

    /// Starts the process (without waiting for it to serve).
    ///
    /// # Panics
    /// When the binary is missing or can't be started.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        self.starts += 1;
        let log =
            std::fs::File::create(self.logs.join(format!("{}-{}-{}.log", self.name, self.addr.port(), self.starts)))
                .expect("create log file");
        let mut cmd = Command::new(binary(self.name));
        cmd.env("CHIPGATE_LISTEN", self.addr.to_string())
            .env("CHIPGATE_LOG_FORMAT", "json")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            // Authentication comes only from `env` (the cluster's keys, or the explicit switch-off).
            .env_remove("CHIPGATE_INSECURE_NO_AUTH")
            .env_remove("CHIPGATE_AUTH_PUBLIC_KEY")
            .env_remove("CHIPGATE_SERVICE_TOKEN_FILE")
            .env_remove("CHIPGATE_SERVICE_SIGNING_KEY")
            .env_remove("CHIPGATE_AUDIT_SIGNING_KEY_FILE")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("start {}: {e}", self.name)));
        self.paused = false;
    }

    /// Waits until it answers health with SERVING.
    ///
    /// # Panics
    /// When that does not happen within `within`.
    pub async fn wait_serving(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.serving_before(deadline, within).await {}
    }

    /// Waits until it serves like [`wait_serving`](Self::wait_serving), and fails at once, with the
    /// end of its log, when the process exits by itself meanwhile: after the faults a test injected,
    /// a service that stops on its own is a finding, not something to start again quietly.
    ///
    /// # Panics
    /// When it exits, or does not serve within `within`.
    pub async fn wait_serving_alive(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if !self.paused
                && let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} on {} exited by itself ({status}) instead of serving; the end of its log:\n{}",
                    self.name,
                    self.addr,
                    self.log_tail()
                );
            }
            if self.serving_before(deadline, within).await {
                return;
            }
        }
    }

    /// One probe of a wait: true when it serves; otherwise fails past `deadline` (with the end of
    /// its log), or pauses a little and answers false.
    async fn serving_before(&self, deadline: Instant, within: Duration) -> bool {
        if health(&self.url()).await == Some(ServingStatus::Serving) {
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "{} on {} did not become SERVING within {within:?}; the end of its log:\n{}",
            self.name,
            self.addr,
            self.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        false
    }

    /// The last lines of its current log (what a failed wait shows).
    pub fn log_tail(&self) -> String {
        let path = self.logs.join(format!("{}-{}-{}.log", self.name, self.addr.port(), self.starts));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Starts it and waits until it serves.
    pub async fn start(&mut self) {
        self.spawn();
        self.wait_serving(Duration::from_secs(30)).await;
    }

    /// SIGKILL, as a crash would (a paused process dies too).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// SIGKILL, then start again on the same port and wait until it serves.
    pub async fn restart(&mut self) {
        self.kill();
        self.start().await;
    }

    /// SIGSTOP: the process stays, holds its connections and leases, and does nothing.
    pub fn pause(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
            self.paused = true;
        }
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
            self.paused = false;
        }
    }

    /// Whether the process is still alive (it did not exit by itself).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How to start a [`ProcessCluster`].
#[derive(Clone, Debug)]
pub struct ProcessOptions {
    /// Orders replicas.
    pub orders_replicas: usize,
    /// Extra environment for every orders replica (e.g. `CHIPGATE_CLAIM_IDLE`).
    pub orders_env: Vec<(String, String)>,
    /// Redis command timeout of every service (`CHIPGATE_REDIS_TIMEOUT`).
    pub redis_timeout: Duration,
    /// Authentication as an operator runs it (on by default): the services verify tokens with the
    /// cluster's public key and orders sends the `service` token from a file; clients act as
    /// whichever party each call needs ([`Parties`]).
    pub auth: bool,
    /// Where the state lives: a single redis-server or a Redis Cluster (the services then run with
    /// `--redis-cluster`, and wait for a replica per write as the flag's default says).
    pub backend: crate::BackendKind,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            backend: crate::BackendKind::default_redis(),
            orders_replicas: 1,
            orders_env: Vec::new(),
            redis_timeout: Duration::from_millis(1500),
            auth: true,
        }
    }
}

/// Redis with AOF and the three services, each its own process on loopback.
pub struct ProcessCluster {
    /// The private redis-server or Redis Cluster (AOF on, `appendfsync always`).
    pub redis: RedisDeployment,
    /// A store on that Redis for the test itself (reads for the checker, tampering).
    pub store: Store,
    /// The licensing service.
    pub licensing: ServiceProcess,
    /// The inventory service.
    pub inventory: ServiceProcess,
    /// The orders replicas.
    pub orders: Vec<ServiceProcess>,
    /// The key the cluster's tokens are signed with, when authentication is on.
    pub signer: Option<Signer>,
    dir: Option<tempfile::TempDir>,
}

impl ProcessCluster {
    /// Starts Redis and the services and waits until every one serves.
    ///
    /// # Panics
    /// When a binary is missing (`cargo build --workspace --bins`) or something does not come up.
    pub async fn start(options: ProcessOptions) -> Self {
        chipgate_runtime::telemetry::init_for_tests();
        let redis = match options.backend {
            crate::BackendKind::RedisCluster => {
                let options = RedisClusterOptions { append_only: true, ..RedisClusterOptions::default() };
                RedisDeployment::Cluster(
                    tokio::task::spawn_blocking(move || RedisCluster::start_with(options))
                        .await
                        .expect("start a redis cluster"),
                )
            }
            _ => RedisDeployment::Single(RedisServer::start_with(ServerOptions {
                append_only: true,
                ..ServerOptions::default()
            })),
        };
        let store = redis.store().await;
        let dir = tempfile::Builder::new().prefix("chipgate-faults").tempdir().expect("temp dir");
        let logs = dir.path().to_path_buf();
        let catalogue = logs.join("catalogue.json");
        std::fs::write(&catalogue, DEFAULT_CATALOGUE).expect("write catalogue");
        let mut common = redis.env();
        common.extend([
            ("CHIPGATE_REDIS_TIMEOUT".to_string(), format!("{}ms", options.redis_timeout.as_millis())),
            ("CHIPGATE_SHUTDOWN_GRACE".to_string(), "1s".to_string()),
        ]);
        let mut orders_auth = Vec::new();
        let mut licensing_env = Vec::new();
        let signer = if options.auth {
            let signer = Signer::generate().expect("a signing key");
            let public = logs.join("public.pem");
            std::fs::write(&public, signer.public_pem()).expect("write the public key");
            crate::write_service_token(&signer, &logs);
            common.push(("CHIPGATE_AUTH_PUBLIC_KEY".into(), public.display().to_string()));
            // Licensing refuses to start without its audit key when authentication is on.
            let audit = logs.join(crate::AUDIT_SIGNING_KEY_FILE);
            let audit_key = Signer::generate().expect("an audit key");
            std::fs::write(&audit, audit_key.private_pem()).expect("write the audit key");
            licensing_env.push(("CHIPGATE_AUDIT_SIGNING_KEY_FILE".into(), audit.display().to_string()));
            orders_auth.push((
                "CHIPGATE_SERVICE_TOKEN_FILE".into(),
                logs.join(crate::SERVICE_TOKEN_FILE).display().to_string(),
            ));
            Some(signer)
        } else {
            common.push(("CHIPGATE_INSECURE_NO_AUTH".into(), "true".into()));
            None
        };
        let mut licensing = ServiceProcess::new(
            "chipgate-licensing",
            common.iter().cloned().chain(licensing_env).collect(),
            Vec::new(),
            logs.clone(),
        );
        let mut inventory = ServiceProcess::new(
            "chipgate-inventory",
            common.clone(),
            vec!["--catalogue".into(), catalogue.display().to_string()],
            logs.clone(),
        );
        licensing.spawn();
        inventory.spawn();
        let mut orders = Vec::new();
        for _ in 0..options.orders_replicas.max(1) {
            let mut env = common.clone();
            env.push(("CHIPGATE_LICENSING_URL".into(), licensing.url()));
            env.push(("CHIPGATE_INVENTORY_URL".into(), inventory.url()));
            env.extend(orders_auth.iter().cloned());
            env.extend(options.orders_env.iter().cloned());
            let mut o = ServiceProcess::new("chipgate-orders", env, Vec::new(), logs.clone());
            o.spawn();
            orders.push(o);
        }
        for p in [&licensing, &inventory].into_iter().chain(orders.iter()) {
            p.wait_serving(Duration::from_secs(30)).await;
        }
        ProcessCluster { redis, store, licensing, inventory, orders, signer, dir: Some(dir) }
    }

    /// Where the processes write their logs.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.as_ref().map(|d| d.path().to_path_buf()).unwrap_or_default()
    }

    /// How many lines of the services' logs so far contain `needle` (e.g. a log message).
    pub fn log_lines_containing(&self, needle: &str) -> usize {
        let Ok(entries) = std::fs::read_dir(self.log_dir()) else { return 0 };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .map(|s| s.lines().filter(|l| l.contains(needle)).count())
            .sum()
    }

    /// A channel to `url` acting as whichever party each call needs ([`Parties`]).
    pub fn parties(&self, url: &str) -> Parties {
        Parties::new(channel(url), self.signer.clone())
    }

    /// A token for a non-buyer `role`, valid for an hour.
    ///
    /// # Panics
    /// When authentication is off.
    pub fn token(&self, role: Role) -> String {
        self.signer.as_ref().expect("authentication is on").mint_role(role, Duration::from_secs(3600))
    }

    /// A buyer token for `buyer_id`, valid for an hour.
    ///
    /// # Panics
    /// When authentication is off.
    pub fn buyer_token(&self, buyer_id: &str) -> String {
        self.signer.as_ref().expect("authentication is on").mint_buyer(buyer_id, Duration::from_secs(3600))
    }

    /// A licensing client.
    pub fn licensing_client(&self) -> LicensingClient {
        LicensingServiceClient::new(self.parties(&self.licensing.url()))
    }

    /// An inventory client.
    pub fn inventory_client(&self) -> InventoryClient {
        InventoryServiceClient::new(self.parties(&self.inventory.url()))
    }

    /// A client of orders replica `i`.
    pub fn orders_client(&self, i: usize) -> OrdersClient {
        OrderServiceClient::new(self.parties(&self.orders[i].url()))
    }

    /// Clients of the three services (orders replica `i`).
    pub fn clients(&self, i: usize) -> crate::invariants::Clients {
        crate::invariants::Clients {
            licensing: self.licensing_client(),
            inventory: self.inventory_client(),
            orders: self.orders_client(i),
        }
    }

    /// Every service process, for fault injection.
    pub fn services_mut(&mut self) -> Vec<&mut ServiceProcess> {
        let mut all = vec![&mut self.licensing, &mut self.inventory];
        all.extend(self.orders.iter_mut());
        all
    }

    /// Makes sure every service runs, unpaused, and serves (after faults), and that the test's own
    /// store has reconnected to Redis.
    ///
    /// # Panics
    /// When a service exited by itself, or does not serve again within 30 s.
    pub async fn heal(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while chipgate_state::Backend::ping(&self.store).await.is_err() {
            assert!(Instant::now() < deadline, "the test can't reach Redis again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for p in self.services_mut() {
            if p.is_paused() {
                p.resume();
            }
        }
        // A process the test killed was started again by the test; one that is not running exited
        // by itself, which wait_serving_alive reports with its log.
        for p in self.services_mut() {
            p.wait_serving_alive(Duration::from_secs(30)).await;
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        // Services first, so nothing logs a lost connection to Redis on the way down.
        for o in &mut self.orders {
            o.kill();
        }
        self.inventory.kill();
        self.licensing.kill();
        if std::env::var_os("CHIPGATE_KEEP_FAULT_LOGS").is_some()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!("fault-test logs kept in {}", kept.display());
        }
    }
}
