//! Lease scenarios: claim, heartbeat, fenced completion and failure,
//! retries with backoff, and the reaper.

use std::time::Duration;

use capture_coordinator::queue::{
    AttemptOutcome, JobId, JobQueue, JobState, ModelRef, QueueError, RunState,
};
use chrono::Utc;

use crate::fixtures::{
    LONG_LEASE, SHORT_LEASE, artifact, artifacts_for_job, assert_lease_lost, claim_when_due,
    create_run_with_jobs, run_spec, tiny_model,
};

pub(crate) async fn claim_leases_the_oldest_job_and_bumps_its_attempt(queue: impl JobQueue) {
    let model = tiny_model();
    let run_id = create_run_with_jobs(&queue, "claim", &model, 2).await;
    let before = Utc::now();
    let claimed = queue
        .claim("worker-a", &model, LONG_LEASE)
        .await
        .unwrap()
        .expect("a job");
    assert_eq!(claimed.attempt, 1);
    assert_eq!(claimed.job.run_id, run_id);
    assert_eq!(claimed.job.key, "adversarial/residual/0");
    assert_eq!(claimed.job.state, JobState::Leased);
    assert_eq!(claimed.job.lease_owner.as_deref(), Some("worker-a"));
    assert_eq!(claimed.run_spec, run_spec("claim", &model));
    let lease_seconds = (claimed.lease_expires_at - before).num_milliseconds() as f64 / 1000.0;
    assert!(
        (55.0..65.0).contains(&lease_seconds),
        "lease of {lease_seconds}s"
    );

    let second = queue
        .claim("worker-b", &model, LONG_LEASE)
        .await
        .unwrap()
        .expect("a job");
    assert_eq!(second.job.key, "adversarial/residual/1");
    assert_ne!(second.job.id, claimed.job.id);
    assert!(
        queue
            .claim("worker-c", &model, LONG_LEASE)
            .await
            .unwrap()
            .is_none()
    );

    let attempts = queue.list_attempts(run_id).await.unwrap();
    assert_eq!(attempts.len(), 2);
    let first_attempt = attempts
        .iter()
        .find(|a| a.job_id == claimed.job.id)
        .unwrap();
    assert_eq!(
        (first_attempt.attempt, first_attempt.worker_id.as_str()),
        (1, "worker-a")
    );
    assert_eq!(first_attempt.outcome, None);
    let status = queue.run_status(run_id).await.unwrap();
    assert_eq!((status.jobs.leased, status.jobs.queued), (2, 0));
    assert_eq!(status.run.state, RunState::Running);
}

pub(crate) async fn claim_only_hands_out_jobs_for_the_loaded_model(queue: impl JobQueue) {
    let model = tiny_model();
    create_run_with_jobs(&queue, "models", &model, 1).await;
    let other_model = ModelRef {
        id: "google/gemma-2-2b-it".to_owned(),
        ..model.clone()
    };
    let other_revision = ModelRef {
        revision: "rev-b".to_owned(),
        ..model.clone()
    };
    assert!(
        queue
            .claim("w", &other_model, LONG_LEASE)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        queue
            .claim("w", &other_revision, LONG_LEASE)
            .await
            .unwrap()
            .is_none()
    );
    let claimed = queue
        .claim("w", &model, LONG_LEASE)
        .await
        .unwrap()
        .expect("a job");
    assert_eq!(claimed.job.model, model);
}

