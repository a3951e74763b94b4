//! The edge: the first thing every call meets, as a stack of small tower layers assembled in one
//! place ([`EdgeLayer`]), linkerd-style, each doing one job with its own tests.
//!
//! From the outside in (a call passes them in this order; its answer comes back the other way):
//!
//! | layer | job |
//! |---|---|
//! | [`metrics`] | counts every call by method and code, its latency and the calls in flight |
//! | [`context`] | builds the [`RequestContext`](crate::RequestContext) (request id, deadline, trace), runs the call in a span, echoes `x-request-id` on every answer |
//! | [`decode`] | turns tonic's INTERNAL for a request that isn't valid protobuf into INVALID_ARGUMENT |
//! | [`identity`] | authentication (with a budget of failed attempts per peer address) and the [`policy`](crate::policy) table, the buyer named in a request, and the account request ids belong to |
//! | [`rate`] | a token bucket per caller |
//! | [`streams`] | streaming calls: a global and a per-caller quota held for the stream's whole life, and an idle bound |
//! | [`shed`] | the global concurrency limit: beyond it RESOURCE_EXHAUSTED at once, never a queue |
//! | [`deadline`] | the earlier of the caller's `grpc-timeout` and the server's own, DEADLINE_EXCEEDED after it |
//!
//! Health checks and reflection ("open" paths, [`is_open`]) are never authenticated, shed, rate
//! limited or timed out, so probes and grpcurl keep working when the service is overloaded; their
//! streams (Health/Watch, reflection) do count against the stream quotas.
//!
//! A layer that refuses a call answers with a trailers-only gRPC status and never reaches the layers
//! inside it; the layers outside it still see the answer (so it is counted, and carries the
//! request id).

pub mod context;
pub mod deadline;
pub mod decode;
pub mod identity;
pub mod metrics;
pub mod rate;
pub mod shed;
pub mod streams;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::body::Body;
use tower::Layer;

use crate::auth::Verifier;
use crate::metrics::RpcMetrics;

pub use streams::StreamLimits;

/// A request as the edge sees it.
pub type Req = http::Request<Body>;
/// A response as the edge sees it.
pub type Resp = http::Response<Body>;
/// The future every edge layer answers with.
pub type BoxFuture<E> = Pin<Box<dyn Future<Output = Result<Resp, E>> + Send>>;

/// Counters the edge keeps (for metrics and tests).
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// Calls answered RESOURCE_EXHAUSTED by load shedding.
    pub shed: AtomicU64,
    /// Calls answered DEADLINE_EXCEEDED by the edge.
    pub deadline_exceeded: AtomicU64,
    /// Streaming calls refused by the stream quotas.
    pub streams_refused: AtomicU64,
    /// Streams ended because nothing was sent on them for the idle bound.
    pub streams_idle_closed: AtomicU64,
    /// Calls refused because their peer address used up its budget of failed authentications.
    pub auth_budget_refused: AtomicU64,
    /// Tokens verified with a signature check (the others were remembered).
    pub signature_checks: AtomicU64,
}

/// Where a layer reports what it did: the edge's own counters and, when the service has them, its
/// Prometheus metrics.
#[derive(Clone, Default)]
pub struct Counters {
    stats: Arc<EdgeStats>,
    metrics: Option<RpcMetrics>,
}

impl Counters {
    /// Counters that also feed `metrics`.
    pub fn new(metrics: Option<RpcMetrics>) -> Self {
        Counters { stats: Arc::default(), metrics }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<EdgeStats> {
        self.stats.clone()
    }

    fn shed(&self) {
        self.stats.shed.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.shed();
        }
    }

    fn deadline_exceeded(&self) {
        self.stats.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.deadline_exceeded();
        }
    }

    fn stream_refused(&self) {
        self.stats.streams_refused.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.stream_refused();
        }
    }

    fn stream_opened(&self, open: bool) {
        if let Some(m) = &self.metrics {
            m.stream_open(open);
        }
    }

    fn stream_idle_closed(&self) {
        self.stats.streams_idle_closed.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.stream_idle_closed();
        }
    }

    fn auth_refused(&self, reason: &'static str) {
        if reason == identity::BUDGET_REASON {
            self.stats.auth_budget_refused.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(m) = &self.metrics {
            m.auth_refused(reason);
        }
    }

    fn signature_checked(&self) {
        self.stats.signature_checks.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.signature_checked();
        }
    }
}

