//! Everything a licensing call can fail with, and the one place it becomes a gRPC status.

use chipgate_runtime::RequestContext;
use chipgate_runtime::errors::{self, Precondition, Violations};
use chipgate_runtime::txn::TxnError;
use chipgate_state::{CommitError, StateError};
use tonic::Status;

/// A licensing failure.
#[derive(Debug)]
pub enum Error {
    /// The request is malformed.
    Invalid(Violations),
    /// A named resource does not exist.
    NotFound {
        /// "application", "wave", "licence", ...
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The resource to create exists already.
    AlreadyExists {
        /// Kind of resource.
        kind: &'static str,
        /// The existing one's id.
        id: String,
        /// Why that matters.
        message: String,
    },
    /// The resource is not in a state that allows the call.
    Precondition {
        /// Stable machine-readable reason.
        reason: &'static str,
        /// For people.
        message: String,
        /// The violated preconditions.
        violations: Vec<Precondition>,
    },
    /// A newer allocation lease holder has already called for this product.
    Fenced {
        /// The fence key.
        key: String,
    },
    /// Concurrent changes kept winning.
    Contention {
        /// Attempts made.
        attempts: u32,
    },
    /// The state backend failed.
    State(StateError),
    /// An already-built status (idempotency, for instance).
    Status(Status),
    /// Stored data that should never be there.
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

    /// The gRPC status for this failure.
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
            Error::Contention { attempts } => errors::aborted(
                "CONTENTION",
                format!("gave up after {attempts} attempts lost to concurrent changes; retry with the same request_id"),
            ),
            Error::State(e) => errors::from_state(&ctx.request_id, &e),
            Error::Status(s) => s,
            Error::Internal(msg) => errors::internal(&ctx.request_id, msg),
        }
    }
}

impl From<StateError> for Error {
    fn from(e: StateError) -> Self {
        Error::State(e)
    }
}

impl From<chipgate_runtime::records::LoadError> for Error {
    fn from(e: chipgate_runtime::records::LoadError) -> Self {
        match e {
            chipgate_runtime::records::LoadError::State(s) => Error::State(s),
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
            CommitError::State(s) => Error::State(s),
            CommitError::Conflict { key } | CommitError::LeaseLost { key } => {
                Error::Internal(format!("unexpected commit failure on {key}"))
            }
        }
    }

    fn contention(attempts: u32) -> Self {
        Error::Contention { attempts }
    }

    fn from_status(s: Status) -> Self {
        Error::Status(s)
    }
}
