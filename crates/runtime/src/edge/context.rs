//! Builds each call's [`RequestContext`] — request id, deadline (the earlier of the caller's
//! `grpc-timeout` and the server's own; none for health and reflection), W3C trace context — puts it
//! in the request's extensions for the layers inside and the handler, runs the call in a tracing
//! span carrying method, request id and trace ids (exported with OpenTelemetry when that is on, as a
//! child of the caller's span), and echoes `x-request-id` on every answer, refusals included.

use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use tower::{Layer, Service};
use tracing::Instrument;

use super::{BoxFuture, Req, Resp, header_status, is_open};
use crate::context::{REQUEST_ID_HEADER, RequestContext};

/// Builds [`Context`].
#[derive(Clone)]
pub struct ContextLayer {
    default_timeout: Option<Duration>,
}

impl ContextLayer {
    /// Calls without a shorter deadline get `default_timeout`.
    pub fn new(default_timeout: Option<Duration>) -> Self {
        ContextLayer { default_timeout }
    }
}

impl<S> Layer<S> for ContextLayer {
    type Service = Context<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Context { inner, default_timeout: self.default_timeout }
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct Context<S> {
    inner: S,
    default_timeout: Option<Duration>,
}

impl<S> Service<Req> for Context<S>
where
    S: Service<Req, Response = Resp> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Resp;
    type Error = S::Error;
    type Future = BoxFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let started = Instant::now();
        let path = req.uri().path().to_string();
        let timeout = if is_open(&path) { None } else { self.default_timeout };
        let mut ctx = RequestContext::from_headers(req.headers(), &path, timeout);
        let request_id = ctx.request_id.clone();
        let span = tracing::info_span!("rpc", otel.name = %path, otel.kind = "server", method = %path,
            request_id = %ctx.request_id, trace_id = tracing::field::Empty, span_id = tracing::field::Empty);
        crate::telemetry::attach(&span, &mut ctx, &[]);
        req.extensions_mut().insert(ctx);
        // The layers inside decide synchronously in `call` too: their logs belong to this span.
        let fut = span.in_scope(|| self.inner.call(req));
        Box::pin(
            async move {
                let mut resp = fut.await?;
                if let Ok(v) = request_id.parse() {
                    resp.headers_mut().insert(REQUEST_ID_HEADER, v);
                }
                let code = header_status(&resp).unwrap_or("0");
                tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, grpc_status = %code, "rpc done");
                Ok(resp)
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn the_handler_sees_the_context_and_the_answer_carries_the_request_id() {
        let seen = tower::service_fn(|req: Req| async move {
            let ctx = req.extensions().get::<RequestContext>().cloned().expect("the context is there");
            Ok::<_, std::convert::Infallible>(match ctx.deadline {
                Some(_) => answer_with(&ctx.request_id),
                None => super::super::answer(tonic::Status::internal("no deadline")),
            })
        });
        fn answer_with(id: &str) -> Resp {
            let mut r = http::Response::new(tonic::body::Body::empty());
            r.headers_mut().insert("seen-request-id", id.parse().expect("header"));
            r
        }
        let svc = ContextLayer::new(Some(Duration::from_secs(5))).layer(seen);
        let mut req = request("/x.Y/Z");
        req.headers_mut().insert("x-request-id", "abc-1".parse().expect("header"));
        let resp = svc.clone().oneshot(req).await.expect("answer");
        assert_eq!(resp.headers().get("seen-request-id").and_then(|v| v.to_str().ok()), Some("abc-1"));
        assert_eq!(resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()), Some("abc-1"));
        // Without one, a fresh id is made and echoed.
        let resp = svc.clone().oneshot(request("/x.Y/Z")).await.expect("answer");
        let made = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).expect("echoed");
        assert_eq!(resp.headers().get("seen-request-id").and_then(|v| v.to_str().ok()), Some(made));
        // Health gets no server deadline.
        let health = svc.oneshot(request("/grpc.health.v1.Health/Check")).await.expect("answer");
        assert_eq!(status_of(&health).as_deref(), Some("13"), "the stand-in says: no deadline");
    }
}
