//! The domain error of the capture services and the one mapping between it
//! and `tonic::Status`, used by servers to answer and by clients to match
//! (e.g. a lost lease).

use tonic::{Code, Status};

use crate::ids::{Attempt, IdParseError, JobId};

/// Start of the message of every lost-lease status, stable so that clients
/// in any language can recognise it.
pub const LEASE_LOST_PREFIX: &str = "lease lost";

const NOT_FOUND_SEPARATOR: &str = " not found: ";
const ALREADY_FINISHED_SEPARATOR: &str = " already finished: ";
const CANCELLED_SEPARATOR: &str = " cancelled: ";

/// Everything a capture service call can fail with.
///
/// Servers return it through `tonic::Status::from`; clients turn a status
/// back into it with [`CaptureServiceError::from_status`]. Messages are
/// lowercase without a trailing period, and the structured variants use
/// stable formats so the round trip keeps their fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureServiceError {
    /// A run, job, worker or prompt set that does not exist (`NOT_FOUND`).
    #[error("{what} not found: {id}")]
    NotFound {
        /// What was looked up, e.g. "run".
        what: String,
        /// The id or name that was looked up.
        id: String,
    },
    /// A request that can never succeed as sent (`INVALID_ARGUMENT`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The attempt no longer holds the job's lease: it expired and the job
    /// was re-leased, or it finished. The late result is discarded
    /// (`FAILED_PRECONDITION`, message starting with "lease lost").
    #[error("lease lost: job {job} attempt {attempt} no longer holds the lease")]
    LeaseLost {
        /// The job.
        job: JobId,
        /// The caller's (stale) attempt.
        attempt: Attempt,
    },
    /// The run or job is in a terminal state, so the change does not apply
    /// (`FAILED_PRECONDITION`).
    #[error("{what} already finished: {id}")]
    AlreadyFinished {
        /// What was changed, e.g. "run".
        what: String,
        /// Its id.
        id: String,
    },
    /// Any other state that forbids the call now (`FAILED_PRECONDITION`),
    /// e.g. a model the run cannot use.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The run was cancelled, so its jobs take no more work (`ABORTED`:
    /// gRPC's `CANCELLED` is what transports report for calls the caller
    /// gave up on).
    #[error("{what} cancelled: {id}")]
    Cancelled {
        /// What was cancelled, e.g. "run".
        what: String,
        /// Its id.
        id: String,
    },
    /// No or a wrong bearer token (`UNAUTHENTICATED`).
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid caller that may not do this (`PERMISSION_DENIED`).
    #[error("{0}")]
    PermissionDenied(String),
    /// A transient failure; retrying later may succeed (`UNAVAILABLE`).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a broken dependency on the server side (`INTERNAL`).
    #[error("{0}")]
    Internal(String),
}

impl CaptureServiceError {
    /// `NotFound` for `what` (e.g. "run") with this id or name.
    pub fn not_found(what: impl Into<String>, id: impl ToString) -> Self {
        Self::NotFound {
            what: what.into(),
            id: id.to_string(),
        }
    }

    /// `AlreadyFinished` for `what` (e.g. "run") with this id.
    pub fn already_finished(what: impl Into<String>, id: impl ToString) -> Self {
        Self::AlreadyFinished {
            what: what.into(),
            id: id.to_string(),
        }
    }

    /// `Cancelled` for `what` (e.g. "run") with this id.
    pub fn cancelled(what: impl Into<String>, id: impl ToString) -> Self {
        Self::Cancelled {
            what: what.into(),
            id: id.to_string(),
        }
    }

    /// `InvalidArgument` with this message.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }

