//! Running one job's capture: its prompts go to the worker's capture
//! thread ([`super::compute`]), which captures them in batches (shared with
//! other jobs of the same settings) and hands each artifact through a
//! bounded queue (one batch's worth) to this job's upload task, which
//! encodes it on a blocking thread and stages it under the attempt's
//! prefix, hashing as it sends, so encoding and uploads overlap with the
//! next batch's compute. A shared stop flag ends both at the next batch or
//! artifact.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capture_proto::Fence;
use object_store::PutPayload;
use tokio::sync::{mpsc, oneshot};

use super::compute::{Capturer, Held, Submission};
use super::convert::JobPlan;
use super::error::JobError;
use super::heartbeat::Progress;
use super::replay::StoreReplay;
use crate::capture::CaptureMode;
use crate::manifest::ArtifactEntry;
use crate::metrics::WorkerMetrics;
use crate::run::PromptArtifact;
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
    pub(crate) capturer: Capturer,
    /// Its slot and mark, given back once captured and submitted.
    pub(crate) held: Held,
    pub(crate) plan: JobPlan,
    pub(crate) run: RunStore,
    pub(crate) fence: Fence,
    pub(crate) replay: Option<StoreReplay>,
    pub(crate) progress: Arc<Progress>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) metrics: WorkerMetrics,
}

/// A captured artifact, assembled and encoded by the upload task; its
/// entry's tensor shapes are filled in from the encoding, its size and
/// sha256 from the upload.
pub(crate) struct PendingUpload {
    pub(crate) entry: ArtifactEntry,
    pub(crate) artifact: PromptArtifact,
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
        job.run,
        job.fence,
        pending,
        Arc::clone(&job.progress),
        Arc::clone(&job.stop),
        job.metrics.clone(),
    ));
    let (done, result) = oneshot::channel();
    let submitted = job.capturer.submit(Submission {
        plan: job.plan,
        replay: job.replay,
        progress: job.progress,
        stop: Arc::clone(&job.stop),
        metrics: job.metrics,
        queue: Some(queue),
        done: Some(done),
    });
    drop(job.held.expected);
    if let Err(error) = submitted {
        job.stop.store(true, Ordering::Relaxed);
        return Err(error);
    }
    let captured = result.await.map_err(|_| {
        JobError::Internal("the capture thread dropped the job (a panic, see the log)".into())
    });
    // Captured: the worker may claim the next job while this one uploads.
    drop(job.held.slot);
    let uploaded = uploads
        .await
        .map_err(|e| JobError::Internal(format!("the upload task failed: {e}")))?;
    let (artifacts, upload) = uploaded?;
    let captured = captured??;
    Ok(Execution {
        stopped: captured.stopped || artifacts.len() < captured.queued,
        artifacts,
        compute: captured.compute,
        upload,
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
        let encoded = tokio::task::spawn_blocking(move || artifact.encode())
            .await
            .map_err(|e| JobError::Internal(format!("the encoding task failed: {e}")))??;
        entry.shapes = encoded.shapes;
        let payload: PutPayload = encoded
            .parts
            .into_parts()
            .into_iter()
            // Each part's buffer, trace rows included, goes to the store
            // as it is.
            .map(Bytes::from_owner)
            .collect();
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
