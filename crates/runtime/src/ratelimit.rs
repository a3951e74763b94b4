//! Per-caller rate limiting, so that one caller (a buyer's runaway script, a misbehaving tool) can't
//! take the whole of a service's capacity from everybody else; the global concurrency limit in the
//! [`edge`](crate::edge) only protects the service itself.
//!
//! One token bucket per caller: the authenticated subject, or the peer's IP address when
//! authentication is off. A call that finds its bucket empty is answered RESOURCE_EXHAUSTED with
//! RetryInfo saying when a token will be there. The table of buckets is bounded: when it is full,
//! buckets that have refilled completely (idle callers) are dropped first.
//!
//! The same buckets, keyed by peer address, budget failed authentications (see
//! [`crate::edge::identity`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Most callers tracked at once.
const MAX_CALLERS: usize = 100_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets by caller.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `per_second` calls per second per caller, with bursts of up to `burst` calls.
    pub fn new(per_second: f64, burst: u32) -> Self {
        RateLimiter { per_second: per_second.max(0.001), burst: f64::from(burst.max(1)), buckets: Mutex::default() }
    }

    /// Takes a token for `caller`, or says how long until one is there.
    pub fn take(&self, caller: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        if buckets.len() >= MAX_CALLERS && !buckets.contains_key(caller) {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
            if buckets.len() >= MAX_CALLERS {
                return Err(Duration::from_secs(1));
            }
        }
        let b = buckets.entry(caller.to_string()).or_insert(Bucket { tokens: self.burst, last: now });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * self.per_second).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_second))
        }
    }
}

impl RateLimiter {
    /// Puts back a token taken for `caller` (the thing it was taken for turned out free).
    pub fn give_back(&self, caller: &str) {
        if let Ok(mut buckets) = self.buckets.lock()
            && let Some(b) = buckets.get_mut(caller)
        {
            b.tokens = (b.tokens + 1.0).min(self.burst);
        }
    }
}

/// RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure for a peer address that failed authentication
/// too often: its calls are refused before their tokens are checked until the budget refills.
pub fn too_many_failed_authentications(retry_after: Duration) -> Status {
    let mut details = ErrorDetails::with_retry_info(Some(retry_after));
    details.add_quota_failure_violation("peer", "failed authentications per peer address");
    details.set_error_info("AUTH_FAILURE_BUDGET", crate::errors::DOMAIN, []);
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "too many failed authentications from this address; retry in {} ms with a valid token",
            retry_after.as_millis().max(1)
        ),
        details,
    )
}

/// RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure for a caller over its rate.
pub fn rate_limited(retry_after: Duration) -> Status {
    let mut details = ErrorDetails::with_retry_info(Some(retry_after));
    details.add_quota_failure_violation("caller", "calls per second for this caller");
    details.set_error_info("RATE_LIMITED", crate::errors::DOMAIN, []);
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("too many calls from this caller; retry in {} ms", retry_after.as_millis().max(1)),
        details,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_its_own_bucket() {
        let rl = RateLimiter::new(1.0, 3);
        for _ in 0..3 {
            assert!(rl.take("a").is_ok());
        }
        let wait = rl.take("a").expect_err("a is over its burst");
        assert!(wait > Duration::from_millis(500) && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(rl.take("b").is_ok(), "b is not affected by a");
        rl.give_back("a");
        assert!(rl.take("a").is_ok(), "a token given back can be taken again");
        assert!(rl.take("a").is_err());
        let s = rate_limited(wait);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.get_error_details().retry_info().is_some());
    }
}
