//! Who is calling: signed bearer tokens, so that every service can tell an import authority from a
//! buyer (and one buyer from another) without calling anyone.
//!
//! Tokens are compact JWTs signed with Ed25519 (`alg: EdDSA`), using `ring` (the crypto rustls already
//! runs on) and a deliberately small encoder: the header is fixed, only `EdDSA` is accepted (no `none`,
//! no algorithm confusion, no `crit` extension we would have to understand), and the claims are
//! `sub`, `role`, `buyer_id` (buyers only), `aud` (`chipgate`), `iat`, `exp` and optionally `nbf`.
//! Keys are PEM files: the services get the public key(s) to verify (several, for rotation), whoever
//! mints tokens gets the PKCS#8 private key (`openssl genpkey -algorithm ed25519` makes one; `chipgate
//! dev` generates its own). No key is ever in the code.
//!
//! Each public key may be limited to the roles it signs for, with a `roles:` line in the text before
//! its PEM block (text outside the blocks is ignored by every PEM reader, so the file stays a plain
//! key bundle for openssl), so that the key a service mints its own `service` tokens with can't
//! mint an import authority's; a block without the line signs for every role. Each role has a
//! maximum token lifetime ([`Lifetimes`]). A token can't be revoked on its own: removing the key
//! that signed it (a rotation) revokes every token of that key, and short lifetimes bound the rest.
//!
//! The [`edge`](crate::edge) layer verifies the token of every call and checks the
//! [`policy`](crate::policy) table; handlers that act on a resource by id check its owner with
//! [`crate::RequestContext::check_owner`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The audience every chipgate token carries.
pub const AUDIENCE: &str = "chipgate";
/// Metadata key of the bearer token.
pub const AUTHORIZATION_HEADER: &str = "authorization";
/// Longest token accepted (a real one is ~300 bytes).
const MAX_TOKEN_BYTES: usize = 4096;
/// Clock skew tolerated on `exp` and `iat`.
const LEEWAY_SECS: u64 = 30;
/// Verified tokens remembered (with their expiry) so a caller's every call doesn't pay an Ed25519
/// verification (~50 µs); the map is emptied when it reaches this size.
const VERIFIED_CACHE: usize = 10_000;
/// Refused tokens remembered (by SHA-256, with the reason) when the reason can't change with time, so
/// the same bad token sent again costs no verification; emptied when it reaches this size.
const REFUSED_CACHE: usize = 10_000;
/// The fixed JOSE header of every token we mint.
const HEADER_JSON: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), followed by the 32-byte key.
const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// What a caller may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The import authority: the approval queue, waves, licences and their terms, domestic ledger.
    ImportAuthority,
    /// The export authority: export authorisations.
    ExportAuthority,
    /// Customs: import policy per product.
    Customs,
    /// The vendor: catalogue, supply, shipping.
    Vendor,
    /// A buyer: its own applications, licences and orders (the token names the buyer).
    Buyer,
    /// The services' own calls to each other (quota and reservations).
    Service,
    /// Reads everything, changes nothing.
    Auditor,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 7] = [
        Role::ImportAuthority,
        Role::ExportAuthority,
        Role::Customs,
        Role::Vendor,
        Role::Buyer,
        Role::Service,
        Role::Auditor,
    ];

    /// The name in tokens and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ImportAuthority => "import_authority",
            Role::ExportAuthority => "export_authority",
            Role::Customs => "customs",
            Role::Vendor => "vendor",
            Role::Buyer => "buyer",
            Role::Service => "service",
            Role::Auditor => "auditor",
        }
    }

    /// The role named `s`.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated caller of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's subject (who, for the audit log).
    pub subject: String,
    /// What it may do.
    pub role: Role,
    /// The buyer it is (buyers only).
    pub buyer_id: Option<String>,
}

impl Principal {
    /// True when this is a buyer other than `buyer_id` (the one case where owning data matters).
    pub fn is_other_buyer(&self, buyer_id: &str) -> bool {
        self.role == Role::Buyer && self.buyer_id.as_deref() != Some(buyer_id)
    }
}

