//! `coordinator soak`: a bounded soak test of the whole job path on
//! loopback. Starts a real coordinator gRPC server in this process (the
//! Postgres or SQLite queue named by a URL, a local artifact store in a
//! temporary directory), submits one run of N one-prompt jobs through
//! CaptureService, and drains it with W simulated workers: real tonic
//! WorkerService clients, each over its own HTTP/2 connection, that claim,
//! heartbeat from a separate task, "capture" by sleeping, stage real small
//! files in the store exactly where a worker stages them, and complete.
//! Measures claim latency and throughput, then checks from the database and
//! the store that every job succeeded exactly once and that no two attempts
//! of a job ever held its lease at the same time.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use capture_proto::ClientConfig;
use capture_proto::tonic::Status;
use capture_proto::v1 as pb;
use capture_worker::store::{ArtifactStore, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::queue::{JobQueue, Queue, RetryPolicy, RunId, RunState};
use crate::server::{ServerConfig, serve};
use crate::service::{Coordinator, LeaseTiming};

mod report;
mod verify;
mod worker;

pub use report::{LatencyStats, SoakReport};
use verify::{verify_database, verify_store};
use worker::SimulatedWorker;

/// The prompt set (and artifact folder) of the soak run.
const PROMPT_SET: &str = "soak";
/// How long an idle worker's ClaimJob may wait on the server for work.
const CLAIM_WAIT: Duration = Duration::from_secs(1);
/// How often the driver looks at the run's state.
const WATCH_POLL: Duration = Duration::from_millis(100);
/// Attempts a job gets: enough that injected failures (at most half of all
/// attempts) never kill a job in practice (0.5^20 per job).
const MAX_ATTEMPTS: i32 = 20;
/// Problems and RPC errors listed in full; the rest are only counted.
const MAX_LISTED: usize = 20;
/// A Gemma-2 `config.json` for the model the run names. The coordinator
/// reads it to check the run; no weights exist and none are needed, since
/// the simulated workers only pretend to capture.
const MODEL_CONFIG: &str = r#"{
  "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
  "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": 50.0,
  "bos_token_id": 2, "eos_token_id": [1, 5], "pad_token_id": 0,
  "final_logit_softcapping": 30.0, "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh",
  "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
  "max_position_embeddings": 512, "num_attention_heads": 8, "num_hidden_layers": 4,
  "num_key_value_heads": 4, "query_pre_attn_scalar": 24, "rms_norm_eps": 1e-06,
  "rope_theta": 10000.0, "sliding_window": 8, "tie_word_embeddings": true, "vocab_size": 817
}"#;

/// How big a soak to run, and how its workers behave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoakConfig {
    /// Simulated workers, each with its own connection.
    pub workers: usize,
    /// Jobs in the run (one prompt each).
    pub jobs: usize,
    /// Mean duration of a fake capture; each job sleeps a uniformly drawn
    /// 0.5x to 1.5x of it, so workers do not move in lockstep.
    pub job_duration: Duration,
    /// Lease the coordinator grants and heartbeats extend.
    pub lease: Duration,
    /// Heartbeat interval the coordinator advertises.
    pub heartbeat: Duration,
    /// Fraction of attempts that end in a retryable FailJob instead of a
    /// completion.
    pub fail_rate: f64,
    /// Fraction of attempts whose worker goes silent (stops heartbeating)
    /// until its lease has expired, then tries to complete anyway: the
    /// coordinator must refuse it.
    pub zombie_rate: f64,
    /// Hard bound on submit + drain + finalization; past it the soak stops
    /// and fails.
    pub max_duration: Duration,
}

impl SoakConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.workers > 0 && self.jobs > 0,
            "a soak needs at least one worker and one job"
        );
        anyhow::ensure!(
            self.heartbeat < self.lease,
            "the heartbeat interval ({:?}) must be shorter than the lease ({:?})",
            self.heartbeat,
            self.lease
        );
        for (name, rate) in [("fail", self.fail_rate), ("zombie", self.zombie_rate)] {
            anyhow::ensure!(
                (0.0..=0.5).contains(&rate),
                "the {name} rate must be between 0 and 0.5, got {rate}"
            );
        }
        Ok(())
    }
}

/// Events the simulated workers count, shared by all of them.
#[derive(Debug, Default)]
struct Counters {
    empty_claims: AtomicU64,
    failures_injected: AtomicU64,
    zombies: AtomicU64,
    zombie_completions_refused: AtomicU64,
    zombie_completions_accepted: AtomicU64,
    heartbeat_lease_losses: AtomicU64,
    completion_lease_losses: AtomicU64,
    rpc_errors: AtomicU64,
    rpc_error_samples: Mutex<Vec<String>>,
}

impl Counters {
    fn rpc_error(&self, call: &str, status: &Status) {
        self.rpc_errors.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.rpc_error_samples.lock().expect("samples lock");
        if samples.len() < MAX_LISTED {
            samples.push(format!("{call}: {:?}: {}", status.code(), status.message()));
        }
    }
}

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// What one simulated worker measured.
#[derive(Debug, Default)]
struct WorkerTally {
    claim: Vec<Duration>,
    heartbeat: Vec<Duration>,
    complete: Vec<Duration>,
    /// (job, attempt) of every CompleteJob the coordinator accepted.
    accepted: Vec<(String, u32)>,
    /// (job, attempt) of every attempt that went silent past its lease.
    zombies: Vec<(String, u32)>,
}

