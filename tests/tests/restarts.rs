//! The coordinator is killed (SIGKILL) and restarted mid-run, then
//! PostgreSQL is restarted mid-run: workers ride both out and the run
//! completes with every artifact exactly once. One test in its own binary,
//! since restarting PostgreSQL affects every database on it.

use std::process::Command;
use std::time::{Duration, Instant};

use capture_tests::cluster::{Cluster, ClusterTiming};
use capture_tests::sandbox::run_ok;

fn succeeded_jobs(cluster: &Cluster, run_id: &str) -> usize {
    cluster
        .status(run_id)
        .and_then(|s| s["jobs"]["succeeded"].as_u64())
        .map(|n| n as usize)
        .unwrap_or(0)
}

fn wait_for_progress(cluster: &Cluster, run_id: &str, at_least: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = succeeded_jobs(cluster, run_id);
        if done >= at_least {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "no progress past {done} jobs:\n{}",
            cluster.coordinator_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_run_survives_coordinator_and_postgres_restarts() {
    let mut cluster = Cluster::start(ClusterTiming {
        lease_seconds: 6.0,
        heartbeat_seconds: 1.0,
    });
    cluster.start_worker(&[]);
    cluster.start_worker(&[]);
    let run_id = cluster.submit(&[
        "--prompt-set",
        "dynamic",
        "--prompt-set",
        "adversarial",
        "--prompt-set",
        "baseline",
        "--shard-size",
        "2",
        "--max-new-tokens",
        "120",
        "--experiment",
        "restarts",
    ]);
    let total = cluster.status(&run_id).unwrap()["jobs"]["total"]
        .as_u64()
        .unwrap() as usize;

    let done = wait_for_progress(&cluster, &run_id, 1);
    assert!(
        done < total,
        "the run finished before the coordinator restart"
    );
    cluster.coordinator.as_mut().unwrap().kill();
    std::thread::sleep(Duration::from_secs(1));
    cluster.start_coordinator();

    let done = wait_for_progress(&cluster, &run_id, done + 1);
    assert!(
        done < total,
        "the run finished before the PostgreSQL restart"
    );
    run_ok(Command::new("pg_ctlcluster").args(["15", "main", "restart"]));

    let status = cluster.wait_for_run(&run_id, Duration::from_secs(600));
    assert_eq!(status["state"], "succeeded", "{status}");
    let objects = cluster.run_objects("restarts", &run_id);
    let artifacts = objects
        .iter()
        .filter(|(k, _)| k.starts_with("inference/raw/residual/"))
        .count();
    let prompts: usize = ["dynamic", "adversarial", "baseline"]
        .iter()
        .map(|set| {
            capture_worker::prompts::PromptSet::builtin(set)
                .unwrap()
                .prompts
                .len()
        })
        .sum();
    assert_eq!(artifacts, prompts);
    assert_eq!(
        objects.len(),
        prompts + 1,
        "only artifacts and manifest.json"
    );
    for worker in &mut cluster.workers {
        assert!(
            worker.try_wait().is_none(),
            "a worker died:\n{}",
            worker.log_text()
        );
    }
}
