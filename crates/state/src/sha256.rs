//! SHA-256 helpers for the audit chain: a transaction's entries are linked in Rust before it is
//! committed ([`crate::Txn::link_audit`], against the head the commit then guards), and verifiers
//! recompute the same links. No backend hashes anything.

use sha2::{Digest, Sha256};

/// Lower-case hex SHA-256 of `data`.
pub fn hex(data: &[u8]) -> String {
    to_hex(&Sha256::digest(data))
}

/// SHA-256 of `data`.
pub fn digest(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Lower-case hex of bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Bytes of a 64-character hex digest; `None` if it is not one.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn hex_round_trip_and_rejects_bad_input() {
        let h = hex(b"chipgate");
        assert_eq!(to_hex(&decode_hex(&h).expect("valid hex")), h);
        assert!(decode_hex("abc").is_none());
        assert!(decode_hex(&"zz".repeat(32)).is_none());
    }
}