/// The claims of a token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Subject.
    pub sub: String,
    /// Role name.
    pub role: String,
    /// Buyer id (buyers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buyer_id: Option<String>,
    /// Audience: always [`AUDIENCE`].
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Not valid before (Unix seconds), when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Why a token or key was refused.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `authorization: Bearer …` metadata.
    #[error("no bearer token")]
    Missing,
    /// Not a well-formed token.
    #[error("malformed token")]
    Malformed,
    /// The signature does not verify with any configured key.
    #[error("bad signature")]
    BadSignature,
    /// Past its `exp`.
    #[error("token expired")]
    Expired,
    /// Before its `nbf`.
    #[error("token not valid yet")]
    NotYetValid,
    /// The header asks for something this verifier does not implement (a `crit` extension).
    #[error("unsupported token: {0}")]
    Unsupported(&'static str),
    /// Well signed, but the claims are unusable.
    #[error("unusable claims: {0}")]
    BadClaims(&'static str),
    /// A key file is unusable.
    #[error("key: {0}")]
    Key(String),
}

impl AuthError {
    /// UNAUTHENTICATED with ErrorInfo; says what was wrong with the token, nothing else.
    pub fn into_status(self) -> Status {
        let reason = match self {
            AuthError::Missing => "TOKEN_MISSING",
            AuthError::Expired => "TOKEN_EXPIRED",
            AuthError::NotYetValid => "TOKEN_NOT_YET_VALID",
            _ => "TOKEN_INVALID",
        };
        let mut details = ErrorDetails::new();
        details.set_error_info(reason, crate::errors::DOMAIN, []);
        Status::with_error_details(
            Code::Unauthenticated,
            format!("{self}: send `authorization: Bearer <token>`"),
            details,
        )
    }
}

/// PERMISSION_DENIED that names nothing but the refusal (never the resource or its owner).
pub fn permission_denied() -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info("PERMISSION_DENIED", crate::errors::DOMAIN, []);
    Status::with_error_details(Code::PermissionDenied, "permission denied", details)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The DER payloads of the PEM blocks labelled `label` in `text`.
fn pem_blocks(text: &str, label: &str) -> Result<Vec<Vec<u8>>, AuthError> {
    let (begin, end) = (format!("-----BEGIN {label}-----"), format!("-----END {label}-----"));
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let stop = after.find(&end).ok_or_else(|| AuthError::Key(format!("unterminated {label} block")))?;
        let b64: String = after[..stop].chars().filter(|c| !c.is_whitespace()).collect();
        out.push(STANDARD.decode(b64).map_err(|e| AuthError::Key(format!("bad base64 in {label}: {e}")))?);
        rest = &after[stop + end.len()..];
    }
    Ok(out)
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

fn read(path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path).map_err(|e| AuthError::Key(format!("can't read {}: {e}", path.display())))
}

/// Mints tokens (the dev cluster, the test harness, an operator's tooling, a service minting its own
/// `service` token).
#[derive(Clone)]
pub struct Signer {
    key: Arc<Ed25519KeyPair>,
    pkcs8: Arc<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<ed25519 private key>)")
    }
}

impl Signer {
    /// A fresh random key.
    ///
    /// # Errors
    /// When the system has no randomness.
    pub fn generate() -> Result<Self, AuthError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| AuthError::Key("no randomness".into()))?;
        Self::from_pkcs8(doc.as_ref())
    }

    fn from_pkcs8(der: &[u8]) -> Result<Self, AuthError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| AuthError::Key(format!("not an Ed25519 PKCS#8 private key: {e}")))?;
        Ok(Signer { key: Arc::new(key), pkcs8: Arc::new(der.to_vec()) })
    }

    /// The key in a PEM `PRIVATE KEY` (PKCS#8) block.
    ///
    /// # Errors
    /// When there is no usable block.
    pub fn from_pem(text: &str) -> Result<Self, AuthError> {
        let blocks = pem_blocks(text, "PRIVATE KEY")?;
        let der = blocks.first().ok_or_else(|| AuthError::Key("no PRIVATE KEY block".into()))?;
        Self::from_pkcs8(der)
    }

    /// The key in the PEM file at `path`.
    ///
    /// # Errors
    /// When it can't be read or holds no usable key.
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        Self::from_pem(&read(path)?)
    }

    /// The private key as PEM (to write the dev cluster's key file).
    pub fn private_pem(&self) -> String {
        pem("PRIVATE KEY", &self.pkcs8)
    }

    /// The public key as PEM (SubjectPublicKeyInfo), what the services verify with.
    pub fn public_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.key.public_key().as_ref());
        pem("PUBLIC KEY", &der)
    }

    /// A verifier for this key's tokens.
    pub fn verifier(&self) -> Verifier {
        let mut k = [0u8; 32];
        k.copy_from_slice(&self.key.public_key().as_ref()[..32]);
        Verifier::with_keys(vec![VerifyingKey { key: k, roles: None }])
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(HEADER_JSON), URL_SAFE_NO_PAD.encode(payload));
        let sig = self.key.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    /// A token for `subject` acting as `role` (and, for buyers, as `buyer_id`), valid for `ttl`.
    pub fn mint(&self, subject: &str, role: Role, buyer_id: Option<&str>, ttl: Duration) -> String {
        let iat = now_secs();
        self.sign(&Claims {
            sub: subject.to_string(),
            role: role.as_str().to_string(),
            buyer_id: buyer_id.map(str::to_string),
            aud: AUDIENCE.to_string(),
            iat,
            exp: iat.saturating_add(ttl.as_secs().max(1)),
            nbf: None,
        })
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(&self.key.public_key().as_ref()[..32]);
        k
    }

    /// The 64-byte Ed25519 signature of `msg` (for signed statements other than tokens, such as
    /// licensing's audit checkpoints; check it with [`ed25519_verify`]).
    pub fn sign_bytes(&self, msg: &[u8]) -> Vec<u8> {
        self.key.sign(msg).as_ref().to_vec()
    }

    /// A buyer token for `buyer_id` (subject `buyer:<id>`).
    pub fn mint_buyer(&self, buyer_id: &str, ttl: Duration) -> String {
        self.mint(&format!("buyer:{buyer_id}"), Role::Buyer, Some(buyer_id), ttl)
    }

    /// A token for a non-buyer `role` (subject `<role>`).
    pub fn mint_role(&self, role: Role, ttl: Duration) -> String {
        self.mint(role.as_str(), role, None, ttl)
    }
}

