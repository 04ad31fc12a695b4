//! One claimed job from start to end: check it against this worker (model,
//! store root, staging prefix), capture it while heartbeating, and report
//! the result: complete, fail (retryable or not) or release. A cancelled
//! run, a lost lease and a shutdown's drain timeout stop the capture.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use capture_proto::v1::{CompleteJobRequest, FailJobRequest, Job, JobState, ReleaseJobRequest};
use capture_proto::{CaptureServiceError, Fence};
use tracing::{error, info, warn};

use super::compute::Held;
use super::convert::{AttemptStats, JobPlan, artifact_record, plan_job, std_duration};
use super::error::JobError;
use super::execute::{Execution, JobRun, execute};
use super::heartbeat::{HeartbeatEvent, Progress, spawn_heartbeat};
use super::replay::StoreReplay;
use super::{PullReport, Shutdown, Worker, rpc};
use crate::store::RunStore;

/// How long completing or failing a job is retried while the coordinator is
/// unavailable (a completion may have committed before its answer was lost;
/// repeating it is answered OK).
const FINISH_GIVE_UP: Duration = Duration::from_secs(300);
/// How long releasing a job is retried.
const RELEASE_GIVE_UP: Duration = Duration::from_secs(30);

/// How a job ended for this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobOutcome {
    /// The coordinator accepted the completion; prompt plus response tokens.
    Completed { tokens: u64 },
    /// Reported failed, or the result could not be reported.
    Failed,
    /// Given back unfinished.
    Released,
    /// The attempt lost its lease; its result is discarded.
    LeaseLost,
    /// A malformed claim that could not even be answered.
    Skipped,
}

impl JobOutcome {
    /// The `outcome` label values of [`JobOutcome::label`].
    pub(crate) const LABELS: [&'static str; 5] =
        ["completed", "failed", "released", "lease_lost", "skipped"];

    /// The outcome's value of the `outcome` metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            JobOutcome::Completed { .. } => "completed",
            JobOutcome::Failed => "failed",
            JobOutcome::Released => "released",
            JobOutcome::LeaseLost => "lease_lost",
            JobOutcome::Skipped => "skipped",
        }
    }

    pub(crate) fn count(self, report: &mut PullReport) {
        match self {
            JobOutcome::Completed { tokens } => {
                report.jobs_completed += 1;
                report.tokens_captured += tokens;
            }
            JobOutcome::Failed => report.jobs_failed += 1,
            JobOutcome::Released => report.jobs_released += 1,
            JobOutcome::LeaseLost => report.leases_lost += 1,
            JobOutcome::Skipped => {}
        }
    }
}

/// Why the wait on a running capture ended.
enum Ending {
    Finished(Result<Execution, JobError>),
    Heartbeat(HeartbeatEvent),
    DrainTimeout,
}

