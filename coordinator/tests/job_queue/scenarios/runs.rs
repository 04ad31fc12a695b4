//! Run scenarios: idempotent creation, cancel, retry of dead jobs,
//! listing, job counts over every run, and the workers table.

use std::time::Duration;

use capture_coordinator::queue::{
    JobCounts, JobQueue, JobState, ModelRef, NewRun, QueueError, RunFilter, RunId, RunState,
    WorkerSeen, WorkerState,
};

use crate::fixtures::{
    LONG_LEASE, artifact, artifacts_for_job, assert_lease_lost, create_run_with_jobs, run_spec,
    shard_jobs, tiny_model,
};

pub(crate) async fn create_run_is_idempotent_on_run_id_and_job_keys(queue: impl JobQueue) {
    let run = NewRun {
        id: RunId::new_time_ordered(),
        spec: run_spec("idempotent", &tiny_model()),
    };
    let first = queue.create_run(&run, &shard_jobs(3)).await.unwrap();
    assert!(first.run_created);
    assert_eq!((first.jobs_inserted, first.jobs_existing), (3, 0));

    let again = queue.create_run(&run, &shard_jobs(3)).await.unwrap();
    assert!(!again.run_created);
    assert_eq!((again.jobs_inserted, again.jobs_existing), (0, 3));

    let extended = queue.create_run(&run, &shard_jobs(4)).await.unwrap();
    assert_eq!((extended.jobs_inserted, extended.jobs_existing), (1, 3));
    let jobs = queue.list_jobs(run.id).await.unwrap();
    assert_eq!(jobs.len(), 4);
    assert!(
        jobs.iter()
            .all(|job| job.state == JobState::Queued && job.attempt == 0)
    );
    assert_eq!(jobs[0].payload, shard_jobs(1)[0].payload);

    let mut other_spec = run.clone();
    other_spec.spec.store_dtype = "bf16".to_owned();
    let conflict = queue.create_run(&other_spec, &shard_jobs(1)).await;
    assert!(
        matches!(conflict, Err(QueueError::Conflict(_))),
        "{conflict:?}"
    );

    let empty = NewRun {
        id: RunId::new_time_ordered(),
        spec: run.spec.clone(),
    };
    let no_jobs = queue.create_run(&empty, &[]).await;
    assert!(
        matches!(no_jobs, Err(QueueError::InvalidArgument(_))),
        "{no_jobs:?}"
    );
    let mut twice = shard_jobs(2);
    twice[1].key = twice[0].key.clone();
    let duplicate = queue.create_run(&empty, &twice).await;
    assert!(
        matches!(duplicate, Err(QueueError::InvalidArgument(_))),
        "{duplicate:?}"
    );
    let missing = queue.run_status(empty.id).await;
    assert!(
        matches!(missing, Err(QueueError::NotFound { .. })),
        "{missing:?}"
    );

    queue.cancel_run(run.id).await.unwrap();
    let after_cancel = queue.create_run(&run, &shard_jobs(5)).await;
    assert!(
        matches!(after_cancel, Err(QueueError::InvalidState(_))),
        "{after_cancel:?}"
    );
    let same_again = queue.create_run(&run, &shard_jobs(4)).await.unwrap();
    assert_eq!((same_again.jobs_inserted, same_again.jobs_existing), (0, 4));
    assert_eq!(queue.list_jobs(run.id).await.unwrap().len(), 4);
}

