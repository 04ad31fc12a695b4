//! Run-level operations of `PostgresQueue`: creating a run with its jobs,
//! cancelling it, and re-queueing its dead jobs; each one transaction that
//! holds the run row's lock.

use sqlx::Row;
use sqlx::types::Json;
use tracing::info;

use super::PostgresQueue;
use crate::queue::{
    CancelReport, CreatedRun, JobId, NewJob, NewRun, QueueError, RunId, RunSpec, RunState,
    validate_new_jobs,
};

impl PostgresQueue {
    pub(super) async fn insert_run_and_jobs(
        &self,
        run: &NewRun,
        jobs: &[NewJob],
    ) -> Result<CreatedRun, QueueError> {
        validate_new_jobs(jobs)?;
        let spec = &run.spec;
        let mut tx = self.pool.begin().await?;
        let run_created = sqlx::query(
            "INSERT INTO runs (id, experiment, spec, model_id, model_revision)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(run.id.0)
        .bind(&spec.experiment)
        .bind(Json(spec))
        .bind(&spec.model.id)
        .bind(&spec.model.revision)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        // why an existing run cannot take jobs it does not have yet
        let mut closed_to_new_jobs = None;
        if !run_created {
            let row = sqlx::query(
                "SELECT spec, state, cancel_requested FROM runs WHERE id = $1 FOR NO KEY UPDATE",
            )
            .bind(run.id.0)
            .fetch_one(&mut *tx)
            .await?;
            let stored_spec = row.try_get::<Json<RunSpec>, _>("spec")?.0;
            if &stored_spec != spec {
                return Err(QueueError::Conflict(format!(
                    "run {} exists with another spec: submit with a new run id",
                    run.id
                )));
            }
            let state: RunState = row.try_get::<String, _>("state")?.parse()?;
            if state != RunState::Running {
                closed_to_new_jobs = Some(format!("already {state}"));
            } else if row.try_get::<bool, _>("cancel_requested")? {
                closed_to_new_jobs = Some("cancelled".to_owned());
            }
        }
        let mut jobs_inserted = 0;
        for job in jobs {
            jobs_inserted += sqlx::query(
                "INSERT INTO jobs (id, run_id, job_key, payload, model_id, model_revision, max_attempts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (run_id, job_key) DO NOTHING",
            )
            .bind(JobId::new_time_ordered().0)
            .bind(run.id.0)
            .bind(&job.key)
            .bind(Json(&job.payload))
            .bind(&spec.model.id)
            .bind(&spec.model.revision)
            .bind(self.retry_policy.max_attempts)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        if let Some(reason) = closed_to_new_jobs.filter(|_| jobs_inserted > 0) {
            return Err(QueueError::InvalidState(format!(
                "run {} is {reason}: new jobs cannot join it; submit a new run",
                run.id
            )));
        }
        tx.commit().await?;
        let jobs_existing = jobs.len() as u64 - jobs_inserted;
        info!(run_id = %run.id, run_created, jobs_inserted, jobs_existing, "run created");
        Ok(CreatedRun {
            run_id: run.id,
            run_created,
            jobs_inserted,
            jobs_existing,
        })
    }

    pub(super) async fn request_cancel(&self, run: RunId) -> Result<CancelReport, QueueError> {
        let mut tx = self.pool.begin().await?;
        let state = sqlx::query_scalar::<_, String>(
            "UPDATE runs SET cancel_requested = true WHERE id = $1 RETURNING state",
        )
        .bind(run.0)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| QueueError::NotFound {
            what: "run",
            id: run.to_string(),
        })?;
        let state: RunState = state.parse()?;
        if matches!(state, RunState::Succeeded | RunState::Failed) {
            return Err(QueueError::InvalidState(format!(
                "run {run} already {state}: nothing to cancel"
            )));
        }
        let queued_jobs_cancelled = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE run_id = $1 AND state = 'queued'",
        )
        .bind(run.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let leased_jobs_flagged = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM jobs WHERE run_id = $1 AND state = 'leased'",
        )
        .bind(run.0)
        .fetch_one(&mut *tx)
        .await?;
        let settlement = Self::settle_run(&mut tx, run.0).await?;
        tx.commit().await?;
        let run_state = settlement.run_finished.unwrap_or(state);
        info!(run_id = %run, queued_jobs_cancelled, leased_jobs_flagged, %run_state, "run cancel requested");
        Ok(CancelReport {
            queued_jobs_cancelled,
            leased_jobs_flagged: leased_jobs_flagged as u64,
            run_state,
        })
    }

    pub(super) async fn requeue_dead_jobs(&self, run: RunId) -> Result<u64, QueueError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT cancel_requested FROM runs WHERE id = $1 FOR NO KEY UPDATE")
            .bind(run.0)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| QueueError::NotFound {
                what: "run",
                id: run.to_string(),
            })?;
        if row.try_get::<bool, _>("cancel_requested")? {
            return Err(QueueError::InvalidState(format!(
                "run {run} was cancelled: submit it again instead of retrying"
            )));
        }
        let requeued = sqlx::query(
            "UPDATE jobs SET state = 'queued', max_attempts = attempt + $2, run_after = now(), finished_at = NULL
             WHERE run_id = $1 AND state = 'dead'",
        )
        .bind(run.0)
        .bind(self.retry_policy.max_attempts)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if requeued > 0 {
            sqlx::query(
                "UPDATE runs SET state = 'running', error = NULL, finished_at = NULL WHERE id = $1",
            )
            .bind(run.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        info!(run_id = %run, requeued, "dead jobs requeued");
        Ok(requeued)
    }
}
