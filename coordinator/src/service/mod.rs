//! The coordinator's gRPC services over the job queue and the artifact
//! store: [`CaptureApi`] for clients, [`WorkerApi`] for workers, both
//! sharing one [`Coordinator`].

use std::collections::{HashMap, HashSet};

/// Runs whose experiment names are cached before the cache starts over.
const EXPERIMENT_CACHE_RUNS: usize = 10_000;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capture_proto::CaptureServiceError;
use capture_proto::v1 as pb;

use self::convert::queue_error;
use crate::queue::JobQueue;
use capture_worker::store::{ArtifactStore, RunStore};

use crate::metrics::CoordinatorMetrics;
use crate::plan::ModelCatalog;
use crate::queue::{Queue, RunId, RunSpec};

mod capture;
pub(crate) mod convert;
mod finalize;
#[cfg(test)]
pub(crate) mod test_support;
mod worker;

pub use capture::CaptureApi;
pub use finalize::{FinalizeReport, RUN_MANIFEST_FORMAT};
pub use worker::WorkerApi;

/// Lease and heartbeat timing handed to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a lease lasts without a heartbeat.
    pub lease: Duration,
    /// How often workers heartbeat; well under `lease`.
    pub heartbeat: Duration,
    /// Longest a ClaimJob call waits for work.
    pub max_claim_wait: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            max_claim_wait: Duration::from_secs(10),
        }
    }
}

/// What both services share: the queue, the store, the models known, and
/// which runs are being finalized right now.
#[derive(Debug)]
pub struct Coordinator {
    pub(crate) queue: Queue,
    pub(crate) store: ArtifactStore,
    pub(crate) catalog: ModelCatalog,
    pub(crate) timing: LeaseTiming,
    pub(crate) metrics: CoordinatorMetrics,
    finalizing: Mutex<HashSet<RunId>>,
    /// Terminal runs whose finalization keeps failing: since when, and the
    /// last error (see `Coordinator::stuck_finalization`).
    finalize_failures: Mutex<HashMap<RunId, (std::time::Instant, String)>>,
    /// Experiment names of runs seen by completions (see `run_store_of`).
    experiments: Mutex<HashMap<RunId, String>>,
}

impl Coordinator {
    pub fn new(queue: Queue, store: ArtifactStore, timing: LeaseTiming) -> Arc<Self> {
        Arc::new(Self {
            queue,
            store,
            catalog: ModelCatalog::default(),
            timing,
            metrics: CoordinatorMetrics::default(),
            finalizing: Mutex::new(HashSet::new()),
            finalize_failures: Mutex::new(HashMap::new()),
            experiments: Mutex::new(HashMap::new()),
        })
    }

    /// The run's root in the store, from its experiment name, which is
    /// cached (a run's spec never changes) so that every completion does
    /// not read the run's totals just to find its root.
    pub(crate) async fn run_store_of(&self, run: RunId) -> Result<RunStore, CaptureServiceError> {
        let cached = self
            .experiments
            .lock()
            .expect("experiment cache lock")
            .get(&run)
            .cloned();
        let experiment = match cached {
            Some(experiment) => experiment,
            None => {
                let record = self.queue.get_run(run).await.map_err(queue_error)?;
                let mut cache = self.experiments.lock().expect("experiment cache lock");
                if cache.len() >= EXPERIMENT_CACHE_RUNS {
                    cache.clear();
                }
                cache.insert(run, record.spec.experiment.clone());
                record.spec.experiment
            }
        };
        self.store
            .run(&experiment, &run.to_string())
            .map_err(|e| CaptureServiceError::Internal(e.to_string()))
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn store(&self) -> &ArtifactStore {
        &self.store
    }

    /// What the services count; exposed by `serve --metrics-listen`.
    pub fn metrics(&self) -> &CoordinatorMetrics {
        &self.metrics
    }

    /// The run's root in the store.
    pub(crate) fn run_store(
        &self,
        run: RunId,
        spec: &RunSpec,
    ) -> Result<RunStore, CaptureServiceError> {
        self.store
            .run(&spec.experiment, &run.to_string())
            .map_err(|e| CaptureServiceError::Internal(e.to_string()))
    }

    /// The wire form of a run, with its jobs when `with_jobs`.
    pub(crate) async fn run_message(
        &self,
        run: RunId,
        with_jobs: bool,
    ) -> Result<pb::Run, CaptureServiceError> {
        let queue = &self.queue;
        let status = queue.run_status(run).await.map_err(queue_error)?;
        let mut message = convert::run(&status, self.artifact_root(run, &status.run.spec));
        if with_jobs {
            message.job_details = queue
                .list_jobs(run)
                .await
                .map_err(queue_error)?
                .iter()
                .map(convert::job_info)
                .collect();
        }
        Ok(message)
    }

    pub(crate) fn artifact_root(&self, run: RunId, spec: &RunSpec) -> String {
        self.run_store(run, spec)
            .map(|store| root_with_slash(store.root_url()))
            .unwrap_or_default()
    }
}

/// Root URLs end with `/`, so `{root}{key}` is the object's URL.
pub(crate) fn root_with_slash(mut url: String) -> String {
    if !url.ends_with('/') {
        url.push('/');
    }
    url
}
