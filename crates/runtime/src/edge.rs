//! The edge layer: the first thing every call meets.
//!
//! A tower layer (not a tonic interceptor, because it needs the method path and must be able to answer
//! without reaching the handler) that, per call:
//! * builds the [`RequestContext`] (request id, deadline, trace) and puts it in the request extensions;
//! * sheds load: a *global* semaphore (shared by every connection) bounds calls in flight, and a call
//!   that finds it full is answered RESOURCE_EXHAUSTED at once instead of queueing. Health checks and
//!   reflection are never shed, so probes keep telling the truth under overload;
//! * enforces the deadline (the earlier of the caller's `grpc-timeout` and the server's own), answering
//!   DEADLINE_EXCEEDED;
//! * runs the call inside a tracing span carrying method, request id and trace ids (exported with
//!   OpenTelemetry when that is on, as a child of the caller's span), and echoes `x-request-id` in the
//!   response headers;
//! * records the call in the service's [`RpcMetrics`] (count by code, latency, in flight, shed);
//! * when authentication is on, verifies the caller's bearer token (UNAUTHENTICATED without a valid
//!   one) and applies the [`policy`](crate::policy) table (PERMISSION_DENIED), reading the buyer id
//!   out of the request message for buyer-scoped RPCs; the [`Principal`](crate::auth::Principal) goes into the context.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::auth::Verifier;
use crate::context::{REQUEST_ID_HEADER, RequestContext};
use crate::metrics::RpcMetrics;
use crate::policy::{self, Decision};

/// Counters the edge keeps (for metrics and tests).
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// Calls answered RESOURCE_EXHAUSTED by load shedding.
    pub shed: AtomicU64,
    /// Calls answered DEADLINE_EXCEEDED by the edge.
    pub deadline_exceeded: AtomicU64,
}

/// Builds [`Edge`] services; clones share one concurrency limit.
#[derive(Clone)]
pub struct EdgeLayer {
    shared: Arc<Shared>,
}

#[derive(Clone)]
struct Shared {
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    default_timeout: Option<Duration>,
    stats: Arc<EdgeStats>,
    metrics: Option<RpcMetrics>,
    /// Token verification (None: authentication off, every caller trusted).
    auth: Option<Arc<Verifier>>,
    /// Largest request message read when a buyer-scoped request must be inspected.
    max_message_bytes: usize,
    /// Per-caller rate limit (None: off).
    rate: Option<Arc<crate::ratelimit::RateLimiter>>,
}

impl EdgeLayer {
    /// At most `max_in_flight` calls at once across all connections; calls without a shorter deadline
    /// get `default_timeout`.
    pub fn new(max_in_flight: usize, default_timeout: Option<Duration>) -> Self {
        EdgeLayer {
            shared: Arc::new(Shared {
                permits: Arc::new(Semaphore::new(max_in_flight)),
                max_in_flight,
                default_timeout,
                stats: Arc::new(EdgeStats::default()),
                metrics: None,
                auth: None,
                max_message_bytes: 4 * 1024 * 1024,
                rate: None,
            }),
        }
    }

    /// Also records every call in `metrics`.
    pub fn with_metrics(self, metrics: RpcMetrics) -> Self {
        let mut s = (*self.shared).clone();
        s.metrics = Some(metrics);
        EdgeLayer { shared: Arc::new(s) }
    }

    /// Limits each caller (its token's subject, or its IP address without authentication) to
    /// `per_second` calls per second with bursts of `burst`; the services' own `service` calls are
    /// not limited.
    pub fn with_rate_limit(self, per_second: f64, burst: u32) -> Self {
        let mut s = (*self.shared).clone();
        s.rate = (per_second > 0.0).then(|| Arc::new(crate::ratelimit::RateLimiter::new(per_second, burst)));
        EdgeLayer { shared: Arc::new(s) }
    }

