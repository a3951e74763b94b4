//! The skeleton every chipgate service shares: one error type and its one mapping to a gRPC status,
//! the handler macros that turn a tonic call into an operation, and reading records and running
//! transactions with that error type ([`Records`]). A service keeps only what differs: its
//! operations, its keys, and (licensing) the audit lock around its transactions.

use std::future::Future;

use chipgate_state::{CommitError, Committed, StateError, Store, Txn};
use prost::Message;
use tonic::Status;

use crate::RequestContext;
use crate::errors::{self, Precondition, Violations};
use crate::records::{self, LoadError, Loaded};
use crate::txn::{IdemKey, TxnError};

/// Everything a call of any service can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (every bad field at once).
    #[error("invalid request: {0:?}")]
    Invalid(Violations),
    /// A named resource does not exist.
    #[error("{kind} {id} not found")]
    NotFound {
        /// "order", "licence", "application", ...
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The resource to create exists already (with other content).
    #[error("{kind} {id} exists: {message}")]
    AlreadyExists {
        /// Kind of resource.
        kind: &'static str,
        /// The existing one's id.
        id: String,
        /// Why that matters.
        message: String,
    },
    /// The resource is not in a state that allows the call.
    #[error("{message}")]
    Precondition {
        /// Stable machine-readable reason.
        reason: &'static str,
        /// For people.
        message: String,
        /// The violated preconditions.
        violations: Vec<Precondition>,
    },
    /// A newer allocation lease holder already acted on this product (the caller's token is stale).
    #[error("fenced at {key}")]
    Fenced {
        /// The fence key.
        key: String,
    },
    /// The caller's own lease was lost mid-work (another replica took over).
    #[error("superseded: {0}")]
    Superseded(String),
    /// Concurrent changes kept winning.
    #[error("{attempts} attempts lost to concurrent changes")]
    Contention {
        /// Attempts made.
        attempts: u32,
    },
    /// Another service answered with an error worth passing on as it is (its details intact).
    #[error("a peer answered {:?}: {}", .0.code(), .0.message())]
    Peer(Status),
    /// The state backend failed.
    #[error("state backend: {0}")]
    State(#[from] StateError),
    /// An already-built status (idempotency, for instance).
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(Status),
    /// Stored data or a rule broken in a way that should never happen.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(kind: &'static str, id: &str) -> Self {
        Error::NotFound { kind, id: id.to_string() }
    }

    /// A precondition failure with a single violation about `subject`.
    pub fn precondition(reason: &'static str, subject: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Error::Precondition {
            reason,
            message: message.clone(),
            violations: vec![(reason.to_string(), subject.to_string(), message)],
        }
    }

    /// INVALID_ARGUMENT for one field.
    pub fn invalid(field: &str, description: impl Into<String>) -> Self {
        let mut v = Violations::new();
        v.add(field, description);
        Error::Invalid(v)
    }

    /// The failure in a few words, for logs and for an order that waits on it (no request ids or other
    /// parts that change from one attempt to the next).
    pub fn describe(&self) -> String {
        match self {
            Error::Invalid(v) => format!("invalid: {:?}", v.list().iter().map(|f| &f.field).collect::<Vec<_>>()),
            other => other.to_string(),
        }
    }

    /// The gRPC status for this failure: the one mapping, exhaustive.
    pub fn into_status(self, ctx: &RequestContext) -> Status {
        match self {
            Error::Invalid(v) => v.into_status(),
            Error::NotFound { kind, id } => errors::not_found(kind, &id),
            Error::AlreadyExists { kind, id, message } => errors::already_exists(kind, &id, message),
            Error::Precondition { reason, message, violations } => {
                errors::failed_precondition(reason, message, violations)
            }
            Error::Fenced { key } => errors::aborted(
                chipgate_contract::FENCED_REASON,
                format!("a newer allocation lease already acted on {key}; this caller's lease is stale"),
            ),
            Error::Superseded(what) => {
                errors::aborted("SUPERSEDED", format!("{what}; another replica took over, retry"))
            }
            Error::Contention { attempts } => errors::aborted(
                "CONTENTION",
                format!("gave up after {attempts} attempts lost to concurrent changes; retry with the same request_id"),
            ),
            Error::Peer(s) | Error::Status(s) => s,
            Error::State(e) => errors::from_state(&ctx.request_id, &e),
            Error::Internal(msg) => errors::internal(&ctx.request_id, msg),
        }
    }
}

impl From<LoadError> for Error {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::State(s) => Error::State(s),
            corrupt => Error::Internal(corrupt.to_string()),
        }
    }
}

impl From<Violations> for Error {
    fn from(v: Violations) -> Self {
        Error::Invalid(v)
    }
}

impl TxnError for Error {
    fn from_commit(e: CommitError) -> Self {
        match e {
            CommitError::Fenced { key } => Error::Fenced { key },
            CommitError::LeaseLost { key } => Error::Superseded(format!("lease {key} lost")),
            CommitError::State(s) => Error::State(s),
            CommitError::Conflict { key } => Error::Internal(format!("unexpected conflict on {key}")),
        }
    }

    fn contention(attempts: u32) -> Self {
        Error::Contention { attempts }
    }

    fn from_status(s: Status) -> Self {
        Error::Status(s)
    }
}

