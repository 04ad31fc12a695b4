//! Publishing a run: promoting accepted attempts' staged files to their
//! documented keys, collecting what lost attempts staged, and writing the
//! run's `manifest.json` — then marking the run finalized in the database.
//!
//! Everything here is idempotent and driven by the database, so it is safe
//! to run after a crash, twice, or from the periodic sweep: only the attempt
//! the queue accepted is ever promoted, so a zombie's uploads never reach a
//! documented key.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use chrono::Utc;
use serde_json::json;
use tracing::{info, warn};

use super::Coordinator;
use crate::queue::{ArtifactRecord, JobId, JobQueue, JobState, RunId, RunState};

/// What [`Coordinator::finalize_run`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FinalizeReport {
    pub copied: usize,
    pub already_promoted: usize,
    pub staging_deleted: usize,
    /// False when the run is still running or another task finalizes it.
    pub finalized: bool,
}

/// The manifest's format tag.
pub const RUN_MANIFEST_FORMAT: &str = "capture-run-manifest/1";

impl Coordinator {
    /// Promotes one accepted attempt's artifacts (right after its
    /// completion, with the keys it recorded). Errors are logged; the
    /// finalizer repeats the promotion.
    pub(crate) async fn promote_job(&self, run: RunId, job: JobId, attempt: i32, keys: &[&str]) {
        let result = self
            .on_run_store(run, |store| async move {
                store
                    .promote(&job.to_string(), attempt_number(attempt), keys)
                    .await
            })
            .await;
        if let Err(error) = result {
            warn!(%run, %job, attempt, error, "promotion failed; the finalizer will retry it");
        }
    }

    /// Deletes what a refused attempt staged (a zombie whose lease was lost
    /// and that completed anyway), unless the queue says that attempt was
    /// accepted: its staged files are never promoted, and if the run is
    /// already finalized nothing else would collect them. Errors are logged;
    /// nothing at a documented key is touched.
    pub(crate) async fn discard_refused_attempt(&self, run: RunId, job: JobId, attempt: i32) {
        let accepted = match self.queue.list_attempts(run).await {
            Ok(attempts) => attempts.iter().any(|a| {
                a.job_id == job
                    && a.attempt == attempt
                    && a.outcome == Some(crate::queue::AttemptOutcome::Succeeded)
            }),
            // Unknown: keep the files (the finalizer collects them if the
            // run is not finalized yet).
            Err(error) => {
                warn!(%run, %job, attempt, %error, "cannot check a refused attempt; its staged files stay");
                return;
            }
        };
        if accepted {
            return;
        }
        let result = self
            .on_run_store(run, |store| async move {
                store
                    .discard_attempt(&job.to_string(), attempt_number(attempt))
                    .await
            })
            .await;
        match result {
            Ok(0) => {}
            Ok(deleted) => {
                info!(%run, %job, attempt, deleted, "refused attempt's staged files deleted")
            }
            Err(error) => {
                warn!(%run, %job, attempt, error, "deleting a refused attempt's staged files failed")
            }
        }
    }

