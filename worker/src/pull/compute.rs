//! The worker's capture thread, shared by every job it holds: jobs submit
//! their prompts here, and the prompts of jobs with the same capture
//! settings run in shared batches (one forward pass per step for all of
//! them), so a worker holding several small jobs batches beyond one job's
//! shard. Each job gets its artifacts through its own upload queue and its
//! result as soon as its last prompt is captured, while the others go on.
//!
//! Jobs are grouped when the thread is free: it takes every waiting
//! submission with the first one's settings (the others wait for the next
//! group, in order), lingering a moment for jobs that are claimed but not
//! submitted yet, so a burst of claims forms one group.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tracing::{debug, error};

use super::Engine;
use super::convert::JobPlan;
use super::error::JobError;
use super::execute::PendingUpload;
use super::heartbeat::Progress;
use super::replay::StoreReplay;
use crate::metrics::WorkerMetrics;
use crate::run::{
    CaptureSettings, PreparedPrompt, ReplaySource, batch_size_for, capture_prepared_batch,
    prepare_prompts,
};

/// The longest a free capture thread waits for claimed jobs that have not
/// submitted their prompts yet before it starts without them. In unit
/// tests 10 s, a margin for a loaded test machine claiming a few jobs from
/// a test coordinator; the wait ends as soon as no claimed job is missing.
const LINGER: Duration = Duration::from_secs(if cfg!(test) { 10 } else { 1 });
/// How often the lingering thread looks whether those jobs are still expected.
const LINGER_POLL: Duration = Duration::from_millis(2);

/// What a job's capture did, handed back when its last prompt is captured
/// (or when it stopped or failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Captured {
    /// Preparing its prompts and the forward passes they took part in
    /// (shared with the other jobs of those batches); encoding is the
    /// upload task's.
    pub(crate) compute: Duration,
    /// Artifacts handed to the upload task.
    pub(crate) queued: usize,
    /// The stop flag (or a stopped upload task) ended it early.
    pub(crate) stopped: bool,
}

/// One job's part for the capture thread.
pub(crate) struct Submission {
    pub(crate) plan: JobPlan,
    pub(crate) replay: Option<StoreReplay>,
    pub(crate) progress: Arc<Progress>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) metrics: WorkerMetrics,
    /// Where its artifacts go, in capture order; `None` once finished
    /// (dropping it ends the job's upload task).
    pub(crate) queue: Option<mpsc::Sender<PendingUpload>>,
    /// Where its result goes; `None` once told.
    pub(crate) done: Option<oneshot::Sender<Result<Captured, JobError>>>,
}

/// The handle jobs submit through; the thread ends once every handle is
/// dropped and its work is done.
#[derive(Clone)]
pub(crate) struct Capturer {
    submissions: std_mpsc::Sender<Submission>,
    expected: Arc<AtomicUsize>,
}

/// A claimed job that may still submit its prompts: a capture thread that
/// is free lingers while any exists. Dropping it (once the job has
/// submitted, or ended without doing so) takes it back.
pub(crate) struct Expected(Arc<AtomicUsize>);

/// What a claimed job holds until its capture is done: one of the worker's
/// `--concurrent-jobs` slots, given back as soon as its last prompt is
/// captured (its uploads and completion then overlap the next jobs'
/// compute), and its mark on the capture thread until it submits.
pub(crate) struct Held {
    pub(crate) slot: OwnedSemaphorePermit,
    pub(crate) expected: Expected,
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Capturer {
    /// Starts the capture thread for `engine`.
    pub(crate) fn start(engine: Arc<Engine>) -> std::io::Result<Self> {
        let (submissions, received) = std_mpsc::channel();
        let expected = Arc::new(AtomicUsize::new(0));
        let watched = Arc::clone(&expected);
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || serve(&engine, &received, &watched))?;
        Ok(Self {
            submissions,
            expected,
        })
    }

    /// Announces a claimed job that will submit its prompts (or end).
    pub(crate) fn expect(&self) -> Expected {
        self.expected.fetch_add(1, Ordering::AcqRel);
        Expected(Arc::clone(&self.expected))
    }

    /// Queues a job's prompts for capture.
    pub(crate) fn submit(&self, submission: Submission) -> Result<(), JobError> {
        self.submissions
            .send(submission)
            .map_err(|_| JobError::Internal("the capture thread has stopped".into()))
    }
}

