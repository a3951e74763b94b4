//! Paging for every List call: `page_size` (default 100, at most 1000) and an opaque `page_token`
//! that encodes where the previous page stopped.

use crate::errors::Violations;

/// Page size when the caller gives none.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page served.
pub const MAX_PAGE_SIZE: usize = 1000;

/// A validated page request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// How many items to return.
    pub size: usize,
    /// Where to continue from (empty: from the start).
    pub cursor: String,
}

const TOKEN_PREFIX: &str = "cg1.";

/// Encodes a cursor as an opaque page token.
pub fn token(cursor: &str) -> String {
    let mut s = String::from(TOKEN_PREFIX);
    for b in cursor.bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn decode(token: &str) -> Option<String> {
    let hex = token.strip_prefix(TOKEN_PREFIX)?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

impl Page {
    /// Validates `page_size` and `page_token`, recording violations.
    pub fn parse(v: &mut Violations, page_size: i32, page_token: &str) -> Page {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => {
                v.add("page_size", "must not be negative");
                DEFAULT_PAGE_SIZE
            }
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let cursor = if page_token.is_empty() {
            String::new()
        } else {
            match decode(page_token) {
                Some(c) => c,
                None => {
                    v.add("page_token", "is not a token this service issued");
                    String::new()
                }
            }
        };
        Page { size, cursor }
    }

    /// The cursor as an offset (for lists paged by position).
    pub fn offset(&self) -> usize {
        self.cursor.parse().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let mut v = Violations::new();
        let p = Page::parse(&mut v, 5, &token("lic-7|3"));
        assert_eq!(p, Page { size: 5, cursor: "lic-7|3".into() });
        assert!(v.is_empty());
        let p = Page::parse(&mut v, 0, "");
        assert_eq!(p.size, DEFAULT_PAGE_SIZE);
        let p = Page::parse(&mut v, 100_000, "");
        assert_eq!(p.size, MAX_PAGE_SIZE);
        Page::parse(&mut v, -1, "nonsense");
        let fields: Vec<&str> = v.list().iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["page_size", "page_token"]);
    }
}
