//! Global load shedding: a semaphore shared by every connection bounds the calls being worked on;
//! a call that finds it full is answered RESOURCE_EXHAUSTED at once instead of queueing (a queue
//! only turns overload into timeouts). The permit is held until the call's response headers, which
//! for a unary call is its whole work; a stream's life is bounded by the [`streams`](super::streams)
//! layer instead, so that open watchers can't starve the calls that do work. Health and reflection
//! are never shed, so probes keep telling the truth under overload.
//!
//! A call that is about to wait rather than work gives its permit back early ([`Slot::give_back`]):
//! a watch call waking the idle followers of its stream hub waits for them to read where their streams
//! end, and holding a share of the limit for that would shed the calls that do work.

use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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

/// A call's share of the global limit, in its request's extensions: the call may give it back
/// before its answer ([`Slot::give_back`]); otherwise it goes back with the response headers.
#[derive(Clone, Debug)]
pub struct Slot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl Slot {
    /// A slot holding `permit` (the edge makes them; tests too).
    pub(crate) fn new(permit: OwnedSemaphorePermit) -> Slot {
        Slot(Arc::new(Mutex::new(Some(permit))))
    }

    /// The slot the edge gave the call `req` (None for calls that didn't pass the edge: direct calls
    /// in tests, health and reflection).
    pub fn of<T>(req: &tonic::Request<T>) -> Option<Slot> {
        req.extensions().get::<Slot>().cloned()
    }

    /// Gives the call's share of the limit back now: what the call does from here is waiting, not
    /// work. Idempotent.
    pub fn give_back(&self) {
        drop(self.0.lock().unwrap_or_else(PoisonError::into_inner).take());
    }

    /// Whether the call still holds its share (what the tests look at).
    #[cfg(test)]
    pub(crate) fn held(&self) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).is_some()
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

    fn call(&mut self, mut req: Req) -> Self::Future {
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
        let slot = Slot::new(permit);
        req.extensions_mut().insert(slot.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await;
            slot.give_back();
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

    /// A call that gives its slot back (to wait, not work) no longer counts against the limit; one
    /// that keeps it does (the test above).
    #[tokio::test]
    async fn a_call_that_gives_its_slot_back_leaves_room_for_others() {
        let counters = Counters::default();
        let layer = ShedLayer::new(1, counters.clone());
        let inner = tower::service_fn(|req: Req| async move {
            if req.uri().path() == "/x.Y/Wait" {
                let slot = req.extensions().get::<Slot>().cloned().expect("the edge's slot");
                assert!(slot.held());
                slot.give_back();
                assert!(!slot.held());
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let svc = layer.layer(inner);
        let waiting = tokio::spawn(svc.clone().oneshot(request("/x.Y/Wait")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let other = svc.clone().oneshot(request("/x.Y/B")).await.expect("answer");
        assert_eq!(status_of(&other), None, "served while the first call waits");
        assert_eq!(status_of(&waiting.await.expect("a").expect("a")), None);
        assert_eq!(counters.stats().shed.load(Ordering::Relaxed), 0);
    }
}
