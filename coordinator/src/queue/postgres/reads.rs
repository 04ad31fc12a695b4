//! Read-side queries of `PostgresQueue` (run status, listings) and the
//! workers table.

use sqlx::Row;

use super::{PostgresQueue, rows};
use crate::queue::{
    ArtifactRecord, AttemptRecord, JobCounts, JobId, JobRecord, QueueError, RunFilter, RunId,
    RunRecord, RunState, RunStatus, WorkerRecord, WorkerSeen,
};

/// A consistent, read-only snapshot for queries that read several tables.
const BEGIN_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";

impl PostgresQueue {
    pub(super) async fn read_job_counts(&self) -> Result<JobCounts, QueueError> {
        let mut counts = JobCounts::default();
        for row in sqlx::query("SELECT state, count(*) AS jobs FROM jobs GROUP BY state")
            .fetch_all(&self.pool)
            .await?
        {
            counts.add(
                row.try_get::<String, _>("state")?.parse()?,
                row.try_get("jobs")?,
            );
        }
        Ok(counts)
    }

    pub(super) async fn read_run_status(&self, run: RunId) -> Result<RunStatus, QueueError> {
        let mut tx = self.pool.begin_with(BEGIN_SNAPSHOT).await?;
        let run_row = sqlx::query("SELECT * FROM runs WHERE id = $1")
            .bind(run.0)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| QueueError::NotFound {
                what: "run",
                id: run.to_string(),
            })?;
        let mut jobs = JobCounts::default();
        for row in
            sqlx::query("SELECT state, count(*) AS jobs FROM jobs WHERE run_id = $1 GROUP BY state")
                .bind(run.0)
                .fetch_all(&mut *tx)
                .await?
        {
            jobs.add(
                row.try_get::<String, _>("state")?.parse()?,
                row.try_get("jobs")?,
            );
        }
        let totals = sqlx::query(
            "SELECT count(*) AS artifacts,
                 CAST(coalesce(sum(size_bytes), 0) AS BIGINT) AS artifact_bytes,
                 CAST(coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(response_tokens, 0)), 0) AS BIGINT) AS tokens,
                 (SELECT min(first_started_at) FROM jobs WHERE run_id = $1) AS started_at
             FROM artifacts WHERE run_id = $1",
        )
        .bind(run.0)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RunStatus {
            run: rows::run_from_row(&run_row)?,
            jobs,
            artifacts: totals.try_get("artifacts")?,
            artifact_bytes: totals.try_get("artifact_bytes")?,
            tokens_captured: totals.try_get("tokens")?,
            started_at: totals.try_get("started_at")?,
        })
    }

    pub(super) async fn read_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, QueueError> {
        sqlx::query(include_str!("list_runs.sql"))
            .bind(filter.experiment.as_deref())
            .bind(filter.state.map(RunState::as_str))
            .bind(i64::from(filter.limit))
            .bind(filter.model_id.as_deref())
            .bind(filter.model_revision.as_deref())
            .bind(filter.created_after)
            .bind(filter.created_before)
            .bind(filter.prompt_set.as_deref())
            .bind(filter.mode.as_deref())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::run_from_row)
            .collect()
    }

    pub(super) async fn read_job(&self, job: JobId) -> Result<JobRecord, QueueError> {
        let row = sqlx::query("SELECT * FROM jobs WHERE id = $1")
            .bind(job.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| QueueError::NotFound {
                what: "job",
                id: job.to_string(),
            })?;
        rows::job_from_row(&row)
    }

    pub(super) async fn read_jobs(&self, run: RunId) -> Result<Vec<JobRecord>, QueueError> {
        self.fetch_run(run).await?;
        sqlx::query("SELECT * FROM jobs WHERE run_id = $1 ORDER BY created_at, id")
            .bind(run.0)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::job_from_row)
            .collect()
    }

    pub(super) async fn read_attempts(&self, run: RunId) -> Result<Vec<AttemptRecord>, QueueError> {
        self.fetch_run(run).await?;
        sqlx::query(
            "SELECT attempts.* FROM attempts JOIN jobs ON jobs.id = attempts.job_id
             WHERE jobs.run_id = $1 ORDER BY attempts.job_id, attempts.attempt",
        )
        .bind(run.0)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(rows::attempt_from_row)
        .collect()
    }

    pub(super) async fn read_artifacts(
        &self,
        run: RunId,
    ) -> Result<Vec<ArtifactRecord>, QueueError> {
        self.fetch_run(run).await?;
        sqlx::query("SELECT * FROM artifacts WHERE run_id = $1 ORDER BY artifact_key")
            .bind(run.0)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::artifact_from_row)
            .collect()
    }

    pub(super) async fn upsert_worker(&self, worker: &WorkerSeen) -> Result<(), QueueError> {
        sqlx::query(
            "INSERT INTO workers (id, model_id, model_revision, state) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET model_id = excluded.model_id,
                 model_revision = excluded.model_revision, state = excluded.state, last_seen_at = now()",
        )
        .bind(&worker.worker_id)
        .bind(&worker.model.id)
        .bind(&worker.model.revision)
        .bind(worker.state.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn read_workers(&self) -> Result<Vec<WorkerRecord>, QueueError> {
        sqlx::query("SELECT * FROM workers ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::worker_from_row)
            .collect()
    }
}
