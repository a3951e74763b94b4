//! Global load shedding: a semaphore shared by every connection bounds the calls being worked on;
//! a call that finds it full is answered RESOURCE_EXHAUSTED at once instead of queueing (a queue
//! only turns overload into timeouts). The permit is held until the call's response headers, which
//! for a unary call is its whole work; a stream's life is bounded by the [`streams`](super::streams)
//! layer instead, so that open watchers can't starve the calls that do work. Health and reflection
//! are never shed, so probes keep telling the truth under overload.

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tower::{Layer, Service};

use super::{BoxFuture, Counters, Req, Resp, is_open, refuse};

/// Builds [`Shed`]; clones share one limit.
#[derive(Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    counters: Counters,
}

impl ShedLayer {
    /// At most `max_in_flight` calls at once.
    pub fn new(max_in_flight: usize, counters: Counters) -> Self {
        ShedLayer { permits: Arc::new(Semaphore::new(max_in_flight)), max_in_flight, counters }
    }

    /// The same limit reporting to `counters`.
    #[must_use]
    pub fn with_counters(mut self, counters: Counters) -> Self {
        self.counters = counters;
        self
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed { inner, shared: self.clone() }
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    shared: ShedLayer,
}

impl<S> Service<Req> for Shed<S>
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
        if is_open(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let Ok(permit) = self.shared.permits.clone().try_acquire_owned() else {
            self.shared.counters.shed();
            let max = self.shared.max_in_flight;
            tracing::warn!(max_in_flight = max, "overloaded; shedding call");
            return refuse(tonic::Status::resource_exhausted(format!(
                "server overloaded: {max} calls in flight; retry with backoff"
            )));
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await;
            drop(permit);
            resp
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

    #[tokio::test]
    async fn sheds_load_beyond_the_global_limit_but_never_health() {
        let counters = Counters::default();
        let layer = ShedLayer::new(2, counters.clone());
        let svc = layer.layer(slow(Duration::from_millis(300)));
        // Two calls on different "connections" (clones) fill the global limit.
        let a = tokio::spawn(svc.clone().oneshot(request("/x.Y/A")));
        let b = tokio::spawn(svc.clone().oneshot(request("/x.Y/B")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let shed = svc.clone().oneshot(request("/x.Y/C")).await.expect("answer");
        assert_eq!(status_of(&shed).as_deref(), Some("8"), "RESOURCE_EXHAUSTED");
        let health = svc.clone().oneshot(request("/grpc.health.v1.Health/Check")).await.expect("answer");
        assert_eq!(status_of(&health), None, "health is never shed");
        assert_eq!(status_of(&a.await.expect("a").expect("a")), None);
        assert_eq!(status_of(&b.await.expect("b").expect("b")), None);
        // Capacity is back.
        let c = svc.clone().oneshot(request("/x.Y/C")).await.expect("answer");
        assert_eq!(status_of(&c), None);
        assert_eq!(counters.stats().shed.load(Ordering::Relaxed), 1);
    }
}
