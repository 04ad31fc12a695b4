//! The coordinator's durable job queue: the `JobQueue` trait, its Postgres
//! (cluster) and SQLite (embedded) implementations, and `Queue`, which picks
//! one by database URL.
//!
//! # Leases and fencing
//!
//! `claim` hands out the oldest claimable job for the worker's model in one
//! atomic step that sets `state = leased`, bumps `attempt`, records the owner
//! and the lease expiry, and inserts the attempt's row in `attempts`. The
//! triple `(job, attempt, worker)` is the lease. `heartbeat`, `complete` and
//! `fail` only act on a row that still matches it — `attempt`, `lease_owner`,
//! `state = 'leased'` and an unexpired `lease_expires_at` — and report
//! [`QueueError::LeaseLost`] when none does, changing nothing. A late
//! worker's result is discarded, never merged. `reap_expired` re-queues jobs
//! whose lease expired (the next claim bumps the attempt, fencing the old
//! holder out) or marks them dead once their attempts are spent.
//!
//! A completion and its artifact rows commit in one transaction. Whenever a
//! job becomes terminal, the same transaction locks the run row and, if no
//! job is left queued or leased, moves the run to `succeeded`, `failed` (some
//! job dead) or `cancelled`.

use chrono::{DateTime, Utc};
use std::future::Future;
use std::time::Duration;

pub mod error;
pub mod migrations;
pub mod model;
pub mod postgres;
pub mod retry;
pub mod sqlite;

pub use error::QueueError;
pub use model::{
    ArtifactRecord, ArtifactRow, AttemptOutcome, AttemptRecord, CancelReport, CaptureMode,
    ClaimedJob, CompletedJob, CreatedRun, DecodingSpec, FailedJob, JobCounts, JobId, JobPayload,
    JobPrompt, JobRecord, JobState, LeaseStatus, ModelRef, NewJob, NewRun, ReapReport, RunFilter,
    RunId, RunRecord, RunSpec, RunState, RunStatus, WorkerRecord, WorkerSeen, WorkerState,
};
pub use postgres::PostgresQueue;
pub use retry::RetryPolicy;
pub use sqlite::SqliteQueue;

/// A durable queue of capture jobs grouped in runs. Implemented by
/// [`PostgresQueue`] and [`SqliteQueue`] with the same semantics, and by
/// [`Queue`], which holds either.
pub trait JobQueue: Send + Sync {
    /// Creates the run and its jobs in one transaction. Idempotent: an
    /// existing run with the same id and spec keeps its jobs, and jobs whose
    /// key the run has already are left alone. Errors: `InvalidArgument` for
    /// no jobs or a key twice in `jobs`, `Conflict` for an existing run id
    /// with another spec, `InvalidState` for new jobs in a finished run.
    fn create_run(
        &self,
        run: &NewRun,
        jobs: &[NewJob],
    ) -> impl Future<Output = Result<CreatedRun, QueueError>> + Send;

