//! `WorkerService`: workers claim jobs for their model, heartbeat, and
//! complete, fail or release them; every call about a job is fenced on
//! (job, attempt, worker) by the queue.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture_proto::tonic::{self, Request, Response, Status};
use capture_proto::v1 as pb;
use capture_proto::{CaptureServiceError, Fence, WorkerService};
use capture_worker::run::{internals_key, residual_key};
use capture_worker::store::RunStore;
use tracing::{info, warn};

use super::Coordinator;
use super::convert::{self, queue_error};
use crate::metrics::{AttemptEnd, LeaseLossKind};
use crate::queue::{
    ArtifactRow, CaptureMode, ClaimedJob, JobId, JobQueue, JobRecord, ModelRef, QueueError,
    WorkerSeen, WorkerState,
};

/// How often a waiting ClaimJob asks the queue again.
const CLAIM_POLL: Duration = Duration::from_millis(250);

/// The worker-facing gRPC service.
#[derive(Debug, Clone)]
pub struct WorkerApi {
    coordinator: Arc<Coordinator>,
}

impl WorkerApi {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

type Reply<T> = Result<Response<T>, Status>;

fn fence(job_id: &str, attempt: u32, worker_id: &str) -> Result<(JobId, i32, String), Status> {
    let fence = Fence::from_wire(job_id, attempt, worker_id).map_err(convert::id_error)?;
    Ok((
        JobId(*fence.job_id.as_uuid()),
        i32::try_from(fence.attempt.get())
            .map_err(|_| CaptureServiceError::InvalidArgument("attempt is out of range".into()))?,
        fence.worker_id.to_string(),
    ))
}

fn model_ref(id: &str, revision: &str) -> Result<ModelRef, Status> {
    if id.is_empty() {
        return Err(CaptureServiceError::InvalidArgument(
            "the worker names no model: model_id is empty".into(),
        )
        .into());
    }
    Ok(ModelRef {
        id: id.to_owned(),
        revision: revision.to_owned(),
    })
}

fn worker_id(text: &str) -> Result<String, Status> {
    Ok(capture_proto::WorkerId::parse_wire(text)
        .map_err(convert::id_error)?
        .to_string())
}

impl WorkerApi {
    async fn record(&self, worker_id: &str, model: &ModelRef, state: WorkerState) {
        let seen = WorkerSeen {
            worker_id: worker_id.to_owned(),
            model: model.clone(),
            state,
        };
        if let Err(error) = self.coordinator.queue.record_worker(&seen).await {
            warn!(worker_id, %error, "cannot record the worker");
        }
    }

    fn job_message(&self, claimed: &ClaimedJob) -> Result<pb::Job, CaptureServiceError> {
        let job = &claimed.job;
        let spec = &claimed.run_spec;
        let attempt = u32::try_from(claimed.attempt).unwrap_or(0);
        let staging_prefix = RunStore::staging_prefix(&job.id.to_string(), attempt)
            .map_err(|e| CaptureServiceError::Internal(e.to_string()))?;
        Ok(pb::Job {
            job_id: job.id.to_string(),
            run_id: job.run_id.to_string(),
            attempt,
            lease_expires_at: Some(convert::timestamp(claimed.lease_expires_at)),
            heartbeat_interval: Some(convert::duration(self.coordinator.timing.heartbeat)),
            job_key: job.key.clone(),
            experiment: spec.experiment.clone(),
            prompts: job
                .payload
                .prompts
                .iter()
                .map(|p| pb::Prompt {
                    prompt_set: job.payload.prompt_set.clone(),
                    prompt_id: p.id.clone(),
                    text: p.text.clone(),
                })
                .collect(),
            mode: Some(convert::capture_mode(&job.payload.mode)),
            decoding: Some(convert::decoding(&spec.decoding)),
            store_dtype: convert::store_dtype(&spec.store_dtype) as i32,
            chat_template: spec.decoding.chat_template,
            model_id: spec.model.id.clone(),
            model_revision: spec.model.revision.clone(),
            artifact_root: self.coordinator.artifact_root(job.run_id, spec),
            staging_prefix: format!("{staging_prefix}/"),
        })
    }

