//! Decoding SQLite rows of the queue tables (text ids, unix-millisecond
//! times, JSON text) into the queue's types.

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use sqlx::types::Json;
use uuid::Uuid;

use crate::queue::{
    ArtifactRecord, ArtifactRow, AttemptRecord, JobId, JobRecord, ModelRef, QueueError, RunId,
    RunRecord, WorkerRecord,
};

/// How ids are stored: hyphenated lowercase text, which sorts like the
/// time-ordered (v7) uuids themselves.
pub(super) fn id_text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

pub(super) fn parse_id(text: &str) -> Result<Uuid, QueueError> {
    Uuid::parse_str(text).map_err(|error| QueueError::Corrupt(format!("id {text:?}: {error}")))
}

pub(super) fn millis_to_time(millis: i64) -> Result<DateTime<Utc>, QueueError> {
    DateTime::from_timestamp_millis(millis)
        .ok_or_else(|| QueueError::Corrupt(format!("time {millis} ms is out of range")))
}

fn id_column(row: &SqliteRow, column: &str) -> Result<Uuid, QueueError> {
    parse_id(&row.try_get::<String, _>(column)?)
}

fn time_column(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, QueueError> {
    millis_to_time(row.try_get(column)?)
}

pub(super) fn optional_time_column(
    row: &SqliteRow,
    column: &str,
) -> Result<Option<DateTime<Utc>>, QueueError> {
    row.try_get::<Option<i64>, _>(column)?
        .map(millis_to_time)
        .transpose()
}

fn parse_column<T>(row: &SqliteRow, column: &str) -> Result<T, QueueError>
where
    T: std::str::FromStr<Err = QueueError>,
{
    row.try_get::<String, _>(column)?.parse()
}

pub(super) fn job_from_row(row: &SqliteRow) -> Result<JobRecord, QueueError> {
    Ok(JobRecord {
        id: JobId(id_column(row, "id")?),
        run_id: RunId(id_column(row, "run_id")?),
        key: row.try_get("job_key")?,
        payload: row.try_get::<Json<_>, _>("payload")?.0,
        model: ModelRef {
            id: row.try_get("model_id")?,
            revision: row.try_get("model_revision")?,
        },
        state: parse_column(row, "state")?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: optional_time_column(row, "lease_expires_at")?,
        run_after: time_column(row, "run_after")?,
        last_error: row.try_get("last_error")?,
        created_at: time_column(row, "created_at")?,
        first_started_at: optional_time_column(row, "first_started_at")?,
        started_at: optional_time_column(row, "started_at")?,
        finished_at: optional_time_column(row, "finished_at")?,
    })
}

pub(super) fn run_from_row(row: &SqliteRow) -> Result<RunRecord, QueueError> {
    Ok(RunRecord {
        id: RunId(id_column(row, "id")?),
        spec: row.try_get::<Json<_>, _>("spec")?.0,
        state: parse_column(row, "state")?,
        cancel_requested: row.try_get("cancel_requested")?,
        error: row.try_get("error")?,
        created_at: time_column(row, "created_at")?,
        finished_at: optional_time_column(row, "finished_at")?,
        finalized_at: optional_time_column(row, "finalized_at")?,
    })
}

pub(super) fn attempt_from_row(row: &SqliteRow) -> Result<AttemptRecord, QueueError> {
    let outcome = row.try_get::<Option<String>, _>("outcome")?;
    Ok(AttemptRecord {
        job_id: JobId(id_column(row, "job_id")?),
        attempt: row.try_get("attempt")?,
        worker_id: row.try_get("worker_id")?,
        started_at: time_column(row, "started_at")?,
        ended_at: optional_time_column(row, "ended_at")?,
        outcome: outcome.map(|outcome| outcome.parse()).transpose()?,
        error: row.try_get("error")?,
    })
}

pub(super) fn artifact_from_row(row: &SqliteRow) -> Result<ArtifactRecord, QueueError> {
    Ok(ArtifactRecord {
        run_id: RunId(id_column(row, "run_id")?),
        job_id: JobId(id_column(row, "job_id")?),
        attempt: row.try_get("attempt")?,
        artifact: ArtifactRow {
            key: row.try_get("artifact_key")?,
            size_bytes: row.try_get("size_bytes")?,
            sha256: row.try_get("sha256")?,
            prompt_set: row.try_get("prompt_set")?,
            prompt_id: row.try_get("prompt_id")?,
            mode: row.try_get("mode")?,
            layer: row.try_get("layer")?,
            prompt_tokens: row.try_get("prompt_tokens")?,
            response_tokens: row.try_get("response_tokens")?,
            shapes: row.try_get::<Json<_>, _>("shapes")?.0,
        },
        created_at: time_column(row, "created_at")?,
    })
}

pub(super) fn worker_from_row(row: &SqliteRow) -> Result<WorkerRecord, QueueError> {
    Ok(WorkerRecord {
        worker_id: row.try_get("id")?,
        model: ModelRef {
            id: row.try_get("model_id")?,
            revision: row.try_get("model_revision")?,
        },
        state: parse_column(row, "state")?,
        first_seen_at: time_column(row, "first_seen_at")?,
        last_seen_at: time_column(row, "last_seen_at")?,
    })
}
