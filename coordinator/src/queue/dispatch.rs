//! `Queue`: the job queue behind a database URL, Postgres or SQLite, with
//! its migrations applied; forwards every `JobQueue` call to the backend.

use chrono::{DateTime, Utc};
use std::time::Duration;

use super::{
    ArtifactRecord, ArtifactRow, AttemptRecord, CancelReport, ClaimedJob, CompletedJob, CreatedRun,
    FailedJob, JobCounts, JobId, JobQueue, JobRecord, LeaseStatus, ModelRef, NewJob, NewRun,
    PostgresQueue, QueueError, ReapReport, RetryPolicy, RunFilter, RunId, RunRecord, RunStatus,
    SqliteQueue, WorkerRecord, WorkerSeen,
};

/// The job queue of one database, chosen by URL scheme.
#[derive(Debug, Clone)]
pub enum Queue {
    Postgres(PostgresQueue),
    Sqlite(SqliteQueue),
}

impl Queue {
    /// Connects to `database_url` and applies the embedded migrations:
    /// `postgres://user:pass@host/db` (or `postgresql://`) for the cluster,
    /// `sqlite://path/to/file.db?mode=rwc` (or `sqlite::memory:`) embedded.
    pub async fn connect(database_url: &str) -> Result<Self, QueueError> {
        if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
            return Ok(Self::Postgres(PostgresQueue::connect(database_url).await?));
        }
        if database_url.starts_with("sqlite:") {
            return Ok(Self::Sqlite(SqliteQueue::connect(database_url).await?));
        }
        let scheme = database_url.split(':').next().unwrap_or_default();
        Err(QueueError::InvalidArgument(format!(
            "unsupported database URL scheme {scheme:?}: use postgres://USER:PASS@HOST/DB or sqlite://PATH?mode=rwc"
        )))
    }

    /// The same queue with another retry policy.
    pub fn with_retry_policy(self, retry_policy: RetryPolicy) -> Self {
        match self {
            Self::Postgres(queue) => Self::Postgres(queue.with_retry_policy(retry_policy)),
            Self::Sqlite(queue) => Self::Sqlite(queue.with_retry_policy(retry_policy)),
        }
    }

    /// `"postgres"` or `"sqlite"`, for logs.
    pub fn backend_name(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite(_) => "sqlite",
        }
    }
}

impl From<PostgresQueue> for Queue {
    fn from(queue: PostgresQueue) -> Self {
        Self::Postgres(queue)
    }
}

impl From<SqliteQueue> for Queue {
    fn from(queue: SqliteQueue) -> Self {
        Self::Sqlite(queue)
    }
}

macro_rules! forward {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Queue::Postgres(queue) => queue.$method($($arg),*).await,
            Queue::Sqlite(queue) => queue.$method($($arg),*).await,
        }
    };
}

impl JobQueue for Queue {
    async fn create_run(&self, run: &NewRun, jobs: &[NewJob]) -> Result<CreatedRun, QueueError> {
        forward!(self.create_run(run, jobs))
    }

    async fn claim(
        &self,
        worker_id: &str,
        model: &ModelRef,
        lease: Duration,
    ) -> Result<Option<ClaimedJob>, QueueError> {
        forward!(self.claim(worker_id, model, lease))
    }

    async fn heartbeat(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        lease: Duration,
    ) -> Result<LeaseStatus, QueueError> {
        forward!(self.heartbeat(job, attempt, worker_id, lease))
    }

    async fn complete(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        artifacts: &[ArtifactRow],
    ) -> Result<CompletedJob, QueueError> {
        forward!(self.complete(job, attempt, worker_id, artifacts))
    }

    async fn fail(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        error: &str,
        retryable: bool,
    ) -> Result<FailedJob, QueueError> {
        forward!(self.fail(job, attempt, worker_id, error, retryable))
    }

    async fn release(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        reason: &str,
    ) -> Result<RunId, QueueError> {
        forward!(self.release(job, attempt, worker_id, reason))
    }

    async fn unfinalized_runs(&self) -> Result<Vec<RunId>, QueueError> {
        forward!(self.unfinalized_runs())
    }

    async fn finalized_since(&self, since: DateTime<Utc>) -> Result<Vec<RunId>, QueueError> {
        forward!(self.finalized_since(since))
    }

    async fn mark_finalized(&self, run: RunId) -> Result<(), QueueError> {
        forward!(self.mark_finalized(run))
    }

    async fn reap_expired(&self) -> Result<ReapReport, QueueError> {
        forward!(self.reap_expired())
    }

    async fn cancel_run(&self, run: RunId) -> Result<CancelReport, QueueError> {
        forward!(self.cancel_run(run))
    }

    async fn retry_run(&self, run: RunId) -> Result<u64, QueueError> {
        forward!(self.retry_run(run))
    }

    async fn job_counts(&self) -> Result<JobCounts, QueueError> {
        forward!(self.job_counts())
    }

    async fn get_run(&self, run: RunId) -> Result<RunRecord, QueueError> {
        forward!(self.get_run(run))
    }

    async fn run_status(&self, run: RunId) -> Result<RunStatus, QueueError> {
        forward!(self.run_status(run))
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, QueueError> {
        forward!(self.list_runs(filter))
    }

    async fn get_job(&self, job: JobId) -> Result<JobRecord, QueueError> {
        forward!(self.get_job(job))
    }

    async fn list_jobs(&self, run: RunId) -> Result<Vec<JobRecord>, QueueError> {
        forward!(self.list_jobs(run))
    }

    async fn list_attempts(&self, run: RunId) -> Result<Vec<AttemptRecord>, QueueError> {
        forward!(self.list_attempts(run))
    }

    async fn list_artifacts(&self, run: RunId) -> Result<Vec<ArtifactRecord>, QueueError> {
        forward!(self.list_artifacts(run))
    }

    async fn record_worker(&self, worker: &WorkerSeen) -> Result<(), QueueError> {
        forward!(self.record_worker(worker))
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRecord>, QueueError> {
        forward!(self.list_workers())
    }
}