    /// A repeated completion of the accepted attempt (its first reply was
    /// lost) is answered OK; anything else stays a lost lease.
    async fn is_repeat_completion(&self, job: JobId, attempt: i32, worker_id: &str) -> bool {
        let Ok(record) = self.coordinator.queue.get_job(job).await else {
            return false;
        };
        if record.state != crate::queue::JobState::Succeeded || record.attempt != attempt {
            return false;
        }
        self.coordinator
            .queue
            .list_attempts(record.run_id)
            .await
            .map(|attempts| {
                attempts.iter().any(|a| {
                    a.job_id == job
                        && a.attempt == attempt
                        && a.worker_id == worker_id
                        && a.outcome == Some(crate::queue::AttemptOutcome::Succeeded)
                })
            })
            .unwrap_or(false)
    }

    /// The wire error of a refused fenced call, counting a lost lease.
    fn refused(&self, call: LeaseLossKind, error: QueueError) -> CaptureServiceError {
        if matches!(error, QueueError::LeaseLost { .. }) {
            self.coordinator.metrics.lease_lost(call, 1);
        }
        queue_error(error)
    }

    async fn after_job_finished(&self, run: crate::queue::RunId, finished: bool) {
        if finished && let Err(error) = self.coordinator.finalize_run(run).await {
            warn!(%run, error, "finalizing the run failed; the sweep will retry");
        }
    }
}

/// The artifact keys a job must produce, exactly.
fn expected_keys(job: &JobRecord) -> BTreeSet<String> {
    let set = &job.payload.prompt_set;
    let mut keys = BTreeSet::new();
    for prompt in &job.payload.prompts {
        match &job.payload.mode {
            CaptureMode::Residual => {
                keys.insert(residual_key(set, &prompt.id));
            }
            CaptureMode::Internals { layers } => {
                for &layer in layers {
                    keys.insert(internals_key(set, &prompt.id, layer as usize));
                }
            }
        }
    }
    keys
}

fn artifact_rows(
    job: &JobRecord,
    artifacts: &[pb::ArtifactRecord],
) -> Result<Vec<ArtifactRow>, CaptureServiceError> {
    let expected = expected_keys(job);
    let given: BTreeSet<String> = artifacts.iter().map(|a| a.key.clone()).collect();
    if given.len() != artifacts.len() || given != expected {
        let missing: Vec<_> = expected.difference(&given).take(5).cloned().collect();
        let extra: Vec<_> = given.difference(&expected).take(5).cloned().collect();
        return Err(CaptureServiceError::InvalidArgument(format!(
            "the completion's artifacts do not match job {} ({}): missing {missing:?}, unexpected {extra:?}, {} listed for {} distinct keys",
            job.id,
            job.key,
            artifacts.len(),
            given.len()
        )));
    }
    artifacts
        .iter()
        .map(|a| {
            let shapes: serde_json::Value = if a.shapes_json.is_empty() {
                serde_json::json!({})
            } else {
                serde_json::from_str(&a.shapes_json).map_err(|e| {
                    CaptureServiceError::InvalidArgument(format!(
                        "artifact {}: shapes_json is not JSON: {e}",
                        a.key
                    ))
                })?
            };
            if a.sha256.len() != 64 || !a.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(CaptureServiceError::InvalidArgument(format!(
                    "artifact {}: sha256 must be 64 hex digits",
                    a.key
                )));
            }
            let mode = pb::CaptureModeKind::try_from(a.mode)
                .ok()
                .and_then(|m| m.short_name())
                .unwrap_or(job.payload.mode.name());
            Ok(ArtifactRow {
                key: a.key.clone(),
                size_bytes: i64::try_from(a.bytes).unwrap_or(i64::MAX),
                sha256: a.sha256.to_ascii_lowercase(),
                prompt_set: a.prompt_set.clone(),
                prompt_id: a.prompt_id.clone(),
                mode: mode.to_owned(),
                layer: a.layer.and_then(|l| i32::try_from(l).ok()),
                prompt_tokens: i32::try_from(a.prompt_tokens).ok(),
                response_tokens: i32::try_from(a.response_tokens).ok(),
                shapes,
            })
        })
        .collect()
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Reply<pb::RegisterWorkerResponse> {
        let request = request.into_inner();
        let worker_id = worker_id(&request.worker_id)?;
        let model = model_ref(&request.model_id, &request.model_revision)?;
        self.record(&worker_id, &model, WorkerState::Idle).await;
        let caps = request.capabilities.unwrap_or_default();
        info!(
            worker_id,
            model = %model.id,
            revision = %model.revision,
            device = caps.device,
            dtype = caps.compute_dtype,
            host = caps.hostname,
            "worker registered"
        );
        Ok(Response::new(pb::RegisterWorkerResponse {
            heartbeat_interval: Some(convert::duration(self.coordinator.timing.heartbeat)),
            lease_duration: Some(convert::duration(self.coordinator.timing.lease)),
        }))
    }

