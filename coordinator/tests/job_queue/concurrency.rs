//! Many workers claiming and completing one run's jobs at once: every job
//! completes exactly once, and no attempt of a job overlaps another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capture_coordinator::queue::{JobId, JobQueue, QueueError, RunState};

use crate::fixtures::{LONG_LEASE, artifact, create_run_with_jobs, tiny_model};

/// Runs `workers` tasks against `queue` until the run of `jobs` jobs ends.
/// Every seventh job fails its first attempt (retryable), so retries and
/// backoff interleave with claims. Bounded to 120 s.
pub(crate) async fn every_job_completes_exactly_once_under_concurrent_workers<Q>(
    queue: Q,
    workers: usize,
    jobs: usize,
) where
    Q: JobQueue + Clone + 'static,
{
    let model = tiny_model();
    let run_id = create_run_with_jobs(&queue, "concurrency", &model, jobs).await;
    let completions: Arc<Mutex<HashMap<JobId, usize>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let (queue, model, completions) = (queue.clone(), model.clone(), completions.clone());
        tasks.spawn(async move {
            let worker_id = format!("worker-{worker}");
            loop {
                let claimed = match queue.claim(&worker_id, &model, LONG_LEASE).await {
                    Ok(claimed) => claimed,
                    Err(error) if error.is_retryable() => continue,
                    Err(error) => panic!("claim failed: {error}"),
                };
                let Some(claimed) = claimed else {
                    let status = queue.run_status(run_id).await.expect("run status");
                    if status.run.state != RunState::Running {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let job = claimed.job.id;
                let shard: usize = claimed.job.key.rsplit('/').next().unwrap().parse().unwrap();
                if shard.is_multiple_of(7) && claimed.attempt == 1 {
                    queue
                        .fail(job, 1, &worker_id, "flaky first attempt", true)
                        .await
                        .expect("fail");
                    continue;
                }
                let artifacts = [artifact(&format!("{}.pt", claimed.job.key))];
                match queue
                    .complete(job, claimed.attempt, &worker_id, &artifacts)
                    .await
                {
                    Ok(_) => *completions.lock().unwrap().entry(job).or_default() += 1,
                    Err(QueueError::LeaseLost { .. }) => panic!("lease lost without any expiry"),
                    Err(error) => panic!("complete failed: {error}"),
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(result) = tasks.join_next().await {
            result.expect("worker task");
        }
    })
    .await
    .expect("workers finished within 120s");

    let completions = completions.lock().unwrap().clone();
    assert_eq!(completions.len(), jobs, "every job completed");
    assert!(
        completions.values().all(|&count| count == 1),
        "no job completed twice"
    );
    let status = queue.run_status(run_id).await.unwrap();
    assert_eq!(status.run.state, RunState::Succeeded);
    assert_eq!(
        (status.jobs.succeeded, status.artifacts),
        (jobs as i64, jobs as i64)
    );

    let attempts = queue.list_attempts(run_id).await.unwrap();
    let mut by_job: HashMap<JobId, Vec<_>> = HashMap::new();
    for attempt in attempts {
        by_job.entry(attempt.job_id).or_default().push(attempt);
    }
    assert_eq!(by_job.len(), jobs);
    for (index, job) in queue.list_jobs(run_id).await.unwrap().iter().enumerate() {
        let history = &by_job[&job.id];
        let expected_attempts = if index.is_multiple_of(7) { 2 } else { 1 };
        assert_eq!(history.len(), expected_attempts, "attempts of {}", job.key);
        assert_eq!(job.attempt as usize, expected_attempts);
        for (number, attempt) in history.iter().enumerate() {
            assert_eq!(attempt.attempt as usize, number + 1);
            assert!(attempt.ended_at.is_some(), "attempt left open: {attempt:?}");
        }
        for pair in history.windows(2) {
            assert!(
                pair[0].ended_at.unwrap() <= pair[1].started_at,
                "attempts overlap (double lease): {pair:?}"
            );
        }
    }
}
