//! `PostgresQueue`: releasing a lease without a failure, and the run
//! finalization bookkeeping (manifest written, artifacts promoted).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::PostgresQueue;
use crate::queue::{JobId, QueueError, RunId};

impl PostgresQueue {
    pub(super) async fn release_lease(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        reason: &str,
    ) -> Result<RunId, QueueError> {
        let mut tx = self.pool.begin().await?;
        let run_id = sqlx::query_scalar::<_, Uuid>(
            "UPDATE jobs SET state = 'queued', run_after = now(), max_attempts = max_attempts + 1,
                 lease_owner = NULL, lease_expires_at = NULL
             WHERE id = $1 AND attempt = $2 AND lease_owner = $3 AND state = 'leased'
               AND lease_expires_at > now()
             RETURNING run_id",
        )
        .bind(job.0)
        .bind(attempt)
        .bind(worker_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(run_id) = run_id else {
            drop(tx);
            return Err(self.lease_lost_or_not_found(job, attempt, worker_id).await);
        };
        sqlx::query(
            "UPDATE attempts SET ended_at = now(), error = 'released: ' || $3 WHERE job_id = $1 AND attempt = $2",
        )
        .bind(job.0)
        .bind(attempt)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        Self::settle_run(&mut tx, run_id).await?;
        tx.commit().await?;
        Ok(RunId(run_id))
    }

    pub(super) async fn read_unfinalized_runs(&self) -> Result<Vec<RunId>, QueueError> {
        Ok(sqlx::query_scalar::<_, Uuid>(
            "SELECT id FROM runs WHERE state <> 'running' AND finalized_at IS NULL
             ORDER BY finished_at, id LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(RunId)
        .collect())
    }

    pub(super) async fn read_finalized_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<RunId>, QueueError> {
        Ok(sqlx::query_scalar::<_, Uuid>(
            "SELECT id FROM runs WHERE finalized_at >= $1 ORDER BY finalized_at DESC, id LIMIT 100",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(RunId)
        .collect())
    }

    pub(super) async fn write_finalized(&self, run: RunId) -> Result<(), QueueError> {
        let updated = sqlx::query(
            "UPDATE runs SET finalized_at = now() WHERE id = $1 AND state <> 'running'",
        )
        .bind(run.0)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            self.fetch_run(run).await?;
            return Err(QueueError::InvalidState(format!(
                "run {run} is still running: it cannot be finalized"
            )));
        }
        Ok(())
    }
}