    /// `Internal` with this message.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal(message.into())
    }

    /// The gRPC code this error is sent with.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound { .. } => Code::NotFound,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::LeaseLost { .. } | Self::AlreadyFinished { .. } | Self::FailedPrecondition(_) => {
                Code::FailedPrecondition
            }
            Self::Cancelled { .. } => Code::Aborted,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// Whether the attempt lost its lease, also for a lease-lost status whose
    /// message did not name the job and attempt.
    pub fn is_lease_lost(&self) -> bool {
        match self {
            Self::LeaseLost { .. } => true,
            Self::FailedPrecondition(message) => message.starts_with(LEASE_LOST_PREFIX),
            _ => false,
        }
    }

    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// The domain error a status stands for: the inverse of
    /// `tonic::Status::from`, and a sensible reading of any other status
    /// (e.g. one from a proxy or the transport).
    ///
    /// Codes without a variant of their own: `CANCELLED`, `DEADLINE_EXCEEDED`,
    /// `RESOURCE_EXHAUSTED` and an `ABORTED` that is not a cancelled run read
    /// as `Unavailable`; `OUT_OF_RANGE` as `InvalidArgument`; `ALREADY_EXISTS`
    /// as `FailedPrecondition`; `OK`, `UNKNOWN`, `UNIMPLEMENTED` and
    /// `DATA_LOSS` as `Internal`.
    pub fn from_status(status: &Status) -> Self {
        let message = status.message();
        let or_code = |fallback: &str| {
            if message.is_empty() {
                fallback.to_owned()
            } else {
                message.to_owned()
            }
        };
        match status.code() {
            Code::NotFound => match message.split_once(NOT_FOUND_SEPARATOR) {
                Some((what, id)) => Self::not_found(what, id),
                None => Self::not_found("resource", or_code("unknown")),
            },
            Code::InvalidArgument | Code::OutOfRange => {
                Self::InvalidArgument(or_code("invalid argument"))
            }
            Code::FailedPrecondition => parse_lease_lost(message)
                .or_else(|| {
                    message
                        .split_once(ALREADY_FINISHED_SEPARATOR)
                        .map(|(what, id)| Self::already_finished(what, id))
                })
                .unwrap_or_else(|| Self::FailedPrecondition(or_code("failed precondition"))),
            Code::AlreadyExists => Self::FailedPrecondition(or_code("already exists")),
            Code::Aborted => match message.split_once(CANCELLED_SEPARATOR) {
                Some((what, id)) => Self::cancelled(what, id),
                None => Self::Unavailable(or_code("aborted")),
            },
            Code::Unauthenticated => Self::Unauthenticated(or_code("unauthenticated")),
            Code::PermissionDenied => Self::PermissionDenied(or_code("permission denied")),
            Code::Unavailable => Self::Unavailable(or_code("unavailable")),
            Code::Cancelled => Self::Unavailable(or_code("request cancelled")),
            Code::DeadlineExceeded => Self::Unavailable(or_code("deadline exceeded")),
            Code::ResourceExhausted => Self::Unavailable(or_code("resource exhausted")),
            Code::Internal => Self::Internal(or_code("internal error")),
            Code::Unimplemented => Self::Internal(or_code("unimplemented")),
            Code::DataLoss => Self::Internal(or_code("data loss")),
            Code::Unknown => Self::Internal(or_code("unknown error")),
            Code::Ok => Self::Internal(format!("unexpected ok status: {message}")),
        }
    }
}

/// Reads `lease lost: job {job} attempt {attempt} ...` back into its fields.
fn parse_lease_lost(message: &str) -> Option<CaptureServiceError> {
    let rest = message
        .strip_prefix(LEASE_LOST_PREFIX)?
        .strip_prefix(": job ")?;
    let mut words = rest.split_whitespace();
    let job = JobId::parse_wire(words.next()?).ok()?;
    if words.next()? != "attempt" {
        return None;
    }
    let attempt = words.next()?.parse::<Attempt>().ok()?;
    Some(CaptureServiceError::LeaseLost { job, attempt })
}

impl From<CaptureServiceError> for Status {
    fn from(error: CaptureServiceError) -> Status {
        Status::new(error.code(), error.to_string())
    }
}

impl From<Status> for CaptureServiceError {
    fn from(status: Status) -> Self {
        Self::from_status(&status)
    }
}

