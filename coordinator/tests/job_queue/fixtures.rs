//! Runs, jobs, artifacts and policies the job queue scenarios share.

use std::time::Duration;

use capture_coordinator::queue::{
    ArtifactRow, CaptureMode, DecodingSpec, JobId, JobPayload, JobPrompt, JobQueue, ModelRef,
    NewJob, NewRun, QueueError, RetryPolicy, RunId, RunSpec,
};

/// A lease long enough never to expire during a test.
pub(crate) const LONG_LEASE: Duration = Duration::from_secs(60);
/// A lease short enough for reaper tests to wait out.
pub(crate) const SHORT_LEASE: Duration = Duration::from_millis(200);

/// Three attempts, backoff between 50 and 200 ms.
pub(crate) fn fast_retry_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(200),
    }
}

pub(crate) fn tiny_model() -> ModelRef {
    ModelRef {
        id: "tests/tiny-gemma2".to_owned(),
        revision: "rev-a".to_owned(),
    }
}

pub(crate) fn run_spec(experiment: &str, model: &ModelRef) -> RunSpec {
    RunSpec {
        experiment: experiment.to_owned(),
        model: model.clone(),
        prompt_sets: vec!["adversarial".to_owned()],
        modes: vec![
            CaptureMode::Residual,
            CaptureMode::Internals { layers: vec![0, 1] },
        ],
        decoding: DecodingSpec {
            max_new_tokens: 8,
            temperature: Some(0.7),
            top_p: Some(0.9),
            seed: Some(42),
            chat_template: true,
            replay: None,
        },
        store_dtype: "f32".to_owned(),
        shard_size: 2,
    }
}

/// Jobs `adversarial/residual/0`, `adversarial/residual/1`, ... with two
/// prompts each.
pub(crate) fn shard_jobs(count: usize) -> Vec<NewJob> {
    (0..count)
        .map(|shard| NewJob {
            key: format!("adversarial/residual/{shard}"),
            payload: JobPayload {
                prompt_set: "adversarial".to_owned(),
                prompts: (0..2)
                    .map(|index| JobPrompt {
                        id: format!("p{}", shard * 2 + index),
                        text: format!("prompt text {}", shard * 2 + index),
                    })
                    .collect(),
                mode: CaptureMode::Residual,
            },
        })
        .collect()
}

/// A fresh run of `jobs` jobs for `model`, created in `queue`.
pub(crate) async fn create_run_with_jobs(
    queue: &impl JobQueue,
    experiment: &str,
    model: &ModelRef,
    jobs: usize,
) -> RunId {
    let run = NewRun {
        id: RunId::new_time_ordered(),
        spec: run_spec(experiment, model),
    };
    let created = queue
        .create_run(&run, &shard_jobs(jobs))
        .await
        .expect("create run");
    assert!(created.run_created);
    run.id
}

pub(crate) fn artifact(key: &str) -> ArtifactRow {
    ArtifactRow {
        key: key.to_owned(),
        size_bytes: 1234,
        sha256: "ab".repeat(32),
        prompt_set: "adversarial".to_owned(),
        prompt_id: "p0".to_owned(),
        mode: "residual".to_owned(),
        layer: None,
        prompt_tokens: Some(7),
        response_tokens: Some(8),
        shapes: serde_json::json!({"prompt.residual_in": [26, 7, 2304]}),
    }
}

/// The artifacts a job with this key would write.
pub(crate) fn artifacts_for_job(job_key: &str) -> Vec<ArtifactRow> {
    vec![
        artifact(&format!("{job_key}/a.pt")),
        artifact(&format!("{job_key}/b.pt")),
    ]
}

#[track_caller]
pub(crate) fn assert_lease_lost(
    result: Result<impl std::fmt::Debug, QueueError>,
    job: JobId,
    attempt: i32,
) {
    match result {
        Err(QueueError::LeaseLost {
            job: lost_job,
            attempt: lost_attempt,
        }) => {
            assert_eq!((lost_job, lost_attempt), (job, attempt));
        }
        other => panic!("expected lease lost on job {job} attempt {attempt}, got {other:?}"),
    }
}

/// Claims until a job comes (backoff), for at most two seconds.
pub(crate) async fn claim_when_due(
    queue: &impl JobQueue,
    worker_id: &str,
    model: &ModelRef,
) -> capture_coordinator::queue::ClaimedJob {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(claimed) = queue
            .claim(worker_id, model, LONG_LEASE)
            .await
            .expect("claim")
        {
            return claimed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no job became claimable within 2s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