    /// Authenticates every call (but health and reflection) with `verifier` and authorises it with the
    /// policy table; `max_message_bytes` bounds the request bodies read for buyer-scoped checks.
    pub fn with_auth(self, verifier: Option<Arc<Verifier>>, max_message_bytes: usize) -> Self {
        let mut s = (*self.shared).clone();
        s.auth = verifier;
        s.max_message_bytes = max_message_bytes;
        EdgeLayer { shared: Arc::new(s) }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<EdgeStats> {
        self.shared.stats.clone()
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Edge { inner, shared: self.shared.clone() }
    }
}

/// The edge service wrapping a router.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Calls that are never shed and never time out at the edge: probes and tooling must keep working
/// when the service is overloaded.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

fn status_response(status: tonic::Status, request_id: &str) -> http::Response<Body> {
    let mut resp = status.into_http::<Body>();
    if let Ok(v) = request_id.parse() {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

impl<S> Service<http::Request<Body>> for Edge<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        let is_exempt = exempt(&path);
        let timeout = if is_exempt { None } else { self.shared.default_timeout };
        let mut ctx = RequestContext::from_headers(req.headers(), &path, timeout);
        let request_id = ctx.request_id.clone();
        let span = tracing::info_span!("rpc", otel.name = %path, otel.kind = "server", method = %path,
            request_id = %ctx.request_id, trace_id = tracing::field::Empty, span_id = tracing::field::Empty);
        crate::telemetry::attach(&span, &mut ctx, &[]);
        let metrics = self.shared.metrics.clone();
        let arrived = std::time::Instant::now();

        // Authentication and the table (health and reflection stay open).
        let mut field_check: Option<(u32, String)> = None;
        // A buyer asking for a resource by id gets the same refusal whether it belongs to another
        // buyer or doesn't exist, so ids can't be probed for existence.
        let mut hide_absence = false;
        if let (Some(verifier), false) = (&self.shared.auth, is_exempt) {
            let refusal = match verifier.authenticate(req.headers()) {
                Err(e) => {
                    let _enter = span.enter();
                    tracing::info!(reason = %e, "unauthenticated call refused");
                    Some(e.into_status())
                }
                Ok(principal) => match policy::decide(&path, principal.role) {
                    Decision::AllowOwned => {
                        hide_absence = true;
                        ctx.authenticated(principal);
                        None
                    }
                    Decision::Allow => {
                        ctx.authenticated(principal);
                        None
                    }
                    Decision::CheckField(n) => {
                        field_check = Some((n, principal.buyer_id.clone().unwrap_or_default()));
                        ctx.authenticated(principal);
                        None
                    }
                    Decision::Deny => {
                        let _enter = span.enter();
                        tracing::info!(subject = %principal.subject, role = %principal.role, "call refused by the policy table");
                        Some(crate::auth::permission_denied())
                    }
                },
            };
            if let Some(status) = refusal {
                if let Some(m) = &metrics {
                    m.answered(
                        &path,
                        crate::metrics::grpc_code_name(&(status.code() as i32).to_string()),
                        arrived.elapsed(),
                    );
                }
                return Box::pin(std::future::ready(Ok(status_response(status, &request_id))));
            }
        }

        let permit = if is_exempt {
            None
        } else {
            match self.shared.permits.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    self.shared.stats.shed.fetch_add(1, Ordering::Relaxed);
                    if let Some(m) = &metrics {
                        m.shed();
                        m.answered(&path, "RESOURCE_EXHAUSTED", arrived.elapsed());
                    }
                    let _enter = span.enter();
                    tracing::warn!(max_in_flight = self.shared.max_in_flight, "overloaded; shedding call");
                    let status = tonic::Status::resource_exhausted(format!(
                        "server overloaded: {} calls in flight; retry with backoff",
                        self.shared.max_in_flight
                    ));
                    return Box::pin(std::future::ready(Ok(status_response(status, &request_id))));
                }
            }
        };