pub(crate) async fn cancel_stops_handing_out_jobs_and_flags_leased_ones(queue: impl JobQueue) {
    let model = tiny_model();
    let run_id = create_run_with_jobs(&queue, "cancel", &model, 4).await;
    let finishing = queue
        .claim("w1", &model, LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    let failing = queue
        .claim("w2", &model, LONG_LEASE)
        .await
        .unwrap()
        .unwrap();

    let report = queue.cancel_run(run_id).await.unwrap();
    assert_eq!(
        (report.queued_jobs_cancelled, report.leased_jobs_flagged),
        (2, 2)
    );
    assert_eq!(report.run_state, RunState::Running);
    assert!(
        queue
            .claim("w3", &model, LONG_LEASE)
            .await
            .unwrap()
            .is_none()
    );
    let lease = queue
        .heartbeat(finishing.job.id, 1, "w1", LONG_LEASE)
        .await
        .unwrap();
    assert!(lease.cancel_requested);

    // a retryable failure of a cancelled run's job is not queued again
    let failed = queue
        .fail(failing.job.id, 1, "w2", "stopped", true)
        .await
        .unwrap();
    assert_eq!(failed.state, JobState::Cancelled);
    assert_eq!(
        queue.get_job(failing.job.id).await.unwrap().state,
        JobState::Cancelled
    );

    // completion is still fenced, and still accepted from the lease holder
    assert_lease_lost(
        queue.complete(finishing.job.id, 2, "w1", &[]).await,
        finishing.job.id,
        2,
    );
    let completed = queue
        .complete(finishing.job.id, 1, "w1", &[artifact("kept.pt")])
        .await
        .unwrap();
    assert_eq!(completed.run_finished, Some(RunState::Cancelled));
    let status = queue.run_status(run_id).await.unwrap();
    assert_eq!(status.run.state, RunState::Cancelled);
    assert!(status.run.cancel_requested && status.run.finished_at.is_some());
    assert_eq!(
        (
            status.jobs.succeeded,
            status.jobs.cancelled,
            status.artifacts
        ),
        (1, 3, 1)
    );

    assert_eq!(
        queue.cancel_run(run_id).await.unwrap().run_state,
        RunState::Cancelled
    );
    let retry = queue.retry_run(run_id).await;
    assert!(
        matches!(retry, Err(QueueError::InvalidState(_))),
        "{retry:?}"
    );
    let unknown = queue.cancel_run(RunId::new_time_ordered()).await;
    assert!(
        matches!(unknown, Err(QueueError::NotFound { .. })),
        "{unknown:?}"
    );
}

pub(crate) async fn retry_run_requeues_dead_jobs_with_a_fresh_budget(queue: impl JobQueue) {
    let model = tiny_model();
    let run_id = create_run_with_jobs(&queue, "retry-run", &model, 2).await;
    let good = queue.claim("w", &model, LONG_LEASE).await.unwrap().unwrap();
    queue
        .complete(good.job.id, 1, "w", &[artifact("good.pt")])
        .await
        .unwrap();
    let bad = queue.claim("w", &model, LONG_LEASE).await.unwrap().unwrap();
    let failed = queue
        .fail(bad.job.id, 1, "w", "worker crashed", false)
        .await
        .unwrap();
    assert_eq!(failed.run_finished, Some(RunState::Failed));
    let cancel_failed = queue.cancel_run(run_id).await;
    assert!(
        matches!(cancel_failed, Err(QueueError::InvalidState(_))),
        "{cancel_failed:?}"
    );

    assert_eq!(queue.retry_run(run_id).await.unwrap(), 1);
    let status = queue.run_status(run_id).await.unwrap();
    assert_eq!(
        (status.run.state, status.jobs.queued, status.run.error),
        (RunState::Running, 1, None)
    );
    let requeued = queue.get_job(bad.job.id).await.unwrap();
    assert_eq!(
        (requeued.max_attempts, requeued.last_error.as_deref()),
        (4, Some("worker crashed"))
    );

    let again = queue.claim("w", &model, LONG_LEASE).await.unwrap().unwrap();
    assert_eq!((again.job.id, again.attempt), (bad.job.id, 2));
    let completed = queue
        .complete(bad.job.id, 2, "w", &[artifact("bad.pt")])
        .await
        .unwrap();
    assert_eq!(completed.run_finished, Some(RunState::Succeeded));
    assert_eq!(queue.retry_run(run_id).await.unwrap(), 0);
    let unknown = queue.retry_run(RunId::new_time_ordered()).await;
    assert!(
        matches!(unknown, Err(QueueError::NotFound { .. })),
        "{unknown:?}"
    );
}

pub(crate) async fn runs_are_listed_newest_first_with_filters(queue: impl JobQueue) {
    let model = tiny_model();
    let older = create_run_with_jobs(&queue, "alpha", &model, 1).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let newer = create_run_with_jobs(&queue, "beta", &model, 1).await;
    let claimed = queue.claim("w", &model, LONG_LEASE).await.unwrap().unwrap();
    assert_eq!(claimed.job.run_id, older, "older runs are served first");
    queue.complete(claimed.job.id, 1, "w", &[]).await.unwrap();

    let all: Vec<_> = queue
        .list_runs(&RunFilter::default())
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(all, vec![newer, older]);
    let alpha = RunFilter {
        experiment: Some("alpha".to_owned()),
        ..RunFilter::default()
    };
    let alpha_runs = queue.list_runs(&alpha).await.unwrap();
    assert_eq!(alpha_runs.len(), 1);
    assert_eq!(
        (alpha_runs[0].id, alpha_runs[0].state),
        (older, RunState::Succeeded)
    );
    assert_eq!(alpha_runs[0].spec.experiment, "alpha");
    let record = queue.get_run(older).await.unwrap();
    assert_eq!(
        (record.id, record.spec.experiment.as_str(), record.state),
        (older, "alpha", RunState::Succeeded)
    );
    let unknown = queue.get_run(RunId::new_time_ordered()).await;
    assert!(
        matches!(unknown, Err(QueueError::NotFound { .. })),
        "{unknown:?}"
    );
    let running = RunFilter {
        state: Some(RunState::Running),
        ..RunFilter::default()
    };
    let running_ids: Vec<_> = queue
        .list_runs(&running)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(running_ids, vec![newer]);
    let one = RunFilter {
        limit: 1,
        ..RunFilter::default()
    };
    assert_eq!(queue.list_runs(&one).await.unwrap().len(), 1);

    // Filters on the spec, the model and the creation time.
    let ids = |filter: RunFilter| {
        let queue = &queue;
        async move {
            queue
                .list_runs(&filter)
                .await
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    let set = |name: &str| RunFilter {
        prompt_set: Some(name.to_owned()),
        ..RunFilter::default()
    };
    assert_eq!(ids(set("adversarial")).await, vec![newer, older]);
    assert!(ids(set("dynamic")).await.is_empty());
    let mode = |name: &str| RunFilter {
        mode: Some(name.to_owned()),
        ..RunFilter::default()
    };
    assert_eq!(ids(mode("internals")).await, vec![newer, older]);
    assert!(ids(mode("attention")).await.is_empty());
    let by_model = RunFilter {
        model_id: Some(model.id.clone()),
        model_revision: Some(model.revision.clone()),
        ..RunFilter::default()
    };
    assert_eq!(ids(by_model).await, vec![newer, older]);
    let other_revision = RunFilter {
        model_revision: Some("not-a-revision".to_owned()),
        ..RunFilter::default()
    };
    assert!(ids(other_revision).await.is_empty());
    let records = queue.list_runs(&RunFilter::default()).await.unwrap();
    let newer_created = records[0].created_at;
    let since_newer = RunFilter {
        created_after: Some(newer_created),
        ..RunFilter::default()
    };
    assert_eq!(ids(since_newer).await, vec![newer]);
    let before_newer = RunFilter {
        created_before: Some(newer_created),
        ..RunFilter::default()
    };
    assert_eq!(ids(before_newer).await, vec![older]);
}

pub(crate) async fn workers_are_recorded_with_their_model_and_state(queue: impl JobQueue) {
    let model = tiny_model();
    let seen = WorkerSeen {
        worker_id: "gpu-7".to_owned(),
        model: model.clone(),
        state: WorkerState::Idle,
    };
    queue.record_worker(&seen).await.unwrap();
    queue
        .record_worker(&WorkerSeen {
            state: WorkerState::Busy,
            ..seen.clone()
        })
        .await
        .unwrap();
    let workers = queue.list_workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(
        (workers[0].worker_id.as_str(), workers[0].state),
        ("gpu-7", WorkerState::Busy)
    );
    assert_eq!(workers[0].model, model);
    assert!(workers[0].last_seen_at >= workers[0].first_seen_at);
}

pub(crate) async fn job_counts_cover_every_run(queue: impl JobQueue) {
    assert_eq!(queue.job_counts().await.unwrap(), JobCounts::default());
    // Each run has its own model, so each claim knows which run it takes from.
    let first_model = tiny_model();
    let second_model = ModelRef {
        id: "tests/other-model".to_owned(),
        revision: "rev-b".to_owned(),
    };
    let third_model = ModelRef {
        id: "tests/third-model".to_owned(),
        revision: String::new(),
    };
    create_run_with_jobs(&queue, "counts", &first_model, 2).await;
    let second_run = create_run_with_jobs(&queue, "counts", &second_model, 3).await;
    create_run_with_jobs(&queue, "counts", &third_model, 1).await;

    let succeeded = queue
        .claim("worker-a", &first_model, LONG_LEASE)
        .await
        .unwrap()
        .expect("a job");
    queue
        .complete(
            succeeded.job.id,
            succeeded.attempt,
            "worker-a",
            &artifacts_for_job(&succeeded.job.key),
        )
        .await
        .unwrap();
    let dead = queue
        .claim("worker-a", &first_model, LONG_LEASE)
        .await
        .unwrap()
        .expect("a job");
    let failed = queue
        .fail(dead.job.id, dead.attempt, "worker-a", "bad prompt", false)
        .await
        .unwrap();
    assert_eq!(failed.state, JobState::Dead);
    queue
        .claim("worker-b", &second_model, LONG_LEASE)
        .await
        .unwrap()
        .expect("a job");
    queue.cancel_run(second_run).await.unwrap();

    assert_eq!(
        queue.job_counts().await.unwrap(),
        JobCounts {
            queued: 1,
            leased: 1,
            succeeded: 1,
            dead: 1,
            cancelled: 2,
        }
    );
}
