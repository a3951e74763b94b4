//! Enforces the call's deadline (from the [`RequestContext`]: the earlier of the caller's
//! `grpc-timeout` and the server's own), answering DEADLINE_EXCEEDED when the handler hasn't answered
//! by then. The handler's future is dropped, so the work stops at its next await; its outcome is
//! unknown to the caller, who retries with the same request id.

use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use super::{BoxFuture, Counters, Req, Resp, answer};
use crate::context::RequestContext;

/// Builds [`Deadline`].
#[derive(Clone)]
pub struct DeadlineLayer {
    counters: Counters,
}

impl DeadlineLayer {
    /// Reports deadlines hit to `counters`.
    pub fn new(counters: Counters) -> Self {
        DeadlineLayer { counters }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner, counters: self.counters.clone() }
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    counters: Counters,
}

impl<S> Service<Req> for Deadline<S>
where
    S: Service<Req, Response = Resp> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Resp;
    type Error = S::Error;
    type Future = BoxFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(deadline) = req.extensions().get::<RequestContext>().and_then(|c| c.deadline) else {
            return Box::pin(self.inner.call(req));
        };
        let started = Instant::now();
        let counters = self.counters.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(r) => r,
                Err(_) => {
                    counters.deadline_exceeded();
                    tracing::warn!(elapsed_ms = started.elapsed().as_millis() as u64, "deadline exceeded");
                    Ok(answer(tonic::Status::deadline_exceeded(
                        "deadline exceeded before the call completed; its outcome is unknown, retry with the same \
                         request_id",
                    )))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::super::testing::*;
    use super::*;
    use tower::ServiceExt;

    fn with_timeout(path: &str, caller: Option<&str>, server: Duration) -> Req {
        let mut req = request(path);
        if let Some(t) = caller {
            req.headers_mut().insert("grpc-timeout", t.parse().expect("header"));
        }
        let ctx = RequestContext::from_headers(req.headers(), path, Some(server));
        req.extensions_mut().insert(ctx);
        req
    }

    #[tokio::test]
    async fn enforces_the_earlier_deadline() {
        let counters = Counters::default();
        let svc = DeadlineLayer::new(counters.clone()).layer(slow(Duration::from_millis(500)));
        let started = Instant::now();
        let resp =
            svc.clone().oneshot(with_timeout("/x.Y/Slow", Some("50m"), Duration::from_secs(5))).await.expect("answer");
        assert_eq!(status_of(&resp).as_deref(), Some("4"), "DEADLINE_EXCEEDED");
        assert!(started.elapsed() < Duration::from_millis(400));
        let ok = svc.clone().oneshot(with_timeout("/x.Y/Slow", None, Duration::from_secs(5))).await.expect("answer");
        assert_eq!(status_of(&ok), None, "the server's own 5 s deadline leaves room");
        let no_ctx = svc.oneshot(request("/x.Y/Slow")).await.expect("answer");
        assert_eq!(status_of(&no_ctx), None, "no context, no deadline");
        assert_eq!(counters.stats().deadline_exceeded.load(Ordering::Relaxed), 1);
    }
}
