//! `bench-queue`: a bounded load test of the job queue. Creates one run of
//! synthetic jobs, drains it with concurrent claim -> complete loops, and
//! measures throughput and per-call latency, then checks from the queue's
//! own records that every job succeeded exactly once.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::queue::{
    ArtifactRow, AttemptOutcome, CaptureMode, DecodingSpec, JobId, JobPayload, JobPrompt, JobQueue,
    JobState, ModelRef, NewJob, NewRun, Queue, QueueError, RunId, RunSpec, RunState,
};

/// How big a benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchQueueConfig {
    /// Concurrent claim -> complete loops.
    pub workers: usize,
    /// Jobs in the run.
    pub jobs: usize,
    /// Lease asked for on every claim.
    pub lease: Duration,
}

/// p50 and p99 of one call's latency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySummary {
    pub p50: Duration,
    pub p99: Duration,
}

/// What one benchmark measured and verified.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchQueueReport {
    pub backend: &'static str,
    pub run_id: RunId,
    pub experiment: String,
    pub config: BenchQueueConfig,
    /// Time to create the run and its jobs (one transaction), not in `wall`.
    pub create_run: Duration,
    /// From the first claim to the last worker's exit.
    pub wall: Duration,
    /// Claims that returned a job.
    pub claims: u64,
    /// Claims that found nothing (each worker's last poll).
    pub empty_claims: u64,
    pub completions: u64,
    pub claim_latency: LatencySummary,
    pub complete_latency: LatencySummary,
    /// Jobs the queue records as succeeded on attempt 1 with exactly one
    /// attempt row.
    pub jobs_succeeded_once: u64,
    /// Everything the verification found wrong; empty when the run is clean.
    pub problems: Vec<String>,
}

impl BenchQueueReport {
    /// Job state transitions (claims plus completions) per second of wall time.
    pub fn transitions_per_second(&self) -> f64 {
        let seconds = self.wall.as_secs_f64();
        if seconds == 0.0 {
            return 0.0;
        }
        (self.claims + self.completions) as f64 / seconds
    }

    /// True when every job succeeded exactly once.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// The results as a markdown table.
    pub fn to_markdown(&self) -> String {
        let millis = |duration: Duration| format!("{:.2} ms", duration.as_secs_f64() * 1e3);
        let rows = [
            ("backend", self.backend.to_owned()),
            ("experiment", self.experiment.clone()),
            ("workers", self.config.workers.to_string()),
            ("jobs", self.config.jobs.to_string()),
            ("create run (not in wall time)", millis(self.create_run)),
            ("wall time", format!("{:.3} s", self.wall.as_secs_f64())),
            (
                "transitions/s (claims + completions)",
                format!("{:.0}", self.transitions_per_second()),
            ),
            (
                "jobs/s",
                format!(
                    "{:.0}",
                    self.completions as f64 / self.wall.as_secs_f64().max(f64::EPSILON)
                ),
            ),
            (
                "claims / completions",
                format!("{} / {}", self.claims, self.completions),
            ),
            ("empty claims", self.empty_claims.to_string()),
            (
                "claim p50 / p99",
                format!(
                    "{} / {}",
                    millis(self.claim_latency.p50),
                    millis(self.claim_latency.p99)
                ),
            ),
            (
                "complete p50 / p99",
                format!(
                    "{} / {}",
                    millis(self.complete_latency.p50),
                    millis(self.complete_latency.p99)
                ),
            ),
            (
                "succeeded exactly once",
                format!("{} of {}", self.jobs_succeeded_once, self.config.jobs),
            ),
        ];
        let mut table = String::from("| metric | value |\n|---|---|\n");
        for (metric, value) in rows {
            let _ = writeln!(table, "| {metric} | {value} |");
        }
        table
    }
}

/// What one worker loop saw.
#[derive(Debug, Default)]
struct WorkerTally {
    claim_latencies: Vec<Duration>,
    complete_latencies: Vec<Duration>,
    completed_jobs: Vec<JobId>,
    empty_claims: u64,
}