/// Whether `signature` is the Ed25519 signature of `msg` by `public_key` (raw 32 bytes).
pub fn ed25519_verify(public_key: &[u8; 32], msg: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key).verify(msg, signature).is_ok()
}

/// The raw 32-byte key of the first `PUBLIC KEY` block (Ed25519 SubjectPublicKeyInfo) in `text`.
///
/// # Errors
/// When there is no such block or it is not an Ed25519 key.
pub fn public_key_from_pem(text: &str) -> Result<[u8; 32], AuthError> {
    let blocks = pem_blocks(text, "PUBLIC KEY")?;
    let der = blocks.first().ok_or_else(|| AuthError::Key("no PUBLIC KEY block".into()))?;
    if der.len() != 44 || der[..12] != SPKI_PREFIX {
        return Err(AuthError::Key("the PUBLIC KEY block is not an Ed25519 key".into()));
    }
    let mut k = [0u8; 32];
    k.copy_from_slice(&der[12..]);
    Ok(k)
}

/// The longest lifetime (`exp - iat`) a token of each role may have.
///
/// Defaults: 30 days for `service` (the orders Deployment's token Secret, re-minted by the operator)
/// and 7 days for every other role (what `chipgate dev` mints). Operators tighten them with
/// `--token-max-lifetime` (e.g. `import_authority=8h,buyer=24h`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    by_role: [Duration; Role::ALL.len()],
}

impl Default for Lifetimes {
    fn default() -> Self {
        let day = Duration::from_secs(24 * 3600);
        let mut by_role = [day * 7; Role::ALL.len()];
        by_role[Role::Service as usize] = day * 30;
        Lifetimes { by_role }
    }
}

impl Lifetimes {
    /// The maximum for `role`.
    pub fn of(&self, role: Role) -> Duration {
        self.by_role[role as usize]
    }

    /// The defaults with `spec` applied: comma-separated `role=duration` pairs, where the role `*`
    /// sets every role not named otherwise in `spec` (e.g. `*=24h,service=720h`).
    ///
    /// # Errors
    /// An unknown role, a bad duration, a zero duration or a malformed pair.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut out = Lifetimes::default();
        let mut named = Vec::new();
        let mut every = None;
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (role, value) = pair.split_once('=').ok_or_else(|| format!("{pair:?} is not role=duration"))?;
            let d = crate::time::parse_duration(value)?;
            if d.is_zero() {
                return Err(format!("{pair:?}: a lifetime must be longer than zero"));
            }
            match role.trim() {
                "*" => every = Some(d),
                r => named.push((Role::parse(r).ok_or_else(|| format!("{r:?} is not a role"))?, d)),
            }
        }
        if let Some(d) = every {
            out.by_role = [d; Role::ALL.len()];
        }
        for (role, d) in named {
            out.by_role[role as usize] = d;
        }
        Ok(out)
    }
}

/// One verification key and the roles it may sign tokens for (None: every role).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyingKey {
    key: [u8; 32],
    roles: Option<Vec<Role>>,
}

impl VerifyingKey {
    /// The roles this key signs for (None: every role).
    pub fn roles(&self) -> Option<&[Role]> {
        self.roles.as_deref()
    }

    fn may_sign(&self, role: Role) -> bool {
        self.roles.as_ref().is_none_or(|r| r.contains(&role))
    }
}

/// Parses the `roles:` annotation of a key: `roles: service` or `roles: vendor, auditor`, on a line of
/// its own (optionally behind `#`) in the text before the key's PEM block.
fn roles_annotation(text: &str) -> Result<Option<Vec<Role>>, AuthError> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim().trim_start_matches('#').trim();
        let Some(list) = line.strip_prefix("roles:") else { continue };
        if found.is_some() {
            return Err(AuthError::Key("two `roles:` lines before one PUBLIC KEY block".into()));
        }
        let mut roles = Vec::new();
        for name in list.split([',', ' ']).map(str::trim).filter(|n| !n.is_empty()) {
            let role =
                Role::parse(name).ok_or_else(|| AuthError::Key(format!("`roles:` names {name:?}, not a role")))?;
            if !roles.contains(&role) {
                roles.push(role);
            }
        }
        if roles.is_empty() {
            return Err(AuthError::Key("an empty `roles:` line (omit it to allow every role)".into()));
        }
        found = Some(roles);
    }
    Ok(found)
}

