//! Where segments are written, chosen by URL: a directory (`file:///var/lib/chipgate/archive` or an
//! absolute path; a PersistentVolumeClaim in Kubernetes) or S3-compatible object storage
//! (`s3://bucket/prefix`, through `object_store`).
//!
//! Both targets offer the same few operations, and the archive's discipline rests on two of them:
//!
//! * [`Target::create`] writes an object **only if nothing is under its name yet**, atomically: the
//!   whole object or none. A second write of the same bytes is accepted (a run repeated after a
//!   crash); a write of other bytes is refused ([`Created::Differs`]), so a sealed segment is never
//!   replaced. On a directory: a hidden temporary file, flushed (`fsync`), hard-linked into place (a
//!   link never replaces an existing name) and the directory flushed. On S3: a PUT with
//!   `If-None-Match: *` (AWS S3, MinIO, R2, Ceph and moto honour it), and a PUT is atomic.
//! * [`Target::get`] reads the whole object or reports that there is none; what is read is then
//!   checked against its manifest by the caller ([`crate::segment::read_checked`]), so a torn,
//!   truncated or missing object is found whatever the target.
//!
//! S3 settings come from the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, web identity for IRSA,
//! `AWS_ALLOW_HTTP=true` for a local plain-HTTP endpoint), or from [`S3Settings`] given explicitly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig};

/// An archive target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A directory on a file system (absolute path).
    Dir(PathBuf),
    /// A bucket (and a prefix in it) of S3-compatible object storage.
    S3(S3),
}

/// An S3 bucket and the prefix the archive lives under.
#[derive(Clone)]
pub struct S3 {
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
    store: Arc<AmazonS3>,
}

impl std::fmt::Debug for S3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3").field("bucket", &self.bucket).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// Two S3 targets are the same archive when they name the same bucket and prefix.
impl PartialEq for S3 {
    fn eq(&self, other: &Self) -> bool {
        self.bucket == other.bucket && self.prefix == other.prefix
    }
}

impl Eq for S3 {}

/// S3 settings given explicitly; each one left `None` comes from the AWS environment (and the
/// defaults of `object_store` after that: region `us-east-1`, HTTPS only).
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    /// Endpoint URL of an S3-compatible service (`AWS_ENDPOINT_URL`); None: AWS itself.
    pub endpoint: Option<String>,
    /// Region (`AWS_REGION`).
    pub region: Option<String>,
    /// Access key id (`AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// Secret access key (`AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<String>,
    /// Allow a plain-HTTP endpoint (`AWS_ALLOW_HTTP=true`): a local endpoint only.
    pub allow_http: Option<bool>,
}

/// What [`Target::create`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The object was written.
    Written,
    /// The same bytes were already there (a repeated write).
    Same,
    /// Other bytes are there; nothing was written.
    Differs,
}

/// A failure to use the target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The URL names no target this build can write.
    #[error("bad archive URL {url:?}: {why}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why.
        why: String,
    },
    /// An object name that is not one of ours (path separators only between escaped parts).
    #[error("bad archive object name {0:?}")]
    BadName(String),
    /// The file system failed.
    #[error("archive {op} {name}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The object.
        name: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The object store failed.
    #[error("archive {op} {name}: {source}")]
    Store {
        /// What was being done.
        op: &'static str,
        /// The object.
        name: String,
        /// The error.
        #[source]
        source: object_store::Error,
    },
}

