//! The segment format: gzip-compressed JSON Lines, and a JSON manifest beside it.
//!
//! Object names: `audit/<chain>/<first sequence, 20 digits>.manifest.json` for an audit chain's
//! segment, `orders/<SKU>/<segment number, 12 digits>.manifest.json` for a product's closed orders,
//! with the chain or SKU escaped to letters, digits, `_`, `-` and `%XX`; zero-padded numbers list in
//! order. The data object sits beside its manifest under a name that carries the start of its own
//! SHA-256 (`<number>.<16 hex>.jsonl.gz`), and the manifest names it.
//!
//! Nothing is ever replaced: both objects are written create-only ([`Target::create`]), the data
//! first and the manifest second, so a segment exists once its manifest does. Because the data's
//! name follows from its content, a run that died after writing the data and a later run that seals
//! different entries write different names (the first is an orphan no manifest names), and a late
//! writer can't change the data under a sealed manifest. A second write of the same manifest with
//! other bytes is refused ([`SealError::Differs`]).
//!
//! [`Target::create`]: crate::Target::create

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::Problem;

/// The format every manifest names.
pub const FORMAT: &str = "chipgate-archive-v1";

/// Suffix of data objects.
pub const DATA_SUFFIX: &str = ".jsonl.gz";
/// Suffix of manifests.
pub const MANIFEST_SUFFIX: &str = ".manifest.json";

/// Largest decompressed segment read back (a guard against a corrupt or hostile object).
pub const MAX_JSON_BYTES: u64 = 1 << 30;

/// A segment's manifest: what the data object holds and how to check it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// `audit` or `orders`.
    pub kind: String,
    /// The audit chain's name, or the product's SKU.
    pub stream: String,
    /// Object name of the data.
    pub data: String,
    /// Hex SHA-256 of the data object (compressed bytes, as stored).
    pub data_sha256: String,
    /// Size of the data object.
    pub data_bytes: u64,
    /// Size of the JSON Lines once decompressed.
    pub json_bytes: u64,
    /// Lines (records) in the segment.
    pub records: u64,
    /// Audit: the first entry's sequence. Orders: the segment's number (1, 2, …).
    pub first: u64,
    /// Audit: the last entry's sequence. Orders: the segment's number.
    pub last: u64,
    /// Audit: the hash the first entry links to (the previous segment's last, or 64 zeros).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_prev_hash: Option<String>,
    /// Audit: the last entry's hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_hash: Option<String>,
    /// The earliest record time (RFC 3339): an audit entry's time, an order's closing time.
    pub first_time: String,
    /// The latest record time (RFC 3339).
    pub last_time: String,
    /// Orders: hex SHA-256 of the previous segment's manifest (segment 1: none), so a removed or
    /// replaced segment breaks the product's sequence of manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_manifest_sha256: Option<String>,
    /// Orders: the order sequence numbers the segment holds, as inclusive ranges (`ord-<SKU>-<n>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub order_seqs: Vec<[u64; 2]>,
    /// Audit: a signed audit checkpoint (proto3 JSON of `chipgate.licensing.v1.AuditCheckpoint`)
    /// pinning this chain at the segment's last entry and hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<serde_json::Value>,
    /// When the segment was written (RFC 3339).
    pub created_at: String,
    /// What wrote it (binary and version).
    pub written_by: String,
}

impl Manifest {
    /// The manifest as stored (pretty JSON, one trailing newline).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parses a stored manifest named `name`.
    ///
    /// # Errors
    /// Not a manifest of this format.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Self, Problem> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| Problem::new(name, 0, format!("the manifest is not readable JSON of this format: {e}")))?;
        if m.format != FORMAT {
            return Err(Problem::new(name, 0, format!("unknown manifest format {:?}", m.format)));
        }
        Ok(m)
    }
}

/// A sealed segment, ready to write: the data object first, then the manifest.
#[derive(Clone, Debug)]
pub struct Sealed {
    /// The data object's name.
    pub data_name: String,
    /// The compressed JSON Lines.
    pub data: Vec<u8>,
    /// The manifest object's name.
    pub manifest_name: String,
    /// The manifest.
    pub manifest: Manifest,
}

/// Why a segment could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The target failed (a data object without its manifest may be left: an orphan no reader
    /// follows).
    #[error(transparent)]
    Target(#[from] crate::TargetError),
    /// An object of that name already holds other bytes: a sealed segment is never replaced.
    #[error("{0} already exists with other content; a sealed segment is never replaced (inspect it)")]
    Differs(String),
}

impl Sealed {
    /// Writes the data object, then the manifest, each create-only (the segment exists once its
    /// manifest does). Writing the very same segment again is accepted.
    ///
    /// # Errors
    /// The target failed, or either name already holds other bytes.
    pub async fn write(&self, target: &crate::Target) -> Result<(), SealError> {
        for (name, bytes) in [(&self.data_name, self.data.clone()), (&self.manifest_name, self.manifest.to_bytes())] {
            if target.create(name, bytes).await? == crate::target::Created::Differs {
                return Err(SealError::Differs(name.clone()));
            }
        }
        Ok(())
    }
}

