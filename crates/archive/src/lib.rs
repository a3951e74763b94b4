//! Records that outlive Redis: the audit log and closed orders, archived in sealed segments that an
//! auditor can check years later without Redis and without chipgate.
//!
//! Export-control records are kept for years (the US EAR asks five, 15 CFR 762.6); Redis holds what is
//! live. A **segment** is a gzip-compressed JSON Lines object with a **manifest** beside it (JSON):
//! the segment's first and last sequence, its data's SHA-256 and size and, for the audit log, the
//! hashes its chain starts from and ends at and a signed audit checkpoint that pins its last entry.
//! Objects are written once under names derived from what they hold ([`segment`]), so a run that
//! died halfway and is run again writes the same names.
//!
//! The services decide what to archive and when to remove it from Redis (licensing for its audit
//! chains, orders per product); this crate holds what both they and the command line need: the
//! target ([`Target`], a directory or S3-compatible object storage, chosen by URL), the segment format, and checking segments
//! ([`audit::check_segment`], [`audit::verify_chain`], [`orders::verify_product`],
//! [`orders::find_order`]). Nothing here trusts a segment: every read recomputes the data's hash and,
//! for the audit log, every link.

pub mod audit;
pub mod json;
pub mod orders;
pub mod prune;
pub mod segment;
pub mod status;
pub mod target;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use segment::Manifest;
pub use target::{Created, S3Settings, Target, TargetError};

/// A problem found in the archive: the segment (its manifest's object name), the sequence (an audit
/// entry's, or 0) and what is wrong. What verification reports so an auditor knows which object to
/// look at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{segment}: {problem}")]
pub struct Problem {
    /// The segment's manifest object name.
    pub segment: String,
    /// The first audit sequence concerned (0 when not about one entry).
    pub sequence: u64,
    /// What is wrong.
    pub problem: String,
}

impl Problem {
    pub(crate) fn new(segment: &str, sequence: u64, problem: impl Into<String>) -> Self {
        Problem { segment: segment.to_string(), sequence, problem: problem.into() }
    }
}

/// Parses a retention window or period: `7d` (days), or anything
/// [`chipgate_runtime::time::parse_duration`] takes (`250ms`, `10s`, `5m`, `1h`, bare seconds).
///
/// # Errors
/// Not such a duration.
pub fn parse_window(s: &str) -> Result<std::time::Duration, String> {
    match s.trim().strip_suffix('d').map(str::parse::<u64>) {
        Some(Ok(days)) => Ok(std::time::Duration::from_secs(days.saturating_mul(86_400))),
        Some(Err(_)) => Err(format!("{s:?} is not a duration like 7d, 12h or 30m")),
        None => chipgate_runtime::time::parse_duration(s),
    }
}

/// RFC 3339 text of a time in milliseconds since the epoch (what manifests and lines carry for people).
pub fn rfc3339(ms: u64) -> String {
    let ts = prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 };
    ts.to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn windows_take_days() {
        assert_eq!(super::parse_window("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(super::parse_window("90m"), Ok(Duration::from_secs(5400)));
        assert!(super::parse_window("xd").is_err());
        assert!(super::parse_window("5w").is_err());
    }
}
