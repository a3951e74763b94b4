//! Everything an orders call can fail with, and the one place it becomes a gRPC status.

use chipgate_runtime::RequestContext;
use chipgate_runtime::errors::{self, Precondition, Violations};
use chipgate_runtime::records::LoadError;
use chipgate_runtime::txn::TxnError;
use chipgate_state::{CommitError, StateError};
use tonic::Status;

/// An orders failure.
#[derive(Debug)]
pub enum Error {
    /// The request is malformed.
    Invalid(Violations),
    /// A named resource does not exist.
    NotFound {
        /// "order", "wave", ...
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The order is not in a state that allows the call.
    Precondition {
        /// Stable reason.
        reason: &'static str,
        /// For people.
        message: String,
        /// Violations.
        violations: Vec<Precondition>,
    },
    /// Another service answered with an error worth passing on as it is (its details intact).
    Peer(Status),
    /// A lease or fence was lost mid-pass (another replica took over).
    Superseded(String),
    /// Concurrent changes kept winning.
    Contention {
        /// Attempts.
        attempts: u32,
    },
    /// The state backend failed.
    State(StateError),
    /// An already-built status.
    Status(Status),
    /// Broken stored data.
    Internal(String),
}

impl Error {
    /// The failure in a few words, for logs and for an order that waits on it (a peer's refusal as
    /// its code and message; no request ids or other parts that change from one attempt to the next).
    pub fn describe(&self) -> String {
        match self {
            Error::Invalid(v) => format!("invalid: {:?}", v.list().iter().map(|f| &f.field).collect::<Vec<_>>()),
            Error::NotFound { kind, id } => format!("{kind} {id} not found"),
            Error::Precondition { message, .. } => message.clone(),
            Error::Peer(s) => format!("a peer answered {:?}: {}", s.code(), s.message()),
            Error::Superseded(why) => format!("superseded: {why}"),
            Error::Contention { attempts } => format!("{attempts} attempts lost to concurrent changes"),
            Error::State(e) => format!("state backend: {e}"),
            Error::Status(s) => format!("{:?}: {}", s.code(), s.message()),
            Error::Internal(m) => format!("internal: {m}"),
        }
    }

    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(kind: &'static str, id: &str) -> Self {
        Error::NotFound { kind, id: id.to_string() }
    }

    /// A precondition failure about `subject`.
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
            Error::Precondition { reason, message, violations } => {
                errors::failed_precondition(reason, message, violations)
            }
            Error::Peer(s) => s,
            Error::Superseded(what) => {
                errors::aborted("SUPERSEDED", format!("{what}; another replica took over, retry"))
            }
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

impl From<LoadError> for Error {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::State(s) => Error::State(s),
            corrupt => Error::Internal(corrupt.to_string()),
        }
    }
}

impl TxnError for Error {
    fn from_commit(e: CommitError) -> Self {
        match e {
            CommitError::Fenced { key } | CommitError::LeaseLost { key } => {
                Error::Superseded(format!("lease {key} lost"))
            }
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