        // Per-caller rate limit (after authentication, so the caller is known).
        if let (Some(rate), false) = (&self.shared.rate, is_exempt) {
            let caller = match &ctx.principal {
                Some(p) if p.role == crate::auth::Role::Service => None,
                Some(p) => Some(p.subject.clone()),
                None => Some(
                    req.extensions()
                        .get::<tonic::transport::server::TcpConnectInfo>()
                        .and_then(|i| i.remote_addr())
                        .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string()),
                ),
            };
            if let Some(caller) = caller
                && let Err(wait) = rate.take(&caller)
            {
                if let Some(m) = &metrics {
                    m.answered(&path, "RESOURCE_EXHAUSTED", arrived.elapsed());
                }
                let _enter = span.enter();
                tracing::info!(%caller, ?wait, "rate limited");
                return Box::pin(std::future::ready(Ok(status_response(
                    crate::ratelimit::rate_limited(wait),
                    &request_id,
                ))));
            }
        }

        let deadline = ctx.deadline;
        // The services' own calls share one scope: their request ids are derived from the work (an
        // order and its generation), and a replica finishing a dead one's work must replay its answers.
        let caller = ctx.principal.as_ref().filter(|p| p.role != crate::auth::Role::Service).map(|p| p.subject.clone());
        req.extensions_mut().insert(ctx);
        // Take the service that was polled ready and leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let stats = self.shared.stats.clone();
        let max_body = self.shared.max_message_bytes.saturating_add(5);
        if let Some(m) = &metrics {
            m.started();
        }
        Box::pin(
            async move {
                let started = arrived;
                // Counts the call as finished however this future ends (answered, or dropped because
                // the client went away).
                let mut done = Finished { metrics, path, code: "CANCELLED", started };
                let req = match field_check {
                    None => req,
                    // Reading the body counts against the deadline too (a client that never finishes
                    // sending must not hold a permit forever).
                    Some((field, buyer)) => {
                        match within(deadline, own_buyer_only(req, field, &buyer, max_body)).await {
                            Ok(req) => req,
                            Err(status) => {
                                done.code = crate::metrics::grpc_code_name(&(status.code() as i32).to_string());
                                return Ok(status_response(status, &request_id));
                            }
                        }
                    }
                };
                // Request ids are scoped to the caller (see `idempotency`).
                let fut = crate::idempotency::CALLER.scope(caller, inner.call(req));
                let result = match deadline {
                    Some(d) => match tokio::time::timeout_at(d, fut).await {
                        Ok(r) => r,
                        Err(_) => {
                            stats.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
                            if let Some(m) = &done.metrics {
                                m.deadline_exceeded();
                            }
                            done.code = "DEADLINE_EXCEEDED";
                            tracing::warn!(elapsed_ms = started.elapsed().as_millis() as u64, "deadline exceeded");
                            let status = tonic::Status::deadline_exceeded(
                                "deadline exceeded before the call completed; its outcome is unknown, retry with \
                                 the same request_id",
                            );
                            return Ok(status_response(status, &request_id));
                        }
                    },
                    None => fut.await,
                };
                drop(permit);
                let mut resp = result?;
                if let Ok(v) = request_id.parse() {
                    resp.headers_mut().insert(REQUEST_ID_HEADER, v);
                }
                let code = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0");
                // tonic answers a request body that isn't valid protobuf with INTERNAL; it is the
                // caller's error, so say so (INVALID_ARGUMENT with a BadRequest).
                if code == "13"
                    && let Some(status) = tonic::Status::from_header_map(resp.headers())
                    && let Some(why) = status.message().strip_prefix("failed to decode Protobuf message")
                {
                    done.code = "INVALID_ARGUMENT";
                    let why = why.trim_start_matches([':', ' ']);
                    return Ok(status_response(
                        crate::errors::invalid_argument(
                            "request",
                            format!("not a valid protobuf encoding of this RPC's request message: {why}"),
                        ),
                        &request_id,
                    ));
                }
                if hide_absence && code == "5" {
                    tracing::info!("refused: no such resource of this buyer");
                    done.code = "PERMISSION_DENIED";
                    return Ok(status_response(crate::auth::permission_denied(), &request_id));
                }
                done.code = crate::metrics::grpc_code_name(code);
                tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, grpc_status = %code, "rpc done");
                Ok(resp)
            }
            .instrument(span),
        )
    }
}

/// `fut`, or DEADLINE_EXCEEDED once `deadline` passes.
async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    fut: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut)
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("deadline exceeded while reading the request"))),
        None => fut.await,
    }
}

