//! Running one job's capture: prompts are captured in batches (one forward
//! pass per step for the whole batch) on a blocking thread with the loaded
//! model, and each artifact is handed through a bounded queue (one batch's
//! worth) to an upload task that encodes it on a blocking thread and stages
//! it under the attempt's prefix, hashing as it sends, so encoding and
//! uploads overlap with the next batch's compute. A shared stop flag ends
//! both at the next batch or artifact.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capture_proto::Fence;
use tokio::sync::mpsc;

use super::Engine;
use super::convert::JobPlan;
use super::error::JobError;
use super::heartbeat::Progress;
use super::replay::StoreReplay;
use crate::capture::CaptureMode;
use crate::manifest::ArtifactEntry;
use crate::metrics::WorkerMetrics;
use crate::run::{
    PromptArtifact, ReplaySource, batch_size_for, capture_prepared_batch, prepare_prompts,
};
use crate::store::RunStore;

/// Artifacts waiting for upload, at least; the queue holds one batch.
const UPLOAD_QUEUE: usize = 2;

/// The most prompts whose artifacts may wait for upload: a job's prompts up
/// to the largest automatic batch.
const MAX_BATCH_HINT: usize = crate::run::AUTO_MAX;

/// What a job's capture produced.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Execution {
    /// The staged artifacts, in capture order, with their uploaded size and sha256.
    pub(crate) artifacts: Vec<ArtifactEntry>,
    /// Tokenizing, forward passes and encoding.
    pub(crate) compute: Duration,
    /// Staging the artifacts.
    pub(crate) upload: Duration,
    /// The stop flag ended it before every prompt was captured and uploaded.
    pub(crate) stopped: bool,
}

/// Everything one job's capture needs.
pub(crate) struct JobRun {
    pub(crate) engine: Arc<Engine>,
    pub(crate) plan: JobPlan,
    pub(crate) run: RunStore,
    pub(crate) fence: Fence,
    pub(crate) replay: Option<StoreReplay>,
    pub(crate) progress: Arc<Progress>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) metrics: WorkerMetrics,
}

/// A captured artifact, encoded by the upload task; its entry's size and
/// sha256 are filled in from the upload.
struct PendingUpload {
    entry: ArtifactEntry,
    artifact: PromptArtifact,
}

/// Captures and stages every prompt of the job (until the stop flag is set).
pub(crate) async fn execute(job: JobRun) -> Result<Execution, JobError> {
    let per_prompt = match &job.plan.settings.mode {
        CaptureMode::Residual => 1,
        CaptureMode::Internals { layers } => layers.len(),
    };
    let capacity = (job.plan.prompts.len().min(MAX_BATCH_HINT) * per_prompt).max(UPLOAD_QUEUE);
    let (queue, pending) = mpsc::channel(capacity);
    let uploads = tokio::spawn(upload_all(
        job.run.clone(),
        job.fence,
        pending,
        Arc::clone(&job.progress),
        Arc::clone(&job.stop),
        job.metrics.clone(),
    ));
    let computed = tokio::task::spawn_blocking(move || capture_all(&job, &queue)).await;
    let uploaded = uploads
        .await
        .map_err(|e| JobError::Internal(format!("the upload task failed: {e}")))?;
    let (artifacts, upload) = uploaded?;
    let captured =
        computed.map_err(|e| JobError::Internal(format!("the capture task failed: {e}")))??;
    Ok(Execution {
        stopped: captured.stopped || artifacts.len() < captured.queued,
        artifacts,
        compute: captured.compute,
        upload,
    })
}

struct Captured {
    compute: Duration,
    /// Artifacts handed to the upload task.
    queued: usize,
    stopped: bool,
}

/// The blocking half: prepare every prompt first (so a bad one fails the
/// job before any compute), then capture them in order.
fn capture_all(job: &JobRun, queue: &mpsc::Sender<PendingUpload>) -> Result<Captured, JobError> {
    let stopped = || job.stop.load(Ordering::Relaxed);
    let settings = &job.plan.settings;
    let meta = &job.engine.meta;
    let mut timer = Instant::now();
    let mut compute = Duration::ZERO;
    let mut queued = 0;
    let prepared = prepare_prompts(
        meta,
        settings,
        &job.plan.set,
        &job.plan.prompts,
        job.replay.as_ref().map(|r| r as &dyn ReplaySource),
    )?;
    let model = &job.engine.model;
    let batch_size = batch_size_for(job.engine.batch_size, meta, model, settings, &prepared);
    for batch in prepared.chunks(batch_size) {
        if stopped() {
            return Ok(Captured {
                compute: compute + timer.elapsed(),
                queued,
                stopped: true,
            });
        }
        let mut on_token = |_| {
            job.progress.tokens.fetch_add(1, Ordering::Relaxed);
            job.metrics.tokens_captured(1);
        };
        let captured = capture_prepared_batch(meta, model, settings, batch, &mut on_token)?;
        for prompt in captured {
            job.progress
                .tokens
                .fetch_add(prompt.prompt_tokens as u64, Ordering::Relaxed);
            job.metrics.tokens_captured(prompt.prompt_tokens as u64);
            for artifact in prompt.artifacts.iter().cloned() {
                // Size and sha256 come from the upload, which hashes as it sends.
                let entry = prompt.entry(&artifact, 0, String::new());
                compute += timer.elapsed();
                let sent = queue.blocking_send(PendingUpload { entry, artifact });
                timer = Instant::now();
                if sent.is_err() {
                    // The upload task stopped: its error is the job's.
                    return Ok(Captured {
                        compute,
                        queued,
                        stopped: true,
                    });
                }
                queued += 1;
            }
            job.progress.prompts_done.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(Captured {
        compute: compute + timer.elapsed(),
        queued,
        stopped: false,
    })
}

/// The async half: stage each artifact as it comes; once the stop flag is
/// set nothing more is uploaded.
async fn upload_all(
    run: RunStore,
    fence: Fence,
    mut pending: mpsc::Receiver<PendingUpload>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    metrics: WorkerMetrics,
) -> Result<(Vec<ArtifactEntry>, Duration), JobError> {
    let job_id = fence.job_id.to_wire();
    let attempt = fence.attempt.get();
    let mut staged = Vec::new();
    let mut spent = Duration::ZERO;
    while let Some(PendingUpload {
        mut entry,
        artifact,
    }) = pending.recv().await
    {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let started = Instant::now();
        let payload = tokio::task::spawn_blocking(move || artifact.encode())
            .await
            .map_err(|e| JobError::Internal(format!("the encoding task failed: {e}")))??;
        let payload = Bytes::from(payload);
        let object = match run.stage_put(&job_id, attempt, &entry.key, payload).await {
            Ok(object) => object,
            Err(error) => {
                // No use computing what cannot be uploaded.
                stop.store(true, Ordering::Relaxed);
                return Err(error.into());
            }
        };
        spent += started.elapsed();
        entry.bytes = object.bytes;
        entry.sha256 = object.sha256;
        progress.artifacts.fetch_add(1, Ordering::Relaxed);
        progress.bytes.fetch_add(object.bytes, Ordering::Relaxed);
        metrics.uploaded(object.bytes);
        staged.push(entry);
    }
    Ok((staged, spent))
}
