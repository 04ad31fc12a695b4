//! `SqliteQueue`: releasing a lease without a failure, and the run
//! finalization bookkeeping (manifest written, artifacts promoted).

use super::{BEGIN_WRITE, SqliteQueue, now_millis, rows};
use crate::queue::{JobId, QueueError, RunId};
use chrono::{DateTime, Utc};
use rows::id_text;

impl SqliteQueue {
    pub(super) async fn release_lease(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        reason: &str,
    ) -> Result<RunId, QueueError> {
        let job_id = id_text(job.0);
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let now = now_millis();
        let run_id = sqlx::query_scalar::<_, String>(
            "UPDATE jobs SET state = 'queued', run_after = ?4, max_attempts = max_attempts + 1,
                 lease_owner = NULL, lease_expires_at = NULL
             WHERE id = ?1 AND attempt = ?2 AND lease_owner = ?3 AND state = 'leased'
               AND lease_expires_at > ?4
             RETURNING run_id",
        )
        .bind(&job_id)
        .bind(attempt)
        .bind(worker_id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(run_id) = run_id else {
            tx.rollback().await?;
            return Err(self.lease_lost_or_not_found(job, attempt, worker_id).await);
        };
        sqlx::query(
            "UPDATE attempts SET ended_at = ?3, error = 'released: ' || ?4 WHERE job_id = ?1 AND attempt = ?2",
        )
        .bind(&job_id)
        .bind(attempt)
        .bind(now)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        Self::settle_run(&mut tx, &run_id, now).await?;
        tx.commit().await?;
        Ok(RunId(rows::parse_id(&run_id)?))
    }

    pub(super) async fn read_unfinalized_runs(&self) -> Result<Vec<RunId>, QueueError> {
        sqlx::query_scalar::<_, String>(
            "SELECT id FROM runs WHERE state <> 'running' AND finalized_at IS NULL
             ORDER BY finished_at, id LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|id| rows::parse_id(id).map(RunId))
        .collect()
    }

    pub(super) async fn read_finalized_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<RunId>, QueueError> {
        sqlx::query_scalar::<_, String>(
            "SELECT id FROM runs WHERE finalized_at >= ?1 ORDER BY finalized_at DESC, id LIMIT 100",
        )
        .bind(since.timestamp_millis())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|id| rows::parse_id(id).map(RunId))
        .collect()
    }

    pub(super) async fn write_finalized(&self, run: RunId) -> Result<(), QueueError> {
        let updated =
            sqlx::query("UPDATE runs SET finalized_at = ?2 WHERE id = ?1 AND state <> 'running'")
                .bind(id_text(run.0))
                .bind(now_millis())
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