/// Runs the soak against the queue at `database_url` (use a scratch
/// database: the run stays in it). Stops by itself once the run is
/// finalized, or fails once `config.max_duration` has passed.
pub async fn soak(database_url: &str, config: SoakConfig) -> anyhow::Result<SoakReport> {
    config.validate()?;
    let scratch = tempfile::tempdir().context("creating the soak's scratch directory")?;
    let model_dir = scratch.path().join("model");
    let store_dir = scratch.path().join("store");
    std::fs::create_dir_all(&model_dir)?;
    std::fs::create_dir_all(&store_dir)?;
    std::fs::write(model_dir.join("config.json"), MODEL_CONFIG)?;
    let model_id = std::fs::canonicalize(&model_dir)?.display().to_string();

    let queue = Queue::connect(database_url)
        .await
        .context("opening the job queue")?
        .with_retry_policy(RetryPolicy {
            max_attempts: MAX_ATTEMPTS,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
        });
    let store = ArtifactStore::from_url(&store_dir.display().to_string(), &StoreOptions::default())
        .context("opening the soak's artifact store")?;
    let timing = LeaseTiming {
        lease: config.lease,
        heartbeat: config.heartbeat,
        ..LeaseTiming::default()
    };
    let coordinator = Coordinator::new(queue, store.clone(), timing);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server_config = ServerConfig {
        client_token: None,
        worker_token: None,
        tls: None,
        timing,
        sweep_interval: Duration::from_millis(500),
    };
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        Arc::clone(&coordinator),
        server_config,
        listener,
        async move {
            let _ = server_stopped.await;
        },
    ));

    let run_id = Arc::new(Mutex::new(None));
    let driven = tokio::time::timeout(
        config.max_duration,
        drive(&coordinator, &store, &url, &model_id, config, &run_id),
    )
    .await;
    let _ = stop_server.send(());
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(Err(error))) => tracing::warn!(%error, "the soak's server failed"),
        Ok(Err(error)) => tracing::warn!(%error, "the soak's server task failed"),
        Ok(Ok(Ok(()))) | Err(_) => {}
    }
    match driven {
        Ok(report) => report,
        Err(_) => {
            let run = *run_id.lock().expect("run id lock");
            let progress = match run {
                Some(run) => match coordinator.queue().run_status(run).await {
                    Ok(status) => format!(
                        "run {run} is {} with jobs {:?}",
                        status.run.state, status.jobs
                    ),
                    Err(error) => format!("run {run}: {error}"),
                },
                None => "the run was not even submitted".to_owned(),
            };
            anyhow::bail!(
                "the soak did not finish within {} s ({progress}): raise --max-seconds or lower --jobs",
                config.max_duration.as_secs_f64()
            )
        }
    }
}

