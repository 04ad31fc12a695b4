//! `worker run`: a long-running worker that pulls capture jobs from the
//! coordinator over gRPC (`WorkerService`), runs them with a model loaded
//! once, uploads the artifacts under each attempt's staging prefix and
//! completes the job.
//!
//! The loop: register (retried while the coordinator is unavailable), then
//! claim while fewer than [`PullOptions::concurrent_jobs`] claimed jobs are
//! not yet captured (with a long poll when the worker holds none); each
//! claimed job is captured on the worker's capture thread (in batches shared
//! with the other jobs of the same capture settings, see `compute`) while a
//! heartbeat task keeps its lease and reports progress. A job whose capture
//! is done gives its slot back at once: its uploads and completion overlap
//! the next jobs' compute. A coordinator restart only ever delays the loop:
//! every call is retried with capped, jittered exponential backoff. When the
//! shutdown future fires the worker stops claiming, lets the jobs it holds
//! finish for up to [`PullOptions::drain_timeout`], releases them
//! otherwise, deregisters and returns its [`PullReport`].

mod compute;
mod convert;
mod error;
mod execute;
mod heartbeat;
mod job;
mod replay;
mod rpc;

#[cfg(test)]
mod tests;

use crate::run::BatchSize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use candle_core::DType;
use capture_proto::v1::{
    ClaimJobRequest, DeregisterWorkerRequest, RegisterWorkerRequest, WorkerCapabilities,
};
use capture_proto::{
    CaptureServiceError, ClientConfig, ConnectError, IdParseError, WorkerClient, WorkerId,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{info, warn};

use self::compute::Capturer;
use crate::error::CaptureError;
use crate::loader::{DeviceArg, ModelMeta, dtype_name};
use crate::metrics::WorkerMetrics;
use crate::model::Gemma2;
use crate::model_files::ModelSource;
use crate::store::{ArtifactStore, StoreError, StoreOptions};

pub use error::JobError;
pub(crate) use job::JobOutcome;

/// How long a claim may wait on the server for work (long poll).
const CLAIM_WAIT: Duration = Duration::from_secs(5);
/// Bounds of the pause after a claim that found no work.
const IDLE_PAUSE_MIN: Duration = Duration::from_millis(200);
const IDLE_PAUSE_MAX: Duration = Duration::from_secs(5);
/// Heartbeat interval when neither the registration nor the job says one.
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How long announcing the shutdown (deregistering) is retried.
const DEREGISTER_GIVE_UP: Duration = Duration::from_secs(20);

/// Everything `worker run` (and the coordinator's embedded worker) needs.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Where the coordinator listens, its token and TLS authority.
    pub coordinator: ClientConfig,
    /// The artifact store, as [`ArtifactStore::from_url`] takes it; it must
    /// be the coordinator's store (each job's artifact root is checked).
    pub store_url: String,
    pub store_options: StoreOptions,
    pub model: ModelSource,
    /// The model id advertised to the coordinator; default: the hub id, or
    /// the canonical directory path of a local checkpoint.
    pub model_id: Option<String>,
    pub device: DeviceArg,
    /// Compute dtype; default: f32 on the CPU, bf16 on GPUs.
    pub compute_dtype: Option<DType>,
    /// Prompts per forward pass; `auto` is resolved per job from its
    /// longest prompt and the free memory.
    pub batch_size: BatchSize,
    /// Claimed jobs captured at once; their prompts share forward passes
    /// when their capture settings match. Jobs done capturing and still
    /// uploading do not count, up to as many again. Default
    /// ([`default_concurrent_jobs`]): 1 on the CPU, 4 on GPUs.
    pub concurrent_jobs: Option<usize>,
    /// A UUID; default: a fresh UUIDv7.
    pub worker_id: Option<String>,
    /// On shutdown: how long the jobs held may still run before they are
    /// stopped and released.
    pub drain_timeout: Duration,
    /// Stop after this many claimed jobs; `None`: run until shut down.
    pub max_jobs: Option<u64>,
    /// Stop as soon as a claim finds no work.
    pub exit_when_idle: bool,
    /// Where the worker counts its jobs, tokens and uploads (register them
    /// to expose them, see [`crate::metrics`]).
    pub metrics: WorkerMetrics,
}