/// Reading records and running transactions, for a service on a [`Store`].
pub trait Records: Sync {
    /// The service's state backend.
    fn store(&self) -> &Store;

    /// Reads and decodes records, one answer per key.
    fn load_many<M: Message + Default + Send>(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<Vec<Loaded<M>>, Error>> + Send {
        async move { Ok(records::load_many(self.store(), keys).await?) }
    }

    /// Reads and decodes one record.
    fn load<M: Message + Default + Send>(&self, key: String) -> impl Future<Output = Result<Loaded<M>, Error>> + Send {
        async move { Ok(records::load(self.store(), key).await?) }
    }

    /// Reads a record that must exist: NOT_FOUND naming `kind` and `id` otherwise.
    fn require<M: Message + Default + Send>(
        &self,
        key: String,
        kind: &'static str,
        id: &str,
    ) -> impl Future<Output = Result<(u64, M), Error>> + Send {
        async move { self.load(key).await?.ok_or_else(|| Error::not_found(kind, id)) }
    }

    /// Runs one optimistic transaction (see [`crate::txn::run`]) with the shared error type.
    fn run_txn<T, F, Fut>(
        &self,
        idem: Option<&IdemKey<'_>>,
        attempt: F,
    ) -> impl Future<Output = Result<(T, Committed), Error>> + Send
    where
        T: Message + Default + Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<(Txn, T), Error>> + Send,
    {
        async move { crate::txn::run(self.store(), idem, attempt).await }
    }
}

/// Serves a mutating RPC (or a read that checks what the caller owns): the operation gets the call's
/// context and the request, and a failure becomes its status in [`Error::into_status`].
#[macro_export]
macro_rules! mutating {
    ($self:ident, $req:ident, $op:ident) => {{
        let ctx = $crate::RequestContext::of(&$req);
        $self.$op(&ctx, $req.into_inner()).await.map(tonic::Response::new).map_err(|e| e.into_status(&ctx))
    }};
    // A call whose body carries a `request_id`: the context keeps it as the idempotency key.
    ($self:ident, $req:ident, $op:ident, request_id) => {{
        let mut ctx = $crate::RequestContext::of(&$req);
        let body = $req.into_inner();
        ctx.idempotency_key.clone_from(&body.request_id);
        $self.$op(&ctx, body).await.map(tonic::Response::new).map_err(|e| e.into_status(&ctx))
    }};
    // A watch call: it also gets the edge's share of the global limit, to give back while it waits
    // for idle stream followers (`hub::StreamHub::subscribe`).
    ($self:ident, $req:ident, $op:ident, slot) => {{
        let ctx = $crate::RequestContext::of(&$req);
        let slot = $crate::edge::shed::Slot::of(&$req);
        $self
            .$op(&ctx, slot.as_ref(), $req.into_inner())
            .await
            .map(tonic::Response::new)
            .map_err(|e| e.into_status(&ctx))
    }};
}

/// Serves a read-only RPC: the operation gets the request only.
#[macro_export]
macro_rules! reading {
    ($self:ident, $req:ident, $op:ident) => {{
        let ctx = $crate::RequestContext::of(&$req);
        $self.$op($req.into_inner()).await.map(tonic::Response::new).map_err(|e| e.into_status(&ctx))
    }};
    // A watch call: it also gets the edge's share of the global limit (as `mutating!`'s).
    ($self:ident, $req:ident, $op:ident, slot) => {{
        let ctx = $crate::RequestContext::of(&$req);
        let slot = $crate::edge::shed::Slot::of(&$req);
        $self.$op(slot.as_ref(), $req.into_inner()).await.map(tonic::Response::new).map_err(|e| e.into_status(&ctx))
    }};
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn every_failure_maps_to_its_code() {
        let ctx = RequestContext::background("test", None);
        let cases = [
            (Error::invalid("units", "must be positive"), Code::InvalidArgument),
            (Error::not_found("order", "ord-1"), Code::NotFound),
            (
                Error::AlreadyExists { kind: "application", id: "app-1".into(), message: "open".into() },
                Code::AlreadyExists,
            ),
            (Error::precondition("ORDER_STATE", "ord-1", "shipped"), Code::FailedPrecondition),
            (Error::Fenced { key: "k".into() }, Code::Aborted),
            (Error::Superseded("lease lost".into()), Code::Aborted),
            (Error::Contention { attempts: 3 }, Code::Aborted),
            (Error::Peer(Status::permission_denied("no")), Code::PermissionDenied),
            (Error::State(StateError::Unavailable("down".into())), Code::Unavailable),
            (Error::Status(Status::invalid_argument("x")), Code::InvalidArgument),
            (Error::Internal("broken".into()), Code::Internal),
        ];
        for (e, code) in cases {
            let what = e.describe();
            assert_eq!(e.into_status(&ctx).code(), code, "{what}");
        }
    }

    #[test]
    fn a_lost_lease_is_superseded_and_a_fence_keeps_its_reason() {
        let ctx = RequestContext::background("test", None);
        let fenced = Error::from_commit(CommitError::Fenced { key: "fence:H200".into() }).into_status(&ctx);
        use tonic_types::StatusExt;
        assert_eq!(fenced.get_error_details().error_info().map(|i| i.reason.clone()).as_deref(), Some("FENCED"));
        assert!(matches!(Error::from_commit(CommitError::LeaseLost { key: "l".into() }), Error::Superseded(_)));
    }
}
