//! The query service's one error type and its mapping to gRPC errors.

use capture_proto::CaptureServiceError;

use super::reader::ReaderError;
use super::vectors::VectorError;
use crate::queue::QueueError;
use crate::service::convert::queue_error;

/// Why a query failed. Messages name the run, artifact or vector at fault.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A request that can never succeed as sent.
    #[error("{0}")]
    Invalid(String),
    /// An unknown run or artifact.
    #[error("{what} not found: {id}")]
    NotFound { what: &'static str, id: String },
    /// An artifact that cannot be read (corrupt, truncated, missing keys) or
    /// a store that failed.
    #[error(transparent)]
    Artifact(#[from] ReaderError),
    #[error(transparent)]
    Vector(#[from] VectorError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl From<QueryError> for CaptureServiceError {
    fn from(error: QueryError) -> Self {
        match error {
            QueryError::Invalid(message) => CaptureServiceError::InvalidArgument(message),
            QueryError::NotFound { what, id } => CaptureServiceError::NotFound {
                what: what.to_owned(),
                id,
            },
            QueryError::Artifact(error) => {
                if error.is_unavailable() {
                    CaptureServiceError::Unavailable(error.to_string())
                } else {
                    CaptureServiceError::FailedPrecondition(error.to_string())
                }
            }
            QueryError::Vector(error) => CaptureServiceError::InvalidArgument(error.to_string()),
            QueryError::Queue(error) => queue_error(error),
        }
    }
}

impl From<QueryError> for capture_proto::tonic::Status {
    fn from(error: QueryError) -> Self {
        CaptureServiceError::from(error).into()
    }
}
