//! Test support: a real S3-compatible server (`moto`, from PyPI: `pip install 'moto[server]'`)
//! started on a free loopback port in a temporary directory and killed when dropped, as the Redis
//! harness does for `redis-server`. The archive's S3 tests run against it; nothing mocks S3.
//!
//! The Python that runs it is `$CHIPGATE_PYTHON`, else `python3` on the PATH (`scripts/test.sh` puts
//! its virtualenv, where moto is installed, first).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::target::{S3Settings, Target};

/// A private moto S3 server.
pub struct MotoServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// The Python that runs moto.
pub fn python_binary() -> String {
    std::env::var("CHIPGATE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// A minimal HTTP/1.1 request without a body (moto takes unsigned requests); returns the status.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let text = String::from_utf8_lossy(&head);
    text.get(9..12).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other(format!("bad reply {text:?}")))
}

impl MotoServer {
    /// Starts a server and waits until it answers.
    ///
    /// # Panics
    /// When moto can't be started (the S3 tests can't run without it): install it with
    /// `pip install 'moto[server]'`.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("chipgate-moto").tempdir().expect("create temp dir");
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = chipgate_state::testing::free_port();
            let log = std::fs::File::create(dir.path().join("moto.log")).expect("moto log file");
            let spawned = Command::new(python_binary())
                .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn();
            let mut child = match spawned {
                Ok(c) => c,
                Err(e) => panic!("can't run {} -m moto.server ({e}): pip install 'moto[server]'", python_binary()),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(dir.path().join("moto.log")).unwrap_or_default();
                    last_err = format!("moto exited with {status}: {log}");
                    break;
                }
                if http(port, "GET", "/").is_ok() {
                    return MotoServer { child, port, _dir: dir };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = "moto did not answer within 30 s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("{last_err}");
    }

    /// The endpoint URL (`http://127.0.0.1:<port>`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Settings that reach this server (any key works; plain HTTP allowed).
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some("chipgate-test".into()),
            secret_access_key: Some("chipgate-test-secret".into()),
            allow_http: Some(true),
        }
    }

    /// A new, empty bucket, and the target of `prefix` in it.
    ///
    /// # Panics
    /// When the bucket can't be created.
    pub fn target(&self, prefix: &str) -> Target {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let bucket = format!("chipgate-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let status = http(self.port, "PUT", &format!("/{bucket}")).expect("create a bucket");
        assert_eq!(status, 200, "creating bucket {bucket}");
        Target::parse_with(&format!("s3://{bucket}/{prefix}"), &self.settings()).expect("an S3 target")
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Created;

    /// The S3 target does what the directory target does, against a real S3 server: create-only
    /// writes, reads, listings by directory and suffix, deletes.
    #[tokio::test]
    async fn the_s3_target_creates_once_reads_lists_and_deletes() {
        let moto = MotoServer::start();
        let t = moto.target("archive/prod");
        assert!(t.url().starts_with("s3://chipgate-") && t.url().ends_with("/archive/prod"), "{}", t.url());
        assert_eq!(t.get("a/b.json").await.expect("read"), None);
        assert_eq!(t.create("a/b.json", b"one".to_vec()).await.expect("write"), Created::Written);
        assert_eq!(t.create("a/b.json", b"one".to_vec()).await.expect("again"), Created::Same);
        assert_eq!(t.create("a/b.json", b"two".to_vec()).await.expect("other"), Created::Differs);
        assert_eq!(t.get("a/b.json").await.expect("read").as_deref(), Some(&b"one"[..]), "never replaced");
        t.put("a/c.gz", b"x".to_vec()).await.expect("write");
        t.put("a/d/e.json", b"z".to_vec()).await.expect("write");
        assert_eq!(t.list("a", ".json").await.expect("list"), vec!["a/b.json".to_string()]);
        assert_eq!(t.list("a", "").await.expect("list").len(), 2, "directly under a/ only");
        assert_eq!(t.list_dirs("a").await.expect("dirs"), vec!["d".to_string()]);
        assert!(t.list("missing", "").await.expect("list").is_empty());
        t.delete("a/c.gz").await.expect("delete");
        t.delete("a/c.gz").await.expect("delete again");
        assert_eq!(t.get("a/c.gz").await.expect("read"), None);
        // Another prefix of the same bucket is another archive.
        let Target::S3(_) = &t else { panic!("an S3 target") };
        let other = Target::parse_with(&t.url().replace("/archive/prod", "/other"), &moto.settings()).expect("s3");
        assert!(other.list("a", "").await.expect("list").is_empty());
        // A server that is gone is an error, not an empty archive.
        drop(moto);
        assert!(t.get("a/b.json").await.is_err());
    }
}
