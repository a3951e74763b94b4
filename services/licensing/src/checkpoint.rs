//! Signed audit checkpoints: the canonical form of "the audit chains stood here at this time", its
//! root, and its Ed25519 signature. Pure: no I/O, no clock (the caller gives the heads and the time).
//!
//! Why: each audit chain is anchored only by its head, which lives in the same Redis as the entries,
//! so whoever can write Redis can cut entries off the end and move the head back, or rewrite an entry
//! and re-link every later one, and the chain still verifies. A checkpoint signed with a key that is
//! not in Redis, kept by an auditor (or shipped to logs and metrics), pins each chain's head at a
//! sequence; a later log that no longer reaches that head at that sequence was rewritten.
//!
//! The canonical form is plain text so an auditor can check a checkpoint with openssl alone (see
//! `AuditCheckpoint` in licensing.proto):
//!
//! ```text
//! root   = hex SHA-256("chipgate-audit-chains-v1\n" + for each chain, by name:
//!                      "chain <len(name)>:<name> <sequence> <head_hash>\n")
//! signed = "chipgate-audit-checkpoint-v1\n" "key_id <key_id>\n" "time <secs>.<nanos:09>\n" "root <root>\n"
//! ```
//!
//! Names are length-prefixed and lines carry no free text, so two different checkpoints never share a
//! canonical form.

use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::auth::{Signer, ed25519_verify};
use chipgate_state::{AUDIT_GENESIS, sha256_hex};

/// First line of the signed text.
pub const SIGNED_HEADER: &str = "chipgate-audit-checkpoint-v1";
/// First line of the text the root is the hash of.
pub const CHAINS_HEADER: &str = "chipgate-audit-chains-v1";
/// Longest chain name accepted.
const MAX_CHAIN_NAME: usize = 512;
/// Most chains a checkpoint may name (licensing partitions by buyer; far fewer buyers exist).
pub const MAX_CHAINS: usize = 100_000;

/// The key id of an Ed25519 public key: `ed25519:` and the first 16 hex digits of SHA-256 of the raw
/// 32-byte key.
pub fn key_id(public_key: &[u8; 32]) -> String {
    format!("ed25519:{}", &sha256_hex(public_key)[..16])
}

/// What is wrong with a checkpoint: the field (as a request path, e.g. `checkpoint.chains[2].head_hash`)
/// and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Defect {
    /// Stable machine-readable reason: `CHECKPOINT_MALFORMED`, `CHECKPOINT_ROOT_MISMATCH`,
    /// `CHECKPOINT_UNSIGNED`, `CHECKPOINT_UNKNOWN_KEY` or `CHECKPOINT_BAD_SIGNATURE`.
    pub reason: &'static str,
    /// The offending field.
    pub field: String,
    /// Why.
    pub description: String,
}

fn defect(reason: &'static str, field: impl Into<String>, description: impl Into<String>) -> Defect {
    Defect { reason, field: field.into(), description: description.into() }
}

fn is_hex_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The canonical text of a list of chain heads, which the root is the SHA-256 of. The heads must be
/// sorted by name (byte order) without repeats, each name 1..=512 bytes without control characters,
/// each hash 64 lower-case hex digits (64 zeros exactly when the sequence is 0).
///
/// # Errors
/// The first head that breaks a rule (field paths relative to the checkpoint).
pub fn chains_text(chains: &[pb::AuditChainHead]) -> Result<String, Defect> {
    const MALFORMED: &str = "CHECKPOINT_MALFORMED";
    if chains.len() > MAX_CHAINS {
        return Err(defect(MALFORMED, "checkpoint.chains", format!("names more than {MAX_CHAINS} chains")));
    }
    let mut out = String::with_capacity(CHAINS_HEADER.len() + 1 + chains.len() * 96);
    out.push_str(CHAINS_HEADER);
    out.push('\n');
    for (i, c) in chains.iter().enumerate() {
        let at = |f: &str| format!("checkpoint.chains[{i}].{f}");
        if c.chain.is_empty() || c.chain.len() > MAX_CHAIN_NAME || c.chain.chars().any(char::is_control) {
            return Err(defect(
                MALFORMED,
                at("chain"),
                format!("must be 1 to {MAX_CHAIN_NAME} bytes without control characters"),
            ));
        }
        if i > 0 && chains[i - 1].chain.as_bytes() >= c.chain.as_bytes() {
            return Err(defect(MALFORMED, at("chain"), "chains must be sorted by name, each named once"));
        }
        if !is_hex_digest(&c.head_hash) {
            return Err(defect(MALFORMED, at("head_hash"), "must be 64 lower-case hex digits"));
        }
        if (c.sequence == 0) != (c.head_hash == AUDIT_GENESIS) {
            return Err(defect(MALFORMED, at("head_hash"), "is 64 zeros exactly when the sequence is 0"));
        }
        out.push_str(&format!("chain {}:{} {} {}\n", c.chain.len(), c.chain, c.sequence, c.head_hash));
    }
    Ok(out)
}

