//! A coordinator on an in-memory SQLite queue and a local store, with one
//! run of single-prompt residual jobs already created (unit tests).

use std::sync::Arc;

use capture_worker::store::{ArtifactStore, StoreOptions};

use super::{Coordinator, LeaseTiming};
use crate::queue::{
    CaptureMode, DecodingSpec, JobPayload, JobPrompt, JobQueue, ModelRef, NewJob, NewRun, Queue,
    RunId, RunSpec,
};

pub(crate) struct TestRun {
    pub(crate) coordinator: Arc<Coordinator>,
    pub(crate) run: RunId,
    pub(crate) model: ModelRef,
    pub(crate) store: ArtifactStore,
    _dir: tempfile::TempDir,
}

/// A coordinator holding run `experiment` of `jobs` queued jobs.
pub(crate) async fn coordinator_with_run(experiment: &str, jobs: usize) -> TestRun {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::connect("sqlite::memory:").await.unwrap();
    let store =
        ArtifactStore::from_url(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap();
    let coordinator = Coordinator::new(queue, store.clone(), LeaseTiming::default());
    let model = ModelRef {
        id: "tests/tiny".into(),
        revision: String::new(),
    };
    let new_jobs: Vec<NewJob> = (0..jobs)
        .map(|shard| NewJob {
            key: format!("set/residual/{shard}"),
            payload: JobPayload {
                prompt_set: "set".into(),
                prompts: vec![JobPrompt {
                    id: shard.to_string(),
                    text: "hello".into(),
                }],
                mode: CaptureMode::Residual,
            },
        })
        .collect();
    let run = NewRun {
        id: RunId::new_time_ordered(),
        spec: RunSpec {
            experiment: experiment.into(),
            model: model.clone(),
            prompt_sets: vec!["set".into()],
            modes: vec![CaptureMode::Residual],
            decoding: DecodingSpec {
                max_new_tokens: 4,
                temperature: None,
                top_p: None,
                seed: None,
                chat_template: false,
                replay: None,
            },
            store_dtype: "f32".into(),
            shard_size: 1,
        },
    };
    coordinator
        .queue()
        .create_run(&run, &new_jobs)
        .await
        .unwrap();
    TestRun {
        coordinator,
        run: run.id,
        model,
        store,
        _dir: dir,
    }
}