/// Health checks and reflection: never authenticated, shed, rate limited or timed out, so probes and
/// tooling keep working when the service is overloaded.
pub fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// A trailers-only answer with `status` (the context layer adds the request id on the way out).
pub fn answer(status: tonic::Status) -> Resp {
    status.into_http::<Body>()
}

/// An edge layer's refusal: answered at once, without calling further in.
fn refuse<E: Send + 'static>(status: tonic::Status) -> BoxFuture<E> {
    Box::pin(std::future::ready(Ok(answer(status))))
}

/// The `grpc-status` of a trailers-only answer (None for an answer whose status comes in trailers).
pub fn header_status(resp: &Resp) -> Option<&str> {
    resp.headers().get("grpc-status").and_then(|v| v.to_str().ok())
}

/// The peer's address as a budget key: the IP address for IPv4, the /64 network for IPv6 (one
/// host usually holds a whole /64, so a per-address budget would be no budget at all).
pub fn peer_key(req: &Req) -> Option<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = req.extensions();
    let addr = ext
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.get_ref().remote_addr()))?;
    Some(ip_key(addr.ip()))
}

fn ip_key(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let net = u128::from(v6) & !((1u128 << 64) - 1);
                format!("{}/64", std::net::Ipv6Addr::from(net))
            }
        },
    }
}

/// Builds the edge stack around a router; clones share every limit and counter.
#[derive(Clone)]
pub struct EdgeLayer {
    counters: Counters,
    default_timeout: Option<Duration>,
    shed: shed::ShedLayer,
    identity: identity::IdentityConfig,
    rate: Option<Arc<crate::ratelimit::RateLimiter>>,
    streams: streams::StreamsLayer,
}

impl EdgeLayer {
    /// At most `max_in_flight` calls at once across all connections; calls without a shorter deadline
    /// get `default_timeout`. Authentication off, no rate limit, default stream limits.
    pub fn new(max_in_flight: usize, default_timeout: Option<Duration>) -> Self {
        let counters = Counters::default();
        EdgeLayer {
            shed: shed::ShedLayer::new(max_in_flight, counters.clone()),
            identity: identity::IdentityConfig::new(None, 4 * 1024 * 1024, counters.clone()),
            streams: streams::StreamsLayer::new(StreamLimits::default(), counters.clone()),
            counters,
            default_timeout,
            rate: None,
        }
    }

    /// Also records every call in `metrics`.
    pub fn with_metrics(self, metrics: RpcMetrics) -> Self {
        let counters = Counters { stats: self.counters.stats.clone(), metrics: Some(metrics) };
        EdgeLayer {
            shed: self.shed.with_counters(counters.clone()),
            identity: self.identity.with_counters(counters.clone()),
            streams: self.streams.with_counters(counters.clone()),
            counters,
            ..self
        }
    }

    /// Limits each caller (its token's subject, or its IP address without authentication) to
    /// `per_second` calls per second with bursts of `burst`; the services' own `service` calls are
    /// not limited.
    pub fn with_rate_limit(mut self, per_second: f64, burst: u32) -> Self {
        self.rate = (per_second > 0.0).then(|| Arc::new(crate::ratelimit::RateLimiter::new(per_second, burst)));
        self
    }

    /// Authenticates every call (but health and reflection) with `verifier` and authorises it with the
    /// policy table; `max_message_bytes` bounds the request bodies read for buyer-scoped checks.
    pub fn with_auth(mut self, verifier: Option<Arc<Verifier>>, max_message_bytes: usize) -> Self {
        self.identity = self.identity.with_verifier(verifier, max_message_bytes);
        self
    }

    /// Each peer address may fail authentication `burst` times, then `per_second` times a second;
    /// beyond that its calls are refused (RESOURCE_EXHAUSTED with RetryInfo) before any signature
    /// check, unless they carry a token verified before. `per_second` 0 turns the budget off.
    pub fn with_auth_failure_budget(mut self, per_second: f64, burst: u32) -> Self {
        self.identity = self.identity.with_failure_budget(per_second, burst);
        self
    }