/// Hex SHA-256 of [`chains_text`].
///
/// # Errors
/// As [`chains_text`].
pub fn root(chains: &[pb::AuditChainHead]) -> Result<String, Defect> {
    Ok(sha256_hex(chains_text(chains)?.as_bytes()))
}

/// The text the signature covers.
pub fn signed_text(key_id: &str, time: &prost_types::Timestamp, root: &str) -> String {
    format!("{SIGNED_HEADER}\nkey_id {key_id}\ntime {}.{:09}\nroot {root}\n", time.seconds, time.nanos)
}

/// A checkpoint of `chains` (any order; they are sorted here) at `time_ms`, signed with `key` when
/// there is one.
///
/// # Errors
/// When a head is malformed (a name twice, a bad hash): the state holds something it should not.
pub fn make(
    mut chains: Vec<pb::AuditChainHead>,
    time_ms: u64,
    key: Option<&Signer>,
) -> Result<pb::AuditCheckpoint, Defect> {
    chains.sort_by(|a, b| a.chain.as_bytes().cmp(b.chain.as_bytes()));
    let root = root(&chains)?;
    let time = chipgate_runtime::time::ts(time_ms);
    let (key_id, signature, public_key_pem) = match key {
        Some(k) => {
            let id = key_id(&k.public_key());
            let sig = k.sign_bytes(signed_text(&id, &time, &root).as_bytes());
            (id, sig, k.public_pem())
        }
        None => (String::new(), Vec::new(), String::new()),
    };
    Ok(pb::AuditCheckpoint { chains, root, time: Some(time), key_id, signature, public_key_pem })
}

/// Checks a checkpoint someone brings back: well formed, its root recomputed from its chains, and
/// signed by `key` — or, when the service has no key (`None`, dev only), unsigned. Returns whether it
/// was signed.
///
/// # Errors
/// The defect; a checkpoint with any defect says nothing about the log.
pub fn check(cp: &pb::AuditCheckpoint, key: Option<&Signer>) -> Result<bool, Defect> {
    check_with_public_key(cp, key.map(Signer::public_key).as_ref())
}

/// [`check`] with the audit key's public half only: how an auditor checks the checkpoints sealed in
/// archive manifests offline (`chipgate audit verify --archive`), with the key pinned out of band.
///
/// # Errors
/// As [`check`].
pub fn check_with_public_key(cp: &pb::AuditCheckpoint, key: Option<&[u8; 32]>) -> Result<bool, Defect> {
    let recomputed = root(&cp.chains)?;
    let Some(time) = cp.time.as_ref().filter(|t| t.seconds >= 0 && (0..1_000_000_000).contains(&t.nanos)) else {
        return Err(defect("CHECKPOINT_MALFORMED", "checkpoint.time", "is required (a valid timestamp)"));
    };
    if recomputed != cp.root {
        return Err(defect(
            "CHECKPOINT_ROOT_MISMATCH",
            "checkpoint.root",
            "is not the SHA-256 of the checkpoint's chains: the chains or the root were changed",
        ));
    }
    let unsigned = cp.signature.is_empty() && cp.key_id.is_empty();
    match (key, unsigned) {
        (None, true) => Ok(false),
        (None, false) => Err(defect(
            "CHECKPOINT_UNKNOWN_KEY",
            "checkpoint.key_id",
            format!("{:?} signed it, but this service runs without an audit key and can't check it", cp.key_id),
        )),
        (Some(_), true) => Err(defect(
            "CHECKPOINT_UNSIGNED",
            "checkpoint.signature",
            "is missing: this service signs its checkpoints, so an unsigned one is not one of them",
        )),
        (Some(public), false) => {
            let ours = key_id(public);
            if cp.key_id != ours {
                return Err(defect(
                    "CHECKPOINT_UNKNOWN_KEY",
                    "checkpoint.key_id",
                    format!("{:?} is not this service's audit key ({ours})", cp.key_id),
                ));
            }
            let text = signed_text(&cp.key_id, time, &cp.root);
            if !ed25519_verify(public, text.as_bytes(), &cp.signature) {
                return Err(defect(
                    "CHECKPOINT_BAD_SIGNATURE",
                    "checkpoint.signature",
                    "does not verify with this service's audit key: the checkpoint was altered or forged",
                ));
            }
            Ok(true)
        }
    }
}

