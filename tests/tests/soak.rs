//! `coordinator soak`, bounded for the test suite: 50 simulated workers
//! (real gRPC clients, one connection each) drain 1,000 jobs from a real
//! coordinator server on loopback against a fresh Postgres database, with
//! injected retryable failures and zombies (workers silent past their
//! lease that complete anyway). The command checks its own invariants and
//! fails on a violation; this test also checks them again straight from the
//! database with SQL, independently of the command's code.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use capture_tests::cluster::{coordinator, fresh_database, sql};
use capture_tests::sandbox::run;

const WORKERS: &str = "50";
const JOBS: usize = 1_000;

/// The `| metric | value |` rows of the command's markdown table.
fn table_rows(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.trim().trim_matches('|').split(" | ").collect();
            match cells.as_slice() {
                [metric, value] => Some((metric.trim().to_owned(), value.trim().to_owned())),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn fifty_workers_complete_a_thousand_jobs_exactly_once_without_a_double_held_lease() {
    let database = fresh_database("soak");
    let started = Instant::now();
    let out = run(coordinator()
        .args(["soak", "--database-url", &database])
        .args(["--workers", WORKERS, "--jobs", &JOBS.to_string()])
        .args(["--job-ms", "20", "--lease-seconds", "2"])
        .args(["--heartbeat-seconds", "0.02"])
        .args(["--fail-rate", "0.02", "--zombie-rate", "0.01"])
        .args(["--max-seconds", "90"])
        .env("RUST_LOG", "error"));
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "coordinator soak failed with {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    assert!(
        elapsed < Duration::from_secs(90),
        "the soak took {elapsed:?}"
    );

    let rows = table_rows(&stdout);
    let value = |metric: &str| {
        rows.get(metric)
            .unwrap_or_else(|| panic!("no {metric:?} row in\n{stdout}"))
            .as_str()
    };
    assert_eq!(value("backend"), "postgres");
    assert_eq!(
        value("jobs succeeded exactly once"),
        format!("{JOBS} of {JOBS}")
    );
    assert_eq!(value("jobs with overlapping attempts"), "0");
    assert_eq!(value("unexpected RPC errors"), "0");
    assert_eq!(value("promoted artifacts"), JOBS.to_string());
    assert_eq!(value("manifest.json jobs_succeeded"), JOBS.to_string());
    assert!(
        value("claim p50 / p90 / p99 / max (claims that got a job)").contains(" ms ("),
        "{stdout}"
    );
    let (zombies, refused) = value("zombies / their completions refused")
        .split_once(" / ")
        .expect("zombies / refused");
    assert_eq!(zombies, refused, "a zombie's completion was accepted");
    let zombies: usize = zombies.parse().unwrap();
    // About 10 are expected; none at all would leave fencing unexercised.
    assert!(zombies > 0, "no zombie was drawn:\n{stdout}");

    // The same invariants, from the database alone.
    let run_id = value("run");
    let of_run = format!("job_id IN (SELECT id FROM jobs WHERE run_id = '{run_id}')");
    assert_eq!(
        sql(
            &database,
            &format!("SELECT state, finalized_at IS NOT NULL FROM runs WHERE id = '{run_id}'")
        ),
        "succeeded|t"
    );
    assert_eq!(
        sql(
            &database,
            &format!("SELECT count(*) FROM jobs WHERE run_id = '{run_id}' AND state = 'succeeded'")
        ),
        JOBS.to_string()
    );
    // Exactly one succeeded attempt per job, and it is the job's last.
    assert_eq!(
        sql(
            &database,
            &format!(
                "SELECT count(*) FROM (SELECT a.job_id FROM attempts a JOIN jobs j ON j.id = a.job_id \
                 WHERE j.run_id = '{run_id}' AND a.outcome = 'succeeded' AND a.attempt = j.attempt \
                 GROUP BY a.job_id HAVING count(*) = 1) once"
            )
        ),
        JOBS.to_string()
    );
    assert_eq!(
        sql(
            &database,
            &format!("SELECT count(*) FROM attempts WHERE {of_run} AND outcome = 'succeeded'")
        ),
        JOBS.to_string()
    );
    // No lease held twice: every attempt ended, and no later attempt of a
    // job started before an earlier one ended.
    assert_eq!(
        sql(
            &database,
            &format!("SELECT count(*) FROM attempts WHERE {of_run} AND ended_at IS NULL")
        ),
        "0"
    );
    assert_eq!(
        sql(
            &database,
            &format!(
                "SELECT count(*) FROM attempts a JOIN attempts b \
                 ON a.job_id = b.job_id AND a.attempt < b.attempt \
                 WHERE a.{of_run} AND b.started_at < a.ended_at"
            )
        ),
        "0"
    );
    // Every zombie's attempt ended by lease expiry, none by success.
    let expired: usize = sql(
        &database,
        &format!("SELECT count(*) FROM attempts WHERE {of_run} AND outcome = 'lease_expired'"),
    )
    .parse()
    .unwrap();
    assert!(
        expired >= zombies,
        "{expired} lease expiries for {zombies} zombies"
    );
    assert_eq!(
        sql(
            &database,
            &format!("SELECT count(*) FROM artifacts WHERE run_id = '{run_id}'")
        ),
        JOBS.to_string()
    );
}
