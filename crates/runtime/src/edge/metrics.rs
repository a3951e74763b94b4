//! The outermost layer: every call, refused or served, counted by method and status code, with its
//! latency (until the response headers) and the calls in flight ([`RpcMetrics`]).

use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use super::{BoxFuture, Req, Resp, header_status};
use crate::metrics::{RpcMetrics, grpc_code_name};

/// Builds [`Record`].
#[derive(Clone)]
pub struct RecordLayer {
    metrics: Option<RpcMetrics>,
}

impl RecordLayer {
    /// Records in `metrics` (None: records nothing).
    pub fn new(metrics: Option<RpcMetrics>) -> Self {
        RecordLayer { metrics }
    }
}

impl<S> Layer<S> for RecordLayer {
    type Service = Record<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Record { inner, metrics: self.metrics.clone() }
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct Record<S> {
    inner: S,
    metrics: Option<RpcMetrics>,
}

impl<S> Service<Req> for Record<S>
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
        let Some(metrics) = self.metrics.clone() else {
            return Box::pin(self.inner.call(req));
        };
        metrics.started();
        // Counts the call as finished however its future ends: answered, or dropped because the
        // client went away (CANCELLED).
        let done = Finished { metrics, path: req.uri().path().to_string(), code: "CANCELLED", started: Instant::now() };
        let fut = self.inner.call(req);
        Box::pin(async move {
            // The whole guard moves into the future (not just the field assigned below), so it is
            // dropped when the future is.
            let mut done = done;
            let resp = fut.await?;
            // A trailers-only answer carries its status in the headers; a served one says OK here
            // (its real status travels in the trailers, after this layer is done).
            done.code = grpc_code_name(header_status(&resp).unwrap_or("0"));
            Ok(resp)
        })
    }
}

/// Records a call's end when dropped.
struct Finished {
    metrics: RpcMetrics,
    path: String,
    /// The status code name (CANCELLED until the call is answered).
    code: &'static str,
    started: Instant,
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.metrics.finished(&self.path, self.code, self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::*;
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn every_answer_is_counted_by_code_and_a_dropped_call_as_cancelled() {
        let m = crate::Metrics::new();
        m.rpc().know(["/a.B/C".to_string()]);
        let refused =
            RecordLayer::new(Some(m.rpc().clone())).layer(answering(Some(tonic::Status::permission_denied("no"))));
        refused.oneshot(request("/a.B/C")).await.expect("answer");
        let ok = RecordLayer::new(Some(m.rpc().clone())).layer(answering(None));
        ok.oneshot(request("/a.B/C")).await.expect("answer");
        let slow = RecordLayer::new(Some(m.rpc().clone())).layer(slow(Duration::from_secs(60)));
        let gave_up = tokio::time::timeout(Duration::from_millis(20), slow.oneshot(request("/a.B/C"))).await;
        assert!(gave_up.is_err(), "the client went away");
        let text = m.render().await;
        for code in ["PERMISSION_DENIED", "OK", "CANCELLED"] {
            assert!(
                text.contains(&format!(
                    r#"grpc_server_handled_total{{grpc_service="a.B",grpc_method="C",grpc_code="{code}"}} 1"#
                )),
                "{code}: {text}"
            );
        }
        assert!(text.contains("grpc_server_in_flight 0"), "{text}");
    }
}
