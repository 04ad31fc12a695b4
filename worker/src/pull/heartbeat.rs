//! The heartbeat of a running job: a task that extends the attempt's lease
//! every heartbeat interval, reporting the progress the capture shares
//! through atomics, and tells the job when its run was cancelled or its
//! lease was lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use capture_proto::v1::{HeartbeatRequest, JobProgress};
use capture_proto::{CaptureServiceError, Fence, WorkerClient};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::rpc;

/// Longest pause before retrying a heartbeat that failed.
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(2);

/// What an attempt has done so far, updated by the capture and the uploads
/// and read by the heartbeat.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) prompts_total: u32,
    pub(crate) prompts_done: AtomicU32,
    /// Prompt plus response tokens captured.
    pub(crate) tokens: AtomicU64,
    pub(crate) artifacts: AtomicU32,
    pub(crate) bytes: AtomicU64,
}

impl Progress {
    pub(crate) fn new(prompts_total: usize) -> Self {
        Self {
            prompts_total: u32::try_from(prompts_total).unwrap_or(u32::MAX),
            ..Self::default()
        }
    }

    pub(crate) fn snapshot(&self) -> JobProgress {
        JobProgress {
            prompts_done: self.prompts_done.load(Ordering::Relaxed),
            prompts_total: self.prompts_total,
            tokens_captured: self.tokens.load(Ordering::Relaxed),
            artifacts_written: self.artifacts.load(Ordering::Relaxed),
            bytes_written: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// What the coordinator's answer to a heartbeat means for the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeartbeatEvent {
    /// The run was cancelled: stop, upload nothing more, release the job.
    CancelRequested,
    /// The attempt no longer holds the lease: stop, never complete.
    LeaseLost(String),
}

/// Heartbeats `fence` every `interval` until aborted (drop or abort the
/// handle) or until it reports an event, which ends it.
pub(crate) fn spawn_heartbeat(
    client: WorkerClient,
    fence: Fence,
    interval: Duration,
    progress: Arc<Progress>,
) -> (JoinHandle<()>, mpsc::Receiver<HeartbeatEvent>) {
    let (events, received) = mpsc::channel(1);
    let task = tokio::spawn(async move {
        let mut pause = interval;
        loop {
            tokio::time::sleep(pause).await;
            pause = interval;
            let request = HeartbeatRequest {
                progress: Some(progress.snapshot()),
                ..Default::default()
            }
            .with_fence(fence);
            let mut client = client.clone();
            let status = match rpc::call("heartbeat", client.heartbeat(request)).await {
                Ok(answer) if answer.cancel_requested => {
                    let _ = events.send(HeartbeatEvent::CancelRequested).await;
                    return;
                }
                Ok(_) => {
                    debug!(job_id = %fence.job_id, attempt = %fence.attempt, "heartbeat");
                    continue;
                }
                Err(status) => status,
            };
            if let Some(event) = event_of_refusal(&CaptureServiceError::from_status(&status)) {
                let _ = events.send(event).await;
                return;
            }
            pause = interval.min(RETRY_PAUSE_MAX);
            warn!(
                job_id = %fence.job_id,
                attempt = %fence.attempt,
                error = %rpc::describe(&status),
                "heartbeat failed, retrying"
            );
        }
    });
    (task, received)
}

/// A refused heartbeat that ends the attempt: a lost lease (also a job the
/// coordinator finished or no longer knows), or a cancelled run.
pub(crate) fn event_of_refusal(error: &CaptureServiceError) -> Option<HeartbeatEvent> {
    match error {
        CaptureServiceError::Cancelled { .. } => Some(HeartbeatEvent::CancelRequested),
        CaptureServiceError::AlreadyFinished { .. } | CaptureServiceError::NotFound { .. } => {
            Some(HeartbeatEvent::LeaseLost(error.to_string()))
        }
        error if error.is_lease_lost() => Some(HeartbeatEvent::LeaseLost(error.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_that_end_the_attempt() {
        let lost = CaptureServiceError::FailedPrecondition("lease lost: expired".into());
        assert!(matches!(
            event_of_refusal(&lost),
            Some(HeartbeatEvent::LeaseLost(_))
        ));
        assert_eq!(
            event_of_refusal(&CaptureServiceError::cancelled("run", "r")),
            Some(HeartbeatEvent::CancelRequested)
        );
        assert!(matches!(
            event_of_refusal(&CaptureServiceError::already_finished("job", "j")),
            Some(HeartbeatEvent::LeaseLost(_))
        ));
        assert_eq!(
            event_of_refusal(&CaptureServiceError::Unavailable("db down".into())),
            None
        );
        assert_eq!(
            event_of_refusal(&CaptureServiceError::Internal("bug".into())),
            None
        );
    }

    #[test]
    fn progress_snapshots_read_the_counters() {
        let progress = Progress::new(4);
        progress.prompts_done.fetch_add(1, Ordering::Relaxed);
        progress.tokens.fetch_add(12, Ordering::Relaxed);
        progress.artifacts.fetch_add(2, Ordering::Relaxed);
        progress.bytes.fetch_add(4096, Ordering::Relaxed);
        assert_eq!(
            progress.snapshot(),
            JobProgress {
                prompts_done: 1,
                prompts_total: 4,
                tokens_captured: 12,
                artifacts_written: 2,
                bytes_written: 4096,
            }
        );
    }
}