/// Verifies tokens against one or more public keys (several during a key rotation), each possibly
/// limited to some roles, with a maximum lifetime per role.
#[derive(Clone, Debug)]
pub struct Verifier {
    keys: Vec<VerifyingKey>,
    lifetimes: Lifetimes,
    /// Tokens already verified, with their principal and expiry (seconds). Keyed by the whole token,
    /// signature included, so only a byte-identical token hits; expiry is still checked on every use.
    verified: Arc<Mutex<HashMap<String, (Principal, u64)>>>,
    /// Tokens refused for a reason time can't change (bad signature, expired, unusable claims), by
    /// SHA-256 of the token, so a replayed bad token costs a hash instead of a verification.
    refused: Arc<Mutex<HashMap<[u8; 32], AuthError>>>,
    /// Ed25519 signature checks made (for metrics and tests).
    checks: Arc<AtomicU64>,
}

fn digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

impl AuthError {
    /// Whether the same token would be refused the same way at any later time (so the refusal can
    /// be remembered).
    fn is_permanent(&self) -> bool {
        matches!(
            self,
            AuthError::BadSignature | AuthError::Expired | AuthError::BadClaims(_) | AuthError::Unsupported(_)
        )
    }
}

impl Verifier {
    fn with_keys(keys: Vec<VerifyingKey>) -> Self {
        Verifier {
            keys,
            lifetimes: Lifetimes::default(),
            verified: Arc::default(),
            refused: Arc::default(),
            checks: Arc::default(),
        }
    }

    /// Every `PUBLIC KEY` block in `text` (Ed25519 SubjectPublicKeyInfo), each limited to the roles of
    /// a `roles:` line between it and the previous block, if there is one.
    ///
    /// # Errors
    /// When there is no key, one is not an Ed25519 key, or a `roles:` line names an unknown role.
    pub fn from_pem(text: &str) -> Result<Self, AuthError> {
        const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
        const END: &str = "-----END PUBLIC KEY-----";
        let mut keys = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find(BEGIN) {
            let roles = roles_annotation(&rest[..start])?;
            let stop = rest[start..]
                .find(END)
                .map(|i| start + i + END.len())
                .ok_or_else(|| AuthError::Key("unterminated PUBLIC KEY block".into()))?;
            let der = pem_blocks(&rest[start..stop], "PUBLIC KEY")?;
            for der in der {
                if der.len() != 44 || der[..12] != SPKI_PREFIX {
                    return Err(AuthError::Key("a PUBLIC KEY block is not an Ed25519 key".into()));
                }
                let mut k = [0u8; 32];
                k.copy_from_slice(&der[12..]);
                keys.push(VerifyingKey { key: k, roles: roles.clone() });
            }
            rest = &rest[stop..];
        }
        if roles_annotation(rest)?.is_some() {
            return Err(AuthError::Key("a `roles:` line after the last PUBLIC KEY block".into()));
        }
        if keys.is_empty() {
            return Err(AuthError::Key("no PUBLIC KEY block".into()));
        }
        Ok(Self::with_keys(keys))
    }

