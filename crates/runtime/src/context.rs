//! The context of one call: request id, deadline, caller, and W3C trace context.
//!
//! The edge layer builds it from the incoming metadata (`x-request-id`, `grpc-timeout`,
//! `traceparent`) and stores it in the request's extensions; handlers read it with
//! [`RequestContext::of`]. Calls a service makes on behalf of a request carry the same request id, the
//! same trace (with this call as parent) and the remaining deadline, via [`RequestContext::outgoing`].

use std::time::Duration;

use tokio::time::Instant;

/// Metadata key of the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Metadata key of the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Metadata key naming the caller while authentication is not configured.
pub const ACTOR_HEADER: &str = "x-chipgate-actor";

/// Everything a handler needs to know about the call it serves.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// The caller's request id, or a generated one.
    pub request_id: String,
    /// 32 hex digits: the trace this call belongs to.
    pub trace_id: String,
    /// 16 hex digits: this call's span.
    pub span_id: String,
    /// The caller's span, when the caller sent a traceparent.
    pub parent_span_id: Option<String>,
    /// Who is calling (the authenticated subject, or the unauthenticated `x-chipgate-actor` claim, or
    /// "anonymous").
    pub actor: String,
    /// When the call must be answered by.
    pub deadline: Option<Instant>,
    /// The gRPC method path, e.g. `/chipgate.licensing.v1.LicensingService/PublishWave`.
    pub method: String,
    /// The authenticated caller (None when authentication is off, or for background work).
    pub principal: Option<crate::auth::Principal>,
    /// The `request_id` in the call's body — its idempotency key, which stays the same over the
    /// call's retries, unlike [`RequestContext::request_id`] (the correlation id) — for calls that
    /// carry one (`mutating!(…, request_id)`); empty otherwise.
    pub idempotency_key: String,
}

fn random_hex(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes * 2);
    for _ in 0..bytes {
        s.push_str(&format!("{:02x}", fastrand::u8(..)));
    }
    s
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses `00-<trace 32 hex>-<span 16 hex>-<flags 2 hex>`; all-zero ids are invalid per the spec.
pub fn parse_traceparent(value: &str) -> Option<(String, String)> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || !is_hex(trace, 32) || !is_hex(span, 16) || !is_hex(flags, 2) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    Some((trace.to_string(), span.to_string()))
}

/// Parses a `grpc-timeout` value ("100m", "5S", ...): at most 8 digits and a unit.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn valid_request_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
}

impl RequestContext {
    /// Builds the context of an incoming call from its headers. The deadline is the earlier of the
    /// caller's `grpc-timeout` and `default_timeout`.
    pub fn from_headers(headers: &http::HeaderMap, method: &str, default_timeout: Option<Duration>) -> Self {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let request_id =
            get(REQUEST_ID_HEADER).filter(|s| valid_request_id(s)).map(str::to_string).unwrap_or_else(|| random_hex(8));
        let (trace_id, parent_span_id) = match get(TRACEPARENT_HEADER).and_then(parse_traceparent) {
            Some((trace, parent)) => (trace, Some(parent)),
            None => (random_hex(16), None),
        };
        let actor = get(ACTOR_HEADER)
            .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or("anonymous")
            .to_string();
        let caller_timeout = get("grpc-timeout").and_then(parse_grpc_timeout);
        let timeout = match (caller_timeout, default_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        RequestContext {
            request_id,
            trace_id,
            span_id: random_hex(8),
            parent_span_id,
            actor,
            deadline: timeout.map(|t| Instant::now() + t),
            method: method.to_string(),
            principal: None,
            idempotency_key: String::new(),
        }
    }

    /// A context for work no call asked for (event consumers, sweepers), optionally continuing the
    /// trace of the change that caused it.
    pub fn background(name: &str, traceparent: Option<&str>) -> Self {
        let (trace_id, parent_span_id) = match traceparent.and_then(parse_traceparent) {
            Some((trace, parent)) => (trace, Some(parent)),
            None => (random_hex(16), None),
        };
        RequestContext {
            request_id: format!("{name}-{}", random_hex(6)),
            trace_id,
            span_id: random_hex(8),
            parent_span_id,
            actor: format!("system:{name}"),
            deadline: None,
            method: name.to_string(),
            principal: None,
            idempotency_key: String::new(),
        }
    }

    /// The context the edge layer attached to a request, or a fresh one (for direct calls in tests).
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        req.extensions().get::<RequestContext>().cloned().unwrap_or_else(|| {
            let headers = req.metadata().clone().into_headers();
            RequestContext::from_headers(&headers, "direct", None)
        })
    }

