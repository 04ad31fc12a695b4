//! `PostgresQueue`: the job queue on PostgreSQL (the cluster backend).
//! Leases use the database clock (`now()`); claims use `FOR UPDATE SKIP
//! LOCKED` so concurrent workers never wait on each other's rows.

use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::types::Json;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{
    ArtifactRecord, ArtifactRow, AttemptRecord, CancelReport, ClaimedJob, CompletedJob, CreatedRun,
    FailedJob, JobCounts, JobId, JobQueue, JobRecord, JobState, LeaseStatus, ModelRef, NewJob,
    NewRun, QueueError, ReapReport, RetryPolicy, RunFilter, RunId, RunRecord, RunSpec, RunState,
    RunStatus, WorkerRecord, WorkerSeen, retry::duration_millis, validate_lease,
};

use super::migrations::POSTGRES_MIGRATOR;

mod finalize;
mod reads;
mod rows;
mod runs;

/// Most expired leases one reaper pass releases.
const REAP_BATCH_SIZE: i64 = 1000;

/// The job queue on a Postgres database.
#[derive(Debug, Clone)]
pub struct PostgresQueue {
    pool: PgPool,
    retry_policy: RetryPolicy,
}

/// What settling a run under its row lock found and did.
struct RunSettlement {
    cancel_requested: bool,
    run_finished: Option<RunState>,
}

impl PostgresQueue {
    /// Connects (16 pooled connections) and applies the migrations.
    pub async fn connect(database_url: &str) -> Result<Self, QueueError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(database_url)
            .await?;
        Self::from_pool(pool).await
    }

    /// Uses an existing pool, applying the migrations.
    pub async fn from_pool(pool: PgPool) -> Result<Self, QueueError> {
        POSTGRES_MIGRATOR.run(&pool).await?;
        Ok(Self {
            pool,
            retry_policy: RetryPolicy::default(),
        })
    }

    pub fn with_retry_policy(mut self, retry_policy: RetryPolicy) -> Self {
        self.retry_policy = retry_policy;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The error for a fenced statement that matched no row: the job is
    /// gone (`NotFound`) or the caller's lease is (`LeaseLost`).
    async fn lease_lost_or_not_found(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
    ) -> QueueError {
        let exists =
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = $1)")
                .bind(job.0)
                .fetch_one(&self.pool)
                .await;
        match exists {
            Ok(false) => QueueError::NotFound {
                what: "job",
                id: job.to_string(),
            },
            Ok(true) => {
                warn!(job_id = %job, attempt, worker_id, "lease lost: late result discarded");
                QueueError::LeaseLost { job, attempt }
            }
            Err(error) => error.into(),
        }
    }

    /// Locks the run row, cancels queued jobs of a cancelled run, and
    /// finishes the run if no job is left queued or leased. Every transaction
    /// that makes a job terminal (or may re-queue one) ends with this, so two
    /// concurrent last transitions of a run serialise on the run row and the
    /// later one sees the earlier one's job.
    async fn settle_run(
        connection: &mut PgConnection,
        run_id: Uuid,
    ) -> Result<RunSettlement, QueueError> {
        // NO KEY UPDATE: does not conflict with the KEY SHARE locks that
        // foreign keys (artifacts, jobs -> runs) take on the same row.
        let cancel_requested = sqlx::query_scalar::<_, bool>(
            "SELECT cancel_requested FROM runs WHERE id = $1 FOR NO KEY UPDATE",
        )
        .bind(run_id)
        .fetch_one(&mut *connection)
        .await?;
        if cancel_requested {
            sqlx::query(
                "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE run_id = $1 AND state = 'queued'",
            )
            .bind(run_id)
            .execute(&mut *connection)
            .await?;
        }
        let finished_state =
            sqlx::query_scalar::<_, String>(include_str!("postgres/finish_run.sql"))
                .bind(run_id)
                .fetch_optional(&mut *connection)
                .await?;
        let run_finished = finished_state
            .map(|state| state.parse::<RunState>())
            .transpose()?;
        if let Some(state) = run_finished {
            info!(run_id = %run_id, %state, "run finished");
        }
        Ok(RunSettlement {
            cancel_requested,
            run_finished,
        })
    }

    async fn fetch_run(&self, run: RunId) -> Result<RunRecord, QueueError> {
        let row = sqlx::query("SELECT * FROM runs WHERE id = $1")
            .bind(run.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| QueueError::NotFound {
                what: "run",
                id: run.to_string(),
            })?;
        rows::run_from_row(&row)
    }
}