    /// The keys in the PEM file at `path`.
    ///
    /// # Errors
    /// When it can't be read or holds no usable key.
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        Self::from_pem(&read(path)?)
    }

    /// The same keys with other maximum lifetimes.
    #[must_use]
    pub fn with_lifetimes(mut self, lifetimes: Lifetimes) -> Self {
        self.lifetimes = lifetimes;
        self
    }

    /// The verification keys.
    pub fn keys(&self) -> &[VerifyingKey] {
        &self.keys
    }

    /// Ed25519 signature checks made so far.
    pub fn signature_checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// The principal of `token`, if it is well formed, signed by one of the keys (one that may sign
    /// its role), for chipgate, current, and not longer-lived than its role allows.
    ///
    /// # Errors
    /// Why it was refused.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.remembered(token).unwrap_or_else(|| self.verify_fresh(token))
    }

    /// The outcome of an earlier verification of this very token, if one is remembered (a
    /// remembered principal whose expiry has passed is refused and forgotten). Costs no signature
    /// check.
    pub fn remembered(&self, token: &str) -> Option<Result<Principal, AuthError>> {
        let hit = self.verified.lock().ok().and_then(|m| m.get(token).cloned());
        if let Some((principal, exp)) = hit {
            if exp.saturating_add(LEEWAY_SECS) < now_secs() {
                if let Ok(mut m) = self.verified.lock() {
                    m.remove(token);
                }
                return Some(Err(AuthError::Expired));
            }
            return Some(Ok(principal));
        }
        if self.refused.lock().is_ok_and(|m| m.is_empty()) {
            return None;
        }
        let d = digest(token);
        self.refused.lock().ok().and_then(|m| m.get(&d).cloned()).map(Err)
    }

    /// Verifies `token` (a signature check) and remembers the outcome.
    ///
    /// # Errors
    /// Why it was refused.
    pub fn verify_fresh(&self, token: &str) -> Result<Principal, AuthError> {
        match self.verify_uncached(token) {
            Ok((principal, exp)) => {
                if let Ok(mut m) = self.verified.lock() {
                    if m.len() >= VERIFIED_CACHE {
                        m.clear();
                    }
                    m.insert(token.to_string(), (principal.clone(), exp));
                }
                Ok(principal)
            }
            Err(e) => {
                if e.is_permanent()
                    && let Ok(mut m) = self.refused.lock()
                {
                    if m.len() >= REFUSED_CACHE {
                        m.clear();
                    }
                    m.insert(digest(token), e.clone());
                }
                Err(e)
            }
        }
    }

    /// [`Verifier::verify`] without the caches; also returns the expiry.
    fn verify_uncached(&self, token: &str) -> Result<(Principal, u64), AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(AuthError::Malformed);
        };
        let header = URL_SAFE_NO_PAD.decode(h).map_err(|_| AuthError::Malformed)?;
        let header: serde_json::Value = serde_json::from_slice(&header).map_err(|_| AuthError::Malformed)?;
        if header.get("alg").and_then(|v| v.as_str()) != Some("EdDSA") {
            return Err(AuthError::Malformed);
        }
        // RFC 7515 §4.1.11: a recipient must refuse a token whose `crit` names an extension it does
        // not understand, and we understand none.
        if header.get("crit").is_some() {
            return Err(AuthError::Unsupported("critical header extensions"));
        }
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| AuthError::Malformed)?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        let key = self
            .keys
            .iter()
            .find(|k| {
                self.checks.fetch_add(1, Ordering::Relaxed);
                UnparsedPublicKey::new(&ED25519, &k.key).verify(signed, &sig).is_ok()
            })
            .ok_or(AuthError::BadSignature)?;
        let payload = URL_SAFE_NO_PAD.decode(p).map_err(|_| AuthError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| AuthError::BadClaims("not the claims"))?;
        let now = now_secs();
        if claims.exp.saturating_add(LEEWAY_SECS) < now {
            return Err(AuthError::Expired);
        }
        if claims.iat > now.saturating_add(LEEWAY_SECS) {
            return Err(AuthError::BadClaims("issued in the future"));
        }
        if claims.nbf.is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECS)) {
            return Err(AuthError::NotYetValid);
        }
        if claims.aud != AUDIENCE {
            return Err(AuthError::BadClaims("wrong audience"));
        }
        let role = Role::parse(&claims.role).ok_or(AuthError::BadClaims("unknown role"))?;
        if !key.may_sign(role) {
            // Somebody holding a key meant for other roles minted this one: worth an operator's eye.
            tracing::warn!(%role, subject = %claims.sub, key_roles = ?key.roles, "token signed by a key that may not sign this role");
            return Err(AuthError::BadClaims("the key that signed it may not sign this role"));
        }
        if claims.exp.saturating_sub(claims.iat) > self.lifetimes.of(role).as_secs() {
            return Err(AuthError::BadClaims("lives longer than its role allows"));
        }
        let buyer_id = match (role, claims.buyer_id) {
            (Role::Buyer, Some(b)) if !b.is_empty() => Some(b),
            (Role::Buyer, _) => return Err(AuthError::BadClaims("a buyer token must name its buyer")),
            (_, _) => None,
        };
        if claims.sub.is_empty() || claims.sub.len() > 128 || !claims.sub.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::BadClaims("bad subject"));
        }
        Ok((Principal { subject: claims.sub, role, buyer_id }, claims.exp))
    }

    /// The principal of a call with `headers`.
    ///
    /// # Errors
    /// When there is no bearer token or it is refused.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Principal, AuthError> {
        self.verify(bearer(headers)?)
    }
}

/// The bearer token of a call with `headers`.
///
/// # Errors
/// Missing when there is no `authorization`, Malformed when it is not `Bearer <token>`.
pub fn bearer(headers: &http::HeaderMap) -> Result<&str, AuthError> {
    let value = headers.get(AUTHORIZATION_HEADER).ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    Ok(value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).ok_or(AuthError::Malformed)?.trim())
}

/// Where a client's token comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// No token (servers with authentication off).
    None,
    /// A fixed token.
    Static(String),
    /// A token file (a Kubernetes secret), re-read when it is older than a minute so rotations apply.
    File(Arc<FileToken>),
    /// Tokens minted from a signing key for one identity, renewed well before they expire.
    Minted(Arc<MintedToken>),
}

/// See [`TokenSource::File`].
#[derive(Debug)]
pub struct FileToken {
    path: std::path::PathBuf,
    cached: RwLock<(String, std::time::Instant)>,
}

/// See [`TokenSource::Minted`].
#[derive(Debug)]
pub struct MintedToken {
    signer: Signer,
    role: Role,
    subject: String,
    buyer_id: Option<String>,
    ttl: Duration,
    cached: RwLock<(String, std::time::Instant)>,
}

