//! The dev cluster's key pair and tokens on disk.
//!
//! The default place is a predictable path under the shared temporary directory, so it is treated
//! as hostile ground: the directory must be ours and closed to everyone else (created fresh with
//! mode 0700, or an existing one refused unless it is a real directory owned by us that nobody else
//! may write to), and every file is created new with mode 0600 without following symlinks, then
//! renamed into place (a rename replaces a link, it never writes through it). A key pair already
//! there is reused, so a second `chipgate dev` (or a restart) keeps every token handed out valid.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chipgate_runtime::auth::{Role, Signer};

/// Buyers the dev cluster writes tokens for.
pub const DEV_BUYERS: [&str; 3] = ["bytedance", "alibaba", "tencent"];

/// How long the written dev tokens stay valid.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The dev cluster's key and the tokens it wrote.
pub struct DevAuth {
    /// Where the files are.
    pub dir: PathBuf,
    /// `(name, token)`: one per non-buyer role, one per dev buyer (`buyer-<id>`).
    pub tokens: Vec<(String, String)>,
    /// True when the key pair was already there (and was kept).
    pub reused: bool,
}

/// Where `chipgate dev` writes its keys and tokens unless told otherwise (and where `chipgate demo`
/// and `chipgate --as` look for the signing key).
pub fn default_auth_dir() -> PathBuf {
    std::env::temp_dir().join("chipgate-dev")
}

/// Opens `dir` (creating it, 0700) and reuses the key pair in it or generates one; writes a fresh
/// token per role and dev buyer. Refuses a directory or file that someone else could have prepared.
pub fn open_or_create(dir: &Path) -> Result<(Signer, DevAuth), String> {
    private_dir(dir)?;
    let key_path = dir.join("signing.pem");
    let (signer, reused) = match read_private(&key_path)? {
        Some(pem) => {
            let signer = Signer::from_pem(&pem).map_err(|e| format!("{}: {e}", key_path.display()))?;
            (signer, true)
        }
        None => {
            let signer = Signer::generate().map_err(|e| format!("can't generate a signing key: {e}"))?;
            write_private(&key_path, &signer.private_pem())?;
            (signer, false)
        }
    };
    write_private(&dir.join("public.pem"), &signer.public_pem())?;
    let tokens_dir = dir.join("tokens");
    private_dir(&tokens_dir)?;
    let mut tokens = Vec::new();
    for role in Role::ALL.into_iter().filter(|r| *r != Role::Buyer) {
        tokens.push((role.as_str().to_string(), signer.mint_role(role, DEV_TOKEN_TTL)));
    }
    for buyer in DEV_BUYERS {
        tokens.push((format!("buyer-{buyer}"), signer.mint_buyer(buyer, DEV_TOKEN_TTL)));
    }
    for (name, token) in &tokens {
        write_private(&tokens_dir.join(format!("{name}.jwt")), token)?;
    }
    Ok((signer, DevAuth { dir: dir.to_path_buf(), tokens, reused }))
}

/// The dev cluster's audit key in `dir` (an auth dir [`open_or_create`] has prepared): reused when
/// `audit-signing.pem` is there, else generated, with its public half in `audit-public.pem`. It is a
/// DEV-ONLY key: it sits next to the token key on this machine, so it proves nothing to anyone but
/// whoever owns the machine; production keeps its audit key away from Redis and from token issuers.
/// Returns the key and whether it was reused.
pub fn audit_key(dir: &Path) -> Result<(Signer, bool), String> {
    private_dir(dir)?;
    let key_path = dir.join("audit-signing.pem");
    let (key, reused) = match read_private(&key_path)? {
        Some(pem) => (Signer::from_pem(&pem).map_err(|e| format!("{}: {e}", key_path.display()))?, true),
        None => {
            let key = Signer::generate().map_err(|e| format!("can't generate an audit key: {e}"))?;
            write_private(&key_path, &key.private_pem())?;
            (key, false)
        }
    };
    write_private(&dir.join("audit-public.pem"), &key.public_pem())?;
    Ok((key, reused))
}

/// Makes sure `dir` is a directory that only we can enter: creates it with mode 0700 if it does not
/// exist; otherwise it must be a real directory (not a symlink), owned by us, that neither group nor
/// others may write to.
fn private_dir(dir: &Path) -> Result<(), String> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| format!("can't create {}: {e}", parent.display()))?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("can't create {}: {e}", dir.display())),
    }
    // Checked after creating too: the mode is masked by the umask, and someone may have won a race.
    let meta = fs::symlink_metadata(dir).map_err(|e| format!("can't inspect {}: {e}", dir.display()))?;
    let refuse = |why: String| {
        Err(format!(
            "refusing to keep keys in {}: {why}; remove it or choose another place with --auth-dir",
            dir.display()
        ))
    };
    if meta.file_type().is_symlink() {
        return refuse("it is a symbolic link".into());
    }
    if !meta.is_dir() {
        return refuse("it is not a directory".into());
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return refuse(format!("it belongs to uid {}, not to you (uid {me})", meta.uid()));
    }
    // Others who can write here could plant links or swap files; reading names alone gives nothing
    // away (every file is 0600), so a 0755 directory of one's own is accepted.
    if meta.mode() & 0o022 != 0 {
        return refuse(format!("others may write to it (mode {:04o}; a new one is made 0700)", meta.mode() & 0o7777));
    }
    Ok(())
}

