//! Why one job failed, whether another attempt could succeed, and the
//! message `FailJob` carries.

use crate::error::CaptureError;
use crate::prompts::PromptError;
use crate::store::StoreError;

/// Everything that can make one attempt of a job fail.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job asks for something this worker can never do: a layer out of
    /// range, a bad dtype, another store, a malformed field.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug or a crashed helper task.
    #[error("{0}")]
    Internal(String),
}

impl JobError {
    /// Whether another attempt (maybe on another worker) could succeed:
    /// false for invalid arguments (layer out of range, context overflow,
    /// replay mismatch, bad dtype, store root mismatch), true for I/O,
    /// store and internal failures.
    pub fn is_retryable(&self) -> bool {
        match self {
            JobError::Invalid(_) | JobError::Prompt(_) => false,
            JobError::Capture(error) => !matches!(
                error,
                CaptureError::InvalidArgument(_) | CaptureError::Prompt(_)
            ),
            JobError::Store(error) => {
                !error.is_access_denied()
                    && !matches!(
                        error,
                        StoreError::InvalidUrl { .. }
                            | StoreError::UnsafeName { .. }
                            | StoreError::UnsafeKey { .. }
                            | StoreError::KeyTooLong { .. }
                    )
            }
            JobError::Internal(_) => true,
        }
    }

    /// The message with every cause that adds something, on one line; a
    /// refusal by the store says what to check.
    pub fn message(&self) -> String {
        let message = with_causes(self.to_string(), std::error::Error::source(self));
        match self {
            JobError::Store(error) if error.is_access_denied() => format!(
                "{message} (the store refused this worker's credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the role, and its rights on the bucket; not retried)"
            ),
            _ => message,
        }
    }
}

/// `message` followed by those of `cause` and its sources that it does not
/// already contain, joined with ": ".
pub(crate) fn with_causes(
    mut message: String,
    mut cause: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(error) = cause {
        let text = error.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        cause = error.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_arguments_are_final_everything_else_is_retried() {
        let cases = [
            (JobError::Invalid("layer 30 is out of range".into()), false),
            (
                JobError::Capture(CaptureError::InvalidArgument("context".into())),
                false,
            ),
            (
                JobError::Store(StoreError::UnsafeKey {
                    key: "a//b".into(),
                    reason: "empty part".into(),
                }),
                false,
            ),
            (
                JobError::Capture(CaptureError::Io {
                    path: "/x".into(),
                    source: std::io::Error::other("disk full"),
                }),
                true,
            ),
            (
                JobError::Store(StoreError::NotFound {
                    location: "s3://b/k".into(),
                }),
                true,
            ),
            (JobError::Internal("task panicked".into()), true),
            (
                JobError::Store(StoreError::Backend {
                    operation: "upload",
                    location: "s3://b/k".into(),
                    source: object_store::Error::PermissionDenied {
                        path: "k".into(),
                        source: "403 Forbidden".into(),
                    },
                }),
                false,
            ),
            (
                // listings come back as generic errors with S3's code inside
                JobError::Store(StoreError::Backend {
                    operation: "list",
                    location: "s3://b/".into(),
                    source: object_store::Error::Generic {
                        store: "S3",
                        source: "Error performing list request: <Code>SignatureDoesNotMatch</Code>"
                            .into(),
                    },
                }),
                false,
            ),
            (
                JobError::Store(StoreError::Backend {
                    operation: "upload",
                    location: "s3://b/k".into(),
                    source: object_store::Error::Generic {
                        store: "S3",
                        source: "connection refused".into(),
                    },
                }),
                true,
            ),
        ];
        for (error, retryable) in cases {
            assert_eq!(error.is_retryable(), retryable, "{error}");
        }
    }

    #[test]
    fn messages_carry_their_causes_once() {
        let error = JobError::Capture(CaptureError::Io {
            path: "/tmp/x".into(),
            source: std::io::Error::other("disk full"),
        });
        assert_eq!(error.message(), "i/o error on /tmp/x: disk full");
        let wrapped = JobError::Store(StoreError::ReadFile {
            path: "/tmp/y".into(),
            source: std::io::Error::other("permission denied"),
        });
        assert_eq!(wrapped.message(), "cannot read /tmp/y: permission denied");
    }
}