impl TokenSource {
    /// The token in `path` (read now, so a missing file fails at startup).
    ///
    /// # Errors
    /// When the file can't be read or is empty.
    pub fn file(path: &Path) -> Result<Self, AuthError> {
        let token = read(path)?.trim().to_string();
        if token.is_empty() {
            return Err(AuthError::Key(format!("{} is empty", path.display())));
        }
        Ok(TokenSource::File(Arc::new(FileToken {
            path: path.to_path_buf(),
            cached: RwLock::new((token, std::time::Instant::now())),
        })))
    }

    /// Tokens for `role` (subject `subject`) minted with `signer`, each valid for an hour.
    pub fn minted(signer: Signer, role: Role, subject: &str, buyer_id: Option<&str>) -> Self {
        let ttl = Duration::from_secs(3600);
        let token = signer.mint(subject, role, buyer_id, ttl);
        TokenSource::Minted(Arc::new(MintedToken {
            signer,
            role,
            subject: subject.to_string(),
            buyer_id: buyer_id.map(str::to_string),
            ttl,
            cached: RwLock::new((token, std::time::Instant::now())),
        }))
    }

    /// The token to send now.
    pub fn current(&self) -> Option<String> {
        match self {
            TokenSource::None => None,
            TokenSource::Static(t) => Some(t.clone()),
            TokenSource::File(f) => {
                let (token, at) = f.cached.read().map(|g| g.clone()).ok()?;
                if at.elapsed() < Duration::from_secs(60) {
                    return Some(token);
                }
                let fresh =
                    std::fs::read_to_string(&f.path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
                let token = match fresh {
                    Some(t) => t,
                    None => {
                        tracing::warn!(path = %f.path.display(), "token file unreadable; keeping the last token");
                        token
                    }
                };
                if let Ok(mut g) = f.cached.write() {
                    *g = (token.clone(), std::time::Instant::now());
                }
                Some(token)
            }
            TokenSource::Minted(m) => {
                let (token, at) = m.cached.read().map(|g| g.clone()).ok()?;
                if at.elapsed() < m.ttl / 2 {
                    return Some(token);
                }
                let token = m.signer.mint(&m.subject, m.role, m.buyer_id.as_deref(), m.ttl);
                if let Ok(mut g) = m.cached.write() {
                    *g = (token.clone(), std::time::Instant::now());
                }
                Some(token)
            }
        }
    }
}

/// A client interceptor adding `authorization: Bearer <token>` to every call.
#[derive(Clone, Debug)]
pub struct Bearer(pub TokenSource);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = self.0.current()
            && let Ok(v) = format!("Bearer {token}").parse()
        {
            req.metadata_mut().insert(AUTHORIZATION_HEADER, v);
        }
        Ok(req)
    }
}