/// Escapes a chain name or SKU into one object-name part: letters, digits, `_` and `-` stay, every
/// other byte becomes `%XX` (so `{lic}:audit` is `%7Blic%7D%3Aaudit` and no name can climb out).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The directory of an audit chain's segments.
pub fn audit_dir(chain: &str) -> String {
    format!("audit/{}", escape(chain))
}

/// The manifest object name of the audit segment that starts at `first`.
pub fn audit_manifest(chain: &str, first: u64) -> String {
    format!("{}/{first:020}{MANIFEST_SUFFIX}", audit_dir(chain))
}

/// The directory of a product's order segments.
pub fn orders_dir(sku: &str) -> String {
    format!("orders/{}", escape(sku))
}

/// The manifest object name of a product's order segment number `n`.
pub fn orders_manifest(sku: &str, n: u64) -> String {
    format!("{}/{n:012}{MANIFEST_SUFFIX}", orders_dir(sku))
}

/// The data object's name beside manifest `manifest_name`, for data whose hex SHA-256 is `sha256`.
pub fn data_name(manifest_name: &str, sha256: &str) -> String {
    let base = manifest_name.strip_suffix(MANIFEST_SUFFIX).unwrap_or(manifest_name);
    format!("{base}.{}{DATA_SUFFIX}", sha256.get(..16).unwrap_or(sha256))
}

/// Gzip of `json` (default level: archives are written once and read rarely).
pub fn compress(json: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(json.len() / 4), flate2::Compression::default());
    // Writing to a Vec can't fail.
    let _ = enc.write_all(json);
    enc.finish().unwrap_or_default()
}

/// The JSON Lines inside a data object, at most [`MAX_JSON_BYTES`].
///
/// # Errors
/// Not gzip, truncated, or larger than the bound.
pub fn decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("the data is not readable gzip: {e}"))?;
    if out.len() as u64 > MAX_JSON_BYTES {
        return Err(format!("the data decompresses to more than {MAX_JSON_BYTES} bytes"));
    }
    Ok(out)
}

/// Reads a segment's manifest and data and checks the data against the manifest's hash and size;
/// returns the manifest and the JSON Lines.
///
/// # Errors
/// The first problem (named by the manifest object).
pub async fn read_checked(target: &crate::Target, manifest_name: &str) -> Result<(Manifest, Vec<u8>), Problem> {
    let unreadable = |e: crate::TargetError| Problem::new(manifest_name, 0, format!("can't be read: {e}"));
    let bytes = target
        .get(manifest_name)
        .await
        .map_err(unreadable)?
        .ok_or_else(|| Problem::new(manifest_name, 0, "the manifest is missing"))?;
    let m = Manifest::parse(manifest_name, &bytes)?;
    let data = target
        .get(&m.data)
        .await
        .map_err(unreadable)?
        .ok_or_else(|| Problem::new(manifest_name, m.first, format!("its data object {} is missing", m.data)))?;
    if data.len() as u64 != m.data_bytes || chipgate_state::sha256_hex(&data) != m.data_sha256 {
        return Err(Problem::new(
            manifest_name,
            m.first,
            format!("its data object {} does not match the manifest's SHA-256 and size (altered or truncated)", m.data),
        ));
    }
    let json = decompress(&data).map_err(|e| Problem::new(manifest_name, m.first, e))?;
    if json.len() as u64 != m.json_bytes {
        return Err(Problem::new(manifest_name, m.first, "its data does not decompress to the manifest's size"));
    }
    Ok((m, json))
}

/// The lines of a JSON Lines text, each parsed.
///
/// # Errors
/// The first line that is not a JSON object (1-based line number).
pub fn lines(json: &[u8]) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, String> {
    json.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_slice(l).map_err(|e| format!("line {} is not a JSON object: {e}", i + 1)))
        .collect()
}

/// Appends one record as a JSON line.
pub fn push_line(out: &mut Vec<u8>, v: &serde_json::Value) {
    // Serialising a Value can't fail.
    let _ = serde_json::to_writer(&mut *out, v);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_and_sort() {
        assert_eq!(escape("{lic}:audit"), "%7Blic%7D%3Aaudit");
        assert_eq!(escape("../H200.x"), "%2E%2E%2FH200%2Ex");
        let m1 = audit_manifest("{lic}:audit", 9);
        let m2 = audit_manifest("{lic}:audit", 10);
        assert_eq!(m1, "audit/%7Blic%7D%3Aaudit/00000000000000000009.manifest.json");
        assert_eq!(
            data_name(&m1, &"ab".repeat(32)),
            "audit/%7Blic%7D%3Aaudit/00000000000000000009.abababababababab.jsonl.gz"
        );
        assert!(m1 < m2, "zero padding lists segments in order");
        assert_eq!(orders_manifest("H200", 3), "orders/H200/000000000003.manifest.json");
    }

    #[test]
    fn gzip_round_trips_and_refuses_garbage() {
        let json = b"{\"a\":1}\n{\"a\":2}\n".repeat(100);
        let z = compress(&json);
        assert!(z.len() < json.len() / 5);
        assert_eq!(decompress(&z).expect("gunzip"), json);
        assert!(decompress(&z[..z.len() / 2]).is_err(), "truncated");
        assert!(decompress(b"not gzip").is_err());
        assert_eq!(lines(&json).expect("lines").len(), 200);
        assert!(lines(b"{}\nnot json\n").expect_err("bad line").starts_with("line 2"));
    }
}
