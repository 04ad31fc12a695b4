//! Between the queue's records and the wire messages, and the one mapping
//! from `QueueError` to the service error.

use capture_proto::v1 as pb;
use capture_proto::{CaptureServiceError, IdParseError, prost_types};
use chrono::{DateTime, Utc};

use crate::queue::{
    self, CaptureMode, DecodingSpec, JobCounts, JobRecord, QueueError, RunId, RunSpec, RunStatus,
};

/// The service error for a queue error. Lease loss keeps its stable
/// "lease lost" form so workers can recognise it.
pub(crate) fn queue_error(error: QueueError) -> CaptureServiceError {
    match error {
        QueueError::NotFound { what, id } => CaptureServiceError::NotFound {
            what: what.to_owned(),
            id,
        },
        QueueError::LeaseLost { job, attempt } => CaptureServiceError::LeaseLost {
            job: capture_proto::JobId::from_uuid(job.0),
            attempt: capture_proto::Attempt::from_wire(u32::try_from(attempt).unwrap_or(1))
                .unwrap_or(capture_proto::Attempt::FIRST),
        },
        QueueError::InvalidState(message) => CaptureServiceError::FailedPrecondition(message),
        QueueError::InvalidArgument(message) => CaptureServiceError::InvalidArgument(message),
        QueueError::Conflict(message) => {
            CaptureServiceError::FailedPrecondition(format!("conflict: {message}"))
        }
        error @ QueueError::Unavailable(_) => CaptureServiceError::Unavailable(error.to_string()),
        error => CaptureServiceError::Internal(error.to_string()),
    }
}

pub(crate) fn id_error(error: IdParseError) -> CaptureServiceError {
    CaptureServiceError::from(error)
}

pub(crate) fn run_id(text: &str) -> Result<RunId, CaptureServiceError> {
    let id = capture_proto::RunId::parse_wire(text).map_err(id_error)?;
    Ok(RunId(*id.as_uuid()))
}

pub(crate) fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn duration(duration: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(duration).unwrap_or_default()
}

/// The wire state of a run: `PENDING` before the first claim, and a
/// finished run reads as `RUNNING` until its manifest is written, so that
/// clients that see a terminal state also see every artifact.
pub(crate) fn run_state(status: &RunStatus) -> pb::RunState {
    match status.run.state {
        queue::RunState::Running if status.started_at.is_none() => pb::RunState::Pending,
        queue::RunState::Running => pb::RunState::Running,
        _ if status.run.finalized_at.is_none() => pb::RunState::Running,
        queue::RunState::Succeeded => pb::RunState::Succeeded,
        queue::RunState::Failed => pb::RunState::Failed,
        queue::RunState::Cancelled => pb::RunState::Cancelled,
    }
}

pub(crate) fn run_state_filter(state: pb::RunState) -> Option<queue::RunState> {
    match state {
        pb::RunState::Unspecified => None,
        pb::RunState::Pending | pb::RunState::Running => Some(queue::RunState::Running),
        pb::RunState::Succeeded => Some(queue::RunState::Succeeded),
        pb::RunState::Failed => Some(queue::RunState::Failed),
        pb::RunState::Cancelled => Some(queue::RunState::Cancelled),
    }
}

pub(crate) fn job_counts(counts: &JobCounts) -> pb::JobCounts {
    let n = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    pb::JobCounts {
        total: n(counts.total()),
        queued: n(counts.queued),
        leased: n(counts.leased),
        succeeded: n(counts.succeeded),
        dead: n(counts.dead),
        cancelled: n(counts.cancelled),
    }
}