pub(crate) async fn heartbeat_extends_a_held_lease_only(queue: impl JobQueue) {
    let model = tiny_model();
    create_run_with_jobs(&queue, "heartbeat", &model, 1).await;
    let claimed = queue
        .claim("w", &model, Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    let job = claimed.job.id;
    let lease = queue.heartbeat(job, 1, "w", LONG_LEASE).await.unwrap();
    assert!(lease.lease_expires_at - claimed.lease_expires_at > chrono::Duration::seconds(30));
    assert!(!lease.cancel_requested);
    assert_eq!(
        queue.get_job(job).await.unwrap().lease_expires_at,
        Some(lease.lease_expires_at)
    );

    assert_lease_lost(queue.heartbeat(job, 2, "w", LONG_LEASE).await, job, 2);
    assert_lease_lost(
        queue.heartbeat(job, 1, "intruder", LONG_LEASE).await,
        job,
        1,
    );
    let unknown = queue
        .heartbeat(JobId::new_time_ordered(), 1, "w", LONG_LEASE)
        .await;
    assert!(
        matches!(unknown, Err(QueueError::NotFound { .. })),
        "{unknown:?}"
    );
    let zero = queue.heartbeat(job, 1, "w", Duration::ZERO).await;
    assert!(
        matches!(zero, Err(QueueError::InvalidArgument(_))),
        "{zero:?}"
    );
}

pub(crate) async fn complete_is_fenced_on_attempt_and_owner(queue: impl JobQueue) {
    let model = tiny_model();
    let run_id = create_run_with_jobs(&queue, "fenced", &model, 1).await;
    let claimed = queue.claim("w", &model, LONG_LEASE).await.unwrap().unwrap();
    let job = claimed.job.id;
    let artifacts = artifacts_for_job(&claimed.job.key);

    assert_lease_lost(queue.complete(job, 2, "w", &artifacts).await, job, 2);
    assert_lease_lost(queue.complete(job, 1, "other", &artifacts).await, job, 1);
    let unchanged = queue.get_job(job).await.unwrap();
    assert_eq!((unchanged.state, unchanged.attempt), (JobState::Leased, 1));
    assert!(queue.list_artifacts(run_id).await.unwrap().is_empty());

    let completed = queue.complete(job, 1, "w", &artifacts).await.unwrap();
    assert_eq!(completed.run_id, run_id);
    assert_eq!(completed.run_finished, Some(RunState::Succeeded));
    let recorded = queue.list_artifacts(run_id).await.unwrap();
    assert_eq!(recorded.len(), 2);
    assert!(
        recorded
            .iter()
            .all(|record| record.job_id == job && record.attempt == 1)
    );
    assert_eq!(recorded[0].artifact, artifacts[0]);

    assert_lease_lost(
        queue.complete(job, 1, "w", &[artifact("late.pt")]).await,
        job,
        1,
    );
    assert_eq!(queue.list_artifacts(run_id).await.unwrap().len(), 2);
    let done = queue.get_job(job).await.unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    assert!(done.finished_at.is_some() && done.lease_owner.is_none());
    let attempts = queue.list_attempts(run_id).await.unwrap();
    assert_eq!(attempts[0].outcome, Some(AttemptOutcome::Succeeded));
    assert!(attempts[0].ended_at.is_some());
}

pub(crate) async fn completion_and_its_artifacts_commit_together(queue: impl JobQueue) {
    let model = tiny_model();
    let run_id = create_run_with_jobs(&queue, "atomic", &model, 2).await;
    let first = queue
        .claim("w1", &model, LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    let second = queue
        .claim("w2", &model, LONG_LEASE)
        .await
        .unwrap()
        .unwrap();

    // a key twice in one batch: the whole completion rolls back
    let twice = [artifact("x.pt"), artifact("y.pt"), artifact("x.pt")];
    let conflict = queue.complete(first.job.id, 1, "w1", &twice).await;
    assert!(
        matches!(conflict, Err(QueueError::Conflict(_))),
        "{conflict:?}"
    );
    assert!(queue.list_artifacts(run_id).await.unwrap().is_empty());
    assert_eq!(
        queue.get_job(first.job.id).await.unwrap().state,
        JobState::Leased
    );
    assert_eq!(queue.list_attempts(run_id).await.unwrap()[0].outcome, None);

    queue
        .complete(first.job.id, 1, "w1", &[artifact("x.pt")])
        .await
        .unwrap();
    // a key another job of the run already recorded
    let taken = queue
        .complete(
            second.job.id,
            1,
            "w2",
            &[artifact("z.pt"), artifact("x.pt")],
        )
        .await;
    assert!(matches!(taken, Err(QueueError::Conflict(_))), "{taken:?}");
    let keys: Vec<_> = queue
        .list_artifacts(run_id)
        .await
        .unwrap()
        .into_iter()
        .map(|record| (record.artifact.key, record.job_id))
        .collect();
    assert_eq!(keys, vec![("x.pt".to_owned(), first.job.id)]);
    assert_eq!(
        queue.get_job(second.job.id).await.unwrap().state,
        JobState::Leased
    );
    assert_eq!(
        queue.run_status(run_id).await.unwrap().run.state,
        RunState::Running
    );
}

pub(crate) async fn fail_retries_with_backoff_then_the_job_is_dead(queue: impl JobQueue) {
    let model = tiny_model();
    let run_id = create_run_with_jobs(&queue, "retries", &model, 2).await;

    let fatal = queue.claim("w", &model, LONG_LEASE).await.unwrap().unwrap();
    let failed = queue
        .fail(fatal.job.id, 1, "w", "bad prompt", false)
        .await
        .unwrap();
    assert_eq!((failed.state, failed.retry_at), (JobState::Dead, None));

    let flaky = queue.claim("w", &model, LONG_LEASE).await.unwrap().unwrap();
    for attempt in 1..=3 {
        if attempt > 1 {
            let again = claim_when_due(&queue, "w", &model).await;
            assert_eq!((again.job.id, again.attempt), (flaky.job.id, attempt));
        }
        let error = format!("cuda out of memory on attempt {attempt}");
        let before = Utc::now();
        let failed = queue
            .fail(flaky.job.id, attempt, "w", &error, true)
            .await
            .unwrap();
        if attempt < 3 {
            assert_eq!(failed.state, JobState::Queued);
            let wait = failed.retry_at.expect("retry time") - before;
            assert!(
                wait >= chrono::Duration::milliseconds(40),
                "backoff of {wait}"
            );
            // still backing off: nothing to claim right now
            assert!(
                queue
                    .claim("w", &model, LONG_LEASE)
                    .await
                    .unwrap()
                    .is_none()
            );
        } else {
            assert_eq!((failed.state, failed.retry_at), (JobState::Dead, None));
            assert_eq!(failed.run_finished, Some(RunState::Failed));
        }
    }
    let dead = queue.get_job(flaky.job.id).await.unwrap();
    assert_eq!((dead.state, dead.attempt), (JobState::Dead, 3));
    assert_eq!(
        dead.last_error.as_deref(),
        Some("cuda out of memory on attempt 3")
    );
    let status = queue.run_status(run_id).await.unwrap();
    assert_eq!((status.run.state, status.jobs.dead), (RunState::Failed, 2));
    assert!(
        status
            .run
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("2 job(s) dead")
    );
    let attempts = queue.list_attempts(run_id).await.unwrap();
    assert_eq!(attempts.len(), 4);
    assert!(
        attempts
            .iter()
            .all(|a| a.outcome == Some(AttemptOutcome::Failed))
    );
    assert_lease_lost(
        queue.fail(flaky.job.id, 3, "w", "again", true).await,
        flaky.job.id,
        3,
    );
}

pub(crate) async fn reaper_requeues_expired_leases_and_fences_out_the_late_worker(
    queue: impl JobQueue,
) {
    let model = tiny_model();
    let run_id = create_run_with_jobs(&queue, "reaper", &model, 1).await;
    let stale = queue
        .claim("slow", &model, SHORT_LEASE)
        .await
        .unwrap()
        .unwrap();
    let job = stale.job.id;
    assert_eq!(queue.reap_expired().await.unwrap().requeued, 0);

    tokio::time::sleep(SHORT_LEASE + Duration::from_millis(100)).await;
    // an expired lease is lost even before the reaper runs
    assert_lease_lost(queue.heartbeat(job, 1, "slow", LONG_LEASE).await, job, 1);
    let report = queue.reap_expired().await.unwrap();
    assert_eq!((report.requeued, report.dead), (1, 0));
    let requeued = queue.get_job(job).await.unwrap();
    assert_eq!(requeued.state, JobState::Queued);
    assert!(requeued.last_error.unwrap().contains("lease expired"));

    let fresh = queue
        .claim("fast", &model, LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((fresh.job.id, fresh.attempt), (job, 2));
    assert_lease_lost(
        queue
            .complete(job, 1, "slow", &[artifact("stale.pt")])
            .await,
        job,
        1,
    );
    assert_lease_lost(queue.fail(job, 1, "slow", "late", true).await, job, 1);
    assert!(queue.list_artifacts(run_id).await.unwrap().is_empty());

    queue
        .complete(job, 2, "fast", &[artifact("fresh.pt")])
        .await
        .unwrap();
    let artifacts = queue.list_artifacts(run_id).await.unwrap();
    assert_eq!(artifacts.len(), 1);
    assert_eq!(
        (artifacts[0].artifact.key.as_str(), artifacts[0].attempt),
        ("fresh.pt", 2)
    );
    let attempts = queue.list_attempts(run_id).await.unwrap();
    let outcomes: Vec<_> = attempts
        .iter()
        .map(|a| (a.attempt, a.worker_id.as_str(), a.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (1, "slow", Some(AttemptOutcome::LeaseExpired)),
            (2, "fast", Some(AttemptOutcome::Succeeded))
        ]
    );
    assert_eq!(
        queue.run_status(run_id).await.unwrap().run.state,
        RunState::Succeeded
    );
}

pub(crate) async fn reaper_marks_a_job_dead_once_its_attempts_are_spent(queue: impl JobQueue) {
    let model = tiny_model();
    let run_id = create_run_with_jobs(&queue, "reaper-dead", &model, 1).await;
    for attempt in 1..=3 {
        let claimed = queue
            .claim("crashy", &model, SHORT_LEASE)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claimed.attempt, attempt);
        tokio::time::sleep(SHORT_LEASE + Duration::from_millis(50)).await;
        let report = queue.reap_expired().await.unwrap();
        let expected = if attempt < 3 { (1, 0) } else { (0, 1) };
        assert_eq!((report.requeued, report.dead), expected);
    }
    let status = queue.run_status(run_id).await.unwrap();
    assert_eq!((status.run.state, status.jobs.dead), (RunState::Failed, 1));
    let job = &queue.list_jobs(run_id).await.unwrap()[0];
    assert!(
        job.last_error.as_deref().unwrap().contains("lease expired"),
        "{job:?}"
    );
}

pub(crate) async fn release_requeues_without_spending_an_attempt_and_runs_finalize_once(
    queue: impl JobQueue,
) {
    let model = tiny_model();
    let run_id = create_run_with_jobs(&queue, "release", &model, 1).await;
    let claimed = queue
        .claim("worker-a", &model, LONG_LEASE)
        .await
        .unwrap()
        .expect("a job");
    let max_before = claimed.job.max_attempts;
    let released = queue
        .release(claimed.job.id, 1, "worker-a", "shutting down")
        .await
        .unwrap();
    assert_eq!(released, run_id);
    assert_lease_lost(
        queue.release(claimed.job.id, 1, "worker-a", "again").await,
        claimed.job.id,
        1,
    );
    let job = queue.get_job(claimed.job.id).await.unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(
        job.max_attempts,
        max_before + 1,
        "a release spends no attempt"
    );
    let attempts = queue.list_attempts(run_id).await.unwrap();
    assert!(attempts[0].ended_at.is_some());
    assert_eq!(
        attempts[0].error.as_deref(),
        Some("released: shutting down")
    );

    // Still running: nothing to finalize, and finalizing is refused.
    assert!(queue.unfinalized_runs().await.unwrap().is_empty());
    assert!(matches!(
        queue.mark_finalized(run_id).await,
        Err(QueueError::InvalidState(_))
    ));
    let again = queue
        .claim("worker-b", &model, LONG_LEASE)
        .await
        .unwrap()
        .expect("the released job");
    assert_eq!(again.attempt, 2);
    queue
        .complete(
            again.job.id,
            2,
            "worker-b",
            &artifacts_for_job(&again.job.key),
        )
        .await
        .unwrap();
    let status = queue.run_status(run_id).await.unwrap();
    assert_eq!(status.run.state, RunState::Succeeded);
    assert!(status.artifacts > 0 && status.artifact_bytes > 0);
    assert!(status.started_at.is_some());
    assert_eq!(status.run.finalized_at, None);
    assert_eq!(queue.unfinalized_runs().await.unwrap(), vec![run_id]);
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    assert!(queue.finalized_since(before).await.unwrap().is_empty());
    queue.mark_finalized(run_id).await.unwrap();
    assert!(queue.unfinalized_runs().await.unwrap().is_empty());
    assert_eq!(queue.finalized_since(before).await.unwrap(), vec![run_id]);
    let later = chrono::Utc::now() + chrono::Duration::seconds(5);
    assert!(queue.finalized_since(later).await.unwrap().is_empty());
    assert!(
        queue
            .run_status(run_id)
            .await
            .unwrap()
            .run
            .finalized_at
            .is_some()
    );
}