impl From<IdParseError> for CaptureServiceError {
    fn from(error: IdParseError) -> Self {
        Self::InvalidArgument(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_variant() -> Vec<CaptureServiceError> {
        vec![
            CaptureServiceError::not_found("run", "0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80"),
            CaptureServiceError::not_found("prompt set", "my set: v2"),
            CaptureServiceError::invalid_argument(
                "unknown prompt set \"foo\": known sets are adversarial, baseline",
            ),
            CaptureServiceError::LeaseLost {
                job: JobId::new(),
                attempt: Attempt::new(3).unwrap(),
            },
            CaptureServiceError::already_finished("run", "0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80"),
            CaptureServiceError::FailedPrecondition(
                "run wants model google/gemma-2-2b-it, the worker has tiny-gemma2".into(),
            ),
            CaptureServiceError::cancelled("run", "0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80"),
            CaptureServiceError::Unauthenticated("missing bearer token".into()),
            CaptureServiceError::PermissionDenied("token may not submit runs".into()),
            CaptureServiceError::Unavailable("database unavailable: connection refused".into()),
            CaptureServiceError::internal("manifest write failed"),
        ]
    }

    #[test]
    fn errors_map_to_the_documented_codes() {
        let codes: Vec<Code> = every_variant()
            .into_iter()
            .map(|error| Status::from(error).code())
            .collect();
        assert_eq!(
            codes,
            [
                Code::NotFound,
                Code::NotFound,
                Code::InvalidArgument,
                Code::FailedPrecondition,
                Code::FailedPrecondition,
                Code::FailedPrecondition,
                Code::Aborted,
                Code::Unauthenticated,
                Code::PermissionDenied,
                Code::Unavailable,
                Code::Internal,
            ]
        );
    }

    #[test]
    fn every_error_survives_the_status_round_trip() {
        for error in every_variant() {
            let status = Status::from(error.clone());
            assert_eq!(
                CaptureServiceError::from_status(&status),
                error,
                "{status:?}"
            );
            assert_eq!(CaptureServiceError::from(status), error);
        }
    }

    #[test]
    fn lease_loss_has_a_stable_message_and_is_recognised() {
        let job = JobId::new();
        let status = Status::from(CaptureServiceError::LeaseLost {
            job,
            attempt: Attempt::FIRST,
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            format!("lease lost: job {job} attempt 1 no longer holds the lease")
        );
        assert!(status.message().starts_with(LEASE_LOST_PREFIX));
        assert!(CaptureServiceError::from_status(&status).is_lease_lost());

        // A server that words it differently is still recognised by prefix.
        let foreign = Status::failed_precondition("lease lost (expired 3s ago)");
        let error = CaptureServiceError::from_status(&foreign);
        assert_eq!(
            error,
            CaptureServiceError::FailedPrecondition("lease lost (expired 3s ago)".into())
        );
        assert!(error.is_lease_lost());
        assert!(!CaptureServiceError::already_finished("job", job).is_lease_lost());
    }

    #[test]
    fn other_codes_read_sensibly() {
        let read = |status: Status| CaptureServiceError::from_status(&status);
        assert_eq!(
            read(Status::cancelled("")),
            CaptureServiceError::Unavailable("request cancelled".into())
        );
        assert!(read(Status::deadline_exceeded("timeout")).is_retryable());
        assert!(read(Status::aborted("conflict, try again")).is_retryable());
        assert_eq!(
            read(Status::out_of_range("limit too large")),
            CaptureServiceError::InvalidArgument("limit too large".into())
        );
        assert_eq!(
            read(Status::unimplemented("")),
            CaptureServiceError::Internal("unimplemented".into())
        );
        assert_eq!(
            read(Status::not_found("no such thing")),
            CaptureServiceError::not_found("resource", "no such thing")
        );
        assert_eq!(
            read(Status::failed_precondition("")),
            CaptureServiceError::FailedPrecondition("failed precondition".into())
        );
        assert!(!read(Status::internal("boom")).is_retryable());
    }

    #[test]
    fn id_parse_errors_are_invalid_arguments() {
        let error = CaptureServiceError::from("x".parse::<JobId>().unwrap_err());
        assert_eq!(Status::from(error.clone()).code(), Code::InvalidArgument);
        assert!(error.to_string().starts_with("invalid job id \"x\""));
    }

    #[test]
    fn messages_are_lowercase_without_trailing_period() {
        for error in every_variant() {
            let message = error.to_string();
            assert!(!message.ends_with('.'), "{message}");
            assert!(
                !message.starts_with(|c: char| c.is_uppercase()),
                "{message}"
            );
        }
    }
}
