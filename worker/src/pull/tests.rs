//! The pulling worker against a real tonic `WorkerService` on loopback that
//! hands out scripted jobs of the tiny test model and records every call,
//! with a `file://` store in a temporary directory.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capture_proto::tonic::transport::Server;
use capture_proto::tonic::transport::server::TcpIncoming;
use capture_proto::tonic::{self, Request, Response, Status};
use capture_proto::v1::{
    self, ClaimJobRequest, ClaimJobResponse, CompleteJobRequest, CompleteJobResponse, Decoding,
    DeregisterWorkerRequest, DeregisterWorkerResponse, FailJobRequest, FailJobResponse,
    HeartbeatRequest, HeartbeatResponse, Job, JobState, RegisterWorkerRequest,
    RegisterWorkerResponse, ReleaseJobRequest, ReleaseJobResponse, ReplaySource, decoding,
    replay_source,
};
use capture_proto::{
    Attempt, CaptureServiceError, ClientConfig, JobId, RunId, WorkerService, WorkerServiceServer,
};
use tokio::sync::oneshot;

use super::{PullOptions, PullReport, run_worker};
use crate::capture::{LayerSelection, Sampling};
use crate::loader::DeviceArg;
use crate::metrics::{Registry, WorkerMetrics, encode_text};
use crate::model_files::ModelSource;
use crate::pt::StoreDtype;
use crate::run::{BatchSize, CaptureOptions, PromptSource, run_capture};
use crate::store::{ArtifactStore, RunStore, StoreOptions};

const MODEL_ID: &str = "tests/tiny-gemma2";
const EXPERIMENT: &str = "exp";

/// Worker logs in the test output, filtered by `RUST_LOG` (default: warnings).
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-gemma2")
}

/// Every call the worker made.
#[derive(Debug, Default)]
struct Calls {
    registered: Vec<RegisterWorkerRequest>,
    claims: usize,
    heartbeats: Vec<HeartbeatRequest>,
    completed: Vec<CompleteJobRequest>,
    failed: Vec<FailJobRequest>,
    released: Vec<ReleaseJobRequest>,
    deregistered: usize,
    /// Jobs handed out and completions recorded, in order: ("claimed" or
    /// "completed", job id).
    events: Vec<(&'static str, String)>,
}

/// Hands out its queued jobs in order, then no work; heartbeats answer as
/// scripted; accepted completions are promoted like the coordinator does.
#[derive(Default)]
struct Script {
    jobs: Mutex<VecDeque<Job>>,
    handed_out: Mutex<HashMap<String, Job>>,
    cancel: AtomicBool,
    lose_lease: AtomicBool,
    /// How long a completion takes before it is recorded, in milliseconds.
    complete_delay_ms: std::sync::atomic::AtomicU64,
    store: Option<ArtifactStore>,
    calls: Mutex<Calls>,
}

impl Script {
    fn calls<T>(&self, read: impl FnOnce(&Calls) -> T) -> T {
        read(&self.calls.lock().unwrap())
    }
}

struct TestCoordinator(Arc<Script>);

#[tonic::async_trait]
impl WorkerService for TestCoordinator {
    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        self.0
            .calls
            .lock()
            .unwrap()
            .registered
            .push(request.into_inner());
        Ok(Response::new(RegisterWorkerResponse {
            heartbeat_interval: Some(prost_duration(Duration::from_secs(10))),
            lease_duration: Some(prost_duration(Duration::from_secs(30))),
        }))
    }