    /// Deletes whatever is in the staging of runs finalized within
    /// `window`: uploads of zombies that lost their lease and never called
    /// `CompleteJob` (those that did are cleaned when refused). One listing
    /// per run; returns the objects deleted. Errors are logged.
    pub async fn sweep_finalized_staging(&self, window: std::time::Duration) -> usize {
        let since =
            Utc::now() - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::hours(1));
        let runs = match self.queue.finalized_since(since).await {
            Ok(runs) => runs,
            Err(error) => {
                warn!(%error, "cannot list finalized runs to sweep their staging");
                return 0;
            }
        };
        let mut deleted = 0;
        for run in runs {
            let result = self
                .on_run_store(
                    run,
                    |store| async move { store.discard_all_staging().await },
                )
                .await;
            match result {
                Ok(0) => {}
                Ok(n) => {
                    info!(%run, deleted = n, "late uploads deleted from a finalized run's staging");
                    deleted += n;
                }
                Err(error) => warn!(%run, error, "sweeping a finalized run's staging failed"),
            }
        }
        deleted
    }

    /// Runs `work` on the run's store; either failure as a message (what
    /// the promotion, discard and sweep paths log).
    async fn on_run_store<T, F, Fut>(&self, run: RunId, work: F) -> Result<T, String>
    where
        F: FnOnce(capture_worker::store::RunStore) -> Fut,
        Fut: std::future::Future<Output = Result<T, capture_worker::store::StoreError>>,
    {
        let store = self.run_store_of(run).await.map_err(|e| e.to_string())?;
        work(store).await.map_err(|e| e.to_string())
    }

    /// Finalizes every terminal run that is not yet, repairing whatever a
    /// crash left half done. Returns how many runs it finalized.
    pub async fn finalize_pending(&self) -> usize {
        let runs = match self.queue.unfinalized_runs().await {
            Ok(runs) => runs,
            Err(error) => {
                warn!(%error, "cannot list runs to finalize");
                return 0;
            }
        };
        let mut done = 0;
        for run in runs {
            let result = self.finalize_run(run).await;
            let mut failures = self.finalize_failures.lock().expect("failures lock");
            match result {
                Ok(report) => {
                    failures.remove(&run);
                    if report.finalized {
                        done += 1;
                    }
                }
                Err(error) => {
                    warn!(%run, error, "finalizing the run failed; will retry");
                    failures
                        .entry(run)
                        .and_modify(|(_, last)| last.clone_from(&error))
                        .or_insert_with(|| (std::time::Instant::now(), error));
                }
            }
        }
        done
    }

    /// Terminal runs whose finalization has failed on every try for longer
    /// than `patience`, with the last error: what a one-shot command (the
    /// embedded `submit`) reports instead of waiting for ever. A server
    /// keeps retrying.
    pub fn stuck_finalizations(&self, patience: std::time::Duration) -> Vec<(RunId, String)> {
        self.finalize_failures
            .lock()
            .expect("failures lock")
            .iter()
            .filter(|(_, (since, _))| since.elapsed() >= patience)
            .map(|(run, (_, error))| (*run, error.clone()))
            .collect()
    }

    /// Every terminal run whose last finalization failed, with the error.
    pub fn failing_finalizations(&self) -> Vec<(RunId, String)> {
        self.stuck_finalizations(std::time::Duration::ZERO)
    }

    /// Promotes every accepted attempt of a terminal run, deletes all
    /// staging, writes `manifest.json` and marks the run finalized.
    ///
    /// One task at a time per run: a second call while one is under way
    /// returns an empty report. The claim is released however the call
    /// ends, including when its future is dropped halfway (a completion
    /// whose worker disconnected cancels the RPC handler that finalizes):
    /// a claim left behind would make every later try, the sweep's
    /// included, skip the run for ever.
    pub async fn finalize_run(&self, run: RunId) -> Result<FinalizeReport, String> {
        let Some(_claim) = FinalizingClaim::take(&self.finalizing, run) else {
            return Ok(FinalizeReport::default());
        };
        self.finalize_run_once(run).await
    }

    async fn finalize_run_once(&self, run: RunId) -> Result<FinalizeReport, String> {
        let error = |e: &dyn std::fmt::Display| e.to_string();
        let status = self.queue.run_status(run).await.map_err(|e| error(&e))?;
        let mut report = FinalizeReport::default();
        if status.run.state == RunState::Running {
            return Ok(report);
        }
        let store = self
            .run_store(run, &status.run.spec)
            .map_err(|e| error(&e))?;
        let jobs = self.queue.list_jobs(run).await.map_err(|e| error(&e))?;
        let attempts = self.queue.list_attempts(run).await.map_err(|e| error(&e))?;
        let artifacts = self
            .queue
            .list_artifacts(run)
            .await
            .map_err(|e| error(&e))?;

        let mut accepted: BTreeMap<(JobId, i32), Vec<&str>> = BTreeMap::new();
        for artifact in &artifacts {
            accepted
                .entry((artifact.job_id, artifact.attempt))
                .or_default()
                .push(artifact.artifact.key.as_str());
        }
        for ((job, attempt), keys) in &accepted {
            let promotion = store
                .promote(&job.to_string(), attempt_number(*attempt), keys)
                .await
                .map_err(|e| error(&e))?;
            report.copied += promotion.copied;
            report.already_promoted += promotion.already_promoted;
        }
        for job in &jobs {
            report.staging_deleted += store
                .discard_job_staging(&job.id.to_string())
                .await
                .map_err(|e| error(&e))?;
        }

        let manifest = run_manifest(&status, &jobs, &attempts, &artifacts, &store.root_url());
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| error(&e))?;
        store
            .put_root_file("manifest.json", Bytes::from(text))
            .await
            .map_err(|e| error(&e))?;
        self.queue
            .mark_finalized(run)
            .await
            .map_err(|e| error(&e))?;
        report.finalized = true;
        info!(
            %run,
            state = %status.run.state,
            artifacts = artifacts.len(),
            copied = report.copied,
            staging_deleted = report.staging_deleted,
            "run finalized: manifest.json written"
        );
        Ok(report)
    }
}

