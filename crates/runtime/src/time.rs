//! Time helpers: protobuf timestamps, milliseconds since the epoch, and human durations ("250ms",
//! "10s", "5m", "1h") for flags.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A protobuf timestamp for milliseconds since the epoch.
pub fn ts(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// A protobuf timestamp, or `None` for 0 (unset).
pub fn ts_opt(ms: u64) -> Option<prost_types::Timestamp> {
    (ms != 0).then(|| ts(ms))
}

/// Milliseconds since the epoch of a protobuf timestamp (negative times clamp to 0).
pub fn ms_of(t: &prost_types::Timestamp) -> u64 {
    if t.seconds < 0 {
        return 0;
    }
    (t.seconds as u64).saturating_mul(1000).saturating_add((t.nanos.max(0) as u64) / 1_000_000)
}

/// Parses "250ms", "10s", "5m", "1h" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 250ms, 10s, 5m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn timestamps_round_trip() {
        let t = ts(1_700_000_123_456);
        assert_eq!((t.seconds, t.nanos), (1_700_000_123, 456_000_000));
        assert_eq!(ms_of(&t), 1_700_000_123_456);
        assert_eq!(ts_opt(0), None);
    }
}