/// A short number standing for a head hash: its first 12 hex digits (48 bits, exact in a
/// Prometheus float), so a dashboard shows when a chain's head changed without a new sequence.
pub fn short_digest(head_hash: &str) -> i64 {
    head_hash.get(..12).and_then(|h| i64::from_str_radix(h, 16).ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn head(chain: &str, sequence: u64, hash: &str) -> pb::AuditChainHead {
        pb::AuditChainHead { chain: chain.into(), sequence, head_hash: hash.into() }
    }

    fn h(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    #[test]
    fn the_canonical_form_is_the_documented_text() {
        let chains = vec![head("{lic}:audit", 7, &h('a')), head("{lic}:audit:b", 0, AUDIT_GENESIS)];
        let text = chains_text(&chains).unwrap();
        assert_eq!(
            text,
            format!(
                "chipgate-audit-chains-v1\nchain 11:{{lic}}:audit 7 {}\nchain 13:{{lic}}:audit:b 0 {AUDIT_GENESIS}\n",
                h('a')
            )
        );
        assert_eq!(root(&chains).unwrap(), sha256_hex(text.as_bytes()));
        let t = prost_types::Timestamp { seconds: 1_700_000_000, nanos: 5_000_000 };
        assert_eq!(
            signed_text("ed25519:0123456789abcdef", &t, "ff"),
            "chipgate-audit-checkpoint-v1\nkey_id ed25519:0123456789abcdef\ntime 1700000000.005000000\nroot ff\n"
        );
    }

    #[test]
    fn names_are_length_prefixed_so_no_two_lists_share_a_root() {
        // Without the length a name holding " 1 " could pose as two fields.
        let a = vec![head("x 1", 2, &h('b'))];
        let b = vec![head("x", 12, &h('b'))];
        assert_ne!(root(&a).unwrap(), root(&b).unwrap());
        // Order and membership matter.
        let one = vec![head("a", 1, &h('c'))];
        let two = vec![head("a", 1, &h('c')), head("b", 1, &h('c'))];
        assert_ne!(root(&one).unwrap(), root(&two).unwrap());
    }

    #[test]
    fn malformed_lists_are_refused_with_the_field() {
        let unsorted = vec![head("b", 1, &h('a')), head("a", 1, &h('a'))];
        assert_eq!(chains_text(&unsorted).unwrap_err().field, "checkpoint.chains[1].chain");
        let twice = vec![head("a", 1, &h('a')), head("a", 2, &h('a'))];
        assert!(chains_text(&twice).is_err());
        assert_eq!(chains_text(&[head("a", 1, "ABC")]).unwrap_err().field, "checkpoint.chains[0].head_hash");
        assert!(chains_text(&[head("a", 1, &h('A'))]).is_err(), "upper-case hex is not canonical");
        assert!(chains_text(&[head("a", 0, &h('a'))]).is_err(), "an empty chain has the genesis hash");
        assert!(chains_text(&[head("a", 3, AUDIT_GENESIS)]).is_err());
        assert!(chains_text(&[head("", 1, &h('a'))]).is_err());
        assert!(chains_text(&[head("a\nchain", 1, &h('a'))]).is_err());
        assert!(chains_text(&[]).is_ok(), "no chains yet is a statement too");
    }

    #[test]
    fn a_signed_checkpoint_verifies_and_any_change_is_refused() {
        let key = Signer::generate().unwrap();
        let chains = vec![head("{lic}:audit:z", 3, &h('d')), head("{lic}:audit", 9, &h('e'))];
        let cp = make(chains, 1_700_000_123_456, Some(&key)).unwrap();
        assert_eq!(cp.chains[0].chain, "{lic}:audit", "sorted by name");
        assert_eq!(cp.signature.len(), 64);
        assert_eq!(cp.key_id, key_id(&key.public_key()));
        assert_eq!(cp.time, Some(prost_types::Timestamp { seconds: 1_700_000_123, nanos: 456_000_000 }));
        assert_eq!(check(&cp, Some(&key)), Ok(true));

        let reason = |cp: &pb::AuditCheckpoint| check(cp, Some(&key)).unwrap_err().reason;
        for i in 0..64 {
            let mut bad = cp.clone();
            bad.signature[i] ^= 0x01;
            assert_eq!(reason(&bad), "CHECKPOINT_BAD_SIGNATURE", "byte {i}");
        }
        // Moving a chain's head back and fixing the root up: the signature covers the root.
        let mut back = cp.clone();
        back.chains[0].sequence = 8;
        back.root = root(&back.chains).unwrap();
        assert_eq!(reason(&back), "CHECKPOINT_BAD_SIGNATURE");
        // ... without fixing the root.
        let mut back = cp.clone();
        back.chains[0].head_hash = h('f');
        assert_eq!(reason(&back), "CHECKPOINT_ROOT_MISMATCH");
        let mut later = cp.clone();
        later.time.as_mut().unwrap().seconds += 1;
        assert_eq!(reason(&later), "CHECKPOINT_BAD_SIGNATURE");
        let mut dropped = cp.clone();
        dropped.chains.pop();
        dropped.root = root(&dropped.chains).unwrap();
        assert_eq!(reason(&dropped), "CHECKPOINT_BAD_SIGNATURE");
        // Stripping the signature does not make it an acceptable unsigned one.
        let mut stripped = cp.clone();
        stripped.signature.clear();
        stripped.key_id.clear();
        assert_eq!(reason(&stripped), "CHECKPOINT_UNSIGNED");
        // Another key's checkpoint, even a valid one, is not ours.
        let other = Signer::generate().unwrap();
        let theirs = make(cp.chains.clone(), 1_700_000_123_456, Some(&other)).unwrap();
        assert_eq!(reason(&theirs), "CHECKPOINT_UNKNOWN_KEY");
        let mut relabelled = theirs.clone();
        relabelled.key_id = cp.key_id.clone();
        assert_eq!(reason(&relabelled), "CHECKPOINT_BAD_SIGNATURE");
        // The shipped public key is informational: swapping it changes nothing.
        let mut swapped = cp.clone();
        swapped.public_key_pem = other.public_pem();
        assert_eq!(check(&swapped, Some(&key)), Ok(true));
    }

    #[test]
    fn unsigned_checkpoints_are_for_keyless_services_only() {
        let cp = make(vec![head("{lic}:audit", 2, &h('1'))], 5, None).unwrap();
        assert!(cp.signature.is_empty() && cp.key_id.is_empty() && cp.public_key_pem.is_empty());
        assert_eq!(check(&cp, None), Ok(false));
        let key = Signer::generate().unwrap();
        assert_eq!(check(&cp, Some(&key)).unwrap_err().reason, "CHECKPOINT_UNSIGNED");
        let signed = make(cp.chains.clone(), 5, Some(&key)).unwrap();
        assert_eq!(check(&signed, None).unwrap_err().reason, "CHECKPOINT_UNKNOWN_KEY");
        let mut no_time = cp.clone();
        no_time.time = None;
        assert_eq!(check(&no_time, None).unwrap_err().field, "checkpoint.time");
    }

    #[test]
    fn the_signature_checks_with_the_public_key_alone() {
        // What an auditor does offline: public key from the PEM, the signed text rebuilt from fields.
        let key = Signer::generate().unwrap();
        let cp = make(vec![head("{lic}:audit", 42, &h('9'))], 1_234_567, Some(&key)).unwrap();
        let public = chipgate_runtime::auth::public_key_from_pem(&cp.public_key_pem).unwrap();
        assert_eq!(key_id(&public), cp.key_id);
        let text = signed_text(&cp.key_id, cp.time.as_ref().unwrap(), &root(&cp.chains).unwrap());
        assert!(ed25519_verify(&public, text.as_bytes(), &cp.signature));
        let mut moved = cp.chains.clone();
        moved[0].sequence = 41;
        let forged = signed_text(&cp.key_id, cp.time.as_ref().unwrap(), &root(&moved).unwrap());
        assert!(!ed25519_verify(&public, forged.as_bytes(), &cp.signature));
    }

    #[test]
    fn short_digests_are_the_first_48_bits() {
        assert_eq!(short_digest(&h('f')), 0xffff_ffff_ffff);
        assert_eq!(short_digest(AUDIT_GENESIS), 0);
        assert_eq!(short_digest("12"), 0);
    }
}