    /// Records the authenticated caller (the actor becomes its subject).
    pub fn authenticated(&mut self, principal: crate::auth::Principal) {
        self.actor = principal.subject.clone();
        self.principal = Some(principal);
    }

    /// Refuses (PERMISSION_DENIED, naming nothing) when the caller is a buyer other than
    /// `owner_buyer_id`; every other caller got past the policy table already.
    ///
    /// # Errors
    /// PERMISSION_DENIED for another buyer's resource.
    pub fn check_owner(&self, owner_buyer_id: &str) -> Result<(), tonic::Status> {
        match &self.principal {
            Some(p) if p.is_other_buyer(owner_buyer_id) => {
                tracing::info!(subject = %p.subject, method = %self.method, "refused: another buyer's resource");
                Err(crate::auth::permission_denied())
            }
            _ => Ok(()),
        }
    }

    /// The buyer the caller is restricted to (Some only for buyer tokens).
    pub fn buyer_scope(&self) -> Option<&str> {
        self.principal.as_ref().filter(|p| p.role == crate::auth::Role::Buyer).and_then(|p| p.buyer_id.as_deref())
    }

    /// This call's W3C traceparent (this call's span as the parent of what it causes).
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }

    /// Time left before the deadline (None: no deadline).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// True once the deadline has passed.
    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// A request for a call made on behalf of this one: same request id and actor, this call's span
    /// as parent, and at most the time left (at least 1 ms, so an expired call fails fast downstream).
    pub fn outgoing<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        let md = req.metadata_mut();
        if let Ok(v) = self.request_id.parse() {
            md.insert(REQUEST_ID_HEADER, v);
        }
        if let Ok(v) = self.traceparent().parse() {
            md.insert(TRACEPARENT_HEADER, v);
        }
        if let Ok(v) = self.actor.parse() {
            md.insert(ACTOR_HEADER, v);
        }
        if let Some(left) = self.remaining() {
            req.set_timeout(left.max(Duration::from_millis(1)));
        }
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_and_rejects_garbage() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parse_traceparent(tp), Some(("4bf92f3577b34da6a3ce929d0e0e4736".into(), "00f067aa0ba902b7".into())));
        assert_eq!(parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
        assert_eq!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), None);
        assert_eq!(parse_traceparent("garbage"), None);
    }

    #[test]
    fn grpc_timeout_parses() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }

    #[tokio::test]
    async fn context_continues_the_callers_trace_and_takes_the_earlier_deadline() {
        let mut h = http::HeaderMap::new();
        h.insert("x-request-id", "req-1".parse().expect("header"));
        h.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().expect("header"));
        h.insert("grpc-timeout", "50m".parse().expect("header"));
        let ctx = RequestContext::from_headers(&h, "/x/Y", Some(Duration::from_secs(10)));
        assert_eq!(ctx.request_id, "req-1");
        assert_eq!(ctx.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(ctx.span_id, "00f067aa0ba902b7");
        assert!(ctx.remaining().expect("deadline") <= Duration::from_millis(50));

        let out = ctx.outgoing(());
        let md = out.metadata();
        assert_eq!(md.get("x-request-id").and_then(|v| v.to_str().ok()), Some("req-1"));
        let tp = md.get("traceparent").and_then(|v| v.to_str().ok()).expect("traceparent");
        assert_eq!(parse_traceparent(tp), Some((ctx.trace_id.clone(), ctx.span_id.clone())));
        assert!(md.get("grpc-timeout").is_some());
    }

    #[test]
    fn missing_headers_get_fresh_ids() {
        let ctx = RequestContext::from_headers(&http::HeaderMap::new(), "/x/Y", None);
        assert_eq!(ctx.request_id.len(), 16);
        assert_eq!(ctx.trace_id.len(), 32);
        assert!(ctx.deadline.is_none());
        assert_eq!(ctx.actor, "anonymous");
    }
}