impl JobQueue for PostgresQueue {
    async fn claim(
        &self,
        worker_id: &str,
        model: &ModelRef,
        lease: Duration,
    ) -> Result<Option<ClaimedJob>, QueueError> {
        let lease_millis = validate_lease(lease)?;
        let Some(row) = sqlx::query(include_str!("postgres/claim.sql"))
            .bind(worker_id)
            .bind(&model.id)
            .bind(&model.revision)
            .bind(lease_millis)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let job = rows::job_from_row(&row)?;
        let run_spec = row.try_get::<Json<RunSpec>, _>("run_spec")?.0;
        let lease_expires_at = job.lease_expires_at.ok_or_else(|| {
            QueueError::Corrupt(format!("claimed job {} has no lease expiry", job.id))
        })?;
        debug!(job_id = %job.id, run_id = %job.run_id, attempt = job.attempt, worker_id, "job claimed");
        Ok(Some(ClaimedJob {
            attempt: job.attempt,
            lease_expires_at,
            run_spec,
            job,
        }))
    }

    async fn heartbeat(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        lease: Duration,
    ) -> Result<LeaseStatus, QueueError> {
        let lease_millis = validate_lease(lease)?;
        let row = sqlx::query(
            "UPDATE jobs SET lease_expires_at = now() + $4::bigint * interval '1 millisecond'
             WHERE id = $1 AND attempt = $2 AND lease_owner = $3 AND state = 'leased'
               AND lease_expires_at > now()
             RETURNING lease_expires_at,
                 (SELECT cancel_requested FROM runs WHERE runs.id = jobs.run_id) AS cancel_requested",
        )
        .bind(job.0)
        .bind(attempt)
        .bind(worker_id)
        .bind(lease_millis)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(self.lease_lost_or_not_found(job, attempt, worker_id).await);
        };
        Ok(LeaseStatus {
            lease_expires_at: row.try_get("lease_expires_at")?,
            cancel_requested: row.try_get("cancel_requested")?,
        })
    }

    async fn complete(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        artifacts: &[ArtifactRow],
    ) -> Result<CompletedJob, QueueError> {
        let mut tx = self.pool.begin().await?;
        let run_id = sqlx::query_scalar::<_, Uuid>(
            "UPDATE jobs SET state = 'succeeded', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL
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
            "UPDATE attempts SET ended_at = now(), outcome = 'succeeded' WHERE job_id = $1 AND attempt = $2",
        )
        .bind(job.0)
        .bind(attempt)
        .execute(&mut *tx)
        .await?;
        for artifact in artifacts {
            sqlx::query(include_str!("postgres/insert_artifact.sql"))
                .bind(run_id)
                .bind(job.0)
                .bind(attempt)
                .bind(&artifact.key)
                .bind(artifact.size_bytes)
                .bind(&artifact.sha256)
                .bind(&artifact.prompt_set)
                .bind(&artifact.prompt_id)
                .bind(&artifact.mode)
                .bind(artifact.layer)
                .bind(artifact.prompt_tokens)
                .bind(artifact.response_tokens)
                .bind(Json(&artifact.shapes))
                .execute(&mut *tx)
                .await?;
        }
        let settlement = Self::settle_run(&mut tx, run_id).await?;
        tx.commit().await?;
        debug!(job_id = %job, run_id = %run_id, attempt, worker_id, artifacts = artifacts.len(), "job completed");
        Ok(CompletedJob {
            run_id: RunId(run_id),
            run_finished: settlement.run_finished,
        })
    }

    async fn fail(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        error: &str,
        retryable: bool,
    ) -> Result<FailedJob, QueueError> {
        let backoff = self.retry_policy.backoff_after(attempt);
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(include_str!("postgres/fail.sql"))
            .bind(job.0)
            .bind(attempt)
            .bind(worker_id)
            .bind(retryable)
            .bind(duration_millis(backoff))
            .bind(error)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            drop(tx);
            return Err(self.lease_lost_or_not_found(job, attempt, worker_id).await);
        };
        let run_id: Uuid = row.try_get("run_id")?;
        let mut state: JobState = row.try_get::<String, _>("state")?.parse()?;
        sqlx::query(
            "UPDATE attempts SET ended_at = now(), outcome = 'failed', error = $3 WHERE job_id = $1 AND attempt = $2",
        )
        .bind(job.0)
        .bind(attempt)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        let settlement = Self::settle_run(&mut tx, run_id).await?;
        tx.commit().await?;
        if state == JobState::Queued && settlement.cancel_requested {
            state = JobState::Cancelled;
        }
        let retry_at = (state == JobState::Queued)
            .then(|| row.try_get("run_after"))
            .transpose()?;
        warn!(job_id = %job, run_id = %run_id, attempt, worker_id, retryable, %state, error, "job attempt failed");
        Ok(FailedJob {
            run_id: RunId(run_id),
            state,
            retry_at,
            run_finished: settlement.run_finished,
        })
    }

    async fn release(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        reason: &str,
    ) -> Result<RunId, QueueError> {
        self.release_lease(job, attempt, worker_id, reason).await
    }

    async fn unfinalized_runs(&self) -> Result<Vec<RunId>, QueueError> {
        self.read_unfinalized_runs().await
    }

    async fn finalized_since(&self, since: DateTime<Utc>) -> Result<Vec<RunId>, QueueError> {
        self.read_finalized_since(since).await
    }

    async fn mark_finalized(&self, run: RunId) -> Result<(), QueueError> {
        self.write_finalized(run).await
    }

    async fn reap_expired(&self) -> Result<ReapReport, QueueError> {
        let mut tx = self.pool.begin().await?;
        let released = sqlx::query(include_str!("postgres/reap.sql"))
            .bind(REAP_BATCH_SIZE)
            .fetch_all(&mut *tx)
            .await?;
        let mut report = ReapReport::default();
        let mut runs = BTreeSet::new();
        for row in &released {
            let job_id: Uuid = row.try_get("id")?;
            let attempt: i32 = row.try_get("attempt")?;
            let state: JobState = row.try_get::<String, _>("state")?.parse()?;
            match state {
                JobState::Dead => report.dead += 1,
                _ => report.requeued += 1,
            }
            warn!(job_id = %job_id, attempt, %state, "lease expired: job released");
            runs.insert(row.try_get::<Uuid, _>("run_id")?);
        }
        // Lock runs in id order so concurrent reapers cannot deadlock.
        for run_id in runs {
            Self::settle_run(&mut tx, run_id).await?;
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn create_run(&self, run: &NewRun, jobs: &[NewJob]) -> Result<CreatedRun, QueueError> {
        self.insert_run_and_jobs(run, jobs).await
    }

    async fn cancel_run(&self, run: RunId) -> Result<CancelReport, QueueError> {
        self.request_cancel(run).await
    }

    async fn retry_run(&self, run: RunId) -> Result<u64, QueueError> {
        self.requeue_dead_jobs(run).await
    }

    async fn job_counts(&self) -> Result<JobCounts, QueueError> {
        self.read_job_counts().await
    }

    async fn get_run(&self, run: RunId) -> Result<RunRecord, QueueError> {
        self.fetch_run(run).await
    }

    async fn run_status(&self, run: RunId) -> Result<RunStatus, QueueError> {
        self.read_run_status(run).await
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, QueueError> {
        self.read_runs(filter).await
    }

    async fn get_job(&self, job: JobId) -> Result<JobRecord, QueueError> {
        self.read_job(job).await
    }

    async fn list_jobs(&self, run: RunId) -> Result<Vec<JobRecord>, QueueError> {
        self.read_jobs(run).await
    }

    async fn list_attempts(&self, run: RunId) -> Result<Vec<AttemptRecord>, QueueError> {
        self.read_attempts(run).await
    }

    async fn list_artifacts(&self, run: RunId) -> Result<Vec<ArtifactRecord>, QueueError> {
        self.read_artifacts(run).await
    }

    async fn record_worker(&self, worker: &WorkerSeen) -> Result<(), QueueError> {
        self.upsert_worker(worker).await
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRecord>, QueueError> {
        self.read_workers().await
    }
}