/// A run marked as being finalized, unmarked when dropped.
struct FinalizingClaim<'a> {
    runs: &'a std::sync::Mutex<std::collections::HashSet<RunId>>,
    run: RunId,
}

impl<'a> FinalizingClaim<'a> {
    /// None when another task holds the run.
    fn take(
        runs: &'a std::sync::Mutex<std::collections::HashSet<RunId>>,
        run: RunId,
    ) -> Option<Self> {
        // The lock is released before a claim exists: a claim dropped
        // while it is held would deadlock (its `Drop` takes the lock).
        let inserted = runs.lock().expect("finalizing lock").insert(run);
        inserted.then(|| Self { runs, run })
    }
}

impl Drop for FinalizingClaim<'_> {
    fn drop(&mut self) {
        // A poisoned lock still holds the set: release the run anyway.
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        runs.remove(&self.run);
    }
}

fn attempt_number(attempt: i32) -> u32 {
    u32::try_from(attempt).unwrap_or(0)
}

/// The run manifest: the engine manifest's fields (format, code version,
/// model, parameters, artifacts with key, size, sha256, tokens and shapes)
/// plus the run id, state, timings, every job with its attempts and the
/// workers that ran them.
fn run_manifest(
    status: &crate::queue::RunStatus,
    jobs: &[crate::queue::JobRecord],
    attempts: &[crate::queue::AttemptRecord],
    artifacts: &[ArtifactRecord],
    root_url: &str,
) -> serde_json::Value {
    let spec = &status.run.spec;
    let workers: BTreeSet<&str> = attempts.iter().map(|a| a.worker_id.as_str()).collect();
    let jobs_json: Vec<_> = jobs
        .iter()
        .map(|job| {
            let job_attempts: Vec<_> = attempts
                .iter()
                .filter(|a| a.job_id == job.id)
                .map(|a| {
                    json!({
                        "attempt": a.attempt,
                        "worker_id": a.worker_id,
                        "started_at": a.started_at,
                        "ended_at": a.ended_at,
                        "outcome": a.outcome.map(|o| o.as_str()),
                        "error": a.error,
                        "seconds": a.ended_at.map(|end| (end - a.started_at).num_milliseconds() as f64 / 1000.0),
                    })
                })
                .collect();
            let accepted = (job.state == JobState::Succeeded).then_some(job.attempt);
            json!({
                "job_id": job.id.to_string(),
                "key": job.key,
                "state": job.state.as_str(),
                "prompt_set": job.payload.prompt_set,
                "prompt_ids": job.payload.prompts.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
                "mode": job.payload.mode.name(),
                "accepted_attempt": accepted,
                "last_error": job.last_error,
                "created_at": job.created_at,
                "started_at": job.first_started_at,
                "finished_at": job.finished_at,
                "attempts": job_attempts,
            })
        })
        .collect();
    let artifacts_json: Vec<_> = artifacts
        .iter()
        .map(|a| {
            json!({
                "key": a.artifact.key,
                "prompt_set": a.artifact.prompt_set,
                "prompt_id": a.artifact.prompt_id,
                "mode": a.artifact.mode,
                "layer": a.artifact.layer,
                "bytes": a.artifact.size_bytes,
                "sha256": a.artifact.sha256,
                "prompt_tokens": a.artifact.prompt_tokens,
                "response_tokens": a.artifact.response_tokens,
                "shapes": a.artifact.shapes,
                "job_id": a.job_id.to_string(),
                "attempt": a.attempt,
            })
        })
        .collect();
    let seconds = |end: Option<chrono::DateTime<Utc>>| {
        end.zip(status.started_at)
            .map(|(end, start)| (end - start).num_milliseconds() as f64 / 1000.0)
    };
    json!({
        "format": RUN_MANIFEST_FORMAT,
        "code_version": env!("CARGO_PKG_VERSION"),
        "run_id": status.run.id.to_string(),
        "experiment": spec.experiment,
        "state": status.run.state.as_str(),
        "error": status.run.error,
        "root": root_url,
        "model": { "id": spec.model.id, "revision": spec.model.revision },
        "parameters": {
            "max_new_tokens": spec.decoding.max_new_tokens,
            "sampling": match spec.decoding.temperature {
                Some(t) => json!({"strategy": "temperature", "temperature": t, "top_p": spec.decoding.top_p, "seed": spec.decoding.seed}),
                None => json!({"strategy": "greedy"}),
            },
            "store_dtype": spec.store_dtype,
            "replay": spec.decoding.replay,
            "chat_template": spec.decoding.chat_template.then_some(capture_worker::run::CHAT_TEMPLATE),
            "prompt_sets": spec.prompt_sets,
            "modes": spec.modes,
            "shard_size": spec.shard_size,
        },
        "timings": {
            "created_at": status.run.created_at,
            "started_at": status.started_at,
            "finished_at": status.run.finished_at,
            "seconds": seconds(status.run.finished_at),
        },
        "totals": {
            "jobs": status.jobs.total(),
            "jobs_succeeded": status.jobs.succeeded,
            "jobs_dead": status.jobs.dead,
            "jobs_cancelled": status.jobs.cancelled,
            "attempts": attempts.len(),
            "artifacts": status.artifacts,
            "bytes": status.artifact_bytes,
            "tokens_captured": status.tokens_captured,
        },
        "workers": workers,
        "jobs": jobs_json,
        "artifacts": artifacts_json,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::FinalizingClaim;
    use crate::queue::JobQueue;
    use crate::service::test_support::coordinator_with_run;

    #[test]
    fn a_run_is_claimed_once_until_its_claim_is_dropped() {
        // On a thread of its own: a deadlock fails the test instead of
        // hanging it.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runs = std::sync::Mutex::new(std::collections::HashSet::new());
            let run = crate::queue::RunId::new_time_ordered();
            let first = FinalizingClaim::take(&runs, run).expect("the first claim");
            assert!(FinalizingClaim::take(&runs, run).is_none(), "claimed twice");
            assert!(
                runs.lock().unwrap().contains(&run),
                "a refused claim must not release the holder's"
            );
            drop(first);
            assert!(runs.lock().unwrap().is_empty());
            assert!(FinalizingClaim::take(&runs, run).is_some());
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("claims finish (no deadlock) and hold");
    }

    #[tokio::test]
    async fn a_finalization_dropped_halfway_does_not_block_the_next() {
        let test = coordinator_with_run("dropped", 1).await;
        let (coordinator, run) = (&test.coordinator, test.run);
        let queue = coordinator.queue();
        let claimed = queue
            .claim("worker-a", &test.model, std::time::Duration::from_secs(60))
            .await
            .unwrap()
            .expect("the job");
        queue
            .fail(claimed.job.id, 1, "worker-a", "gave up", false)
            .await
            .unwrap();
        // What a completion's RPC handler does when its worker disconnects:
        // the finalization is polled, waits on the database, and is dropped.
        let dropped =
            tokio::time::timeout(std::time::Duration::ZERO, coordinator.finalize_run(run)).await;
        assert!(dropped.is_err(), "the first try must stop halfway");
        assert_eq!(queue.unfinalized_runs().await.unwrap(), vec![run]);
        assert_eq!(coordinator.finalize_pending().await, 1);
        assert!(queue.unfinalized_runs().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn late_uploads_to_a_finalized_run_are_swept() {
        let test = coordinator_with_run("sweep", 1).await;
        let (coordinator, run) = (&test.coordinator, test.run);
        let queue = coordinator.queue();
        let hour = std::time::Duration::from_secs(3600);
        let claimed = queue
            .claim("worker-a", &test.model, std::time::Duration::from_secs(60))
            .await
            .unwrap()
            .expect("the job");
        let store = test.store.run("sweep", &run.to_string()).unwrap();
        let job = claimed.job.id.to_string();
        // Staging of a running run is never touched.
        store
            .stage_put(
                &job,
                1,
                "inference/raw/residual/set/0.pt",
                Bytes::from_static(b"x"),
            )
            .await
            .unwrap();
        assert_eq!(coordinator.sweep_finalized_staging(hour).await, 0);
        assert_eq!(store.list("_staging").await.unwrap().len(), 1);

        queue
            .fail(claimed.job.id, 1, "worker-a", "gave up", false)
            .await
            .unwrap();
        assert!(coordinator.finalize_run(run).await.unwrap().finalized);
        // A zombie uploads after finalization and never completes.
        store
            .stage_put(
                &job,
                1,
                "inference/raw/residual/set/0.pt",
                Bytes::from_static(b"late"),
            )
            .await
            .unwrap();
        assert_eq!(coordinator.sweep_finalized_staging(hour).await, 1);
        assert!(store.list("_staging").await.unwrap().is_empty());
        assert!(
            store
                .list("")
                .await
                .unwrap()
                .iter()
                .any(|o| o.key == "manifest.json")
        );
        // Outside the window: not listed any more.
        store
            .stage_put(
                &job,
                1,
                "inference/raw/residual/set/0.pt",
                Bytes::from_static(b"later"),
            )
            .await
            .unwrap();
        assert_eq!(
            coordinator
                .sweep_finalized_staging(std::time::Duration::ZERO)
                .await,
            0
        );
    }
}