/// Submits the run, drains it, waits for its manifest, then verifies.
async fn drive(
    coordinator: &Arc<Coordinator>,
    store: &ArtifactStore,
    url: &str,
    model_id: &str,
    config: SoakConfig,
    run_id_slot: &Mutex<Option<RunId>>,
) -> anyhow::Result<SoakReport> {
    let queue = coordinator.queue();
    let channel = capture_proto::connect(&ClientConfig::new(url)).await?;
    let mut capture = capture_proto::capture_client(channel, None);
    let submit_started = Instant::now();
    let submitted = capture
        .submit_run(pb::SubmitRunRequest {
            spec: Some(run_spec(model_id, config.jobs)?),
        })
        .await
        .map_err(|status| anyhow::anyhow!("SubmitRun failed: {}", status.message()))?
        .into_inner();
    let submit = submit_started.elapsed();
    let run_id = RunId(
        submitted
            .run_id
            .parse()
            .context("SubmitRun answered a run id that is not a UUID")?,
    );
    *run_id_slot.lock().expect("run id lock") = Some(run_id);
    anyhow::ensure!(
        submitted.job_count as usize == config.jobs,
        "the run has {} jobs, expected {}",
        submitted.job_count,
        config.jobs
    );

    let counters = Arc::new(Counters::default());
    let finished = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.workers {
        let worker = SimulatedWorker {
            url: url.to_owned(),
            model_id: model_id.to_owned(),
            store: store.clone(),
            counters: Arc::clone(&counters),
            finished: Arc::clone(&finished),
            config,
        };
        workers.spawn(async move { worker.run().await });
    }
    loop {
        let status = queue.run_status(run_id).await?;
        if status.run.state != RunState::Running {
            break;
        }
        tokio::time::sleep(WATCH_POLL).await;
    }
    let wall = started.elapsed();
    finished.store(true, Ordering::Relaxed);
    let mut tallies = Vec::with_capacity(config.workers);
    let mut problems = Vec::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok(tally)) => tallies.push(tally),
            Ok(Err(error)) => problems.push(format!("a simulated worker stopped: {error:#}")),
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    let status = loop {
        let status = queue.run_status(run_id).await?;
        if status.run.finalized_at.is_some() {
            break status;
        }
        tokio::time::sleep(WATCH_POLL).await;
    };

    let mut claim = Vec::new();
    let mut heartbeat = Vec::new();
    let mut complete = Vec::new();
    let mut accepted: HashMap<String, Vec<u32>> = HashMap::new();
    let mut zombies = HashSet::new();
    for tally in tallies {
        zombies.extend(tally.zombies);
        claim.extend(tally.claim);
        heartbeat.extend(tally.heartbeat);
        complete.extend(tally.complete);
        for (job, attempt) in tally.accepted {
            accepted.entry(job).or_default().push(attempt);
        }
    }
    type DbTime = Option<chrono::DateTime<chrono::Utc>>;
    let seconds_between = |start: DbTime, end: DbTime| {
        start
            .zip(end)
            .map(|(start, end)| (end - start).num_milliseconds() as f64 / 1e3)
            .unwrap_or_default()
    };
    let run_seconds = seconds_between(status.started_at, status.run.finished_at);
    let finalize_seconds = seconds_between(status.run.finished_at, status.run.finalized_at);
    let mut report = SoakReport {
        backend: queue.backend_name(),
        run_id,
        config,
        submit,
        wall,
        run_seconds,
        finalize_seconds,
        claim: LatencyStats::of(&mut claim),
        heartbeat: LatencyStats::of(&mut heartbeat),
        complete: LatencyStats::of(&mut complete),
        empty_claims: count(&counters.empty_claims),
        failures_injected: count(&counters.failures_injected),
        zombies: count(&counters.zombies),
        zombie_completions_refused: count(&counters.zombie_completions_refused),
        heartbeat_lease_losses: count(&counters.heartbeat_lease_losses),
        completion_lease_losses: count(&counters.completion_lease_losses),
        rpc_errors: count(&counters.rpc_errors),
        attempts: 0,
        lease_expiries: 0,
        jobs_succeeded_once: 0,
        overlapping_attempts: 0,
        promoted_objects: 0,
        zombie_staged_objects_left: 0,
        staged_objects_left: 0,
        manifest_jobs_succeeded: None,
        problems,
    };
    let zombie_accepted = count(&counters.zombie_completions_accepted);
    if zombie_accepted > 0 {
        report.problems.push(format!(
            "{zombie_accepted} completions sent after the lease expired were accepted"
        ));
    }
    verify_database(queue, run_id, &accepted, &mut report).await?;
    verify_store(store, &status.run.spec, run_id, &zombies, &mut report).await?;
    Ok(report)
}

/// The run: one uploaded prompt set of `jobs` prompts, residual mode, one
/// prompt per job.
fn run_spec(model_id: &str, jobs: usize) -> anyhow::Result<pb::RunSpec> {
    let prompts: Vec<_> = (0..jobs)
        .map(|index| serde_json::json!({"id": format!("p{index:06}"), "text": format!("soak prompt {index}")}))
        .collect();
    let json = serde_json::to_vec(&serde_json::json!({
        "name": PROMPT_SET,
        "description": "coordinator soak: one prompt per job",
        "prompts": prompts,
    }))?;
    Ok(pb::RunSpec {
        experiment: "soak".to_owned(),
        prompt_sets: vec![pb::PromptSetSource {
            source: Some(pb::prompt_set_source::Source::File(pb::PromptFile {
                name: PROMPT_SET.to_owned(),
                json,
            })),
        }],
        modes: vec![pb::CaptureMode {
            kind: pb::CaptureModeKind::Residual as i32,
            layers: Vec::new(),
            all_layers: false,
        }],
        decoding: Some(pb::Decoding {
            max_new_tokens: 1,
            ..pb::Decoding::default()
        }),
        model_id: model_id.to_owned(),
        model_revision: String::new(),
        store_dtype: pb::StoreDtype::F32 as i32,
        shard_size: 1,
        chat_template: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_use_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=200).rev().map(Duration::from_millis).collect();
        let stats = LatencyStats::of(&mut samples);
        assert_eq!(stats.count, 200);
        assert_eq!(stats.p50, Duration::from_millis(100));
        assert_eq!(stats.p90, Duration::from_millis(180));
        assert_eq!(stats.p99, Duration::from_millis(198));
        assert_eq!(stats.max, Duration::from_millis(200));
        assert_eq!(LatencyStats::of(&mut []), LatencyStats::default());
    }

    #[test]
    fn rates_and_timing_are_validated() {
        let config = SoakConfig {
            workers: 2,
            jobs: 10,
            job_duration: Duration::from_millis(5),
            lease: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
            fail_rate: 0.0,
            zombie_rate: 0.0,
            max_duration: Duration::from_secs(60),
        };
        assert!(config.validate().is_ok());
        let slow_heartbeat = SoakConfig {
            heartbeat: Duration::from_secs(5),
            ..config
        };
        assert!(slow_heartbeat.validate().is_err());
        let too_flaky = SoakConfig {
            fail_rate: 0.6,
            ..config
        };
        assert!(too_flaky.validate().is_err());
    }
}
