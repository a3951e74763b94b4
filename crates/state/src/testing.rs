//! Test support: a real `redis-server` started on a free loopback port in a temporary directory and
//! killed when dropped. Every Redis-backed test in the workspace uses it; nothing mocks Redis.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
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
}

fn free_port() -> u16 {
    // Bind port 0, read the port the kernel chose, release it. Another process could take it before
    // redis-server binds; start_with() retries on a new port if that happens.
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
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

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
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

/// Runs each named `async fn(Store)` twice: once on a fresh [`crate::MemoryBackend`] and once on a
/// fresh real `redis-server`. This is how the conformance suites hold both backends to the same
/// behaviour.
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
    };
}
