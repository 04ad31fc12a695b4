//! The job queue's trait-level test suite, run against Postgres (a fresh
//! database per test, [`database::TestDatabase`]; needs `DATABASE_URL`,
//! which `scripts/test.sh` sets) and SQLite (a temporary file per test).

mod concurrency;
mod database;
mod fixtures;
mod scenarios;

use capture_coordinator::queue::{JobQueue, PostgresQueue, Queue};
use database::TestDatabase;

/// A Postgres queue on the per-test database `pool` points at.
async fn postgres_queue(pool: sqlx::PgPool) -> Queue {
    Queue::from(
        PostgresQueue::from_pool(pool)
            .await
            .expect("apply postgres migrations"),
    )
    .with_retry_policy(fixtures::fast_retry_policy())
}

/// A SQLite queue in a fresh temporary file; keep the directory alive.
async fn sqlite_queue() -> (tempfile::TempDir, Queue) {
    let directory = tempfile::tempdir().expect("temporary directory");
    let url = format!(
        "sqlite://{}?mode=rwc",
        directory.path().join("queue.db").display()
    );
    let queue = capture_coordinator::connect(&url)
        .await
        .expect("open sqlite queue");
    (
        directory,
        queue.with_retry_policy(fixtures::fast_retry_policy()),
    )
}

/// Instantiates every scenario once per backend (Quickwit's
/// `metastore_test_suite!`).
macro_rules! job_queue_test_suite {
    ($($scenario:ident),+ $(,)?) => {
        mod postgres_backend {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let database = crate::TestDatabase::create().await;
                    let queue = crate::postgres_queue(database.pool(5).await).await;
                    crate::scenarios::$scenario(queue).await;
                    database.drop_database().await;
                }
            )+
        }

        mod sqlite_backend {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let (_directory, queue) = crate::sqlite_queue().await;
                    crate::scenarios::$scenario(queue).await;
                }
            )+
        }
    };
}

job_queue_test_suite!(
    create_run_is_idempotent_on_run_id_and_job_keys,
    claim_leases_the_oldest_job_and_bumps_its_attempt,
    claim_only_hands_out_jobs_for_the_loaded_model,
    heartbeat_extends_a_held_lease_only,
    complete_is_fenced_on_attempt_and_owner,
    completion_and_its_artifacts_commit_together,
    fail_retries_with_backoff_then_the_job_is_dead,
    reaper_requeues_expired_leases_and_fences_out_the_late_worker,
    reaper_marks_a_job_dead_once_its_attempts_are_spent,
    cancel_stops_handing_out_jobs_and_flags_leased_ones,
    retry_run_requeues_dead_jobs_with_a_fresh_budget,
    runs_are_listed_newest_first_with_filters,
    workers_are_recorded_with_their_model_and_state,
    job_counts_cover_every_run,
    release_requeues_without_spending_an_attempt_and_runs_finalize_once,
);

/// 12 workers, 500 jobs, on a pool of 16 connections to a fresh database.
#[tokio::test]
async fn postgres_every_job_completes_exactly_once_under_concurrent_workers() {
    let database = TestDatabase::create().await;
    let queue = postgres_queue(database.pool(16).await).await;
    concurrency::every_job_completes_exactly_once_under_concurrent_workers(queue, 12, 500).await;
    database.drop_database().await;
}

/// The same on SQLite, smaller: its writers take turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_every_job_completes_exactly_once_under_concurrent_workers() {
    let (_directory, queue) = sqlite_queue().await;
    concurrency::every_job_completes_exactly_once_under_concurrent_workers(queue, 4, 100).await;
}

#[tokio::test]
async fn connect_opens_an_in_memory_sqlite_queue() {
    let queue = capture_coordinator::connect("sqlite::memory:")
        .await
        .expect("open in-memory sqlite queue");
    assert_eq!(queue.backend_name(), "sqlite");
    scenarios::claim_only_hands_out_jobs_for_the_loaded_model(queue).await;
}

#[tokio::test]
async fn reopening_a_sqlite_file_keeps_its_runs() {
    let (directory, queue) = sqlite_queue().await;
    let model = fixtures::tiny_model();
    let run_id = fixtures::create_run_with_jobs(&queue, "reopen", &model, 2).await;
    drop(queue);
    let url = format!(
        "sqlite://{}?mode=rwc",
        directory.path().join("queue.db").display()
    );
    let reopened = capture_coordinator::connect(&url)
        .await
        .expect("reopen sqlite queue");
    let status = reopened
        .run_status(run_id)
        .await
        .expect("run survives reopening");
    assert_eq!(status.jobs.queued, 2);
}

#[tokio::test]
async fn connect_refuses_unknown_url_schemes() {
    let error = capture_coordinator::connect("mysql://localhost/capture")
        .await
        .expect_err("mysql is not a queue backend");
    assert!(
        matches!(error, capture_coordinator::QueueError::InvalidArgument(_)),
        "{error:?}"
    );
    assert!(error.to_string().contains("\"mysql\""), "{error}");
}
