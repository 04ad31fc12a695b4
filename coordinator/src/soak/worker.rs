//! The simulated workers of `coordinator soak`: real WorkerService clients
//! that claim, heartbeat from a separate task, fake a capture by sleeping,
//! stage small real files where a worker stages its artifacts, and complete,
//! fail (injected) or go silent past their lease (zombies).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capture_proto::tonic::Status;
use capture_proto::v1 as pb;
use capture_proto::{CaptureServiceError, ClientConfig, WorkerClient, WorkerId};
use capture_worker::run::residual_key;
use capture_worker::store::ArtifactStore;
use tokio::sync::oneshot;

use super::{CLAIM_WAIT, Counters, SoakConfig, WorkerTally};

/// One simulated worker: its own connection, register, then claim ->
/// heartbeat -> fake capture -> stage -> complete until the run is over.
pub(super) struct SimulatedWorker {
    pub(super) url: String,
    pub(super) model_id: String,
    pub(super) store: ArtifactStore,
    pub(super) counters: Arc<Counters>,
    pub(super) finished: Arc<AtomicBool>,
    pub(super) config: SoakConfig,
}

impl SimulatedWorker {
    pub(super) async fn run(self) -> anyhow::Result<WorkerTally> {
        let channel = capture_proto::connect(&ClientConfig::new(&self.url)).await?;
        let mut client = capture_proto::worker_client(channel, None);
        let worker_id = WorkerId::new().to_string();
        let registered = client
            .register_worker(pb::RegisterWorkerRequest {
                worker_id: worker_id.clone(),
                model_id: self.model_id.clone(),
                model_revision: String::new(),
                capabilities: Some(pb::WorkerCapabilities {
                    device: "soak".to_owned(),
                    compute_dtype: "f32".to_owned(),
                    num_layers: 4,
                    hostname: "loopback".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                }),
            })
            .await
            .map_err(|status| anyhow::anyhow!("RegisterWorker failed: {}", status.message()))?
            .into_inner();
        let advertised = registered
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(self.config.heartbeat);
        let mut tally = WorkerTally::default();
        loop {
            let claim_started = Instant::now();
            let claimed = client
                .claim_job(pb::ClaimJobRequest {
                    worker_id: worker_id.clone(),
                    model_id: self.model_id.clone(),
                    model_revision: String::new(),
                    capabilities: None,
                    wait: Some(crate::service::convert::duration(CLAIM_WAIT)),
                })
                .await;
            let claim_latency = claim_started.elapsed();
            let job = match claimed {
                Ok(answer) => answer.into_inner().job,
                Err(status) => {
                    self.counters.rpc_error("ClaimJob", &status);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(job) = job else {
                self.counters.empty_claims.fetch_add(1, Ordering::Relaxed);
                if self.finished.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            };
            tally.claim.push(claim_latency);
            let interval = job
                .heartbeat_interval
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or(advertised);
            self.run_job(&client, &worker_id, job, interval, &mut tally)
                .await?;
        }
        let _ = client
            .deregister_worker(pb::DeregisterWorkerRequest { worker_id })
            .await;
        Ok(tally)
    }

    /// One attempt: heartbeat in the background while "capturing", then
    /// fail it (injected), go silent (zombie) or stage and complete it.
    async fn run_job(
        &self,
        client: &WorkerClient,
        worker_id: &str,
        job: pb::Job,
        interval: Duration,
        tally: &mut WorkerTally,
    ) -> anyhow::Result<()> {
        let fence = (job.job_id.clone(), job.attempt, worker_id.to_owned());
        let heartbeat = Heartbeat::start(client.clone(), fence.clone(), interval, &self.counters);
        let jitter = 0.5 + rand::random::<f64>();
        tokio::time::sleep(self.config.job_duration.mul_f64(jitter)).await;

        let draw = rand::random::<f64>();
        if draw < self.config.fail_rate {
            tally.heartbeat.extend(heartbeat.stop().await);
            self.counters
                .failures_injected
                .fetch_add(1, Ordering::Relaxed);
            let failed = client
                .clone()
                .fail_job(pb::FailJobRequest {
                    job_id: fence.0,
                    attempt: fence.1,
                    worker_id: fence.2,
                    error: "soak: injected retryable failure".to_owned(),
                    retryable: true,
                })
                .await;
            if let Err(status) = failed {
                self.lease_lost_or_error(
                    "FailJob",
                    &status,
                    &self.counters.completion_lease_losses,
                );
            }
            return Ok(());
        }
        let zombie = draw < self.config.fail_rate + self.config.zombie_rate;
        if zombie {
            // Silent past the lease, as a worker stuck in a long pause or
            // behind a network partition would be.
            tally.heartbeat.extend(heartbeat.stop().await);
            self.counters.zombies.fetch_add(1, Ordering::Relaxed);
            tally.zombies.push((job.job_id.clone(), job.attempt));
            tokio::time::sleep(self.config.lease + Duration::from_secs(1)).await;
        } else {
            let lost = heartbeat.lost.load(Ordering::Relaxed);
            tally.heartbeat.extend(heartbeat.stop().await);
            if lost {
                // The lease is gone: a real worker stops and never completes.
                return Ok(());
            }
        }
        let artifacts = self.stage(&job).await?;
        let complete_started = Instant::now();
        let completed = client
            .clone()
            .complete_job(pb::CompleteJobRequest {
                job_id: job.job_id.clone(),
                attempt: job.attempt,
                worker_id: worker_id.to_owned(),
                artifacts,
                stats: Some(pb::JobStats {
                    tokens_captured: 2,
                    bytes_written: 0,
                    ..pb::JobStats::default()
                }),
            })
            .await;
        match (completed, zombie) {
            (Ok(_), false) => {
                tally.complete.push(complete_started.elapsed());
                tally.accepted.push((job.job_id, job.attempt));
            }
            (Ok(_), true) => {
                self.counters
                    .zombie_completions_accepted
                    .fetch_add(1, Ordering::Relaxed);
                tally.accepted.push((job.job_id, job.attempt));
            }
            (Err(status), false) => self.lease_lost_or_error(
                "CompleteJob",
                &status,
                &self.counters.completion_lease_losses,
            ),
            (Err(status), true) => self.lease_lost_or_error(
                "CompleteJob (zombie)",
                &status,
                &self.counters.zombie_completions_refused,
            ),
        }
        Ok(())
    }

    /// Counts a refusal that means "lease lost" in `lost`, anything else
    /// as an unexpected RPC error.
    fn lease_lost_or_error(&self, call: &str, status: &Status, lost: &AtomicU64) {
        if is_lease_refusal(status) {
            lost.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.rpc_error(call, status);
        }
    }

    /// Uploads one small file per expected artifact under the attempt's
    /// staging prefix, as a worker does, and returns their records.
    async fn stage(&self, job: &pb::Job) -> anyhow::Result<Vec<pb::ArtifactRecord>> {
        let run = self.store.run(&job.experiment, &job.run_id)?;
        let mut records = Vec::with_capacity(job.prompts.len());
        for prompt in &job.prompts {
            let key = residual_key(&prompt.prompt_set, &prompt.prompt_id);
            let payload = Bytes::from(format!(
                "soak artifact {key} of job {} attempt {}\n",
                job.job_id, job.attempt
            ));
            let staged = run
                .stage_put(&job.job_id, job.attempt, &key, payload)
                .await?;
            records.push(pb::ArtifactRecord {
                key,
                bytes: staged.bytes,
                sha256: staged.sha256,
                prompt_set: prompt.prompt_set.clone(),
                prompt_id: prompt.prompt_id.clone(),
                mode: pb::CaptureModeKind::Residual as i32,
                layer: None,
                prompt_tokens: 1,
                response_tokens: 1,
                shapes_json: "{}".to_owned(),
            });
        }
        Ok(records)
    }
}

/// A job's heartbeat task: every interval, extend the lease; stops on
/// request or on a lost lease.
struct Heartbeat {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<Duration>>,
    lost: Arc<AtomicBool>,
}

impl Heartbeat {
    fn start(
        mut client: WorkerClient,
        (job_id, attempt, worker_id): (String, u32, String),
        interval: Duration,
        counters: &Arc<Counters>,
    ) -> Self {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let lost = Arc::new(AtomicBool::new(false));
        let task_lost = Arc::clone(&lost);
        let counters = Arc::clone(counters);
        let task = tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => return latencies,
                    () = tokio::time::sleep(interval) => {}
                }
                let sent = Instant::now();
                let answer = client
                    .heartbeat(pb::HeartbeatRequest {
                        job_id: job_id.clone(),
                        attempt,
                        worker_id: worker_id.clone(),
                        progress: None,
                    })
                    .await;
                match answer {
                    Ok(_) => latencies.push(sent.elapsed()),
                    Err(status) if is_lease_refusal(&status) => {
                        task_lost.store(true, Ordering::Relaxed);
                        counters
                            .heartbeat_lease_losses
                            .fetch_add(1, Ordering::Relaxed);
                        return latencies;
                    }
                    Err(status) => counters.rpc_error("Heartbeat", &status),
                }
            }
        });
        Self { stop, task, lost }
    }

    /// Stops the task and returns the latencies of its heartbeats.
    async fn stop(self) -> Vec<Duration> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// Whether a refused fenced call means the attempt no longer holds the
/// lease (including a job finished or re-leased meanwhile).
fn is_lease_refusal(status: &Status) -> bool {
    let error = CaptureServiceError::from_status(status);
    error.is_lease_lost()
        || matches!(
            error,
            CaptureServiceError::AlreadyFinished { .. } | CaptureServiceError::NotFound { .. }
        )
}
