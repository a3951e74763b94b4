//! Rich gRPC errors (google.rpc error details via `tonic-types`), built the same way by every service.
//!
//! Each service maps its own error enum to `tonic::Status` in one exhaustive match; these helpers keep
//! the details uniform: INVALID_ARGUMENT carries BadRequest field violations, FAILED_PRECONDITION
//! carries PreconditionFailure, RESOURCE_EXHAUSTED carries QuotaFailure, NOT_FOUND and ALREADY_EXISTS
//! carry ResourceInfo, and every error carries ErrorInfo with a stable machine-readable reason.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The ErrorInfo domain of every chipgate error.
pub const DOMAIN: &str = "chipgate.dev";

/// Field violations collected while validating a request.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// None yet.
    pub fn new() -> Self {
        Violations::default()
    }

    /// Records that `field` is wrong, and why.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The recorded violations.
    pub fn list(&self) -> &[FieldViolation] {
        &self.0
    }

    /// Ok when nothing was recorded, else INVALID_ARGUMENT with every violation.
    pub fn check(self) -> Result<(), Status> {
        if self.0.is_empty() { Ok(()) } else { Err(self.into_status()) }
    }

    /// Ok when empty, else the violations themselves (for `TryFrom` conversions at the edge, whose
    /// error is the list of what is wrong).
    ///
    /// # Errors
    /// When any violation was recorded.
    pub fn check_violations(self) -> Result<(), Violations> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }

    /// INVALID_ARGUMENT with every violation.
    pub fn into_status(self) -> Status {
        let summary = self.0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ");
        let mut details = ErrorDetails::with_bad_request(self.0);
        details.set_error_info("INVALID_ARGUMENT", DOMAIN, []);
        Status::with_error_details(Code::InvalidArgument, format!("invalid request: {summary}"), details)
    }
}

/// INVALID_ARGUMENT for one field.
pub fn invalid_argument(field: &str, description: impl Into<String>) -> Status {
    let mut v = Violations::new();
    v.add(field, description);
    v.into_status()
}

/// NOT_FOUND for a resource, with ResourceInfo.
pub fn not_found(resource_type: &str, name: &str) -> Status {
    let mut details = ErrorDetails::with_resource_info(resource_type, name, "", format!("no {resource_type} {name:?}"));
    details.set_error_info("NOT_FOUND", DOMAIN, [("resource_type".to_string(), resource_type.to_string())]);
    Status::with_error_details(Code::NotFound, format!("{resource_type} {name:?} not found"), details)
}

/// ALREADY_EXISTS for a resource, with ResourceInfo naming the one that exists.
pub fn already_exists(resource_type: &str, name: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    let mut details = ErrorDetails::with_resource_info(resource_type, name, "", message.clone());
    details.set_error_info("ALREADY_EXISTS", DOMAIN, [("resource_type".to_string(), resource_type.to_string())]);
    Status::with_error_details(Code::AlreadyExists, message, details)
}

/// One precondition violation: `(type, subject, description)`.
pub type Precondition = (String, String, String);

/// FAILED_PRECONDITION with PreconditionFailure violations and a stable reason.
pub fn failed_precondition(reason: &str, message: impl Into<String>, violations: Vec<Precondition>) -> Status {
    let mut details = ErrorDetails::new();
    for (t, s, d) in violations {
        details.add_precondition_failure_violation(t, s, d);
    }
    details.set_error_info(reason, DOMAIN, []);
    Status::with_error_details(Code::FailedPrecondition, message, details)
}

/// RESOURCE_EXHAUSTED with QuotaFailure violations `(subject, description)`, plus any precondition
/// violations that also failed.
pub fn quota_exhausted(
    reason: &str,
    message: impl Into<String>,
    quota: Vec<(String, String)>,
    preconditions: Vec<Precondition>,
) -> Status {
    let mut details = ErrorDetails::new();
    for (s, d) in quota {
        details.add_quota_failure_violation(s, d);
    }
    for (t, s, d) in preconditions {
        details.add_precondition_failure_violation(t, s, d);
    }
    details.set_error_info(reason, DOMAIN, []);
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// UNAVAILABLE with a retry hint: a dependency (Redis, another service) can't be reached right now.
pub fn unavailable(message: impl Into<String>) -> Status {
    let mut details = ErrorDetails::with_retry_info(Some(Duration::from_millis(200)));
    details.set_error_info("UNAVAILABLE", DOMAIN, []);
    Status::with_error_details(Code::Unavailable, message, details)
}

/// ABORTED: a concurrent change won; the caller may retry the whole call.
pub fn aborted(reason: &str, message: impl Into<String>) -> Status {
    let mut details = ErrorDetails::with_retry_info(Some(Duration::from_millis(10)));
    details.set_error_info(reason, DOMAIN, []);
    Status::with_error_details(Code::Aborted, message, details)
}

/// INTERNAL without leaking internals: the detail goes to the log, the caller gets the request id.
pub fn internal(request_id: &str, detail: impl std::fmt::Display) -> Status {
    tracing::error!(request_id, error = %detail, "internal error");
    let mut details = ErrorDetails::with_request_info(request_id, "");
    details.set_error_info("INTERNAL", DOMAIN, []);
    Status::with_error_details(Code::Internal, format!("internal error (request {request_id})"), details)
}

/// Maps a state-layer failure to UNAVAILABLE (transient) or INTERNAL.
pub fn from_state(request_id: &str, e: &chipgate_state::StateError) -> Status {
    match e {
        chipgate_state::StateError::Unavailable(msg) => {
            tracing::warn!(request_id, error = %msg, "state backend unavailable");
            unavailable("state backend unavailable; retry with the same request_id")
        }
        chipgate_state::StateError::Backend(msg) => internal(request_id, msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_become_bad_request_details() {
        let mut v = Violations::new();
        v.add("units", "must be at least 1");
        v.add("buyer_id", "is required");
        let status = v.check().expect_err("violations");
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request details");
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[0].field, "units");
        assert_eq!(details.error_info().map(|i| i.domain.as_str()), Some(DOMAIN));
        assert!(Violations::new().check().is_ok());
    }

    #[test]
    fn quota_details_carry_both_kinds() {
        let s = quota_exhausted(
            "QUOTA",
            "short",
            vec![("lic-1".into(), "needs 10, 3 left".into())],
            vec![("CONDITION_QUOTA".into(), "lic-1".into(), "short".into())],
        );
        assert_eq!(s.code(), Code::ResourceExhausted);
        let d = s.get_error_details();
        assert_eq!(d.quota_failure().map(|q| q.violations.len()), Some(1));
        assert_eq!(d.precondition_failure().map(|p| p.violations.len()), Some(1));
    }
}
