//! A token bucket per caller ([`RateLimiter`]): the token's subject, or the peer's address without
//! authentication. Over its rate a caller gets RESOURCE_EXHAUSTED with RetryInfo; the services' own
//! `service` calls, health and reflection are not limited.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{BoxFuture, Req, Resp, is_open, peer_key, refuse};
use crate::auth::Role;
use crate::context::RequestContext;
use crate::ratelimit::RateLimiter;

/// Builds [`RateLimit`].
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Option<Arc<RateLimiter>>,
}

impl RateLimitLayer {
    /// Limits with `limiter` (None: no limit).
    pub fn new(limiter: Option<Arc<RateLimiter>>) -> Self {
        RateLimitLayer { limiter }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit { inner, limiter: self.limiter.clone() }
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Option<Arc<RateLimiter>>,
}

/// Whose bucket a call takes from (None: not limited).
fn caller(req: &Req) -> Option<String> {
    match req.extensions().get::<RequestContext>().and_then(|c| c.principal.as_ref()) {
        Some(p) if p.role == Role::Service => None,
        Some(p) => Some(p.subject.clone()),
        None => Some(peer_key(req).unwrap_or_else(|| "unknown".to_string())),
    }
}

impl<S> Service<Req> for RateLimit<S>
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
        if let Some(limiter) = &self.limiter
            && !is_open(req.uri().path())
            && let Some(caller) = caller(&req)
            && let Err(wait) = limiter.take(&caller)
        {
            tracing::info!(%caller, ?wait, "rate limited");
            return refuse(crate::ratelimit::rate_limited(wait));
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::*;
    use super::*;
    use crate::auth::Principal;
    use tower::ServiceExt;

    fn as_caller(path: &str, role: Role, subject: &str) -> Req {
        let mut req = request(path);
        let mut ctx = RequestContext::from_headers(req.headers(), path, None);
        ctx.authenticated(Principal { subject: subject.into(), role, buyer_id: None });
        req.extensions_mut().insert(ctx);
        req
    }

    #[tokio::test]
    async fn each_caller_has_its_bucket_and_services_and_probes_have_none() {
        let layer = RateLimitLayer::new(Some(Arc::new(RateLimiter::new(0.01, 2))));
        let svc = layer.layer(answering(None));
        for _ in 0..2 {
            let ok = svc.clone().oneshot(as_caller("/x.Y/Z", Role::Vendor, "v1")).await.expect("answer");
            assert_eq!(status_of(&ok), None);
        }
        let limited = svc.clone().oneshot(as_caller("/x.Y/Z", Role::Vendor, "v1")).await.expect("answer");
        let s = status(&limited).expect("limited");
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        use tonic_types::StatusExt;
        assert!(s.get_error_details().retry_info().and_then(|r| r.retry_delay).is_some_and(|d| d > Duration::ZERO));
        let other = svc.clone().oneshot(as_caller("/x.Y/Z", Role::Vendor, "v2")).await.expect("answer");
        assert_eq!(status_of(&other), None, "another caller is not affected");
        for _ in 0..5 {
            let ok = svc.clone().oneshot(as_caller("/x.Y/Z", Role::Service, "service:orders")).await.expect("answer");
            assert_eq!(status_of(&ok), None, "the services' own calls are not limited");
            let ok = svc
                .clone()
                .oneshot(as_caller("/grpc.health.v1.Health/Check", Role::Vendor, "v1"))
                .await
                .expect("answer");
            assert_eq!(status_of(&ok), None, "probes are not limited");
        }
    }
}