/// Runs the benchmark on `queue`: creates a run of `config.jobs` jobs for a
/// model no one else serves, drains it with `config.workers` concurrent
/// loops, and verifies the outcome. Stops by itself once no job is left;
/// the first queue error of any loop aborts the benchmark with that error.
pub async fn bench_queue(
    queue: &Queue,
    config: BenchQueueConfig,
) -> Result<BenchQueueReport, QueueError> {
    if config.workers == 0 || config.jobs == 0 {
        return Err(QueueError::InvalidArgument(
            "bench-queue needs at least one worker and one job".to_owned(),
        ));
    }
    let run_id = RunId::new_time_ordered();
    let experiment = format!("bench-queue-{run_id}");
    // A model revision unique to this run: claims never pick up jobs of
    // other runs, including leftovers of an aborted benchmark.
    let model = ModelRef {
        id: "bench/queue".to_owned(),
        revision: run_id.to_string(),
    };
    let run = NewRun {
        id: run_id,
        spec: bench_run_spec(&experiment, &model),
    };
    let jobs = bench_jobs(config.jobs);

    let create_started = Instant::now();
    queue.create_run(&run, &jobs).await?;
    let create_run = create_started.elapsed();

    let started = Instant::now();
    let mut loops = tokio::task::JoinSet::new();
    for worker_index in 0..config.workers {
        let queue = queue.clone();
        let model = model.clone();
        let worker_id = format!("bench-worker-{worker_index}-{run_id}");
        loops.spawn(async move { drain(&queue, &worker_id, &model, config.lease).await });
    }
    let mut tallies = Vec::with_capacity(config.workers);
    while let Some(joined) = loops.join_next().await {
        // A panicking loop is a bug in the benchmark: surface the panic.
        let tally = joined.unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()))?;
        tallies.push(tally);
    }
    let wall = started.elapsed();

    let mut claim_latencies = Vec::new();
    let mut complete_latencies = Vec::new();
    let mut completed_jobs = Vec::new();
    let mut empty_claims = 0;
    for tally in tallies {
        claim_latencies.extend(tally.claim_latencies);
        complete_latencies.extend(tally.complete_latencies);
        completed_jobs.extend(tally.completed_jobs);
        empty_claims += tally.empty_claims;
    }

    let (jobs_succeeded_once, problems) =
        verify_run(queue, run_id, config.jobs, &completed_jobs).await?;
    Ok(BenchQueueReport {
        backend: queue.backend_name(),
        run_id,
        experiment,
        config,
        create_run,
        wall,
        claims: claim_latencies.len() as u64,
        empty_claims,
        completions: complete_latencies.len() as u64,
        claim_latency: summarize(&mut claim_latencies),
        complete_latency: summarize(&mut complete_latencies),
        jobs_succeeded_once,
        problems,
    })
}

/// One worker: claim -> complete until a claim finds nothing. With a lease
/// longer than the benchmark and no failures, an empty claim means every
/// job is leased or done, so the loop can stop.
async fn drain(
    queue: &Queue,
    worker_id: &str,
    model: &ModelRef,
    lease: Duration,
) -> Result<WorkerTally, QueueError> {
    let mut tally = WorkerTally::default();
    loop {
        let claim_started = Instant::now();
        let Some(claimed) = queue.claim(worker_id, model, lease).await? else {
            tally.empty_claims += 1;
            return Ok(tally);
        };
        tally.claim_latencies.push(claim_started.elapsed());

        let artifact = bench_artifact(&claimed.job.key, &claimed.job.payload);
        let complete_started = Instant::now();
        queue
            .complete(claimed.job.id, claimed.attempt, worker_id, &[artifact])
            .await?;
        tally.complete_latencies.push(complete_started.elapsed());
        tally.completed_jobs.push(claimed.job.id);
    }
}

