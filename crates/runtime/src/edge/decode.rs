//! tonic answers a request body that isn't valid protobuf for the RPC (truncated, bad UTF-8, wrong
//! wire type, nested too deep) with INTERNAL; it is the caller's error, so this layer says so:
//! INVALID_ARGUMENT with a `BadRequest` on the field `request`.

use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{BoxFuture, Req, Resp, answer, header_status};

/// Builds [`Decode`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeLayer;

impl<S> Layer<S> for DecodeLayer {
    type Service = Decode<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Decode { inner }
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct Decode<S> {
    inner: S,
}

/// The INVALID_ARGUMENT for `resp`, when it is tonic's INTERNAL for an undecodable request.
fn honest(resp: &Resp) -> Option<tonic::Status> {
    if header_status(resp) != Some("13") {
        return None;
    }
    let status = tonic::Status::from_header_map(resp.headers())?;
    let why = status.message().strip_prefix("failed to decode Protobuf message")?;
    let why = why.trim_start_matches([':', ' ']);
    Some(crate::errors::invalid_argument(
        "request",
        format!("not a valid protobuf encoding of this RPC's request message: {why}"),
    ))
}

impl<S> Service<Req> for Decode<S>
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
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match honest(&resp) {
                Some(status) => answer(status),
                None => resp,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use tonic_types::StatusExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn undecodable_requests_are_the_callers_error_and_other_internals_stay() {
        let bad = tonic::Status::internal("failed to decode Protobuf message: invalid wire type");
        let resp = DecodeLayer.layer(answering(Some(bad))).oneshot(request("/x.Y/Z")).await.expect("answer");
        let s = status(&resp).expect("a status");
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let field = s.get_error_details().bad_request().map(|b| b.field_violations[0].field.clone());
        assert_eq!(field.as_deref(), Some("request"));
        let other = tonic::Status::internal("the store fell over");
        let resp = DecodeLayer.layer(answering(Some(other))).oneshot(request("/x.Y/Z")).await.expect("answer");
        assert_eq!(status(&resp).map(|s| s.code()), Some(tonic::Code::Internal));
    }
}