    /// Leases the oldest claimable job (queued, past its backoff, run not
    /// cancelled) for exactly this model id and revision to `worker_id`
    /// until now + `lease`, bumping its attempt. `None` when there is none.
    fn claim(
        &self,
        worker_id: &str,
        model: &ModelRef,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<ClaimedJob>, QueueError>> + Send;

    /// Extends a held lease to now + `lease`, and tells whether the run was
    /// cancelled. `LeaseLost` if the lease is no longer held.
    fn heartbeat(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<LeaseStatus, QueueError>> + Send;

    /// Accepts the attempt's result: the job succeeds and `artifacts` are
    /// recorded, all in one transaction. `LeaseLost` (nothing written) if the
    /// lease is no longer held; `Conflict` (nothing written, lease still
    /// held) if an artifact key is already taken in the run.
    fn complete(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        artifacts: &[ArtifactRow],
    ) -> impl Future<Output = Result<CompletedJob, QueueError>> + Send;

    /// Ends the attempt as failed. A `retryable` failure with attempts left
    /// is queued again after the policy's jittered backoff; otherwise the job
    /// is dead, keeping `error` as its last error. `LeaseLost` if the lease
    /// is no longer held.
    fn fail(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        error: &str,
        retryable: bool,
    ) -> impl Future<Output = Result<FailedJob, QueueError>> + Send;

    /// Gives a held lease back without counting a failure (the worker is
    /// shutting down or its run was cancelled): the job is queued again at
    /// once with one more attempt allowed, or cancelled if its run was.
    /// `LeaseLost` if the lease is no longer held.
    fn release(
        &self,
        job: JobId,
        attempt: i32,
        worker_id: &str,
        reason: &str,
    ) -> impl Future<Output = Result<RunId, QueueError>> + Send;

    /// Terminal runs whose manifest is not written yet, oldest first.
    fn unfinalized_runs(&self) -> impl Future<Output = Result<Vec<RunId>, QueueError>> + Send;

    /// Runs finalized at or after `since`, most recent first (at most 100):
    /// the ones whose staging a late zombie upload may still litter.
    fn finalized_since(
        &self,
        since: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<RunId>, QueueError>> + Send;

    /// Records that the run's artifacts are promoted and its manifest is
    /// written. `InvalidState` while the run is still running.
    fn mark_finalized(&self, run: RunId) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Re-queues jobs whose lease expired (dead if their attempts are spent).
    fn reap_expired(&self) -> impl Future<Output = Result<ReapReport, QueueError>> + Send;

    /// Cancels the run: queued jobs become cancelled and are never handed
    /// out; leased ones stay leased, their heartbeats report
    /// `cancel_requested`, and their completion is still fenced and accepted.
    /// Idempotent; `InvalidState` for a run that already succeeded or failed.
    fn cancel_run(
        &self,
        run: RunId,
    ) -> impl Future<Output = Result<CancelReport, QueueError>> + Send;

    /// Queues the run's dead jobs again with a fresh attempt budget (the
    /// attempt numbers keep growing) and returns how many. `InvalidState`
    /// for a cancelled run.
    fn retry_run(&self, run: RunId) -> impl Future<Output = Result<u64, QueueError>> + Send;

    /// How many jobs of every run are in each state (for metrics).
    fn job_counts(&self) -> impl Future<Output = Result<JobCounts, QueueError>> + Send;

    /// The run's record alone (no counts): NOT_FOUND when unknown.
    fn get_run(&self, run: RunId) -> impl Future<Output = Result<RunRecord, QueueError>> + Send;

    /// The run with its job counts by state and its artifact count.
    fn run_status(&self, run: RunId) -> impl Future<Output = Result<RunStatus, QueueError>> + Send;

    /// Runs, newest first.
    fn list_runs(
        &self,
        filter: &RunFilter,
    ) -> impl Future<Output = Result<Vec<RunRecord>, QueueError>> + Send;

    fn get_job(&self, job: JobId) -> impl Future<Output = Result<JobRecord, QueueError>> + Send;

    /// The run's jobs, in claim order.
    fn list_jobs(
        &self,
        run: RunId,
    ) -> impl Future<Output = Result<Vec<JobRecord>, QueueError>> + Send;

    /// Every attempt at the run's jobs, by job then attempt.
    fn list_attempts(
        &self,
        run: RunId,
    ) -> impl Future<Output = Result<Vec<AttemptRecord>, QueueError>> + Send;

    /// The artifacts of the run's accepted completions, by key.
    fn list_artifacts(
        &self,
        run: RunId,
    ) -> impl Future<Output = Result<Vec<ArtifactRecord>, QueueError>> + Send;

    /// Records that a worker is alive, with its model and state.
    fn record_worker(
        &self,
        worker: &WorkerSeen,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    fn list_workers(&self) -> impl Future<Output = Result<Vec<WorkerRecord>, QueueError>> + Send;
}

mod dispatch;
pub use dispatch::Queue;

/// Rejects job batches the queue cannot take: none, or one key twice.
pub(crate) fn validate_new_jobs(jobs: &[NewJob]) -> Result<(), QueueError> {
    if jobs.is_empty() {
        return Err(QueueError::InvalidArgument(
            "a run needs at least one job".to_owned(),
        ));
    }
    let mut keys = std::collections::HashSet::with_capacity(jobs.len());
    for job in jobs {
        if job.key.is_empty() {
            return Err(QueueError::InvalidArgument("a job key is empty".to_owned()));
        }
        if !keys.insert(job.key.as_str()) {
            return Err(QueueError::InvalidArgument(format!(
                "job key {:?} appears twice in the run",
                job.key
            )));
        }
    }
    Ok(())
}

/// Rejects a lease too short to mean anything or too long to store.
pub(crate) fn validate_lease(lease: Duration) -> Result<i64, QueueError> {
    let millis = retry::duration_millis(lease);
    const SEVEN_DAYS_MILLIS: i64 = 7 * 24 * 3_600_000;
    if !(1..=SEVEN_DAYS_MILLIS).contains(&millis) {
        return Err(QueueError::InvalidArgument(format!(
            "lease of {lease:?} is out of range: give between 1ms and 7 days"
        )));
    }
    Ok(millis)
}