    async fn claim_job(
        &self,
        request: Request<ClaimJobRequest>,
    ) -> Result<Response<ClaimJobResponse>, Status> {
        let request = request.into_inner();
        self.0.calls.lock().unwrap().claims += 1;
        let job = if request.model_id == MODEL_ID {
            self.0.jobs.lock().unwrap().pop_front()
        } else {
            None
        };
        if let Some(job) = &job {
            let mut handed = self.0.handed_out.lock().unwrap();
            handed.insert(job.job_id.clone(), job.clone());
            let event = ("claimed", job.job_id.clone());
            self.0.calls.lock().unwrap().events.push(event);
        }
        Ok(Response::new(ClaimJobResponse {
            job,
            retry_after: None,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let request = request.into_inner();
        self.0
            .calls
            .lock()
            .unwrap()
            .heartbeats
            .push(request.clone());
        if self.0.lose_lease.load(Ordering::Relaxed) {
            let job = JobId::parse_wire(&request.job_id).map_err(CaptureServiceError::from)?;
            let attempt = Attempt::from_wire(request.attempt).map_err(CaptureServiceError::from)?;
            return Err(CaptureServiceError::LeaseLost { job, attempt }.into());
        }
        Ok(Response::new(HeartbeatResponse {
            lease_expires_at: None,
            cancel_requested: self.0.cancel.load(Ordering::Relaxed),
        }))
    }

    async fn complete_job(
        &self,
        request: Request<CompleteJobRequest>,
    ) -> Result<Response<CompleteJobResponse>, Status> {
        let request = request.into_inner();
        let delay = self.0.complete_delay_ms.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let job = self
            .0
            .handed_out
            .lock()
            .unwrap()
            .get(&request.job_id)
            .cloned();
        if let (Some(store), Some(job)) = (&self.0.store, job) {
            let keys: Vec<&str> = request.artifacts.iter().map(|a| a.key.as_str()).collect();
            store
                .run(&job.experiment, &job.run_id)
                .unwrap()
                .promote(&request.job_id, request.attempt, &keys)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        let mut calls = self.0.calls.lock().unwrap();
        calls.events.push(("completed", request.job_id.clone()));
        calls.completed.push(request);
        Ok(Response::new(CompleteJobResponse {}))
    }

    async fn fail_job(
        &self,
        request: Request<FailJobRequest>,
    ) -> Result<Response<FailJobResponse>, Status> {
        let request = request.into_inner();
        let state = if request.retryable {
            JobState::Queued
        } else {
            JobState::Dead
        };
        self.0.calls.lock().unwrap().failed.push(request);
        Ok(Response::new(FailJobResponse {
            state: state.into(),
            retry_at: None,
        }))
    }

    async fn release_job(
        &self,
        request: Request<ReleaseJobRequest>,
    ) -> Result<Response<ReleaseJobResponse>, Status> {
        self.0
            .calls
            .lock()
            .unwrap()
            .released
            .push(request.into_inner());
        Ok(Response::new(ReleaseJobResponse {}))
    }

    async fn deregister_worker(
        &self,
        _request: Request<DeregisterWorkerRequest>,
    ) -> Result<Response<DeregisterWorkerResponse>, Status> {
        self.0.calls.lock().unwrap().deregistered += 1;
        Ok(Response::new(DeregisterWorkerResponse {}))
    }
}

fn prost_duration(duration: Duration) -> capture_proto::prost_types::Duration {
    capture_proto::prost_types::Duration::try_from(duration).unwrap()
}

/// Serves `script` on `incoming` until the returned sender is dropped or fired.
fn serve(script: &Arc<Script>, incoming: TcpIncoming) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    let service = WorkerServiceServer::new(TestCoordinator(Arc::clone(script)));
    tokio::spawn(async move {
        Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    stop
}

/// A temporary `file://` store with the script's jobs and the worker's options.
struct Fixture {
    _dir: tempfile::TempDir,
    store: ArtifactStore,
    script: Arc<Script>,
    metrics: WorkerMetrics,
}

impl Fixture {
    fn new() -> Self {
        logs();
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::from_url(
            dir.path().join("store").to_str().unwrap(),
            &StoreOptions::default(),
        )
        .unwrap();
        let script = Arc::new(Script {
            store: Some(store.clone()),
            ..Script::default()
        });
        Self {
            _dir: dir,
            store,
            script,
            metrics: WorkerMetrics::default(),
        }
    }

    fn queue(&self, job: Job) {
        self.script.jobs.lock().unwrap().push_back(job);
    }

    fn options(&self, addr: SocketAddr) -> PullOptions {
        PullOptions {
            coordinator: ClientConfig::new(format!("http://{addr}")),
            store_url: self.store.url().to_string(),
            store_options: StoreOptions::default(),
            model: ModelSource::new(tiny_model().to_str().unwrap()),
            model_id: Some(MODEL_ID.into()),
            device: DeviceArg::Cpu,
            compute_dtype: None,
            batch_size: BatchSize::Fixed(2),
            concurrent_jobs: None,
            worker_id: None,
            drain_timeout: Duration::from_secs(60),
            max_jobs: None,
            exit_when_idle: true,
            metrics: self.metrics.clone(),
        }
    }

    /// Serves the script and runs a worker until it finds no more work.
    async fn run_until_idle(&self) -> PullReport {
        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let _server = serve(&self.script, incoming);
        run_worker(self.options(addr), std::future::pending())
            .await
            .unwrap()
    }

    /// Queues three jobs of two of [`SIX`] each in run `run_id`, in order,
    /// and returns them.
    fn queue_six_in_pairs(&self, run_id: &str, max_new_tokens: u32) -> Vec<Job> {
        let jobs: Vec<Job> = SIX
            .chunks(2)
            .map(|prompts| job(&self.store, run_id, prompts, max_new_tokens))
            .collect();
        for job in &jobs {
            self.queue(job.clone());
        }
        jobs
    }

    /// [`Fixture::run_until_idle`] with a worker that holds three jobs and
    /// batches up to 8 prompts.
    async fn run_holding_three_jobs(&self) -> PullReport {
        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let _server = serve(&self.script, incoming);
        let options = PullOptions {
            concurrent_jobs: Some(3),
            batch_size: BatchSize::Fixed(8),
            ..self.options(addr)
        };
        run_worker(options, std::future::pending()).await.unwrap()
    }

    fn run_store(&self, run_id: &str) -> RunStore {
        self.store.run(EXPERIMENT, run_id).unwrap()
    }

    /// The value of the exposition line of `series` (name and labels).
    fn metric(&self, series: &str) -> f64 {
        let mut registry = Registry::default();
        self.metrics.register(&mut registry);
        let text = encode_text(&registry).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }
}

/// A greedy internals job of layers 1 and 3 on `prompts` of set `pairs`.
fn job(store: &ArtifactStore, run_id: &str, prompts: &[(&str, &str)], max_new_tokens: u32) -> Job {
    let job_id = JobId::new().to_wire();
    let run = store.run(EXPERIMENT, run_id).unwrap();
    Job {
        staging_prefix: format!("{}/", RunStore::staging_prefix(&job_id, 1).unwrap()),
        job_id,
        run_id: run_id.to_owned(),
        attempt: 1,
        heartbeat_interval: Some(prost_duration(Duration::from_secs(10))),
        job_key: "pairs/internals/0".into(),
        experiment: EXPERIMENT.into(),
        prompts: prompts
            .iter()
            .map(|(id, text)| v1::Prompt {
                prompt_set: "pairs".into(),
                prompt_id: (*id).into(),
                text: (*text).into(),
            })
            .collect(),
        mode: Some(v1::CaptureMode {
            kind: v1::CaptureModeKind::Internals.into(),
            layers: vec![1, 3],
            all_layers: false,
        }),
        decoding: Some(Decoding {
            strategy: Some(decoding::Strategy::Greedy(v1::Greedy {})),
            max_new_tokens,
            replay: None,
        }),
        store_dtype: v1::StoreDtype::F32.into(),
        model_id: MODEL_ID.into(),
        artifact_root: format!("{}/", run.root_url()),
        ..Default::default()
    }
}

const PROMPTS: [(&str, &str); 2] = [
    ("1", "Explain why the sky is blue."),
    ("2", "Write a haiku about rust."),
];

/// `worker capture` of [`PROMPTS`] as set `pairs`, internals of layers 1
/// and 3, 4 new tokens, into `out`, in batches of 2 like the worker's.
fn capture_with_the_cli(out: &Path) {
    capture_prompts_with_the_cli(out, &PROMPTS, 2);
}

/// `worker capture` of `prompts` as set `pairs`, internals of layers 1 and
/// 3, 4 new tokens, into `out`, `batch_size` prompts per batch.
fn capture_prompts_with_the_cli(out: &Path, prompts: &[(&str, &str)], batch_size: usize) {
    let prompt_file = out.join("pairs.json");
    std::fs::create_dir_all(out).unwrap();
    let prompts: Vec<_> = prompts
        .iter()
        .map(|(id, text)| serde_json::json!({"id": id, "text": text, "note": ""}))
        .collect();
    let json = serde_json::json!({"name": "pairs", "description": "", "prompts": prompts});
    std::fs::write(&prompt_file, json.to_string()).unwrap();
    run_capture(&CaptureOptions {
        model: ModelSource::new(tiny_model().to_str().unwrap()),
        prompts: PromptSource::File(prompt_file),
        mode: "internals".into(),
        layers: LayerSelection::List(vec![1, 3]),
        max_new_tokens: 4,
        sampling: Sampling::Greedy,
        replay: None,
        store_dtype: StoreDtype::F32,
        chat_template: false,
        device: DeviceArg::Cpu,
        compute_dtype: None,
        // the worker's batches: the same batches give the same bytes
        batch_size: BatchSize::Fixed(batch_size),
        out: out.to_path_buf(),
        progress: false,
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_staged_byte_for_byte_like_worker_capture_and_completed() {
    let fixture = Fixture::new();
    let run_id = RunId::new().to_wire();
    let job = job(&fixture.store, &run_id, &PROMPTS, 4);
    let job_id = job.job_id.clone();
    fixture.queue(job);
    let report = fixture.run_until_idle().await;
    assert_eq!(
        report,
        PullReport {
            jobs_completed: 1,
            tokens_captured: report.tokens_captured,
            ..PullReport::default()
        }
    );
    assert!(report.tokens_captured > 8, "{report:?}");
    assert_eq!(
        fixture.metric("capture_worker_tokens_captured_total"),
        report.tokens_captured as f64
    );
    assert_eq!(
        fixture.metric("capture_worker_jobs_total{outcome=\"completed\"}"),
        1.0
    );
    assert_eq!(fixture.metric("capture_worker_job_seconds_count"), 1.0);
    assert_eq!(fixture.metric("capture_worker_busy"), 0.0);

    let cli_out = tempfile::tempdir().unwrap();
    capture_with_the_cli(cli_out.path());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cli_out.path().join("manifest.json")).unwrap())
            .unwrap();
    let cli_artifacts = manifest["artifacts"].as_array().unwrap();
    assert_eq!(cli_artifacts.len(), 4);

    let (completed, registered, deregistered) = fixture
        .script
        .calls(|c| (c.completed.clone(), c.registered.clone(), c.deregistered));
    assert_eq!(registered.len(), 1);
    assert_eq!(registered[0].model_id, MODEL_ID);
    assert_eq!(registered[0].model_revision, "");
    let capabilities = registered[0].capabilities.clone().unwrap();
    assert_eq!(capabilities.num_layers, 4);
    assert_eq!(capabilities.compute_dtype, "f32");
    assert_eq!(capabilities.device, "cpu");
    assert_eq!(deregistered, 1);
    assert_eq!(completed.len(), 1);
    let complete = &completed[0];
    assert_eq!(complete.job_id, job_id);
    assert_eq!(complete.attempt, 1);
    let stats = complete.stats.unwrap();
    assert_eq!(stats.tokens_captured, report.tokens_captured);
    assert!(stats.started_at.is_some() && stats.finished_at.is_some());

    // Every record matches the CLI's manifest entry, and the promoted file
    // holds exactly the bytes `worker capture` wrote.
    let run = fixture.run_store(&run_id);
    assert_eq!(complete.artifacts.len(), 4);
    for (record, cli) in complete.artifacts.iter().zip(cli_artifacts) {
        assert_eq!(record.key, cli["key"].as_str().unwrap());
        assert_eq!(record.sha256, cli["sha256"].as_str().unwrap());
        assert_eq!(record.bytes, cli["bytes"].as_u64().unwrap());
        assert_eq!(record.prompt_set, "pairs");
        assert_eq!(record.prompt_id, cli["prompt_id"].as_str().unwrap());
        assert_eq!(record.mode, i32::from(v1::CaptureModeKind::Internals));
        assert_eq!(record.layer, cli["layer"].as_u64().map(|l| l as u32));
        assert_eq!(
            u64::from(record.response_tokens),
            cli["response_tokens"].as_u64().unwrap()
        );
        let shapes: serde_json::Value = serde_json::from_str(&record.shapes_json).unwrap();
        assert_eq!(shapes, cli["shapes"]);
        let stored = run.get(&record.key).await.unwrap();
        let written = std::fs::read(cli_out.path().join(&record.key)).unwrap();
        assert!(stored == written, "{} differs", record.key);
    }
    let uploaded: u64 = complete.artifacts.iter().map(|record| record.bytes).sum();
    assert_eq!(
        fixture.metric("capture_worker_upload_bytes_total"),
        uploaded as f64
    );
    // Nothing was written outside the promoted keys and the (now empty) staging.
    let keys: Vec<String> = run
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_job_reads_the_earlier_run_from_the_store() {
    let fixture = Fixture::new();
    let first_run = RunId::new().to_wire();
    fixture.queue(job(&fixture.store, &first_run, &PROMPTS, 4));
    // The replayed run is finished first: a worker claims its next job as
    // soon as a capture is done, while that job still uploads.
    assert_eq!(fixture.run_until_idle().await.jobs_completed, 1);
    let replay_run = RunId::new().to_wire();
    let mut replay = job(&fixture.store, &replay_run, &PROMPTS, 0);
    let root = fixture.run_store(&first_run).root_url();
    replay.decoding.as_mut().unwrap().replay = Some(ReplaySource {
        source: Some(replay_source::Source::RootUrl(format!("{root}/"))),
    });
    fixture.queue(replay);
    // The same prompts, so the same batch: equal batches give equal bits.
    let mut relative = job(&fixture.store, &RunId::new().to_wire(), &PROMPTS, 0);
    relative.decoding.as_mut().unwrap().replay = Some(ReplaySource {
        source: Some(replay_source::Source::RootUrl(format!(
            "{EXPERIMENT}/{first_run}"
        ))),
    });
    fixture.queue(relative);

    let report = fixture.run_until_idle().await;
    assert_eq!(report.jobs_completed, 2, "{report:?}");
    let completed = fixture.script.calls(|c| c.completed.clone());
    // Replaying greedy responses on the same model reproduces them exactly.
    for (original, replayed) in completed[0].artifacts.iter().zip(&completed[1].artifacts) {
        assert_eq!(original.key, replayed.key);
        assert_eq!(original.sha256, replayed.sha256);
    }
    assert_eq!(
        completed[2].artifacts[0].sha256,
        completed[0].artifacts[0].sha256
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_fail_without_retry_and_the_worker_goes_on() {
    let fixture = Fixture::new();
    let run_id = RunId::new().to_wire();
    let mut bad_layer = job(&fixture.store, &run_id, &PROMPTS, 2);
    bad_layer.mode.as_mut().unwrap().layers = vec![1, 9];
    fixture.queue(bad_layer);
    let mut elsewhere = job(&fixture.store, &run_id, &PROMPTS, 2);
    elsewhere.artifact_root = "s3://other-bucket/exp/run/".into();
    fixture.queue(elsewhere);
    let mut missing_replay = job(&fixture.store, &run_id, &PROMPTS, 2);
    missing_replay.decoding.as_mut().unwrap().replay = Some(ReplaySource {
        source: Some(replay_source::Source::RootUrl("exp/no-such-run".into())),
    });
    fixture.queue(missing_replay);
    fixture.queue(job(&fixture.store, &run_id, &PROMPTS[..1], 2));

    let report = fixture.run_until_idle().await;
    assert_eq!(report.jobs_failed, 3, "{report:?}");
    assert_eq!(report.jobs_completed, 1, "{report:?}");
    let failed = fixture.script.calls(|c| c.failed.clone());
    assert!(failed.iter().all(|f| !f.retryable), "{failed:?}");
    assert_eq!(
        failed[0].error,
        "layer 9 is out of range: the model has 4 layers (0-3)"
    );
    assert!(
        failed[1]
            .error
            .starts_with("the job's artifact root s3://other-bucket/exp/run/ is not this worker's run root file://"),
        "{}",
        failed[1].error
    );
    assert!(
        failed[2]
            .error
            .starts_with("nothing to replay for prompt 1 of set pairs"),
        "{}",
        failed[2].error
    );
}

/// How many files the local store holds in all.
fn staged_objects(store: &ArtifactStore) -> usize {
    let root = match store.url() {
        crate::store::StoreUrl::Local { root } => root.clone(),
        other => panic!("a local store, not {other}"),
    };
    walk(&root)
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| {
                    let path = entry.path();
                    if path.is_dir() { walk(&path) } else { 1 }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A job long enough on the tiny model that heartbeats come while it runs.
fn long_job(fixture: &Fixture) -> Job {
    let prompts: Vec<(String, String)> = (0..40)
        .map(|i| {
            (
                i.to_string(),
                format!("Prompt number {i} asks for a long answer."),
            )
        })
        .collect();
    let prompts: Vec<(&str, &str)> = prompts
        .iter()
        .map(|(id, text)| (id.as_str(), text.as_str()))
        .collect();
    let mut job = job(&fixture.store, &RunId::new().to_wire(), &prompts, 40);
    job.heartbeat_interval = Some(prost_duration(Duration::from_millis(10)));
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_is_released_and_a_lost_lease_abandoned() {
    let fixture = Fixture::new();
    fixture.script.cancel.store(true, Ordering::Relaxed);
    fixture.queue(long_job(&fixture));
    let report = fixture.run_until_idle().await;
    assert_eq!(report.jobs_released, 1, "{report:?}");
    let (released, completed, heartbeats) = fixture
        .script
        .calls(|c| (c.released.clone(), c.completed.len(), c.heartbeats.clone()));
    assert_eq!(released[0].reason, "the run was cancelled");
    assert_eq!(completed, 0);
    let progress = heartbeats[0].progress.unwrap();
    assert_eq!(progress.prompts_total, 40);
    // The capture stopped early and uploaded nothing after the release.
    let staged = staged_objects(&fixture.store);
    assert!(staged < 80, "{staged} of 80 artifacts were staged");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(staged_objects(&fixture.store), staged);

    let fixture = Fixture::new();
    fixture.script.lose_lease.store(true, Ordering::Relaxed);
    fixture.queue(long_job(&fixture));
    let report = fixture.run_until_idle().await;
    assert_eq!(report.leases_lost, 1, "{report:?}");
    assert_eq!(fixture.metric("capture_worker_lease_losses_total"), 1.0);
    assert_eq!(
        fixture.metric("capture_worker_jobs_total{outcome=\"lease_lost\"}"),
        1.0
    );
    let calls = fixture
        .script
        .calls(|c| (c.released.len(), c.completed.len(), c.failed.len()));
    assert_eq!(calls, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_job_after_the_drain_timeout() {
    let fixture = Fixture::new();
    fixture.queue(long_job(&fixture));
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let _server = serve(&fixture.script, incoming);
    let options = PullOptions {
        drain_timeout: Duration::ZERO,
        exit_when_idle: false,
        ..fixture.options(addr)
    };
    let script = Arc::clone(&fixture.script);
    let shutdown = async move {
        // Once the job runs (a heartbeat came), ask the worker to stop.
        while script.calls(|c| c.heartbeats.is_empty()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let report = run_worker(options, shutdown).await.unwrap();
    assert_eq!(report.jobs_released, 1, "{report:?}");
    let (released, deregistered) = fixture
        .script
        .calls(|c| (c.released.clone(), c.deregistered));
    assert_eq!(released[0].reason, "the worker is shutting down");
    assert_eq!(deregistered, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_waits_for_a_coordinator_that_starts_late() {
    let fixture = Fixture::new();
    fixture.queue(job(
        &fixture.store,
        &RunId::new().to_wire(),
        &PROMPTS[..1],
        2,
    ));
    // A port bound but not listening (connections are refused, and no
    // other socket can be given it meanwhile), listened on only after the
    // worker started.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let worker = tokio::spawn(run_worker(fixture.options(addr), std::future::pending()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _server = serve(
        &fixture.script,
        TcpIncoming::from(socket.listen(64).unwrap()),
    );
    let report = tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("the worker finishes once the coordinator is up")
        .unwrap()
        .unwrap();
    assert_eq!(report.jobs_completed, 1, "{report:?}");
}

/// Six prompts, captured by three jobs of two.
const SIX: [(&str, &str); 6] = [
    ("1", "Explain why the sky is blue."),
    ("2", "Write a haiku about rust."),
    ("3", "List three prime numbers."),
    ("4", "What is a residual stream?"),
    ("5", "Say hello in French."),
    ("6", "Summarise the plot of Hamlet in one line."),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_jobs_with_the_same_settings_share_one_batch() {
    let fixture = Fixture::new();
    let run_id = RunId::new().to_wire();
    let jobs = fixture.queue_six_in_pairs(&run_id, 4);
    let report = fixture.run_holding_three_jobs().await;
    assert_eq!(report.jobs_completed, 3, "{report:?}");
    // One batch of the three jobs' six prompts.
    assert_eq!(fixture.metric("capture_worker_batch_jobs_count"), 1.0);
    assert_eq!(fixture.metric("capture_worker_batch_jobs_sum"), 3.0);
    assert_eq!(fixture.metric("capture_worker_batch_prompts_sum"), 6.0);
    assert_eq!(fixture.metric("capture_worker_busy"), 0.0);

    // Each job staged exactly its own prompts' artifacts, byte for byte
    // what `worker capture` writes for the six prompts in one batch.
    let cli_out = tempfile::tempdir().unwrap();
    capture_prompts_with_the_cli(cli_out.path(), &SIX, 8);
    let completed = fixture.script.calls(|c| c.completed.clone());
    assert_eq!(completed.len(), 3);
    let run = fixture.run_store(&run_id);
    let mut tokens = 0;
    for job in &jobs {
        let complete = completed
            .iter()
            .find(|c| c.job_id == job.job_id)
            .expect("every job completed");
        let ids: Vec<&str> = job.prompts.iter().map(|p| p.prompt_id.as_str()).collect();
        let mut seen: Vec<&str> = complete
            .artifacts
            .iter()
            .map(|a| a.prompt_id.as_str())
            .collect();
        seen.dedup();
        assert_eq!(seen, ids);
        assert_eq!(complete.artifacts.len(), 4);
        for record in &complete.artifacts {
            let stored = run.get(&record.key).await.unwrap();
            let written = std::fs::read(cli_out.path().join(&record.key)).unwrap();
            assert!(stored == written, "{} differs", record.key);
        }
        tokens += complete.stats.unwrap().tokens_captured;
    }
    assert_eq!(tokens, report.tokens_captured);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_in_a_group_leaves_the_others_and_other_settings_batch_apart() {
    let fixture = Fixture::new();
    let run_id = RunId::new().to_wire();
    fixture.queue(job(&fixture.store, &run_id, &SIX[..2], 4));
    // Longer than the tiny model's 512 positions: fails while prepared.
    let long = "word ".repeat(600);
    fixture.queue(job(&fixture.store, &run_id, &[("7", long.as_str())], 4));
    // Other settings (2 new tokens): a batch of its own.
    fixture.queue(job(&fixture.store, &run_id, &SIX[2..4], 2));
    let report = fixture.run_holding_three_jobs().await;
    assert_eq!(
        (report.jobs_completed, report.jobs_failed),
        (2, 1),
        "{report:?}"
    );
    let failed = fixture.script.calls(|c| c.failed.clone());
    assert!(!failed[0].retryable);
    assert!(failed[0].error.contains("context"), "{}", failed[0].error);
    assert_eq!(fixture.metric("capture_worker_batch_jobs_count"), 2.0);
    assert_eq!(fixture.metric("capture_worker_batch_jobs_sum"), 2.0);
    assert_eq!(fixture.metric("capture_worker_batch_prompts_sum"), 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_job_is_claimed_while_a_captured_one_completes() {
    let fixture = Fixture::new();
    let run_id = RunId::new().to_wire();
    let ids: Vec<String> = fixture
        .queue_six_in_pairs(&run_id, 2)
        .into_iter()
        .map(|job| job.job_id)
        .collect();
    fixture
        .script
        .complete_delay_ms
        .store(500, std::sync::atomic::Ordering::Relaxed);
    // One job captured at a time (the CPU default).
    let report = fixture.run_until_idle().await;
    assert_eq!(report.jobs_completed, 3, "{report:?}");
    let events = fixture.script.calls(|c| c.events.clone());
    let at = |event: (&'static str, &String)| {
        events
            .iter()
            .position(|(kind, id)| (*kind, id) == event)
            .unwrap_or_else(|| panic!("no {event:?} in {events:?}"))
    };
    // The second job's capture did not wait for the first's completion...
    assert!(
        at(("claimed", &ids[1])) < at(("completed", &ids[0])),
        "{events:?}"
    );
    // ...but with one job captured and one completing, the third waited.
    assert!(
        at(("claimed", &ids[2])) > at(("completed", &ids[0])),
        "{events:?}"
    );
}
