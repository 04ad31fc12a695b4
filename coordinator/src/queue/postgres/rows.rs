//! Decoding Postgres rows of the queue tables into the queue's types.

use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;

use crate::queue::{
    ArtifactRecord, ArtifactRow, AttemptRecord, JobId, JobRecord, ModelRef, QueueError, RunId,
    RunRecord, WorkerRecord,
};

fn parse_column<T>(row: &PgRow, column: &str) -> Result<T, QueueError>
where
    T: std::str::FromStr<Err = QueueError>,
{
    row.try_get::<String, _>(column)?.parse()
}

pub(super) fn job_from_row(row: &PgRow) -> Result<JobRecord, QueueError> {
    Ok(JobRecord {
        id: JobId(row.try_get("id")?),
        run_id: RunId(row.try_get("run_id")?),
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
        lease_expires_at: row.try_get("lease_expires_at")?,
        run_after: row.try_get("run_after")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        first_started_at: row.try_get("first_started_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

pub(super) fn run_from_row(row: &PgRow) -> Result<RunRecord, QueueError> {
    Ok(RunRecord {
        id: RunId(row.try_get("id")?),
        spec: row.try_get::<Json<_>, _>("spec")?.0,
        state: parse_column(row, "state")?,
        cancel_requested: row.try_get("cancel_requested")?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get("finished_at")?,
        finalized_at: row.try_get("finalized_at")?,
    })
}

pub(super) fn attempt_from_row(row: &PgRow) -> Result<AttemptRecord, QueueError> {
    let outcome = row.try_get::<Option<String>, _>("outcome")?;
    Ok(AttemptRecord {
        job_id: JobId(row.try_get("job_id")?),
        attempt: row.try_get("attempt")?,
        worker_id: row.try_get("worker_id")?,
        started_at: row.try_get("started_at")?,
        ended_at: row.try_get("ended_at")?,
        outcome: outcome.map(|outcome| outcome.parse()).transpose()?,
        error: row.try_get("error")?,
    })
}

pub(super) fn artifact_from_row(row: &PgRow) -> Result<ArtifactRecord, QueueError> {
    Ok(ArtifactRecord {
        run_id: RunId(row.try_get("run_id")?),
        job_id: JobId(row.try_get("job_id")?),
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
        created_at: row.try_get("created_at")?,
    })
}

pub(super) fn worker_from_row(row: &PgRow) -> Result<WorkerRecord, QueueError> {
    Ok(WorkerRecord {
        worker_id: row.try_get("id")?,
        model: ModelRef {
            id: row.try_get("model_id")?,
            revision: row.try_get("model_revision")?,
        },
        state: parse_column(row, "state")?,
        first_seen_at: row.try_get("first_seen_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
    })
}
