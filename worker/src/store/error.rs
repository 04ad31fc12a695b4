//! The one error enum of the artifact store.

use std::path::PathBuf;

use capture_format::prompts::quote_short;

/// Everything that can go wrong while opening a store or moving artifacts.
///
/// Messages name the store location (`s3://bucket/prefix/exp/run/key` or
/// `file:///dir/exp/run/key`) and never credentials.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL cannot be used (unknown scheme, missing bucket, bad path).
    #[error("invalid store url {}: {reason}", quote_short(.url))]
    InvalidUrl { url: String, reason: String },
    /// An experiment name, run id, job id or attempt that cannot be a path part.
    #[error("unsafe {kind} {}: {reason}", quote_short(.value))]
    UnsafeName {
        kind: &'static str,
        value: String,
        reason: String,
    },
    /// A relative artifact key that cannot become an object key.
    #[error("unsafe artifact key {}: {reason}", quote_short(.key))]
    UnsafeKey { key: String, reason: String },
    /// The full object key would be longer than object stores accept.
    #[error("object key {location} is {bytes} bytes long; object stores accept at most {max}")]
    KeyTooLong {
        location: String,
        bytes: usize,
        max: usize,
    },
    /// A local store directory could not be created or resolved.
    #[error("cannot use store directory {}: {source}", .path.display())]
    LocalDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The object store client could not be configured.
    #[error("cannot open store {url}: {source}")]
    Open {
        url: String,
        #[source]
        source: object_store::Error,
    },
    /// The object does not exist.
    #[error("{location} not found")]
    NotFound { location: String },
    /// A ranged read asked for bytes the object does not have.
    #[error("invalid byte range {start}..{end} of {location}: {reason}")]
    InvalidRange {
        location: String,
        start: u64,
        end: u64,
        reason: String,
    },
    /// Promotion was asked for artifacts the attempt never staged (and that
    /// are not already at their documented keys).
    #[error(
        "cannot promote job {job} attempt {attempt}: {} staged artifact(s) missing under {staging}, first {}",
        .missing.len(),
        quote_short(.missing.first().map(String::as_str).unwrap_or_default())
    )]
    MissingStaged {
        job: String,
        attempt: u32,
        staging: String,
        missing: Vec<String>,
    },
    /// A local file to upload could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The object store failed (network, permissions, server error).
    #[error("cannot {operation} {location}: {}", with_causes(.source))]
    Backend {
        operation: &'static str,
        location: String,
        #[source]
        source: object_store::Error,
    },
    /// A blocking helper task (hashing) panicked or was cancelled.
    #[error("internal task failed while {operation}: {source}")]
    Task {
        operation: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl StoreError {
    /// Wraps an object store error, turning "not found" into [`StoreError::NotFound`].
    pub(crate) fn backend(
        operation: &'static str,
        location: String,
        source: object_store::Error,
    ) -> Self {
        match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound { location },
            source => StoreError::Backend {
                operation,
                location,
                source,
            },
        }
    }

    /// Whether this error says the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// Whether the store refused the credentials or their rights (HTTP 401
    /// or 403: an unknown key, a wrong secret, no permission on the
    /// bucket). Another try with the same credentials gets the same answer.
    pub fn is_access_denied(&self) -> bool {
        let StoreError::Backend { source, .. } = self else {
            return false;
        };
        if matches!(
            source,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        ) {
            return true;
        }
        // object_store reports some refusals (listings) as generic errors;
        // S3's error codes are in the text.
        let text = with_causes(source);
        [
            "AccessDenied",
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "403 Forbidden",
            "401 Unauthorized",
        ]
        .iter()
        .any(|code| text.contains(code))
    }
}

/// The error's message followed by those of its causes that add something
/// (object_store's messages stop at "error sending request"; the cause says
/// "connection refused" or "operation timed out").
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = inner.source();
    }
    message
}