/// What a worker did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullReport {
    /// Jobs whose completion the coordinator accepted.
    pub jobs_completed: u64,
    /// Jobs reported failed (retryable or not).
    pub jobs_failed: u64,
    /// Jobs given back unfinished (shutdown, cancelled run, another model).
    pub jobs_released: u64,
    /// Jobs whose lease was lost before they could complete.
    pub leases_lost: u64,
    /// Prompt plus response tokens of the completed jobs.
    pub tokens_captured: u64,
}

/// Why a worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid worker option: {0}")]
    InvalidOption(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    // The messages below already carry their cause: no `#[source]`, so
    // that `{:#}` does not print it twice.
    #[error("cannot load the model: {0}")]
    Model(CaptureError),
    #[error("cannot open the artifact store: {0}")]
    Store(StoreError),
    #[error("the coordinator refused this worker: {0}")]
    Refused(CaptureServiceError),
    #[error("cannot talk to the coordinator over TLS: {error} ({hint})")]
    Tls { error: String, hint: &'static str },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The model, loaded once and shared by every job.
pub(crate) struct Engine {
    pub(crate) meta: ModelMeta,
    pub(crate) model: Gemma2,
    pub(crate) batch_size: BatchSize,
    /// Artifacts that may be assembled at once: one per job held (each
    /// job's upload task encodes its artifacts in turn), for `auto`.
    pub(crate) encoders: usize,
}

/// What every job of this worker shares.
pub(crate) struct Worker {
    pub(crate) id: WorkerId,
    pub(crate) client: WorkerClient,
    pub(crate) engine: Arc<Engine>,
    /// The capture thread every job's prompts go to.
    pub(crate) capturer: Capturer,
    pub(crate) concurrent_jobs: usize,
    pub(crate) store: ArtifactStore,
    pub(crate) model_id: String,
    pub(crate) model_revision: String,
    pub(crate) capabilities: WorkerCapabilities,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) metrics: WorkerMetrics,
}

/// Whether the shutdown future has fired; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub(crate) fn fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the shutdown has fired (at once if it has).
    pub(crate) async fn wait(&mut self) {
        // An error means the sender is gone, which only happens once the
        // worker returns: nothing is left to wait for either way.
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}

/// Runs a pulling worker until `shutdown` resolves (or `max_jobs` /
/// `exit_when_idle` says to stop) and reports what it did.
///
/// The model is loaded before the coordinator is contacted; a coordinator
/// that is down or restarting is waited for, never a reason to return.
pub async fn run_worker(
    options: PullOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<PullReport, PullError> {
    tokio::pin!(shutdown);
    let mut worker = tokio::select! {
        worker = start(&options) => worker?,
        () = &mut shutdown => {
            info!("shut down while loading the model");
            return Ok(PullReport::default());
        }
    };
    let worker_id = worker.id;
    let (fire, watched) = watch::channel(false);
    let work = pull_loop(&mut worker, &options, Shutdown(watched));
    tokio::pin!(work);
    let mut fired = false;
    loop {
        tokio::select! {
            report = &mut work => return report,
            () = &mut shutdown, if !fired => {
                fired = true;
                info!(worker_id = %worker_id, "shutting down: no new jobs are claimed");
                let _ = fire.send(true);
            }
        }
    }
}

/// Loads the model, opens the store and the coordinator channel.
async fn start(options: &PullOptions) -> Result<Worker, PullError> {
    let id = match &options.worker_id {
        Some(text) => WorkerId::parse_wire(text)
            .map_err(|e: IdParseError| PullError::InvalidOption(e.to_string()))?,
        None => WorkerId::new(),
    };
    let concurrent_jobs = options
        .concurrent_jobs
        .unwrap_or_else(|| default_concurrent_jobs(options.device));
    if concurrent_jobs == 0 {
        return Err(PullError::InvalidOption(
            "--concurrent-jobs must be at least 1".into(),
        ));
    }
    let store = ArtifactStore::from_url(&options.store_url, &options.store_options)
        .map_err(PullError::Store)?;
    let channel = capture_proto::connect_lazy(&options.coordinator)?;
    let client = capture_proto::worker_client(channel, options.coordinator.token.as_ref());

    let source = options.model.clone();
    let device = options.device;
    let batch_size = options.batch_size;
    let dtype = options
        .compute_dtype
        .unwrap_or_else(|| device.default_dtype());
    let loading = std::time::Instant::now();
    let engine = tokio::task::spawn_blocking(move || -> Result<Engine, CaptureError> {
        let meta = ModelMeta::load(&source)?;
        let model = meta.load_model(&device.open()?, dtype)?;
        Ok(Engine {
            meta,
            model,
            batch_size,
            encoders: most_held(concurrent_jobs),
        })
    })
    .await
    .map_err(|e| PullError::Internal(format!("model loading task failed: {e}")))?
    .map_err(PullError::Model)?;
    let model_id = options
        .model_id
        .clone()
        .unwrap_or_else(|| engine.meta.files.model_id.clone());
    let capabilities = WorkerCapabilities {
        device: device.to_string(),
        compute_dtype: dtype_name(dtype).to_owned(),
        num_layers: u32::try_from(engine.meta.config.num_hidden_layers).unwrap_or(0),
        hostname: hostname(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    info!(
        worker_id = %id,
        model_id,
        model_revision = options.model.revision.as_deref().unwrap_or(""),
        device = %device,
        compute_dtype = dtype_name(dtype),
        weight_dtype = dtype_name(engine.model.matrix_dtype()),
        layers = engine.meta.config.num_hidden_layers,
        concurrent_jobs,
        coordinator = options.coordinator.url,
        store = %store.url(),
        load_seconds = loading.elapsed().as_secs_f64(),
        "model loaded"
    );
    let engine = Arc::new(engine);
    let capturer = Capturer::start(Arc::clone(&engine))
        .map_err(|e| PullError::Internal(format!("cannot start the capture thread: {e}")))?;
    Ok(Worker {
        id,
        client,
        engine,
        capturer,
        concurrent_jobs,
        store,
        model_id,
        model_revision: options.model.revision.clone().unwrap_or_default(),
        capabilities,
        heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
        drain_timeout: options.drain_timeout,
        metrics: options.metrics.clone(),
    })
}

/// Register, claim and run jobs until told to stop, then deregister.
async fn pull_loop(
    worker: &mut Worker,
    options: &PullOptions,
    mut shutdown: Shutdown,
) -> Result<PullReport, PullError> {
    let mut report = PullReport::default();
    match register(worker, &mut shutdown).await? {
        Some(interval) => worker.heartbeat_interval = interval,
        None => return Ok(report),
    }
    let worker = &*worker;
    let mut claimed = 0u64;
    let mut idle = rpc::Backoff::new(IDLE_PAUSE_MIN, IDLE_PAUSE_MAX);
    let mut running = FuturesUnordered::new();
    // One per job held until its capture is done (`--concurrent-jobs`).
    let slots = Arc::new(Semaphore::new(worker.concurrent_jobs));
    let most_held = most_held(worker.concurrent_jobs);
    // At most one claim in flight, kept across the loop's turns: dropping
    // it could lose a job the coordinator has already leased to us. It
    // holds a slot and keeps a free capture thread waiting for its job.
    let mut claiming: Option<(ClaimInFlight<'_>, compute::Held)> = None;
    let mut pause: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // `exit_when_idle` and a claim found no work, or claims are refused:
    // finish what is held.
    let mut no_more = false;
    let mut refused: Option<PullError> = None;
    loop {
        if shutdown.fired() {
            // Stopping: an unanswered claim is given up (a job it got
            // leased is retried once its lease expires).
            claiming = None;
            pause = None;
        }
        let want_claim =
            !shutdown.fired() && !no_more && options.max_jobs.is_none_or(|max| claimed < max);
        if !want_claim && claiming.is_none() && running.is_empty() {
            break;
        }
        tokio::select! {
            Some(outcome) = running.next(), if !running.is_empty() => {
                let outcome: JobOutcome = outcome;
                outcome.count(&mut report);
            }
            slot = Arc::clone(&slots).acquire_owned(),
                if want_claim
                    && claiming.is_none()
                    && pause.is_none()
                    && running.len() < most_held =>
            {
                let slot = slot.map_err(|e| PullError::Internal(format!("job slots closed: {e}")))?;
                claiming = Some(start_claim(worker, slot, running.is_empty()));
            }
            claim = async { claiming.as_mut().expect("guarded").0.as_mut().await }, if claiming.is_some() => {
                let (_, held) = claiming.take().expect("guarded");
                let claim = match claim {
                    Ok(claim) => claim,
                    Err(error) => {
                        // Fatal (a refusal, TLS): the jobs held still finish.
                        no_more = true;
                        refused = Some(error);
                        continue;
                    }
                };
                match claim {
                    Claim::Job(job) => {
                        claimed += 1;
                        idle.reset();
                        // The next claim starts (and is expected by the
                        // capture thread) before this job can submit: a
                        // capture thread lingering for a burst of claims
                        // must not see none in between and start without
                        // the rest.
                        let more = !shutdown.fired()
                            && !no_more
                            && options.max_jobs.is_none_or(|max| claimed < max)
                            && running.len() + 1 < most_held;
                        if more && let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
                            claiming = Some(start_claim(worker, slot, false));
                        }
                        running.push(run_claimed(worker, *job, held, shutdown.clone()));
                    }
                    Claim::NoWork { retry_after } => {
                        if options.exit_when_idle {
                            info!(worker_id = %worker.id, held = running.len(), "no work left: stopping");
                            no_more = true;
                        } else {
                            let delay = retry_after
                                .unwrap_or_else(|| idle.next_delay())
                                .clamp(IDLE_PAUSE_MIN, IDLE_PAUSE_MAX);
                            pause = Some(Box::pin(tokio::time::sleep(delay)));
                        }
                    }
                }
            }
            () = async { pause.as_mut().expect("guarded").await }, if pause.is_some() => {
                pause = None;
            }
            () = shutdown.wait(), if !shutdown.fired() => {}
        }
    }
    if let Some(error) = refused {
        return Err(error);
    }
    deregister(worker).await;
    info!(
        worker_id = %worker.id,
        completed = report.jobs_completed,
        failed = report.jobs_failed,
        released = report.jobs_released,
        leases_lost = report.leases_lost,
        tokens = report.tokens_captured,
        "worker stopped"
    );
    Ok(report)
}

/// The most jobs a worker holds at once: `concurrent_jobs` capturing, and
/// jobs captured and still uploading, up to as many again (the artifacts
/// waiting for upload stay within one more group's, however slow the
/// store).
fn most_held(concurrent_jobs: usize) -> usize {
    2 * concurrent_jobs
}

/// Starts a claim holding `slot`, expected by the capture thread until its
/// job submits (or none comes). A worker holding jobs only takes what is
/// there now: its capture thread may be waiting to batch with it.
fn start_claim(
    worker: &Worker,
    slot: OwnedSemaphorePermit,
    idle: bool,
) -> (ClaimInFlight<'_>, compute::Held) {
    let wait = if idle { CLAIM_WAIT } else { Duration::ZERO };
    let held = compute::Held {
        slot,
        expected: worker.capturer.expect(),
    };
    (Box::pin(claim(worker, wait)), held)
}

/// Runs one claimed job, counted in the worker's metrics.
async fn run_claimed(
    worker: &Worker,
    job: capture_proto::v1::Job,
    held: compute::Held,
    shutdown: Shutdown,
) -> JobOutcome {
    let busy = worker.metrics.busy();
    let started = std::time::Instant::now();
    let outcome = job::run_job(worker, job, held, shutdown).await;
    worker.metrics.job_finished(outcome, started.elapsed());
    drop(busy);
    outcome
}

/// Jobs a worker on `device` holds at once unless told otherwise: 1 on the
/// CPU, where batches beyond one job's 4 prompts gain little (0.144 to
/// 0.109 s per token and prompt from 4 to 16 prompts, docs/benchmarks.md)
/// for about 4 times the trace memory; 4 on GPUs, so that jobs of 4
/// prompts fill batches of 16, the best batch measured on an H200 (1,077
/// captured tokens per second against 226 one prompt at a time, and fewer
/// at 64).
pub fn default_concurrent_jobs(device: DeviceArg) -> usize {
    match device {
        DeviceArg::Cpu => 1,
        DeviceArg::Cuda(_) => 4,
    }
}

/// Announces the worker; returns the heartbeat interval to use, or `None`
/// when shut down before the coordinator answered.
async fn register(worker: &Worker, shutdown: &mut Shutdown) -> Result<Option<Duration>, PullError> {
    let request = RegisterWorkerRequest {
        worker_id: worker.id.to_wire(),
        model_id: worker.model_id.clone(),
        model_revision: worker.model_revision.clone(),
        capabilities: Some(worker.capabilities.clone()),
    };
    let registering = rpc::retried(
        &worker.client,
        "register",
        None,
        &request,
        |mut client, request| async move { client.register_worker(request).await },
    );
    let answer = tokio::select! {
        answer = registering => answer,
        () = shutdown.wait() => return Ok(None),
    };
    match answer {
        Ok(response) => {
            let interval = response
                .heartbeat_interval
                .and_then(convert::std_duration)
                .unwrap_or(worker.heartbeat_interval);
            info!(
                worker_id = %worker.id,
                heartbeat_seconds = interval.as_secs_f64(),
                lease_seconds = response
                    .lease_duration
                    .and_then(convert::std_duration)
                    .map(|d| d.as_secs_f64()),
                "registered with the coordinator"
            );
            Ok(Some(interval))
        }
        Err(status) => {
            rpc::fail_on_tls(&status)?;
            let error = CaptureServiceError::from_status(&status);
            if rpc::is_fatal(&error) {
                return Err(PullError::Refused(error));
            }
            // Registration is optional: claims work without it.
            warn!(worker_id = %worker.id, error = %error, "registration refused, claiming anyway");
            Ok(Some(worker.heartbeat_interval))
        }
    }
}

/// A claim the loop has started and not yet seen answered.
type ClaimInFlight<'a> = Pin<Box<dyn Future<Output = Result<Claim, PullError>> + Send + 'a>>;

enum Claim {
    Job(Box<capture_proto::v1::Job>),
    NoWork { retry_after: Option<Duration> },
}

/// One claim that waits up to `wait` on the server for work, retried while
/// the coordinator is unavailable.
async fn claim(worker: &Worker, wait: Duration) -> Result<Claim, PullError> {
    let request = ClaimJobRequest {
        worker_id: worker.id.to_wire(),
        model_id: worker.model_id.clone(),
        model_revision: worker.model_revision.clone(),
        capabilities: Some(worker.capabilities.clone()),
        wait: convert::proto_duration(wait),
    };
    let mut backoff = rpc::Backoff::default();
    loop {
        let answer = rpc::retried(
            &worker.client,
            "claim",
            None,
            &request,
            |mut client, request| async move { client.claim_job(request).await },
        )
        .await;
        match answer {
            Ok(response) => {
                return Ok(match response.job {
                    Some(job) => Claim::Job(Box::new(job)),
                    None => Claim::NoWork {
                        retry_after: response.retry_after.and_then(convert::std_duration),
                    },
                });
            }
            Err(status) => {
                rpc::fail_on_tls(&status)?;
                let error = CaptureServiceError::from_status(&status);
                if rpc::is_fatal(&error) {
                    return Err(PullError::Refused(error));
                }
                let delay = backoff.next_delay();
                warn!(worker_id = %worker.id, error = %error, retry_in_ms = delay.as_millis() as u64, "claim refused, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Announces that the worker stops (best effort: its leases expire anyway).
async fn deregister(worker: &Worker) {
    let request = DeregisterWorkerRequest {
        worker_id: worker.id.to_wire(),
    };
    let answer = rpc::retried(
        &worker.client,
        "deregister",
        Some(DEREGISTER_GIVE_UP),
        &request,
        |mut client, request| async move { client.deregister_worker(request).await },
    )
    .await;
    if let Err(status) = answer {
        warn!(worker_id = %worker.id, error = %status.message(), "cannot deregister");
    }
}

/// `HOSTNAME`, else the kernel's host name, else `unknown`.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