/// Checks the run from the queue's records: every job succeeded on its
/// first and only attempt, each was completed by exactly one worker call,
/// the run succeeded and holds one artifact per job. Returns how many jobs
/// passed and what went wrong.
async fn verify_run(
    queue: &Queue,
    run_id: RunId,
    expected_jobs: usize,
    completed_jobs: &[JobId],
) -> Result<(u64, Vec<String>), QueueError> {
    let mut problems = Vec::new();
    let mut completions_by_job: HashMap<JobId, u32> = HashMap::new();
    for job in completed_jobs {
        *completions_by_job.entry(*job).or_default() += 1;
    }
    let mut attempts_by_job: HashMap<JobId, Vec<Option<AttemptOutcome>>> = HashMap::new();
    for attempt in queue.list_attempts(run_id).await? {
        attempts_by_job
            .entry(attempt.job_id)
            .or_default()
            .push(attempt.outcome);
    }

    let jobs = queue.list_jobs(run_id).await?;
    if jobs.len() != expected_jobs {
        problems.push(format!(
            "run has {} jobs, expected {expected_jobs}",
            jobs.len()
        ));
    }
    let mut succeeded_once = 0;
    for job in &jobs {
        let completions = completions_by_job.get(&job.id).copied().unwrap_or(0);
        let attempts = attempts_by_job
            .get(&job.id)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let clean = job.state == JobState::Succeeded
            && job.attempt == 1
            && completions == 1
            && attempts == [Some(AttemptOutcome::Succeeded)];
        if clean {
            succeeded_once += 1;
        } else if problems.len() < 20 {
            problems.push(format!(
                "job {} ({}): state {}, attempt {}, {completions} accepted completions, attempts {attempts:?}",
                job.id, job.key, job.state, job.attempt
            ));
        }
    }

    let status = queue.run_status(run_id).await?;
    if status.run.state != RunState::Succeeded {
        problems.push(format!(
            "run state is {}, expected succeeded",
            status.run.state
        ));
    }
    if status.jobs.succeeded != expected_jobs as i64 || status.jobs.total() != expected_jobs as i64
    {
        problems.push(format!(
            "run status counts {:?}, expected {expected_jobs} succeeded",
            status.jobs
        ));
    }
    if status.artifacts != expected_jobs as i64 {
        problems.push(format!(
            "run has {} artifacts, expected {expected_jobs}",
            status.artifacts
        ));
    }
    Ok((succeeded_once, problems))
}

/// Nearest-rank p50 and p99; zero for no samples. Sorts `samples`.
fn summarize(samples: &mut [Duration]) -> LatencySummary {
    samples.sort_unstable();
    LatencySummary {
        p50: percentile(samples, 50),
        p99: percentile(samples, 99),
    }
}

/// Nearest-rank percentile of sorted `samples`.
fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

fn bench_run_spec(experiment: &str, model: &ModelRef) -> RunSpec {
    RunSpec {
        experiment: experiment.to_owned(),
        model: model.clone(),
        prompt_sets: vec!["bench".to_owned()],
        modes: vec![CaptureMode::Residual],
        decoding: DecodingSpec {
            max_new_tokens: 1,
            temperature: None,
            top_p: None,
            seed: None,
            chat_template: false,
            replay: None,
        },
        store_dtype: "f32".to_owned(),
        shard_size: 1,
    }
}

/// Jobs `bench/residual/0`, `bench/residual/1`, ..., one prompt each.
fn bench_jobs(count: usize) -> Vec<NewJob> {
    (0..count)
        .map(|index| NewJob {
            key: format!("bench/residual/{index}"),
            payload: JobPayload {
                prompt_set: "bench".to_owned(),
                prompts: vec![JobPrompt {
                    id: format!("p{index}"),
                    text: format!("bench prompt {index}"),
                }],
                mode: CaptureMode::Residual,
            },
        })
        .collect()
}

/// One small artifact row for a job; its key is unique in the run.
fn bench_artifact(job_key: &str, payload: &JobPayload) -> ArtifactRow {
    let prompt_id = payload
        .prompts
        .first()
        .map(|prompt| prompt.id.clone())
        .unwrap_or_default();
    ArtifactRow {
        key: format!("inference/raw/{job_key}.pt"),
        size_bytes: 1024,
        sha256: "0".repeat(64),
        prompt_set: payload.prompt_set.clone(),
        prompt_id,
        mode: payload.mode.name().to_owned(),
        layer: None,
        prompt_tokens: Some(4),
        response_tokens: Some(1),
        shapes: serde_json::json!({ "residual": [1, 5, 8] }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let summary = summarize(&mut samples);
        assert_eq!(summary.p50, Duration::from_millis(50));
        assert_eq!(summary.p99, Duration::from_millis(99));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
        assert_eq!(
            percentile(&[Duration::from_millis(7)], 99),
            Duration::from_millis(7)
        );
    }

    #[test]
    fn bench_jobs_have_unique_keys_and_artifact_keys() {
        let jobs = bench_jobs(3);
        let keys: Vec<_> = jobs
            .iter()
            .map(|job| bench_artifact(&job.key, &job.payload).key)
            .collect();
        assert_eq!(
            keys,
            [
                "inference/raw/bench/residual/0.pt",
                "inference/raw/bench/residual/1.pt",
                "inference/raw/bench/residual/2.pt"
            ]
        );
    }
}