/// Reads the (single-message) request body and lets the call through only if the buyer named in its
/// top-level string field `field` is `buyer`; the body is handed on unchanged.
async fn own_buyer_only(
    req: http::Request<Body>,
    field: u32,
    buyer: &str,
    max_body: usize,
) -> Result<http::Request<Body>, tonic::Status> {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    // The limit is on the message; the body also carries the 5-byte gRPC frame header.
    let limited = http_body_util::Limited::new(body, max_body.saturating_add(5));
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            // What tonic answers for an oversized message when it decodes one itself, so a call is
            // refused the same way whether or not the edge had to read it first.
            tracing::info!(max_body, "buyer-scoped request larger than the message limit");
            return Err(tonic::Status::resource_exhausted(format!(
                "request message larger than the limit of {max_body} bytes"
            )));
        }
        Err(e) => {
            tracing::info!(error = %e, "buyer-scoped request body unreadable");
            return Err(crate::errors::invalid_argument("request", "unreadable request body"));
        }
    };
    let named = policy::single_frame(&bytes).and_then(|msg| policy::string_field(msg, field));
    match named {
        Some(b) if b == buyer => Ok(http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)))),
        Some(_) => {
            tracing::info!(field, "refused: a buyer acting on another buyer's id");
            Err(crate::auth::permission_denied())
        }
        None => Err(crate::errors::invalid_argument(
            "request",
            "a buyer's request must be one uncompressed, well-formed message",
        )),
    }
}

/// Records a call's end in the metrics when dropped: after the response, or when the client gave up
/// and the call's future was dropped (counted as CANCELLED).
struct Finished {
    metrics: Option<RpcMetrics>,
    path: String,
    /// The status code name (CANCELLED until the call is answered).
    code: &'static str,
    started: std::time::Instant,
}

impl Drop for Finished {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.finished(&self.path, self.code, self.started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// A stand-in handler that takes `delay` to answer OK (the edge is generic over the router, so a
    /// plain tower service exercises it fully).
    fn slow(
        delay: Duration,
    ) -> impl Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |req: http::Request<Body>| async move {
            assert!(req.extensions().get::<RequestContext>().is_some(), "the handler sees the context");
            tokio::time::sleep(delay).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        })
    }

    fn request(path: &str) -> http::Request<Body> {
        http::Request::builder().uri(path).body(Body::empty()).expect("request")
    }

    fn grpc_status(resp: &http::Response<Body>) -> Option<String> {
        resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    #[tokio::test]
    async fn sheds_load_beyond_the_global_limit_but_never_health() {
        let layer = EdgeLayer::new(2, None);
        let svc = layer.layer(slow(Duration::from_millis(300)));
        // Two calls on different "connections" (clones) fill the global limit.
        let a = tokio::spawn(svc.clone().oneshot(request("/x.Y/A")));
        let b = tokio::spawn(svc.clone().oneshot(request("/x.Y/B")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let shed = svc.clone().oneshot(request("/x.Y/C")).await.expect("answer");
        assert_eq!(grpc_status(&shed).as_deref(), Some("8"), "RESOURCE_EXHAUSTED");
        assert!(shed.headers().get("x-request-id").is_some());
        let health = svc.clone().oneshot(request("/grpc.health.v1.Health/Check")).await.expect("answer");
        assert_eq!(grpc_status(&health), None, "health is never shed");
        assert_eq!(grpc_status(&a.await.expect("a").expect("a")), None);
        assert_eq!(grpc_status(&b.await.expect("b").expect("b")), None);
        // Capacity is back.
        let c = svc.clone().oneshot(request("/x.Y/C")).await.expect("answer");
        assert_eq!(grpc_status(&c), None);
        assert_eq!(layer.stats().shed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn enforces_the_earlier_deadline() {
        let layer = EdgeLayer::new(10, Some(Duration::from_secs(5)));
        let svc = layer.layer(slow(Duration::from_millis(500)));
        let mut req = request("/x.Y/Slow");
        req.headers_mut().insert("grpc-timeout", "50m".parse().expect("header"));
        let started = std::time::Instant::now();
        let resp = svc.clone().oneshot(req).await.expect("answer");
        assert_eq!(grpc_status(&resp).as_deref(), Some("4"), "DEADLINE_EXCEEDED");
        assert!(started.elapsed() < Duration::from_millis(400));
        let ok = svc.oneshot(request("/x.Y/Slow")).await.expect("answer");
        assert_eq!(grpc_status(&ok), None, "the server's own 5 s deadline leaves room");
        assert_eq!(layer.stats().deadline_exceeded.load(Ordering::Relaxed), 1);
    }
}
