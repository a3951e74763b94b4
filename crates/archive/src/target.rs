//! Where segments are written: a directory (the default; a PersistentVolumeClaim in Kubernetes),
//! chosen by URL (`file:///var/lib/chipgate/archive` or an absolute path).
//!
//! S3-compatible object storage is not built in: the archive crate would pull an HTTP and cloud-auth
//! stack into every service for one target. A bucket mounted as a directory (or a directory synced to
//! one) keeps the same format; URLs with another scheme are refused with that explanation.
//!
//! A write is durable before it is visible: the object goes to a hidden temporary file, is flushed
//! (`fsync`), renamed into place and the directory flushed, so a crash leaves either the whole object
//! or no object under its name, never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

/// An archive target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A directory on a file system (absolute path).
    Dir(PathBuf),
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
}

impl Target {
    /// The target a URL names: `file:///abs/path` or `/abs/path`.
    ///
    /// # Errors
    /// A relative path, an empty one, or another scheme (`s3://…` is not built in).
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let bad = |why: &str| TargetError::BadUrl { url: url.to_string(), why: why.to_string() };
        let path = if let Some(rest) = url.strip_prefix("file://") {
            rest
        } else if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(&format!(
                "scheme {scheme:?} is not supported: this build archives to a directory (file:///path or /path), \
                 e.g. a mounted volume; S3-compatible storage is not built in"
            )));
        } else {
            url
        };
        if !path.starts_with('/') {
            return Err(bad("must be an absolute path (file:///var/lib/chipgate/archive)"));
        }
        Ok(Target::Dir(PathBuf::from(path)))
    }

    /// The target's URL (`file:///…`).
    pub fn url(&self) -> String {
        match self {
            Target::Dir(p) => format!("file://{}", p.display()),
        }
    }

    fn path(&self, name: &str) -> Result<PathBuf, TargetError> {
        let ok = !name.is_empty()
            && name.split('/').all(|part| {
                !part.is_empty()
                    && !part.starts_with('.')
                    && part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'%' | b'.' | b'_' | b'-'))
            });
        if !ok {
            return Err(TargetError::BadName(name.to_string()));
        }
        match self {
            Target::Dir(root) => Ok(root.join(name)),
        }
    }

    /// Writes an object durably under `name`, replacing any object of that name.
    ///
    /// # Errors
    /// A bad name or a file-system failure (nothing is visible under `name` then, or the old object).
    pub async fn put(&self, name: &str, data: Vec<u8>) -> Result<(), TargetError> {
        let path = self.path(name)?;
        let owned = name.to_string();
        let io = move |op: &'static str| {
            let name = owned.clone();
            move |source| TargetError::Io { op, name, source }
        };
        tokio::task::spawn_blocking(move || write_durably(&path, &data).map_err(io("write")))
            .await
            .map_err(|e| TargetError::Io { op: "write", name: name.to_string(), source: std::io::Error::other(e) })?
    }

    /// Reads an object (None when there is none).
    ///
    /// # Errors
    /// A bad name or a file-system failure.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, TargetError> {
        let path = self.path(name)?;
        match tokio::fs::read(&path).await {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TargetError::Io { op: "read", name: name.to_string(), source }),
        }
    }

    /// The objects directly under `dir` whose names end with `suffix`, as full names, in name order
    /// (hidden temporary files are never listed).
    ///
    /// # Errors
    /// A bad name or a file-system failure (a missing directory lists nothing).
    pub async fn list(&self, dir: &str, suffix: &str) -> Result<Vec<String>, TargetError> {
        let path = self.path(dir)?;
        let io = |source| TargetError::Io { op: "list", name: dir.to_string(), source };
        let mut read = match tokio::fs::read_dir(&path).await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let mut out = Vec::new();
        while let Some(entry) = read.next_entry().await.map_err(io)? {
            let Ok(file) = entry.file_name().into_string() else { continue };
            if !file.starts_with('.') && file.ends_with(suffix) {
                out.push(format!("{dir}/{file}"));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Temporary file, flush, rename, flush the directory: after a crash the name holds the whole new
/// object or the old one.
fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("an object needs a directory"))?;
    std::fs::create_dir_all(dir)?;
    let file_name = path.file_name().and_then(|f| f.to_str()).unwrap_or("object");
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{}", std::process::id(), nanos()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_directories_and_refuse_the_rest() {
        assert_eq!(Target::parse("file:///var/a").ok(), Some(Target::Dir("/var/a".into())));
        assert_eq!(Target::parse("/var/a").ok(), Some(Target::Dir("/var/a".into())));
        assert_eq!(Target::parse("/var/a").map(|t| t.url()).ok().as_deref(), Some("file:///var/a"));
        for bad in ["relative/dir", "", "file://relative", "s3://bucket/prefix", "https://x/y"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        let err = Target::parse("s3://bucket").map(|_| ()).expect_err("s3 refused");
        assert!(err.to_string().contains("S3-compatible storage is not built in"), "{err}");
    }

    #[tokio::test]
    async fn objects_are_written_whole_read_back_and_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Target::Dir(dir.path().to_path_buf());
        assert_eq!(t.get("a/b.json").await.expect("read"), None);
        t.put("a/b.json", b"one".to_vec()).await.expect("write");
        t.put("a/b.json", b"two".to_vec()).await.expect("overwrite");
        t.put("a/c.gz", b"x".to_vec()).await.expect("write");
        assert_eq!(t.get("a/b.json").await.expect("read").as_deref(), Some(&b"two"[..]));
        assert_eq!(t.list("a", ".json").await.expect("list"), vec!["a/b.json".to_string()]);
        assert!(t.list("missing", "").await.expect("list").is_empty());
        // No temporary file is left behind.
        let files: Vec<_> = std::fs::read_dir(dir.path().join("a")).expect("dir").collect();
        assert_eq!(files.len(), 2);
        for bad in ["../x", "/abs", "a//b", ".hidden", "a/../../x", ""] {
            assert!(matches!(t.put(bad, vec![]).await, Err(TargetError::BadName(_))), "{bad}");
        }
    }
}
