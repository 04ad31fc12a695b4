//! `bench-queue` end to end on an embedded SQLite queue: the benchmark
//! drains its run with concurrent workers and every job succeeds exactly once.

use std::time::Duration;

use capture_coordinator::bench_queue::{BenchQueueConfig, bench_queue};
use capture_coordinator::queue::{JobQueue, JobState, RunState};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_queue_on_sqlite_completes_every_job_exactly_once() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let url = format!(
        "sqlite://{}?mode=rwc",
        directory.path().join("queue.db").display()
    );
    let queue = capture_coordinator::connect(&url)
        .await
        .expect("open sqlite queue");
    let config = BenchQueueConfig {
        workers: 4,
        jobs: 200,
        lease: Duration::from_secs(60),
    };

    let report = bench_queue(&queue, config)
        .await
        .expect("run the benchmark");

    assert!(report.is_clean(), "problems: {:#?}", report.problems);
    assert_eq!(report.jobs_succeeded_once, 200);
    assert_eq!(report.claims, 200);
    assert_eq!(report.completions, 200);
    assert_eq!(
        report.empty_claims, 4,
        "each worker stops on one empty claim"
    );
    assert!(report.transitions_per_second() > 0.0);
    assert!(report.claim_latency.p50 <= report.claim_latency.p99);

    // Independently of the report: the queue's own records agree.
    let jobs = queue.list_jobs(report.run_id).await.expect("list jobs");
    assert_eq!(jobs.len(), 200);
    assert!(
        jobs.iter()
            .all(|job| job.state == JobState::Succeeded && job.attempt == 1)
    );
    let status = queue.run_status(report.run_id).await.expect("run status");
    assert_eq!(status.run.state, RunState::Succeeded);
    assert_eq!(status.artifacts, 200);
    assert!(
        report
            .to_markdown()
            .contains("| succeeded exactly once | 200 of 200 |")
    );

    // A second benchmark on the same database uses its own run and model.
    let again = bench_queue(
        &queue,
        BenchQueueConfig {
            workers: 2,
            jobs: 10,
            ..config
        },
    )
    .await
    .expect("run the benchmark again");
    assert!(again.is_clean(), "problems: {:#?}", again.problems);
    assert_ne!(again.experiment, report.experiment);
}