/// Aborts the heartbeat task however the job ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one claimed job and reports its result to the coordinator; `held`
/// (its slot and its mark on the capture thread) is given back once its
/// capture is done, or when it ends without one.
pub(crate) async fn run_job(
    worker: &Worker,
    job: Job,
    held: Held,
    mut shutdown: Shutdown,
) -> JobOutcome {
    let fence = match job.fence(worker.id) {
        Ok(fence) => fence,
        Err(problem) => {
            error!(job_id = job.job_id, attempt = job.attempt, error = %problem, "claimed a job without a valid id or attempt: skipping it");
            return JobOutcome::Skipped;
        }
    };
    let started_at = SystemTime::now();
    let clock = Instant::now();
    info!(
        job_id = %fence.job_id,
        attempt = %fence.attempt,
        run_id = job.run_id,
        job_key = job.job_key,
        prompts = job.prompts.len(),
        "claimed job"
    );
    if !job.model_id.is_empty()
        && (job.model_id != worker.model_id || job.model_revision != worker.model_revision)
    {
        let reason = format!(
            "the job wants model {} at revision {:?}, this worker has {} at revision {:?}",
            job.model_id, job.model_revision, worker.model_id, worker.model_revision
        );
        warn!(job_id = %fence.job_id, reason, "releasing a job for another model");
        return release(worker, fence, &reason).await;
    }
    let (plan, run, replay) = match prepare(worker, &job, fence) {
        Ok(prepared) => prepared,
        Err(problem) => return fail(worker, fence, &problem).await,
    };

    let progress = Arc::new(Progress::new(plan.prompts.len()));
    let stop = Arc::new(AtomicBool::new(false));
    let interval = job
        .heartbeat_interval
        .and_then(std_duration)
        .unwrap_or(worker.heartbeat_interval);
    let (heartbeat, mut events) = spawn_heartbeat(
        worker.client.clone(),
        fence,
        interval,
        Arc::clone(&progress),
    );
    let _heartbeat = AbortOnDrop(heartbeat);
    let work = execute(JobRun {
        capturer: worker.capturer.clone(),
        held,
        plan,
        run,
        fence,
        replay,
        progress: Arc::clone(&progress),
        stop: Arc::clone(&stop),
        metrics: worker.metrics.clone(),
    });
    tokio::pin!(work);

    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let ending = loop {
        tokio::select! {
            result = &mut work => break Ending::Finished(result),
            Some(event) = events.recv() => break Ending::Heartbeat(event),
            () = shutdown.wait(), if drain_deadline.is_none() => {
                info!(
                    job_id = %fence.job_id,
                    drain_seconds = worker.drain_timeout.as_secs_f64(),
                    "shutting down: letting the current job finish"
                );
                drain_deadline = Some(tokio::time::Instant::now() + worker.drain_timeout);
            }
            () = tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)),
                if drain_deadline.is_some() => break Ending::DrainTimeout,
        }
    };

    match ending {
        Ending::Finished(Ok(execution)) if !execution.stopped => {
            let stats = AttemptStats {
                compute: execution.compute,
                upload: execution.upload,
                tokens: progress.tokens.load(Ordering::Relaxed),
                bytes: execution.artifacts.iter().map(|a| a.bytes).sum(),
                started_at,
                finished_at: SystemTime::now(),
            };
            complete(worker, fence, &execution, stats, clock).await
        }
        Ending::Finished(Ok(_)) => {
            let problem = JobError::Internal("the capture stopped before it was done".into());
            fail(worker, fence, &problem).await
        }
        Ending::Finished(Err(problem)) => fail(worker, fence, &problem).await,
        Ending::Heartbeat(HeartbeatEvent::CancelRequested) => {
            stop.store(true, Ordering::Relaxed);
            info!(job_id = %fence.job_id, attempt = %fence.attempt, "run cancelled: stopping the job");
            let outcome = release(worker, fence, "the run was cancelled").await;
            wait_for_capture(work, shutdown).await;
            outcome
        }
        Ending::Heartbeat(HeartbeatEvent::LeaseLost(reason)) => {
            stop.store(true, Ordering::Relaxed);
            warn!(job_id = %fence.job_id, attempt = %fence.attempt, reason, "lease lost: abandoning the job");
            wait_for_capture(work, shutdown).await;
            JobOutcome::LeaseLost
        }
        Ending::DrainTimeout => {
            stop.store(true, Ordering::Relaxed);
            warn!(job_id = %fence.job_id, attempt = %fence.attempt, "drain timeout: releasing the unfinished job");
            release(worker, fence, "the worker is shutting down").await
        }
    }
}

/// Reads the job and checks it fits this worker: its plan, its run's store
/// (whose root must be the job's artifact root), its staging prefix and the
/// replay root. Every problem here fails the job.
fn prepare(
    worker: &Worker,
    job: &Job,
    fence: Fence,
) -> Result<(JobPlan, RunStore, Option<StoreReplay>), JobError> {
    let plan = plan_job(job, worker.engine.meta.config.num_hidden_layers)?;
    let run = worker.store.run(&job.experiment, &job.run_id)?;
    let ours = run.root_url();
    if ours.trim_end_matches('/') != job.artifact_root.trim_end_matches('/') {
        return Err(JobError::Invalid(format!(
            "the job's artifact root {} is not this worker's run root {ours}: start the worker with the coordinator's store (--store)",
            job.artifact_root
        )));
    }
    let staging = RunStore::staging_prefix(&fence.job_id.to_wire(), fence.attempt.get())?;
    if staging != job.staging_prefix.trim_end_matches('/') {
        return Err(JobError::Invalid(format!(
            "the job's staging prefix {:?} is not {staging:?}, where this worker stages attempt {} of job {}",
            job.staging_prefix, fence.attempt, fence.job_id
        )));
    }
    let replay = match &plan.replay_root {
        Some(root) => Some(StoreReplay::open(&worker.store, root)?),
        None => None,
    };
    Ok((plan, run, replay))
}

/// Waits until a stopped capture has let go of the model (it stops at the
/// next prompt or artifact), unless the worker is shutting down.
async fn wait_for_capture(
    work: std::pin::Pin<&mut impl std::future::Future<Output = Result<Execution, JobError>>>,
    mut shutdown: Shutdown,
) {
    tokio::select! {
        _ = work => {}
        () = shutdown.wait() => {}
    }
}