/// A channel whose calls carry a bearer token.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// `channel` with `tokens` attached.
pub fn with_token(channel: tonic::transport::Channel, tokens: TokenSource) -> AuthChannel {
    tonic::service::interceptor::InterceptedService::new(channel, Bearer(tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_carry_the_role_and_buyer() {
        let s = Signer::generate().expect("key");
        let v = s.verifier();
        let p = v.verify(&s.mint_buyer("bytedance", Duration::from_secs(60))).expect("valid");
        assert_eq!((p.role, p.buyer_id.as_deref()), (Role::Buyer, Some("bytedance")));
        let p = v.verify(&s.mint_role(Role::Customs, Duration::from_secs(60))).expect("valid");
        assert_eq!((p.role, p.buyer_id), (Role::Customs, None));
    }

    #[test]
    fn keys_round_trip_through_pem_and_other_keys_are_refused() {
        let s = Signer::generate().expect("key");
        let again = Signer::from_pem(&s.private_pem()).expect("private pem");
        let other = Signer::generate().expect("key");
        let both = Verifier::from_pem(&format!("{}{}", s.public_pem(), other.public_pem())).expect("public pem");
        let only_s = Verifier::from_pem(&s.public_pem()).expect("public pem");
        let t = again.mint_role(Role::Vendor, Duration::from_secs(60));
        assert!(only_s.verify(&t).is_ok());
        let t2 = other.mint_role(Role::Vendor, Duration::from_secs(60));
        assert_eq!(only_s.verify(&t2), Err(AuthError::BadSignature));
        assert!(both.verify(&t2).is_ok(), "rotation: either key verifies");
    }

    #[test]
    fn expired_tampered_and_odd_tokens_are_refused() {
        let s = Signer::generate().expect("key");
        let v = s.verifier();
        let now = now_secs();
        let claims = |role: &str, buyer: Option<&str>, exp: u64| Claims {
            sub: "x".into(),
            role: role.into(),
            buyer_id: buyer.map(str::to_string),
            aud: AUDIENCE.into(),
            iat: now - 10,
            exp,
            nbf: None,
        };
        assert_eq!(v.verify(&s.sign(&claims("vendor", None, now - 3600))), Err(AuthError::Expired));
        assert!(matches!(v.verify(&s.sign(&claims("root", None, now + 60))), Err(AuthError::BadClaims(_))));
        assert!(matches!(v.verify(&s.sign(&claims("buyer", None, now + 60))), Err(AuthError::BadClaims(_))));
        // Raise the role in the payload, keep the signature: refused.
        let t = s.sign(&claims("auditor", None, now + 60));
        let parts: Vec<&str> = t.split('.').collect();
        let forged =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("import_authority", None, now + 60)).expect("json"));
        assert_eq!(v.verify(&format!("{}.{forged}.{}", parts[0], parts[2])), Err(AuthError::BadSignature));
        // alg "none" and garbage.
        let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        assert_eq!(v.verify(&format!("{none}.{}.", parts[1])), Err(AuthError::Malformed));
        assert_eq!(v.verify("a.b"), Err(AuthError::Malformed));
        assert_eq!(v.verify(""), Err(AuthError::Malformed));
        let mut h = http::HeaderMap::new();
        assert_eq!(v.authenticate(&h), Err(AuthError::Missing));
        h.insert("authorization", "Basic abc".parse().expect("header"));
        assert_eq!(v.authenticate(&h), Err(AuthError::Malformed));
    }

    #[test]
    fn verified_tokens_are_remembered_but_still_expire() {
        let s = Signer::generate().expect("key");
        let v = s.verifier();
        let t = s.mint_role(Role::Vendor, Duration::from_secs(60));
        let p = v.verify(&t).expect("valid");
        assert_eq!(v.verify(&t).expect("remembered"), p);
        // A token differing only in its signature is not a hit: it is verified, and refused.
        let mut bad = t.clone();
        let last = bad.pop().expect("non-empty");
        bad.push(if last == 'A' { 'Q' } else { 'A' });
        assert!(v.verify(&bad).is_err());
        // A remembered token whose expiry has passed is refused and forgotten.
        v.verified.lock().expect("lock").insert(t.clone(), (p, now_secs() - 3600));
        assert_eq!(v.verify(&t), Err(AuthError::Expired));
        assert!(!v.verified.lock().expect("lock").contains_key(&t));
    }

    fn claims(role: &str, iat: u64, exp: u64, nbf: Option<u64>) -> Claims {
        Claims {
            sub: "x".into(),
            role: role.into(),
            buyer_id: (role == "buyer").then(|| "b".to_string()),
            aud: AUDIENCE.into(),
            iat,
            exp,
            nbf,
        }
    }

    #[test]
    fn not_before_is_enforced() {
        let s = Signer::generate().expect("key");
        let v = s.verifier();
        let now = now_secs();
        assert_eq!(v.verify(&s.sign(&claims("vendor", now, now + 600, Some(now + 300)))), Err(AuthError::NotYetValid));
        assert!(v.verify(&s.sign(&claims("vendor", now, now + 600, Some(now)))).is_ok(), "nbf now is valid");
        assert!(v.verify(&s.sign(&claims("vendor", now, now + 600, Some(now + 20)))).is_ok(), "within the leeway");
        // Not remembered as refused: the same token becomes valid later.
        let later = s.sign(&claims("vendor", now, now + 600, Some(now + 300)));
        assert_eq!(v.verify(&later), Err(AuthError::NotYetValid));
        assert!(v.remembered(&later).is_none());
    }

    #[test]
    fn critical_header_extensions_are_refused() {
        let s = Signer::generate().expect("key");
        let v = s.verifier();
        let now = now_secs();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("vendor", now, now + 60, None)).expect("json"));
        for header in [r#"{"alg":"EdDSA","crit":["exp"],"exp":1}"#, r#"{"alg":"EdDSA","crit":["b64"],"b64":false}"#] {
            let input = format!("{}.{payload}", URL_SAFE_NO_PAD.encode(header));
            let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(s.key.sign(input.as_bytes()).as_ref()));
            assert!(matches!(v.verify(&token), Err(AuthError::Unsupported(_))), "{header}");
        }
    }

    #[test]
    fn lifetimes_are_capped_per_role() {
        let s = Signer::generate().expect("key");
        let now = now_secs();
        let day = 24 * 3600;
        let v = s.verifier();
        assert!(v.verify(&s.sign(&claims("buyer", now, now + 7 * day, None))).is_ok(), "7 days: the default");
        assert!(matches!(
            v.verify(&s.sign(&claims("buyer", now, now + 7 * day + 1, None))),
            Err(AuthError::BadClaims(_))
        ));
        assert!(v.verify(&s.sign(&claims("service", now, now + 30 * day, None))).is_ok());
        assert!(matches!(
            v.verify(&s.sign(&claims("service", now, now + 365 * day, None))),
            Err(AuthError::BadClaims(_))
        ));
        // A back-dated iat doesn't help: the lifetime is exp - iat.
        assert!(matches!(
            v.verify(&s.sign(&claims("vendor", now - 30 * day, now + day, None))),
            Err(AuthError::BadClaims(_))
        ));

        let tight = Lifetimes::parse("*=1h, service=720h").expect("spec");
        assert_eq!(
            (tight.of(Role::ImportAuthority), tight.of(Role::Service)),
            (Duration::from_secs(3600), Duration::from_secs(720 * 3600))
        );
        let v = s.verifier().with_lifetimes(tight);
        assert!(matches!(
            v.verify(&s.sign(&claims("import_authority", now, now + 2 * 3600, None))),
            Err(AuthError::BadClaims(_))
        ));
        assert!(v.verify(&s.sign(&claims("import_authority", now, now + 3600, None))).is_ok());
        let only = Lifetimes::parse("auditor=8h").expect("spec");
        assert_eq!(
            (only.of(Role::Auditor), only.of(Role::Buyer)),
            (Duration::from_secs(8 * 3600), Duration::from_secs(7 * day))
        );
        for bad in ["root=1h", "buyer", "buyer=1d", "buyer=0s"] {
            assert!(Lifetimes::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_key_signs_only_the_roles_it_is_given() {
        let service_key = Signer::generate().expect("key");
        let people_key = Signer::generate().expect("key");
        let pem = format!(
            "# orders mints its own service tokens with this one\nroles: service\n{}\
             roles: import_authority, vendor auditor\n{}",
            service_key.public_pem(),
            people_key.public_pem()
        );
        let v = Verifier::from_pem(&pem).expect("annotated bundle");
        assert_eq!(v.keys()[0].roles(), Some(&[Role::Service][..]));
        assert_eq!(v.keys()[1].roles(), Some(&[Role::ImportAuthority, Role::Vendor, Role::Auditor][..]));
        let ttl = Duration::from_secs(600);
        assert!(v.verify(&service_key.mint_role(Role::Service, ttl)).is_ok());
        assert!(matches!(v.verify(&service_key.mint_role(Role::ImportAuthority, ttl)), Err(AuthError::BadClaims(_))));
        assert!(matches!(v.verify(&service_key.mint_buyer("b", ttl)), Err(AuthError::BadClaims(_))));
        assert!(v.verify(&people_key.mint_role(Role::ImportAuthority, ttl)).is_ok());
        assert!(matches!(v.verify(&people_key.mint_role(Role::Service, ttl)), Err(AuthError::BadClaims(_))));
        // A bundle without annotations (today's files) still lets every key sign every role.
        let plain =
            Verifier::from_pem(&format!("{}{}", service_key.public_pem(), people_key.public_pem())).expect("pem");
        assert!(plain.keys().iter().all(|k| k.roles().is_none()));
        assert!(plain.verify(&service_key.mint_role(Role::ImportAuthority, ttl)).is_ok());
        // Mistakes fail at startup, never open up.
        for bad in [
            format!("roles: root\n{}", service_key.public_pem()),
            format!("roles:\n{}", service_key.public_pem()),
            format!("roles: service\nroles: vendor\n{}", service_key.public_pem()),
            format!("{}roles: service\n", service_key.public_pem()),
        ] {
            assert!(Verifier::from_pem(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn raw_signatures_verify_with_the_public_key_read_back_from_pem() {
        let s = Signer::generate().expect("key");
        let public = public_key_from_pem(&s.public_pem()).expect("public pem");
        assert_eq!(public, s.public_key());
        let sig = s.sign_bytes(b"checkpoint");
        assert_eq!(sig.len(), 64);
        assert!(ed25519_verify(&public, b"checkpoint", &sig));
        assert!(!ed25519_verify(&public, b"checkpoinT", &sig));
        assert!(!ed25519_verify(&Signer::generate().expect("key").public_key(), b"checkpoint", &sig));
        assert!(public_key_from_pem(&s.private_pem()).is_err(), "a private key is not a public one");
        assert!(public_key_from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").is_err());
    }

    #[test]
    fn refused_tokens_are_remembered_and_cost_no_second_check() {
        let s = Signer::generate().expect("key");
        let other = Signer::generate().expect("key");
        let v = s.verifier();
        let forged = other.mint_role(Role::ImportAuthority, Duration::from_secs(60));
        assert_eq!(v.verify(&forged), Err(AuthError::BadSignature));
        let checks = v.signature_checks();
        assert_eq!(checks, 1);
        for _ in 0..100 {
            assert_eq!(v.verify(&forged), Err(AuthError::BadSignature));
        }
        assert_eq!(v.signature_checks(), checks, "the same bad token is not checked again");
        assert_eq!(v.remembered(&forged), Some(Err(AuthError::BadSignature)));
        // Every different one is.
        let _ = v.verify(&other.mint_role(Role::Vendor, Duration::from_secs(60)));
        assert_eq!(v.signature_checks(), checks + 1);
    }
}