pub(crate) fn job_state(state: queue::JobState) -> pb::JobState {
    match state {
        queue::JobState::Queued => pb::JobState::Queued,
        queue::JobState::Leased => pb::JobState::Leased,
        queue::JobState::Succeeded => pb::JobState::Succeeded,
        queue::JobState::Dead => pb::JobState::Dead,
        queue::JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub(crate) fn capture_mode(mode: &CaptureMode) -> pb::CaptureMode {
    match mode {
        CaptureMode::Residual => pb::CaptureMode {
            kind: pb::CaptureModeKind::Residual as i32,
            layers: Vec::new(),
            all_layers: false,
        },
        CaptureMode::Internals { layers } => pb::CaptureMode {
            kind: pb::CaptureModeKind::Internals as i32,
            layers: layers.clone(),
            all_layers: false,
        },
    }
}

pub(crate) fn decoding(spec: &DecodingSpec) -> pb::Decoding {
    let strategy = match spec.temperature {
        Some(temperature) => pb::decoding::Strategy::Sampling(pb::Sampling {
            temperature,
            top_p: spec.top_p,
            seed: spec.seed.unwrap_or(0),
        }),
        None => pb::decoding::Strategy::Greedy(pb::Greedy {}),
    };
    pb::Decoding {
        strategy: Some(strategy),
        max_new_tokens: spec.max_new_tokens,
        replay: spec.replay.clone().map(|root| pb::ReplaySource {
            source: Some(pb::replay_source::Source::RootUrl(root)),
        }),
    }
}

pub(crate) fn store_dtype(name: &str) -> pb::StoreDtype {
    pb::StoreDtype::from_short_name(name).unwrap_or(pb::StoreDtype::F32)
}

/// The stored spec in wire form. Uploaded prompt files come back by name
/// only (their prompts live in the jobs).
pub(crate) fn run_spec(spec: &RunSpec) -> pb::RunSpec {
    pb::RunSpec {
        experiment: spec.experiment.clone(),
        prompt_sets: spec
            .prompt_sets
            .iter()
            .map(|name| pb::PromptSetSource {
                source: Some(
                    if capture_worker::prompts::BUILTIN_SET_NAMES.contains(&name.as_str()) {
                        pb::prompt_set_source::Source::Builtin(name.clone())
                    } else {
                        pb::prompt_set_source::Source::File(pb::PromptFile {
                            name: name.clone(),
                            json: Vec::new(),
                        })
                    },
                ),
            })
            .collect(),
        modes: spec.modes.iter().map(capture_mode).collect(),
        decoding: Some(decoding(&spec.decoding)),
        model_id: spec.model.id.clone(),
        model_revision: spec.model.revision.clone(),
        store_dtype: store_dtype(&spec.store_dtype) as i32,
        shard_size: spec.shard_size,
        chat_template: spec.decoding.chat_template,
    }
}

pub(crate) fn run(status: &RunStatus, artifact_root: String) -> pb::Run {
    pb::Run {
        run_id: status.run.id.to_string(),
        spec: Some(run_spec(&status.run.spec)),
        state: run_state(status) as i32,
        jobs: Some(job_counts(&status.jobs)),
        artifact_root,
        created_at: Some(timestamp(status.run.created_at)),
        started_at: status.started_at.map(timestamp),
        finished_at: status
            .run
            .finalized_at
            .and(status.run.finished_at)
            .map(timestamp),
        tokens_captured: u64::try_from(status.tokens_captured).unwrap_or(0),
        artifacts_written: u64::try_from(status.artifacts).unwrap_or(0),
        bytes_written: u64::try_from(status.artifact_bytes).unwrap_or(0),
        job_details: Vec::new(),
    }
}

pub(crate) fn job_info(job: &JobRecord) -> pb::JobInfo {
    pb::JobInfo {
        job_id: job.id.to_string(),
        job_key: job.key.clone(),
        state: job_state(job.state) as i32,
        prompt_set: job.payload.prompt_set.clone(),
        prompt_ids: job.payload.prompts.iter().map(|p| p.id.clone()).collect(),
        mode: Some(capture_mode(&job.payload.mode)),
        attempt: u32::try_from(job.attempt).unwrap_or(0),
        max_attempts: u32::try_from(job.max_attempts).unwrap_or(0),
        worker_id: job.lease_owner.clone().unwrap_or_default(),
        lease_expires_at: job.lease_expires_at.map(timestamp),
        last_error: job.last_error.clone().unwrap_or_default(),
    }
}

pub(crate) fn progress(status: &RunStatus, observed_at: DateTime<Utc>) -> pb::RunProgress {
    let state = run_state(status);
    pb::RunProgress {
        run_id: status.run.id.to_string(),
        state: state as i32,
        jobs: Some(job_counts(&status.jobs)),
        tokens_captured: u64::try_from(status.tokens_captured).unwrap_or(0),
        artifacts_written: u64::try_from(status.artifacts).unwrap_or(0),
        bytes_written: u64::try_from(status.artifact_bytes).unwrap_or(0),
        finished: state.is_terminal(),
        observed_at: Some(timestamp(observed_at)),
    }
}

/// The wire form of a recorded artifact.
pub(crate) fn artifact_record(row: &queue::ArtifactRow) -> pb::ArtifactRecord {
    let mode = match row.mode.as_str() {
        "residual" => pb::CaptureModeKind::Residual,
        "internals" => pb::CaptureModeKind::Internals,
        _ => pb::CaptureModeKind::Unspecified,
    };
    pb::ArtifactRecord {
        key: row.key.clone(),
        bytes: u64::try_from(row.size_bytes).unwrap_or(0),
        sha256: row.sha256.clone(),
        prompt_set: row.prompt_set.clone(),
        prompt_id: row.prompt_id.clone(),
        mode: mode as i32,
        layer: row.layer.and_then(|l| u32::try_from(l).ok()),
        prompt_tokens: row
            .prompt_tokens
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(0),
        response_tokens: row
            .response_tokens
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(0),
        shapes_json: row.shapes.to_string(),
    }
}
