//! `QueueError`, the job queue's one error type, and the one place where
//! sqlx errors become queue errors (by SQLSTATE / SQLite result code).

use sqlx::error::ErrorKind;

use super::model::JobId;

/// Everything a queue operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The named run or job does not exist.
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },

    /// The caller no longer holds the lease it names: another attempt owns
    /// the job, or the lease expired, or the job finished or was cancelled.
    /// The caller's result must be discarded.
    #[error(
        "lease lost on job {job} attempt {attempt}: the job was re-leased, reaped, finished or cancelled; discard this attempt's result"
    )]
    LeaseLost { job: JobId, attempt: i32 },

    /// The operation does not apply in the current state (e.g. retrying a
    /// cancelled run).
    #[error("{0}")]
    InvalidState(String),

    /// The request itself is malformed (e.g. a run with no jobs).
    #[error("{0}")]
    InvalidArgument(String),

    /// A uniqueness rule was broken (e.g. two artifacts with one key in a
    /// run, or a run id reused with another spec); nothing was written.
    #[error("conflict: {0}")]
    Conflict(String),

    /// The database cannot be reached or asked to retry (connection lost,
    /// pool exhausted, serialization failure, deadlock, busy): try again.
    #[error("database unavailable, try again: {0}")]
    Unavailable(#[source] sqlx::Error),

    /// A stored value the queue cannot read back.
    #[error("corrupt queue data: {0}")]
    Corrupt(String),

    /// Applying the embedded migrations failed.
    #[error("applying queue migrations failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),

    /// Any other database error.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl QueueError {
    /// Whether repeating the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Postgres SQLSTATEs that mean "try again".
const POSTGRES_RETRYABLE_CODES: &[&str] = &[
    "40001", // serialization_failure
    "40P01", // deadlock_detected
    "55P03", // lock_not_available
    "57P01", // admin_shutdown
    "57P02", // crash_shutdown
    "57P03", // cannot_connect_now
    "53300", // too_many_connections
];

/// SQLite primary result codes that mean "try again".
const SQLITE_RETRYABLE_CODES: &[i64] = &[
    5, // SQLITE_BUSY
    6, // SQLITE_LOCKED
];

fn is_retryable_postgres_code(code: &str) -> bool {
    // class 08: connection exception
    POSTGRES_RETRYABLE_CODES.contains(&code) || code.starts_with("08")
}

fn is_retryable_sqlite_code(code: &str) -> bool {
    // SQLite reports extended result codes; the primary code is the low byte.
    code.parse::<i64>()
        .is_ok_and(|extended| SQLITE_RETRYABLE_CODES.contains(&(extended & 0xff)))
}

impl From<sqlx::Error> for QueueError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(database_error) => {
                if database_error.kind() == ErrorKind::UniqueViolation {
                    let what = database_error
                        .constraint()
                        .map(|constraint| format!(" ({constraint})"))
                        .unwrap_or_default();
                    return Self::Conflict(format!("{}{what}", database_error.message()));
                }
                let is_sqlite = database_error
                    .try_downcast_ref::<sqlx::sqlite::SqliteError>()
                    .is_some();
                let retryable = match database_error.code() {
                    Some(code) if is_sqlite => is_retryable_sqlite_code(&code),
                    Some(code) => is_retryable_postgres_code(&code),
                    None => false,
                };
                if retryable {
                    return Self::Unavailable(error);
                }
                Self::Database(error)
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Self::Unavailable(error),
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                Self::Corrupt(error.to_string())
            }
            _ => Self::Database(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_and_serialization_codes_are_retryable() {
        assert!(is_retryable_postgres_code("40001"));
        assert!(is_retryable_postgres_code("40P01"));
        assert!(is_retryable_postgres_code("08006"));
        assert!(!is_retryable_postgres_code("23505"));
        assert!(is_retryable_sqlite_code("5")); // SQLITE_BUSY
        assert!(is_retryable_sqlite_code("517")); // SQLITE_BUSY_SNAPSHOT
        assert!(!is_retryable_sqlite_code("19")); // SQLITE_CONSTRAINT
    }

    #[test]
    fn pool_timeouts_map_to_unavailable() {
        let error = QueueError::from(sqlx::Error::PoolTimedOut);
        assert!(error.is_retryable(), "{error}");
        assert!(!QueueError::from(sqlx::Error::RowNotFound).is_retryable());
    }
}