    /// Streaming calls: `limits`, for the methods in `streaming` (full paths).
    pub fn with_streams(mut self, limits: StreamLimits, streaming: impl IntoIterator<Item = String>) -> Self {
        self.streams = streams::StreamsLayer::new(limits, self.counters.clone()).with_paths(streaming);
        self
    }

    /// The stream layer alone (for a port that serves only health).
    pub fn streams(&self) -> streams::StreamsLayer {
        self.streams.clone()
    }

    /// The counters.
    pub fn stats(&self) -> Arc<EdgeStats> {
        self.counters.stats()
    }
}

/// The whole stack around a router `S`.
pub type Edge<S> = metrics::Record<
    context::Context<
        decode::Decode<identity::Identity<rate::RateLimit<streams::Streams<shed::Shed<deadline::Deadline<S>>>>>>,
    >,
>;

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, router: S) -> Self::Service {
        // Innermost first: the order here is the order of the table in the module docs, reversed.
        let s = deadline::DeadlineLayer::new(self.counters.clone()).layer(router);
        let s = self.shed.layer(s);
        let s = self.streams.layer(s);
        let s = rate::RateLimitLayer::new(self.rate.clone()).layer(s);
        let s = identity::IdentityLayer::new(self.identity.clone()).layer(s);
        let s = decode::DecodeLayer.layer(s);
        let s = context::ContextLayer::new(self.default_timeout).layer(s);
        metrics::RecordLayer::new(self.counters.metrics.clone()).layer(s)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Stand-ins for the edge's unit tests: handlers, requests, and reading answers.

    use super::*;
    use tower::Service;

    /// A handler that takes `delay` to answer OK with an empty body.
    pub fn slow(
        delay: Duration,
    ) -> impl Service<Req, Response = Resp, Error = std::convert::Infallible, Future = impl Send> + Clone + Send + 'static
    {
        tower::service_fn(move |_req: Req| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        })
    }

    /// A handler answering at once with `status` (trailers-only), or OK when None.
    pub fn answering(
        status: Option<tonic::Status>,
    ) -> impl Service<Req, Response = Resp, Error = std::convert::Infallible, Future = impl Send> + Clone + Send + 'static
    {
        tower::service_fn(move |_req: Req| {
            let status = status.clone();
            async move {
                Ok::<_, std::convert::Infallible>(match status {
                    Some(s) => answer(s),
                    None => http::Response::new(Body::empty()),
                })
            }
        })
    }

    /// A request for `path` with an empty body.
    pub fn request(path: &str) -> Req {
        http::Request::builder().uri(path).body(Body::empty()).expect("request")
    }

    /// A request for `path` carrying one gRPC frame of `msg`.
    pub fn framed(path: &str, msg: &[u8]) -> Req {
        let mut body = vec![0u8];
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(msg);
        http::Request::builder()
            .uri(path)
            .body(Body::new(http_body_util::Full::new(bytes::Bytes::from(body))))
            .expect("request")
    }

    /// The `grpc-status` of a trailers-only answer.
    pub fn status_of(resp: &Resp) -> Option<String> {
        header_status(resp).map(str::to_string)
    }

    /// The status of a trailers-only answer (None: OK).
    pub fn status(resp: &Resp) -> Option<tonic::Status> {
        tonic::Status::from_header_map(resp.headers())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn peers_are_keyed_by_address_and_ipv6_by_network() {
        assert_eq!(ip_key("10.1.2.3".parse().expect("ip")), "10.1.2.3");
        assert_eq!(ip_key("2001:db8:1:2:aaaa::1".parse().expect("ip")), "2001:db8:1:2::/64");
        assert_eq!(ip_key("2001:db8:1:2:bbbb::9".parse().expect("ip")), "2001:db8:1:2::/64", "same /64, same key");
        assert_eq!(ip_key("::ffff:10.1.2.3".parse().expect("ip")), "10.1.2.3", "v4-mapped is the v4 address");
        let mut req = request("/x.Y/Z");
        assert_eq!(peer_key(&req), None);
        req.extensions_mut().insert(tonic::transport::server::TcpConnectInfo {
            local_addr: None,
            remote_addr: Some("192.0.2.7:4242".parse().expect("addr")),
        });
        assert_eq!(peer_key(&req).as_deref(), Some("192.0.2.7"));
    }

    /// The original edge test, through the whole stack: two calls on different "connections"
    /// (clones) fill the global limit, a third is shed with its request id, health never is.
    #[tokio::test]
    async fn sheds_load_beyond_the_global_limit_but_never_health() {
        let layer = EdgeLayer::new(2, None);
        let seen = tower::service_fn(|req: Req| async move {
            assert!(req.extensions().get::<crate::RequestContext>().is_some(), "the handler sees the context");
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
        let svc = layer.layer(seen);
        let a = tokio::spawn(svc.clone().oneshot(request("/x.Y/A")));
        let b = tokio::spawn(svc.clone().oneshot(request("/x.Y/B")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let shed = svc.clone().oneshot(request("/x.Y/C")).await.expect("answer");
        assert_eq!(status_of(&shed).as_deref(), Some("8"), "RESOURCE_EXHAUSTED");
        assert!(shed.headers().get("x-request-id").is_some());
        let health = svc.clone().oneshot(request("/grpc.health.v1.Health/Check")).await.expect("answer");
        assert_eq!(status_of(&health), None, "health is never shed");
        assert_eq!(status_of(&a.await.expect("a").expect("a")), None);
        assert_eq!(status_of(&b.await.expect("b").expect("b")), None);
        // Capacity is back.
        let c = svc.clone().oneshot(request("/x.Y/C")).await.expect("answer");
        assert_eq!(status_of(&c), None);
        assert_eq!(layer.stats().shed.load(Ordering::Relaxed), 1);
    }

    /// The original deadline test, through the whole stack (the context layer reads `grpc-timeout`).
    #[tokio::test]
    async fn enforces_the_earlier_deadline() {
        let layer = EdgeLayer::new(10, Some(Duration::from_secs(5)));
        let svc = layer.layer(slow(Duration::from_millis(500)));
        let mut req = request("/x.Y/Slow");
        req.headers_mut().insert("grpc-timeout", "50m".parse().expect("header"));
        let started = std::time::Instant::now();
        let resp = svc.clone().oneshot(req).await.expect("answer");
        assert_eq!(status_of(&resp).as_deref(), Some("4"), "DEADLINE_EXCEEDED");
        assert!(started.elapsed() < Duration::from_millis(400));
        let ok = svc.oneshot(request("/x.Y/Slow")).await.expect("answer");
        assert_eq!(status_of(&ok), None, "the server's own 5 s deadline leaves room");
        assert_eq!(layer.stats().deadline_exceeded.load(Ordering::Relaxed), 1);
    }

    /// The assembled stack: a refusal from a middle layer still carries the request id and is
    /// counted; an open path passes every layer untouched.
    #[tokio::test]
    async fn the_stack_answers_with_request_ids_and_counts_refusals() {
        let all = crate::metrics::Metrics::new();
        let metrics = all.rpc().clone();
        let signer = crate::auth::Signer::generate().expect("key");
        let layer = EdgeLayer::new(8, Some(Duration::from_secs(5)))
            .with_metrics(metrics.clone())
            .with_auth(Some(Arc::new(signer.verifier())), 1024);
        let svc = layer.layer(slow(Duration::ZERO));
        let mut req = request("/chipgate.licensing.v1.LicensingService/ListQueue");
        req.headers_mut().insert("x-request-id", "rid-7".parse().expect("header"));
        let resp = svc.clone().oneshot(req).await.expect("answer");
        assert_eq!(status_of(&resp).as_deref(), Some("16"), "UNAUTHENTICATED without a token");
        assert_eq!(resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()), Some("rid-7"));
        let health = svc.clone().oneshot(request("/grpc.health.v1.Health/Check")).await.expect("answer");
        assert_eq!(status_of(&health), None, "health needs no token");
        let text = all.render().await;
        assert!(
            text.contains(r#"grpc_server_handled_total{grpc_service="unknown",grpc_method="unknown",grpc_code="UNAUTHENTICATED"} 1"#),
            "{text}"
        );
    }
}
