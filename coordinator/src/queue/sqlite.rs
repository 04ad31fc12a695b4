//! `SqliteQueue`: the job queue in one SQLite file (the embedded default),
//! with the same semantics as Postgres. SQLite serialises writers: every
//! write is a `BEGIN IMMEDIATE` transaction, so a claim's read and write
//! cannot interleave with another's. Times are unix milliseconds from the
//! coordinator's clock, taken once the write lock is held.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::{Connection, Row};
use tracing::{debug, info, warn};

use super::{
    ArtifactRecord, ArtifactRow, AttemptRecord, CancelReport, ClaimedJob, CompletedJob, CreatedRun,
    FailedJob, JobCounts, JobId, JobQueue, JobRecord, JobState, LeaseStatus, ModelRef, NewJob,
    NewRun, QueueError, ReapReport, RetryPolicy, RunFilter, RunId, RunRecord, RunSpec, RunState,
    RunStatus, WorkerRecord, WorkerSeen, retry::duration_millis, validate_lease,
};

use super::migrations::SQLITE_MIGRATOR;

mod finalize;
mod reads;
mod rows;
mod runs;

use rows::{id_text, millis_to_time};

/// Starts a write transaction holding SQLite's write lock from the start.
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// The job queue in a SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteQueue {
    pool: SqlitePool,
    retry_policy: RetryPolicy,
    /// For an in-memory database, a connection outside the pool that keeps
    /// it alive: SQLite drops an in-memory database with its last
    /// connection, and the pool may close its one connection (a query
    /// cancelled midway, as when a client hangs up), after which the next
    /// would open a new, empty database.
    _keeper: Option<Arc<Mutex<SqliteConnection>>>,
}

fn now_millis() -> i64 {
    Utc::now().timestamp_millis()
}

impl SqliteQueue {
    /// Opens `sqlite://PATH?mode=rwc` (WAL, 4 pooled connections) or an
    /// in-memory database (one pooled connection, and one more that keeps
    /// the database alive), and applies the migrations.
    pub async fn connect(database_url: &str) -> Result<Self, QueueError> {
        let in_memory = database_url.contains(":memory:") || database_url.contains("mode=memory");
        let mut options = SqliteConnectOptions::from_str(database_url)?
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let mut pool_options = SqlitePoolOptions::new().acquire_timeout(Duration::from_secs(30));
        if in_memory {
            // Every connection would see its own empty database: keep one.
            pool_options = pool_options
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        } else {
            options = options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal);
            pool_options = pool_options.max_connections(4);
        }
        let keeper = if in_memory {
            let keeper = SqliteConnection::connect_with(&options).await?;
            Some(Arc::new(Mutex::new(keeper)))
        } else {
            None
        };
        let pool = pool_options.connect_with(options).await?;
        Ok(Self {
            _keeper: keeper,
            ..Self::from_pool(pool).await?
        })
    }

    /// Uses an existing pool, applying the migrations.
    pub async fn from_pool(pool: SqlitePool) -> Result<Self, QueueError> {
        SQLITE_MIGRATOR.run(&pool).await?;
        Ok(Self {
            pool,
            retry_policy: RetryPolicy::default(),
            _keeper: None,
        })
    }

    pub fn with_retry_policy(mut self, retry_policy: RetryPolicy) -> Self {
        self.retry_policy = retry_policy;
        self
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn lease_lost_or_not_found(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
    ) -> QueueError {
        let exists =
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = ?1)")
                .bind(id_text(job.0))
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

    /// Cancels queued jobs of a cancelled run and finishes the run if no job
    /// is left queued or leased; returns (cancel requested, final state).
    async fn settle_run(
        connection: &mut SqliteConnection,
        run_id: &str,
        now: i64,
    ) -> Result<(bool, Option<RunState>), QueueError> {
        let cancel_requested =
            sqlx::query_scalar::<_, bool>("SELECT cancel_requested FROM runs WHERE id = ?1")
                .bind(run_id)
                .fetch_one(&mut *connection)
                .await?;
        if cancel_requested {
            sqlx::query(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?2 WHERE run_id = ?1 AND state = 'queued'",
            )
            .bind(run_id)
            .bind(now)
            .execute(&mut *connection)
            .await?;
        }
        let finished_state = sqlx::query_scalar::<_, String>(include_str!("sqlite/finish_run.sql"))
            .bind(run_id)
            .bind(now)
            .fetch_optional(&mut *connection)
            .await?;
        let run_finished = finished_state
            .map(|state| state.parse::<RunState>())
            .transpose()?;
        if let Some(state) = run_finished {
            info!(run_id, %state, "run finished");
        }
        Ok((cancel_requested, run_finished))
    }

    async fn fetch_run(&self, run: RunId) -> Result<RunRecord, QueueError> {
        let row = sqlx::query("SELECT * FROM runs WHERE id = ?1")
            .bind(id_text(run.0))
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| QueueError::NotFound {
                what: "run",
                id: run.to_string(),
            })?;
        rows::run_from_row(&row)
    }
}