async fn complete(
    worker: &Worker,
    fence: Fence,
    execution: &Execution,
    stats: AttemptStats,
    clock: Instant,
) -> JobOutcome {
    let request = CompleteJobRequest {
        artifacts: execution.artifacts.iter().map(artifact_record).collect(),
        stats: Some(stats.to_proto()),
        ..Default::default()
    }
    .with_fence(fence);
    let answer = rpc::retried(
        &worker.client,
        "complete",
        Some(FINISH_GIVE_UP),
        &request,
        |mut client, request| async move { client.complete_job(request).await },
    )
    .await;
    let status = match answer {
        Ok(_) => {
            let compute = execution.compute.as_secs_f64();
            info!(
                job_id = %fence.job_id,
                attempt = %fence.attempt,
                artifacts = execution.artifacts.len(),
                tokens = stats.tokens,
                bytes = stats.bytes,
                compute_seconds = compute,
                upload_seconds = execution.upload.as_secs_f64(),
                total_seconds = clock.elapsed().as_secs_f64(),
                tokens_per_second = stats.tokens as f64 / compute.max(1e-9),
                "completed job"
            );
            return JobOutcome::Completed {
                tokens: stats.tokens,
            };
        }
        Err(status) => status,
    };
    let refusal = CaptureServiceError::from_status(&status);
    if refusal.is_lease_lost() {
        warn!(job_id = %fence.job_id, attempt = %fence.attempt, error = %refusal, "lease lost before completion: the result is discarded");
        return JobOutcome::LeaseLost;
    }
    if let CaptureServiceError::Cancelled { .. } = refusal {
        info!(job_id = %fence.job_id, attempt = %fence.attempt, "run cancelled: the completion was not taken");
        return JobOutcome::Released;
    }
    if rpc::is_transient(&status) {
        error!(job_id = %fence.job_id, attempt = %fence.attempt, error = %rpc::describe(&status), "cannot reach the coordinator to complete the job: giving it up");
        return JobOutcome::Failed;
    }
    let problem = JobError::Internal(format!("the coordinator refused the completion: {refusal}"));
    fail(worker, fence, &problem).await
}

async fn fail(worker: &Worker, fence: Fence, problem: &JobError) -> JobOutcome {
    let message = problem.message();
    let retryable = problem.is_retryable();
    warn!(job_id = %fence.job_id, attempt = %fence.attempt, retryable, error = message, "job failed");
    let request = FailJobRequest {
        error: message,
        retryable,
        ..Default::default()
    }
    .with_fence(fence);
    let answer = rpc::retried(
        &worker.client,
        "fail",
        Some(FINISH_GIVE_UP),
        &request,
        |mut client, request| async move { client.fail_job(request).await },
    )
    .await;
    match answer {
        Ok(answer) => {
            let state = JobState::try_from(answer.state).unwrap_or(JobState::Unspecified);
            info!(job_id = %fence.job_id, attempt = %fence.attempt, state = state.short_name(), "failure recorded");
            JobOutcome::Failed
        }
        Err(status) if CaptureServiceError::from_status(&status).is_lease_lost() => {
            warn!(job_id = %fence.job_id, attempt = %fence.attempt, "lease lost before the failure was recorded");
            JobOutcome::LeaseLost
        }
        Err(status) => {
            error!(job_id = %fence.job_id, attempt = %fence.attempt, error = %rpc::describe(&status), "cannot record the failure");
            JobOutcome::Failed
        }
    }
}

async fn release(worker: &Worker, fence: Fence, reason: &str) -> JobOutcome {
    let request = ReleaseJobRequest {
        reason: reason.to_owned(),
        ..Default::default()
    }
    .with_fence(fence);
    let answer = rpc::retried(
        &worker.client,
        "release",
        Some(RELEASE_GIVE_UP),
        &request,
        |mut client, request| async move { client.release_job(request).await },
    )
    .await;
    match answer {
        Ok(_) => {
            info!(job_id = %fence.job_id, attempt = %fence.attempt, reason, "released job");
            JobOutcome::Released
        }
        Err(status) if CaptureServiceError::from_status(&status).is_lease_lost() => {
            JobOutcome::LeaseLost
        }
        Err(status) => {
            warn!(job_id = %fence.job_id, attempt = %fence.attempt, error = %rpc::describe(&status), "cannot release the job: its lease will expire");
            JobOutcome::Released
        }
    }
}