/// The thread: group waiting submissions by settings, capture each group.
fn serve(engine: &Engine, received: &std_mpsc::Receiver<Submission>, expected: &AtomicUsize) {
    let mut waiting: VecDeque<Submission> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match received.recv() {
                Ok(submission) => waiting.push_back(submission),
                Err(_) => return,
            }
        }
        linger(received, expected, &mut waiting);
        let settings = waiting[0].plan.settings.clone();
        let (group, others): (Vec<_>, Vec<_>) =
            waiting.drain(..).partition(|s| s.plan.settings == settings);
        waiting = others.into();
        let members: Vec<Member> = group.into_iter().map(Member::new).collect();
        // A panic drops the members' result senders: their jobs fail as
        // internal errors (retried), and the thread serves the next group.
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
            capture_group(engine, &settings, members);
        }));
        if run.is_err() {
            error!("a capture panicked: its jobs fail and are retried");
        }
    }
}

/// Takes every submission already sent, then waits (up to [`LINGER`]) for
/// claimed jobs that have not submitted yet.
fn linger(
    received: &std_mpsc::Receiver<Submission>,
    expected: &AtomicUsize,
    waiting: &mut VecDeque<Submission>,
) {
    let deadline = Instant::now() + LINGER;
    loop {
        waiting.extend(received.try_iter());
        let now = Instant::now();
        if expected.load(Ordering::Acquire) == 0 || now >= deadline {
            return;
        }
        match received.recv_timeout(LINGER_POLL.min(deadline - now)) {
            Ok(submission) => waiting.push_back(submission),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// One job of a group, while the thread holds it.
struct Member {
    job: Submission,
    /// Prompts not captured yet.
    remaining: usize,
    compute: Duration,
    queued: usize,
}

impl Member {
    fn new(job: Submission) -> Self {
        Self {
            job,
            remaining: 0,
            compute: Duration::ZERO,
            queued: 0,
        }
    }

    fn active(&self) -> bool {
        self.job.done.is_some()
    }

    /// Hands the job its result (once) and lets its upload task end.
    fn finish(&mut self, result: Result<Captured, JobError>) {
        self.job.queue = None;
        if let Some(done) = self.job.done.take() {
            // The job may have stopped waiting (drain timeout): nothing to tell.
            let _ = done.send(result);
        }
    }

    /// Finishes the job as stopped (if it is still active).
    fn finish_stopped(&mut self) {
        let captured = self.captured(true);
        self.finish(Ok(captured));
    }

    fn captured(&self, stopped: bool) -> Captured {
        Captured {
            compute: self.compute,
            queued: self.queued,
            stopped,
        }
    }

    /// Hands one captured artifact to the upload task; false once that task
    /// has stopped (its error is the job's).
    fn send(&mut self, upload: PendingUpload) -> bool {
        let sent = self
            .job
            .queue
            .as_ref()
            .is_some_and(|queue| queue.blocking_send(upload).is_ok());
        if sent {
            self.queued += 1;
        }
        sent
    }
}

/// Captures the prompts of `members` (all with `settings`) in shared
/// batches, in submission order; each member finishes as soon as its last
/// prompt is handed to its upload task.
fn capture_group(engine: &Engine, settings: &CaptureSettings, mut members: Vec<Member>) {
    let (meta, model) = (&engine.meta, &engine.model);
    // Which member each prompt belongs to, and the prompts.
    let mut owners: Vec<usize> = Vec::new();
    let mut prompts: Vec<PreparedPrompt> = Vec::new();
    for (index, member) in members.iter_mut().enumerate() {
        if member.job.stop.load(Ordering::Relaxed) {
            member.finish_stopped();
            continue;
        }
        // Every prompt of a job is prepared first, so that a bad one fails
        // the job before any compute.
        let started = Instant::now();
        let prepared = prepare_prompts(
            meta,
            settings,
            &member.job.plan.set,
            &member.job.plan.prompts,
            member.job.replay.as_ref().map(|r| r as &dyn ReplaySource),
        );
        member.compute += started.elapsed();
        match prepared {
            Ok(prepared) => {
                member.remaining = prepared.len();
                owners.extend(std::iter::repeat_n(index, prepared.len()));
                prompts.extend(prepared);
                if member.remaining == 0 {
                    let captured = member.captured(false);
                    member.finish(Ok(captured));
                }
            }
            Err(error) => member.finish(Err(error.into())),
        }
    }
    let batch_size = batch_size_for(
        engine.batch_size,
        meta,
        model,
        settings,
        &prompts,
        engine.encoders,
    )
    .max(1);
    debug!(
        jobs = members.len(),
        prompts = prompts.len(),
        batch_size,
        "capturing a group of jobs"
    );
    let mut start = 0;
    while start < prompts.len() {
        let end = (start + batch_size).min(prompts.len());
        for member in &mut members {
            if member.active() && member.job.stop.load(Ordering::Relaxed) {
                member.finish_stopped();
            }
        }
        let rows: Vec<usize> = (start..end)
            .filter(|&i| members[owners[i]].active())
            .collect();
        start = end;
        if !rows.is_empty() {
            capture_rows(engine, settings, &mut members, &owners, &prompts, &rows);
        }
    }
    for member in &mut members {
        // Only members whose prompts were skipped after a stop are left.
        member.finish_stopped();
    }
}

/// One batch: the prompts at `rows` (of active members) in shared passes.
fn capture_rows(
    engine: &Engine,
    settings: &CaptureSettings,
    members: &mut [Member],
    owners: &[usize],
    prompts: &[PreparedPrompt],
    rows: &[usize],
) {
    let batch: Vec<PreparedPrompt> = rows.iter().map(|&i| prompts[i].clone()).collect();
    let mut jobs: Vec<usize> = rows.iter().map(|&i| owners[i]).collect();
    jobs.dedup();
    if let Some(member) = members.get(jobs[0]) {
        member.job.metrics.batch(jobs.len(), batch.len());
    }
    let started = Instant::now();
    let captured = {
        let members = &*members;
        let mut on_token = |row: usize| {
            let member = &members[owners[rows[row]]];
            member.job.progress.tokens.fetch_add(1, Ordering::Relaxed);
            member.job.metrics.tokens_captured(1);
        };
        capture_prepared_batch(&engine.meta, &engine.model, settings, &batch, &mut on_token)
    };
    let elapsed = started.elapsed();
    for &job in &jobs {
        members[job].compute += elapsed;
    }
    let captured = match captured {
        Ok(captured) => captured,
        Err(error) => {
            let error = JobError::from(error);
            for &job in &jobs[1..] {
                members[job].finish(Err(shared_failure(&error)));
            }
            members[jobs[0]].finish(Err(error));
            return;
        }
    };
    for (&row, mut prompt) in rows.iter().zip(captured) {
        let member = &mut members[owners[row]];
        if !member.active() {
            continue;
        }
        let tokens = prompt.prompt_tokens as u64;
        member
            .job
            .progress
            .tokens
            .fetch_add(tokens, Ordering::Relaxed);
        member.job.metrics.tokens_captured(tokens);
        let mut sent = true;
        // Taken out of the prompt: the upload task then holds each artifact
        // alone, and encoding takes its trace.
        for artifact in std::mem::take(&mut prompt.artifacts) {
            // Shapes come from the upload task, which assembles and encodes
            // the artifact; size and sha256 from the upload, which hashes as
            // it sends.
            let entry = prompt.entry(&artifact);
            let upload = PendingUpload { entry, artifact };
            if !member.send(upload) {
                sent = false;
                break;
            }
        }
        if !sent {
            // The upload task stopped: its error is the job's.
            member.finish_stopped();
            continue;
        }
        member
            .job
            .progress
            .prompts_done
            .fetch_add(1, Ordering::Relaxed);
        member.remaining -= 1;
        if member.remaining == 0 {
            let captured = member.captured(false);
            member.finish(Ok(captured));
        }
    }
}

/// What the other jobs of a failed batch are told: the same failure, as
/// retryable as it is.
fn shared_failure(error: &JobError) -> JobError {
    let message = format!(
        "a forward pass shared with another job failed: {}",
        error.message()
    );
    if error.is_retryable() {
        JobError::Internal(message)
    } else {
        JobError::Invalid(message)
    }
}
