//! Helpers on the generated messages: defaults the contract documents, the
//! short names of its enums (as on the command line), terminal states, and
//! the fencing token of every request about a leased job.

use crate::ids::{Attempt, Fence, IdParseError, JobId, RunId, WorkerId};
use crate::v1::{
    CaptureModeKind, CompleteJobRequest, FailJobRequest, HeartbeatRequest, Job, JobState,
    ReleaseJobRequest, RunState, StoreDtype,
};

/// Most prompts per job when `RunSpec.shard_size` is 0.
pub const DEFAULT_SHARD_SIZE: u32 = 4;
/// Most response tokens per prompt when `Decoding.max_new_tokens` is 0.
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 50;
/// Most runs per page when `ListRunsRequest.limit` is 0.
pub const DEFAULT_LIST_LIMIT: u32 = 50;

impl StoreDtype {
    /// The name used on the command line and in manifests: f32, f16 or bf16;
    /// unspecified reads as the default, f32.
    pub fn short_name(self) -> &'static str {
        match self {
            StoreDtype::Unspecified | StoreDtype::F32 => "f32",
            StoreDtype::F16 => "f16",
            StoreDtype::Bf16 => "bf16",
        }
    }

    /// Parses f32, f16 or bf16 (any case).
    pub fn from_short_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f32" => Some(StoreDtype::F32),
            "f16" => Some(StoreDtype::F16),
            "bf16" => Some(StoreDtype::Bf16),
            _ => None,
        }
    }
}

impl CaptureModeKind {
    /// The name used on the command line and in paths: residual or
    /// internals; `None` when unspecified.
    pub fn short_name(self) -> Option<&'static str> {
        match self {
            CaptureModeKind::Unspecified => None,
            CaptureModeKind::Residual => Some("residual"),
            CaptureModeKind::Internals => Some("internals"),
        }
    }

    /// Parses residual or internals (any case).
    pub fn from_short_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "residual" => Some(CaptureModeKind::Residual),
            "internals" => Some(CaptureModeKind::Internals),
            _ => None,
        }
    }
}

impl RunState {
    /// Whether the run has ended (a failed run can be retried).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }

    /// Lowercase name for displays: pending, running, succeeded, failed,
    /// cancelled (unspecified for an unset state).
    pub fn short_name(self) -> &'static str {
        match self {
            RunState::Unspecified => "unspecified",
            RunState::Pending => "pending",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }
}

impl JobState {
    /// Whether the job has ended (a dead job can be retried with its run).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Dead | JobState::Cancelled
        )
    }

    /// Lowercase name for displays and database columns: queued, leased,
    /// succeeded, dead, cancelled (unspecified for an unset state).
    pub fn short_name(self) -> &'static str {
        match self {
            JobState::Unspecified => "unspecified",
            JobState::Queued => "queued",
            JobState::Leased => "leased",
            JobState::Succeeded => "succeeded",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl Job {
    /// The job's typed id.
    pub fn typed_job_id(&self) -> Result<JobId, IdParseError> {
        JobId::parse_wire(&self.job_id)
    }

    /// The job's run, typed.
    pub fn typed_run_id(&self) -> Result<RunId, IdParseError> {
        RunId::parse_wire(&self.run_id)
    }

    /// The fence this worker must send with every call about the job.
    pub fn fence(&self, worker_id: WorkerId) -> Result<Fence, IdParseError> {
        Ok(Fence {
            job_id: self.typed_job_id()?,
            attempt: Attempt::from_wire(self.attempt)?,
            worker_id,
        })
    }
}

macro_rules! fenced_request {
    ($($request:ident),+ $(,)?) => {$(
        impl $request {
            /// The request's (job id, attempt, worker id), checked.
            pub fn fence(&self) -> Result<Fence, IdParseError> {
                Fence::from_wire(&self.job_id, self.attempt, &self.worker_id)
            }

            /// Sets the request's job id, attempt and worker id.
            pub fn with_fence(mut self, fence: Fence) -> Self {
                self.job_id = fence.job_id.to_wire();
                self.attempt = fence.attempt.get();
                self.worker_id = fence.worker_id.to_wire();
                self
            }
        }
    )+};
}

fenced_request!(
    HeartbeatRequest,
    CompleteJobRequest,
    FailJobRequest,
    ReleaseJobRequest,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_round_trip() {
        for dtype in [StoreDtype::F32, StoreDtype::F16, StoreDtype::Bf16] {
            assert_eq!(StoreDtype::from_short_name(dtype.short_name()), Some(dtype));
        }
        assert_eq!(StoreDtype::Unspecified.short_name(), "f32");
        assert_eq!(StoreDtype::from_short_name("BF16"), Some(StoreDtype::Bf16));
        assert_eq!(StoreDtype::from_short_name("f64"), None);

        for mode in [CaptureModeKind::Residual, CaptureModeKind::Internals] {
            assert_eq!(
                CaptureModeKind::from_short_name(mode.short_name().unwrap()),
                Some(mode)
            );
        }
        assert_eq!(CaptureModeKind::Unspecified.short_name(), None);
    }

    #[test]
    fn terminal_states() {
        assert!(!RunState::Pending.is_terminal());
        assert!(!RunState::Running.is_terminal());
        assert!(RunState::Failed.is_terminal());
        assert!(!JobState::Leased.is_terminal());
        assert!(JobState::Dead.is_terminal());
        assert_eq!(JobState::Dead.short_name(), "dead");
        assert_eq!(RunState::Cancelled.short_name(), "cancelled");
    }

    #[test]
    fn fenced_requests_carry_job_attempt_and_worker() {
        let fence = Fence {
            job_id: JobId::new(),
            attempt: Attempt::new(2).unwrap(),
            worker_id: WorkerId::new(),
        };
        let heartbeat = HeartbeatRequest::default().with_fence(fence);
        assert_eq!(heartbeat.fence().unwrap(), fence);
        let fail = FailJobRequest {
            error: "out of memory".into(),
            retryable: true,
            ..Default::default()
        }
        .with_fence(fence);
        assert_eq!(fail.fence().unwrap(), fence);
        assert_eq!(
            CompleteJobRequest::default().fence().unwrap_err(),
            IdParseError::Missing { kind: "job id" }
        );

        let job = Job {
            job_id: fence.job_id.to_wire(),
            run_id: RunId::new().to_wire(),
            attempt: 2,
            ..Default::default()
        };
        assert_eq!(job.fence(fence.worker_id).unwrap(), fence);
        assert!(job.typed_run_id().is_ok());
    }
}