impl JobQueue for SqliteQueue {
    async fn claim(
        &self,
        worker_id: &str,
        model: &ModelRef,
        lease: Duration,
    ) -> Result<Option<ClaimedJob>, QueueError> {
        let lease_millis = validate_lease(lease)?;
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let now = now_millis();
        let Some(row) = sqlx::query(include_str!("sqlite/claim.sql"))
            .bind(worker_id)
            .bind(&model.id)
            .bind(&model.revision)
            .bind(now)
            .bind(lease_millis)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let job = rows::job_from_row(&row)?;
        sqlx::query(
            "INSERT INTO attempts (job_id, attempt, worker_id, started_at) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(id_text(job.id.0))
        .bind(job.attempt)
        .bind(worker_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let run_spec =
            sqlx::query_scalar::<_, Json<RunSpec>>("SELECT spec FROM runs WHERE id = ?1")
                .bind(id_text(job.run_id.0))
                .fetch_one(&mut *tx)
                .await?
                .0;
        tx.commit().await?;
        debug!(job_id = %job.id, run_id = %job.run_id, attempt = job.attempt, worker_id, "job claimed");
        Ok(Some(ClaimedJob {
            attempt: job.attempt,
            lease_expires_at: millis_to_time(now + lease_millis)?,
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
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let now = now_millis();
        let row = sqlx::query(
            "UPDATE jobs SET lease_expires_at = ?4 + ?5
             WHERE id = ?1 AND attempt = ?2 AND lease_owner = ?3 AND state = 'leased'
               AND lease_expires_at > ?4
             RETURNING lease_expires_at,
                 (SELECT cancel_requested FROM runs WHERE runs.id = jobs.run_id) AS cancel_requested",
        )
        .bind(id_text(job.0))
        .bind(attempt)
        .bind(worker_id)
        .bind(now)
        .bind(lease_millis)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        let Some(row) = row else {
            return Err(self.lease_lost_or_not_found(job, attempt, worker_id).await);
        };
        Ok(LeaseStatus {
            lease_expires_at: millis_to_time(row.try_get("lease_expires_at")?)?,
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
        let job_id = id_text(job.0);
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let now = now_millis();
        let run_id = sqlx::query_scalar::<_, String>(
            "UPDATE jobs SET state = 'succeeded', finished_at = ?4, lease_owner = NULL, lease_expires_at = NULL
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
        sqlx::query("UPDATE attempts SET ended_at = ?3, outcome = 'succeeded' WHERE job_id = ?1 AND attempt = ?2")
            .bind(&job_id)
            .bind(attempt)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        for artifact in artifacts {
            sqlx::query(include_str!("sqlite/insert_artifact.sql"))
                .bind(&run_id)
                .bind(&job_id)
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
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        let (_, run_finished) = Self::settle_run(&mut tx, &run_id, now).await?;
        tx.commit().await?;
        debug!(job_id = %job, run_id, attempt, worker_id, artifacts = artifacts.len(), "job completed");
        Ok(CompletedJob {
            run_id: RunId(rows::parse_id(&run_id)?),
            run_finished,
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
        let job_id = id_text(job.0);
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let now = now_millis();
        let row = sqlx::query(include_str!("sqlite/fail.sql"))
            .bind(&job_id)
            .bind(attempt)
            .bind(worker_id)
            .bind(retryable)
            .bind(duration_millis(backoff))
            .bind(error)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Err(self.lease_lost_or_not_found(job, attempt, worker_id).await);
        };
        let run_id: String = row.try_get("run_id")?;
        let mut state: JobState = row.try_get::<String, _>("state")?.parse()?;
        sqlx::query(
            "UPDATE attempts SET ended_at = ?3, outcome = 'failed', error = ?4 WHERE job_id = ?1 AND attempt = ?2",
        )
        .bind(&job_id)
        .bind(attempt)
        .bind(now)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        let (cancel_requested, run_finished) = Self::settle_run(&mut tx, &run_id, now).await?;
        tx.commit().await?;
        if state == JobState::Queued && cancel_requested {
            state = JobState::Cancelled;
        }
        let retry_at = if state == JobState::Queued {
            Some(millis_to_time(row.try_get("run_after")?)?)
        } else {
            None
        };
        warn!(job_id = %job, run_id, attempt, worker_id, retryable, %state, error, "job attempt failed");
        Ok(FailedJob {
            run_id: RunId(rows::parse_id(&run_id)?),
            state,
            retry_at,
            run_finished,
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
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let now = now_millis();
        let released = sqlx::query(include_str!("sqlite/reap.sql"))
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        let mut report = ReapReport::default();
        let mut runs = BTreeSet::new();
        for row in &released {
            let job_id: String = row.try_get("id")?;
            let attempt: i32 = row.try_get("attempt")?;
            let state: JobState = row.try_get::<String, _>("state")?.parse()?;
            sqlx::query(
                "UPDATE attempts SET ended_at = ?3, outcome = 'lease_expired', error = ?4
                 WHERE job_id = ?1 AND attempt = ?2",
            )
            .bind(&job_id)
            .bind(attempt)
            .bind(now)
            .bind(row.try_get::<String, _>("last_error")?)
            .execute(&mut *tx)
            .await?;
            match state {
                JobState::Dead => report.dead += 1,
                _ => report.requeued += 1,
            }
            warn!(job_id, attempt, %state, "lease expired: job released");
            runs.insert(row.try_get::<String, _>("run_id")?);
        }
        for run_id in runs {
            Self::settle_run(&mut tx, &run_id, now).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool's one connection closed (as a query cancelled midway can
    /// have it): the next one finds the same in-memory database.
    #[tokio::test]
    async fn an_in_memory_queue_outlives_its_pooled_connection() {
        let queue = SqliteQueue::connect("sqlite::memory:").await.unwrap();
        sqlx::query("CREATE TABLE marker (x INTEGER)")
            .execute(queue.pool())
            .await
            .unwrap();
        sqlx::query("INSERT INTO marker VALUES (7)")
            .execute(queue.pool())
            .await
            .unwrap();
        queue.pool().acquire().await.unwrap().close().await.unwrap();
        let marker: i64 = sqlx::query_scalar("SELECT x FROM marker")
            .fetch_one(queue.pool())
            .await
            .unwrap();
        assert_eq!(marker, 7);
        let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs")
            .fetch_one(queue.pool())
            .await
            .unwrap();
        assert_eq!(runs, 0);
    }
}
