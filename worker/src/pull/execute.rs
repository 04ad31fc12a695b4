//! Running one job's capture: prompts are captured one by one on a
//! blocking thread with the loaded model, and each artifact is encoded and
//! handed through a small bounded queue to an upload task that stages it
//! under the attempt's prefix, so uploads overlap with the next prompt's
//! compute. A shared stop flag ends both at the next prompt or artifact.

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
use crate::manifest::ArtifactEntry;
use crate::metrics::WorkerMetrics;
use crate::run::{ReplaySource, capture_prepared, prepare_prompts};
use crate::store::RunStore;

/// Encoded artifacts waiting for upload, at most (each may be large).
const UPLOAD_QUEUE: usize = 2;

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

/// An encoded artifact; its entry's size and sha256 are filled in from the upload.
struct PendingUpload {
    entry: ArtifactEntry,
    payload: Bytes,
}

/// Captures and stages every prompt of the job (until the stop flag is set).
pub(crate) async fn execute(job: JobRun) -> Result<Execution, JobError> {
    let (queue, pending) = mpsc::channel(UPLOAD_QUEUE);
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
    for item in &prepared {
        if stopped() {
            return Ok(Captured {
                compute: compute + timer.elapsed(),
                queued,
                stopped: true,
            });
        }
        let mut on_token = || {
            job.progress.tokens.fetch_add(1, Ordering::Relaxed);
            job.metrics.tokens_captured(1);
        };
        let captured = capture_prepared(meta, &job.engine.model, settings, item, &mut on_token)?;
        job.progress
            .tokens
            .fetch_add(captured.prompt_tokens as u64, Ordering::Relaxed);
        job.metrics.tokens_captured(captured.prompt_tokens as u64);
        for artifact in &captured.artifacts {
            let payload = Bytes::from(artifact.encode()?);
            // Size and sha256 come from the upload, which hashes as it sends.
            let entry = captured.entry(artifact, payload.len() as u64, String::new());
            compute += timer.elapsed();
            let sent = queue.blocking_send(PendingUpload { entry, payload });
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
    while let Some(PendingUpload { mut entry, payload }) = pending.recv().await {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let started = Instant::now();
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