    async fn claim_job(
        &self,
        request: Request<pb::ClaimJobRequest>,
    ) -> Reply<pb::ClaimJobResponse> {
        let request = request.into_inner();
        let worker_id = worker_id(&request.worker_id)?;
        let model = model_ref(&request.model_id, &request.model_revision)?;
        let wait = request
            .wait
            .and_then(|w| Duration::try_from(w).ok())
            .unwrap_or_default()
            .min(self.coordinator.timing.max_claim_wait);
        let deadline = Instant::now() + wait;
        loop {
            let claimed = self
                .coordinator
                .queue
                .claim(&worker_id, &model, self.coordinator.timing.lease)
                .await
                .map_err(queue_error)?;
            if let Some(claimed) = claimed {
                self.coordinator.metrics.job_claimed(&claimed.job);
                let job = self.job_message(&claimed)?;
                info!(
                    worker_id,
                    job_id = job.job_id,
                    job_key = job.job_key,
                    attempt = job.attempt,
                    "job leased"
                );
                return Ok(Response::new(pb::ClaimJobResponse {
                    job: Some(job),
                    retry_after: None,
                }));
            }
            if Instant::now() + CLAIM_POLL > deadline {
                return Ok(Response::new(pb::ClaimJobResponse {
                    job: None,
                    retry_after: Some(convert::duration(Duration::from_secs(1))),
                }));
            }
            tokio::time::sleep(CLAIM_POLL).await;
        }
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Reply<pb::HeartbeatResponse> {
        let request = request.into_inner();
        let (job, attempt, worker_id) =
            fence(&request.job_id, request.attempt, &request.worker_id)?;
        let status = self
            .coordinator
            .queue
            .heartbeat(job, attempt, &worker_id, self.coordinator.timing.lease)
            .await
            .map_err(|error| self.refused(LeaseLossKind::Heartbeat, error))?;
        Ok(Response::new(pb::HeartbeatResponse {
            lease_expires_at: Some(convert::timestamp(status.lease_expires_at)),
            cancel_requested: status.cancel_requested,
        }))
    }

    async fn complete_job(
        &self,
        request: Request<pb::CompleteJobRequest>,
    ) -> Reply<pb::CompleteJobResponse> {
        let request = request.into_inner();
        let (job_id, attempt, worker_id) =
            fence(&request.job_id, request.attempt, &request.worker_id)?;
        let queue = &self.coordinator.queue;
        let job = queue.get_job(job_id).await.map_err(queue_error)?;
        let rows = artifact_rows(&job, &request.artifacts)?;
        match queue.complete(job_id, attempt, &worker_id, &rows).await {
            Ok(completed) => {
                let stats = request.stats.unwrap_or_default();
                info!(
                    job_id = %job_id,
                    job_key = job.key,
                    attempt,
                    worker_id,
                    artifacts = rows.len(),
                    tokens = stats.tokens_captured,
                    bytes = stats.bytes_written,
                    "job completed"
                );
                self.coordinator
                    .metrics
                    .attempt_ended(AttemptEnd::Succeeded);
                self.coordinator.metrics.artifacts_accepted(&rows);
                let keys: Vec<&str> = rows.iter().map(|row| row.key.as_str()).collect();
                self.coordinator
                    .promote_job(completed.run_id, job_id, attempt, &keys)
                    .await;
                self.after_job_finished(completed.run_id, completed.run_finished.is_some())
                    .await;
                Ok(Response::new(pb::CompleteJobResponse {}))
            }
            Err(QueueError::LeaseLost { .. })
                if self.is_repeat_completion(job_id, attempt, &worker_id).await =>
            {
                Ok(Response::new(pb::CompleteJobResponse {}))
            }
            Err(error) => {
                if matches!(error, QueueError::LeaseLost { .. }) {
                    warn!(job_id = %job_id, attempt, worker_id, "late completion discarded: lease lost");
                    self.coordinator
                        .discard_refused_attempt(job.run_id, job_id, attempt)
                        .await;
                }
                Err(self.refused(LeaseLossKind::Complete, error).into())
            }
        }
    }

    async fn fail_job(&self, request: Request<pb::FailJobRequest>) -> Reply<pb::FailJobResponse> {
        let request = request.into_inner();
        let (job_id, attempt, worker_id) =
            fence(&request.job_id, request.attempt, &request.worker_id)?;
        let failed = self
            .coordinator
            .queue
            .fail(
                job_id,
                attempt,
                &worker_id,
                &request.error,
                request.retryable,
            )
            .await
            .map_err(|error| self.refused(LeaseLossKind::Fail, error))?;
        self.coordinator
            .metrics
            .attempt_ended(AttemptEnd::of_failure(failed.state));
        self.after_job_finished(failed.run_id, failed.run_finished.is_some())
            .await;
        Ok(Response::new(pb::FailJobResponse {
            state: convert::job_state(failed.state) as i32,
            retry_at: failed.retry_at.map(convert::timestamp),
        }))
    }

    async fn release_job(
        &self,
        request: Request<pb::ReleaseJobRequest>,
    ) -> Reply<pb::ReleaseJobResponse> {
        let request = request.into_inner();
        let (job_id, attempt, worker_id) =
            fence(&request.job_id, request.attempt, &request.worker_id)?;
        let reason = if request.reason.is_empty() {
            "worker shutting down"
        } else {
            request.reason.as_str()
        };
        let run = self
            .coordinator
            .queue
            .release(job_id, attempt, &worker_id, reason)
            .await
            .map_err(|error| self.refused(LeaseLossKind::Release, error))?;
        self.coordinator.metrics.attempt_ended(AttemptEnd::Released);
        info!(job_id = %job_id, attempt, worker_id, reason, "job released");
        // A release in a cancelled run may have been its last job.
        if let Ok(status) = self.coordinator.queue.run_status(run).await {
            self.after_job_finished(run, status.run.state != crate::queue::RunState::Running)
                .await;
        }
        Ok(Response::new(pb::ReleaseJobResponse {}))
    }

    async fn deregister_worker(
        &self,
        request: Request<pb::DeregisterWorkerRequest>,
    ) -> Reply<pb::DeregisterWorkerResponse> {
        let request = request.into_inner();
        let worker_id = worker_id(&request.worker_id)?;
        let model = self
            .coordinator
            .queue
            .list_workers()
            .await
            .ok()
            .and_then(|workers| workers.into_iter().find(|w| w.worker_id == worker_id))
            .map(|w| w.model);
        if let Some(model) = model {
            self.record(&worker_id, &model, WorkerState::Stopped).await;
        }
        info!(worker_id, "worker deregistered");
        Ok(Response::new(pb::DeregisterWorkerResponse {}))
    }
}