impl Target {
    /// The target a URL names: `file:///abs/path`, `/abs/path`, or `s3://bucket/prefix` with its
    /// settings from the AWS environment.
    ///
    /// # Errors
    /// A relative or empty path, an S3 URL without a bucket or with settings the client refuses, or
    /// another scheme.
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        Self::parse_with(url, &S3Settings::default())
    }

    /// [`parse`](Self::parse) with S3 settings that take precedence over the environment.
    ///
    /// # Errors
    /// As [`parse`](Self::parse).
    pub fn parse_with(url: &str, s3: &S3Settings) -> Result<Self, TargetError> {
        let bad = |why: &str| TargetError::BadUrl { url: url.to_string(), why: why.to_string() };
        let path = if let Some(rest) = url.strip_prefix("file://") {
            rest
        } else if let Some(rest) = url.strip_prefix("s3://") {
            return Self::s3(url, rest, s3);
        } else if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(&format!(
                "scheme {scheme:?} is not supported: a directory (file:///path or /path) or S3-compatible \
                 object storage (s3://bucket/prefix)"
            )));
        } else {
            url
        };
        if !path.starts_with('/') {
            return Err(bad("must be an absolute path (file:///var/lib/chipgate/archive)"));
        }
        Ok(Target::Dir(PathBuf::from(path)))
    }

    fn s3(url: &str, rest: &str, settings: &S3Settings) -> Result<Self, TargetError> {
        let bad = |why: String| TargetError::BadUrl { url: url.to_string(), why };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("names no bucket (s3://bucket/prefix)".into()));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() && !valid_name(prefix) {
            return Err(bad("the prefix may hold letters, digits, '.', '_', '-' and '/' between parts".into()));
        }
        // reqwest's rustls takes the process's crypto provider: ring, as tonic and redis use (never
        // aws-lc, a C build). Installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            // Sealing relies on create-only writes (If-None-Match: *).
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            // A few retries over seconds, not object_store's ten over three minutes: a GetOrder that
            // reads the archive, or a run, should fail soon and say why (the next run retries).
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
                ..RetryConfig::default()
            });
        if let Some(e) = &settings.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &settings.region {
            b = b.with_region(r);
        }
        if let Some(k) = &settings.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &settings.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        if let Some(h) = settings.allow_http {
            b = b.with_allow_http(h);
        }
        let store = b.build().map_err(|e| bad(e.to_string()))?;
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        Ok(Target::S3(S3 { bucket: bucket.to_string(), prefix, store: Arc::new(store) }))
    }

    /// The target's URL (`file:///…` or `s3://bucket/prefix`).
    pub fn url(&self) -> String {
        match self {
            Target::Dir(p) => format!("file://{}", p.display()),
            Target::S3(s) => format!("s3://{}/{}", s.bucket, s.prefix.trim_end_matches('/')),
        }
    }

    fn check(name: &str) -> Result<(), TargetError> {
        if valid_name(name) { Ok(()) } else { Err(TargetError::BadName(name.to_string())) }
    }

    fn path(root: &Path, name: &str) -> Result<PathBuf, TargetError> {
        Self::check(name)?;
        Ok(root.join(name))
    }

    fn key(s3: &S3, name: &str) -> Result<ObjectPath, TargetError> {
        Self::check(name)?;
        ObjectPath::parse(format!("{}{name}", s3.prefix)).map_err(|_| TargetError::BadName(name.to_string()))
    }

    /// Writes an object under `name` unless one is there already (see the module's text): the whole
    /// object becomes visible at once, and an existing object is never replaced.
    ///
    /// # Errors
    /// A bad name or a failure of the target (nothing new is visible under `name` then).
    pub async fn create(&self, name: &str, data: Vec<u8>) -> Result<Created, TargetError> {
        match self {
            Target::Dir(root) => blocking_write(Self::path(root, name)?, name, data, create_durably).await,
            Target::S3(s3) => {
                let key = Self::key(s3, name)?;
                let opts = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
                match s3.store.put_opts(&key, PutPayload::from(data.clone()), opts).await {
                    Ok(_) => Ok(Created::Written),
                    Err(object_store::Error::AlreadyExists { .. }) => match self.get(name).await? {
                        Some(there) if there == data => Ok(Created::Same),
                        _ => Ok(Created::Differs),
                    },
                    Err(source) => Err(TargetError::Store { op: "write", name: name.to_string(), source }),
                }
            }
        }
    }

    /// Writes an object under `name`, replacing any object of that name (never used for segments:
    /// tests use it to tamper with an archive).
    ///
    /// # Errors
    /// A bad name or a failure of the target (the old object or the new one is visible then).
    pub async fn put(&self, name: &str, data: Vec<u8>) -> Result<(), TargetError> {
        match self {
            Target::Dir(root) => blocking_write(Self::path(root, name)?, name, data, write_durably).await,
            Target::S3(s3) => {
                let key = Self::key(s3, name)?;
                s3.store.put(&key, PutPayload::from(data)).await.map(|_| ()).map_err(|source| TargetError::Store {
                    op: "write",
                    name: name.to_string(),
                    source,
                })
            }
        }
    }

    /// Reads an object (None when there is none).
    ///
    /// # Errors
    /// A bad name or a failure of the target.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, TargetError> {
        match self {
            Target::Dir(root) => match tokio::fs::read(Self::path(root, name)?).await {
                Ok(data) => Ok(Some(data)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(TargetError::Io { op: "read", name: name.to_string(), source }),
            },
            Target::S3(s3) => {
                let key = Self::key(s3, name)?;
                let store_err = |source| TargetError::Store { op: "read", name: name.to_string(), source };
                match s3.store.get(&key).await {
                    Ok(r) => Ok(Some(r.bytes().await.map_err(store_err)?.to_vec())),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(store_err(e)),
                }
            }
        }
    }

    /// Removes an object (nothing when there is none): for retention pruning and tests.
    ///
    /// # Errors
    /// A bad name or a failure of the target.
    pub async fn delete(&self, name: &str) -> Result<(), TargetError> {
        match self {
            Target::Dir(root) => match tokio::fs::remove_file(Self::path(root, name)?).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(TargetError::Io { op: "delete", name: name.to_string(), source }),
            },
            Target::S3(s3) => match s3.store.delete(&Self::key(s3, name)?).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(source) => Err(TargetError::Store { op: "delete", name: name.to_string(), source }),
            },
        }
    }

    /// The objects directly under `dir` whose names end with `suffix`, as full names, in name order
    /// (hidden temporary files are never listed).
    ///
    /// # Errors
    /// A bad name or a failure of the target (a missing directory lists nothing).
    pub async fn list(&self, dir: &str, suffix: &str) -> Result<Vec<String>, TargetError> {
        let mut out = Vec::new();
        match self {
            Target::Dir(root) => {
                let io = |source| TargetError::Io { op: "list", name: dir.to_string(), source };
                let Some(mut read) = read_dir(&Self::path(root, dir)?).await.map_err(io)? else {
                    return Ok(Vec::new());
                };
                while let Some(entry) = read.next_entry().await.map_err(io)? {
                    let Ok(file) = entry.file_name().into_string() else { continue };
                    if !file.starts_with('.') && file.ends_with(suffix) {
                        out.push(format!("{dir}/{file}"));
                    }
                }
            }
            Target::S3(s3) => {
                let key = Self::key(s3, dir)?;
                let listed = s3.store.list_with_delimiter(Some(&key)).await.map_err(|source| TargetError::Store {
                    op: "list",
                    name: dir.to_string(),
                    source,
                })?;
                for o in listed.objects {
                    if let Some(file) = o.location.filename()
                        && !file.starts_with('.')
                        && file.ends_with(suffix)
                    {
                        out.push(format!("{dir}/{file}"));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The directories directly under `dir` (their last part), in name order.
    ///
    /// # Errors
    /// A bad name or a failure of the target (a missing directory lists nothing).
    pub async fn list_dirs(&self, dir: &str) -> Result<Vec<String>, TargetError> {
        let mut out = Vec::new();
        match self {
            Target::Dir(root) => {
                let io = |source| TargetError::Io { op: "list", name: dir.to_string(), source };
                let Some(mut read) = read_dir(&Self::path(root, dir)?).await.map_err(io)? else {
                    return Ok(Vec::new());
                };
                while let Some(entry) = read.next_entry().await.map_err(io)? {
                    let is_dir = entry.file_type().await.map(|t| t.is_dir()).unwrap_or(false);
                    if let Ok(name) = entry.file_name().into_string()
                        && is_dir
                        && !name.starts_with('.')
                    {
                        out.push(name);
                    }
                }
            }
            Target::S3(s3) => {
                let key = Self::key(s3, dir)?;
                let listed = s3.store.list_with_delimiter(Some(&key)).await.map_err(|source| TargetError::Store {
                    op: "list",
                    name: dir.to_string(),
                    source,
                })?;
                out.extend(listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Our object names: `/`-separated parts of letters, digits, `%`, `.`, `_` and `-`, none empty or
/// hidden (so none climbs out of the archive's root).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('/').all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'%' | b'.' | b'_' | b'-'))
        })
}

/// A flushed temporary file beside `path`, handed to `place`; removed afterwards whatever happened.
fn with_temp(
    path: &Path,
    data: &[u8],
    place: impl FnOnce(&Path) -> std::io::Result<Created>,
) -> std::io::Result<Created> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("an object needs a directory"))?;
    std::fs::create_dir_all(dir)?;
    let file_name = path.file_name().and_then(|f| f.to_str()).unwrap_or("object");
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{}", std::process::id(), nanos()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        let done = place(&tmp)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(done)
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Temporary file, flush, hard link into place (a link never replaces a name), flush the
/// directory: after a crash the name holds the whole object or nothing, and an existing object is
/// left as it is.
/// Runs one of the durable file writes below off the runtime (they fsync), its errors naming `name`.
async fn blocking_write<T: Send + 'static>(
    path: PathBuf,
    name: &str,
    data: Vec<u8>,
    write: fn(&Path, &[u8]) -> std::io::Result<T>,
) -> Result<T, TargetError> {
    let io = |source| TargetError::Io { op: "write", name: name.to_string(), source };
    tokio::task::spawn_blocking(move || write(&path, &data))
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)
}

/// A directory's entries (None when there is no such directory: it lists nothing).
async fn read_dir(path: &Path) -> std::io::Result<Option<tokio::fs::ReadDir>> {
    match tokio::fs::read_dir(path).await {
        Ok(r) => Ok(Some(r)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn create_durably(path: &Path, data: &[u8]) -> std::io::Result<Created> {
    with_temp(path, data, |tmp| match std::fs::hard_link(tmp, path) {
        Ok(()) => Ok(Created::Written),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(if std::fs::read(path)? == data { Created::Same } else { Created::Differs })
        }
        Err(e) => Err(e),
    })
}

/// Temporary file, flush, rename, flush the directory: after a crash the name holds the whole new
/// object or the old one.
fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    with_temp(path, data, |tmp| std::fs::rename(tmp, path).map(|()| Created::Written)).map(|_| ())
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_directories_and_buckets_and_refuse_the_rest() {
        assert_eq!(Target::parse("file:///var/a").ok(), Some(Target::Dir("/var/a".into())));
        assert_eq!(Target::parse("/var/a").ok(), Some(Target::Dir("/var/a".into())));
        assert_eq!(Target::parse("/var/a").map(|t| t.url()).ok().as_deref(), Some("file:///var/a"));
        for bad in ["relative/dir", "", "file://relative", "s3://", "s3:///prefix", "s3://b/../x", "https://x/y"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        let err = Target::parse("gs://bucket").map(|_| ()).expect_err("gs refused");
        assert!(err.to_string().contains("s3://bucket/prefix"), "{err}");
        let s3 = Target::parse("s3://records/chipgate/prod/").expect("an S3 URL");
        assert!(matches!(&s3, Target::S3(s) if s.bucket == "records" && s.prefix == "chipgate/prod/"), "{s3:?}");
        assert_eq!(s3.url(), "s3://records/chipgate/prod");
        assert_eq!(Target::parse("s3://records").map(|t| t.url()).ok().as_deref(), Some("s3://records/"));
    }

    #[tokio::test]
    async fn objects_are_created_once_read_back_and_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Target::Dir(dir.path().to_path_buf());
        assert_eq!(t.get("a/b.json").await.expect("read"), None);
        assert_eq!(t.create("a/b.json", b"one".to_vec()).await.expect("write"), Created::Written);
        assert_eq!(t.create("a/b.json", b"one".to_vec()).await.expect("again"), Created::Same);
        assert_eq!(t.create("a/b.json", b"two".to_vec()).await.expect("other"), Created::Differs);
        assert_eq!(t.get("a/b.json").await.expect("read").as_deref(), Some(&b"one"[..]), "never replaced");
        t.put("a/c.gz", b"x".to_vec()).await.expect("write");
        t.put("a/c.gz", b"y".to_vec()).await.expect("overwrite");
        assert_eq!(t.get("a/c.gz").await.expect("read").as_deref(), Some(&b"y"[..]));
        assert_eq!(t.list("a", ".json").await.expect("list"), vec!["a/b.json".to_string()]);
        assert_eq!(t.list_dirs("").await.ok(), None, "an empty name is refused");
        t.put("a/d/e.json", b"z".to_vec()).await.expect("write");
        assert_eq!(t.list_dirs("a").await.expect("dirs"), vec!["d".to_string()]);
        assert!(t.list("missing", "").await.expect("list").is_empty());
        // No temporary file is left behind.
        let files: Vec<_> = std::fs::read_dir(dir.path().join("a")).expect("dir").collect();
        assert_eq!(files.len(), 3);
        t.delete("a/c.gz").await.expect("delete");
        t.delete("a/c.gz").await.expect("delete again");
        assert_eq!(t.get("a/c.gz").await.expect("read"), None);
        for bad in ["../x", "/abs", "a//b", ".hidden", "a/../../x", ""] {
            assert!(matches!(t.put(bad, vec![]).await, Err(TargetError::BadName(_))), "{bad}");
            assert!(matches!(t.create(bad, vec![]).await, Err(TargetError::BadName(_))), "{bad}");
        }
    }
}