/// Opens a file without following a symlink at its last component.
fn no_follow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Reads a private file of ours (None when it does not exist). Refuses a symlink, a file owned by
/// someone else, or one that others may read.
fn read_private(path: &Path) -> Result<Option<String>, String> {
    let mut file = match OpenOptions::new().read(true).custom_flags(no_follow()).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("can't open {} (a symbolic link is refused): {e}", path.display())),
    };
    let meta = file.metadata().map_err(|e| format!("can't inspect {}: {e}", path.display()))?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_file() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "refusing {}: it must be a regular file of yours with mode 0600 (uid {}, mode {:04o})",
            path.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| format!("can't read {}: {e}", path.display()))?;
    Ok(Some(text))
}

/// Writes `text` to `path` with mode 0600: into a new file (create-new, no symlink followed) next to
/// it, then renamed over it. A symlink already at `path` is refused rather than replaced.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    if let Ok(meta) = fs::symlink_metadata(path)
        && !meta.is_file()
    {
        return Err(format!("refusing to write {}: something other than a regular file is there", path.display()));
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.{:016x}.tmp", fastrand::u64(..)));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(&tmp)
        .map_err(|e| format!("can't create {}: {e}", tmp.display()))?;
    let written = file.write_all(text.as_bytes()).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(format!("can't write {}: {e}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_fresh_dir_is_0700_and_every_file_0600() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("chipgate-dev");
        let (_, auth) = open_or_create(&dir).unwrap();
        assert!(!auth.reused);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("tokens")), 0o700);
        for f in ["signing.pem", "public.pem", "tokens/auditor.jwt", "tokens/buyer-bytedance.jwt"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
    }

    #[test]
    fn the_audit_key_is_its_own_private_file_and_is_reused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("d");
        let (token_key, _) = open_or_create(&dir).unwrap();
        let (first, reused) = audit_key(&dir).unwrap();
        assert!(!reused);
        assert_ne!(first.public_pem(), token_key.public_pem(), "the audit key is not the token key");
        assert_eq!(mode(&dir.join("audit-signing.pem")), 0o600);
        assert_eq!(mode(&dir.join("audit-public.pem")), 0o600);
        let (second, reused) = audit_key(&dir).unwrap();
        assert!(reused);
        assert_eq!(first.public_pem(), second.public_pem(), "checkpoints kept across restarts still verify");
        // A planted link where the key goes is refused, not followed.
        let victim = base.path().join("victim.txt");
        fs::write(&victim, "precious").unwrap();
        fs::remove_file(dir.join("audit-signing.pem")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("audit-signing.pem")).unwrap();
        assert!(audit_key(&dir).is_err());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn a_second_start_reuses_the_key_pair() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("d");
        let (first, _) = open_or_create(&dir).unwrap();
        let (second, auth) = open_or_create(&dir).unwrap();
        assert!(auth.reused);
        assert_eq!(first.public_pem(), second.public_pem());
        // A token the first handed out still verifies with the second's key.
        let token = first.mint_role(Role::Auditor, Duration::from_secs(60));
        assert!(second.verifier().verify(&token).is_ok());
    }

    #[test]
    fn a_planted_symlink_never_receives_the_private_key() {
        let base = tempfile::tempdir().unwrap();
        let victim = base.path().join("victim.txt");
        fs::write(&victim, "precious").unwrap();
        // Someone else prepared the shared path: a world-writable dir with a link in it.
        let dir = base.path().join("chipgate-dev");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("signing.pem")).unwrap();
        let err = open_or_create(&dir).err().unwrap();
        assert!(err.contains("mode 0777"), "{err}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");

        // Even in a private dir, a link where a key goes is refused, not followed.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let err = open_or_create(&dir).err().unwrap();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        fs::remove_file(dir.join("signing.pem")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("public.pem")).unwrap();
        let err = open_or_create(&dir).err().unwrap();
        assert!(err.contains("public.pem"), "{err}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn a_dir_that_is_a_symlink_or_readable_by_others_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let real = base.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(open_or_create(&link).err().unwrap().contains("symbolic link"));
        assert!(!real.join("signing.pem").exists());

        let open = base.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(open_or_create(&open).err().unwrap().contains("mode 0770"));
        // Readable but not writable by others: nobody can plant anything, and every file is 0600.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        open_or_create(&open).unwrap();
        assert_eq!(mode(&open.join("signing.pem")), 0o600);
    }

    #[test]
    fn a_key_readable_by_others_is_not_reused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("d");
        open_or_create(&dir).unwrap();
        fs::set_permissions(dir.join("signing.pem"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(open_or_create(&dir).err().unwrap().contains("mode 0600"));
    }

    #[test]
    fn a_dir_owned_by_someone_else_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("theirs");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        // Only root can give a directory away; as anyone else this part has nothing to show.
        if rustix::fs::chown(&dir, Some(rustix::process::Uid::from_raw(65534)), None).is_err() {
            return;
        }
        let err = open_or_create(&dir).err().unwrap();
        assert!(err.contains("belongs to uid 65534"), "{err}");
    }
}
