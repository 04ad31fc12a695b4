//! End to end on loopback: `coordinator serve` on a fresh Postgres database
//! and moto S3 bucket, real `worker run` processes on the tiny model, and
//! the client commands. Checks that every artifact lands exactly once at its
//! documented key, equal to what `worker capture` writes, through worker
//! kills and a zombie worker, and that bad submissions create nothing.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use capture_tests::cluster::{Cluster, ClusterTiming, sql};
use capture_tests::sandbox::{compare_captures, run, rust_capture, tiny_model};
use sha2::{Digest, Sha256};

const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// The documented keys of `sets` x modes for the tiny model (4 layers).
fn expected_keys(manifests_dir: &Path) -> BTreeSet<String> {
    capture_tests::sandbox::files_below(manifests_dir)
        .into_iter()
        .filter(|k| k.starts_with("inference/raw/"))
        .collect()
}

/// Checks the run root holds exactly the expected artifacts plus
/// manifest.json, nothing staged, and that the manifest's sha256 of each
/// artifact is the object's.
fn check_run_objects(
    cluster: &Cluster,
    experiment: &str,
    run_id: &str,
    expected: &BTreeSet<String>,
) -> serde_json::Value {
    let objects = cluster.run_objects(experiment, run_id);
    let keys: Vec<&str> = objects.iter().map(|(k, _)| k.as_str()).collect();
    let unique: BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(keys.len(), unique.len(), "a key appears twice: {keys:?}");
    assert!(
        !keys.iter().any(|k| k.starts_with("_staging")),
        "staging left behind: {keys:?}"
    );
    let mut want: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    want.insert("manifest.json");
    assert_eq!(
        unique, want,
        "the run root's objects differ from the expected keys"
    );

    let manifest_bytes = &objects
        .iter()
        .find(|(k, _)| k == "manifest.json")
        .expect("manifest.json")
        .1;
    let manifest: serde_json::Value =
        serde_json::from_slice(manifest_bytes).expect("manifest.json is JSON");
    assert_eq!(manifest["run_id"], run_id);
    let artifacts = manifest["artifacts"].as_array().expect("artifacts");
    assert_eq!(artifacts.len(), expected.len());
    for (key, body) in &objects {
        if key == "manifest.json" {
            continue;
        }
        let entry = artifacts
            .iter()
            .find(|a| a["key"] == key.as_str())
            .unwrap_or_else(|| panic!("{key} is not in the manifest"));
        assert_eq!(
            entry["sha256"].as_str().unwrap(),
            hex::encode(Sha256::digest(body)),
            "{key}: the stored object is not the accepted attempt's"
        );
        assert_eq!(entry["bytes"].as_u64().unwrap(), body.len() as u64);
    }
    manifest
}

#[test]
fn three_workers_capture_two_sets_in_both_modes_exactly_once() {
    let mut cluster = Cluster::start(ClusterTiming::default());
    for _ in 0..2 {
        cluster.start_worker(&[]);
    }
    // One worker holds up to three jobs and batches their prompts together.
    cluster.start_worker(&["--concurrent-jobs", "3"]);
    let decoding = ["--max-new-tokens", "12"];
    let run_id = cluster.submit(
        &[
            &[
                "--prompt-set",
                "adversarial",
                "--prompt-set",
                "dynamic",
                "--mode",
                "both",
                "--layers",
                "all",
                "--experiment",
                "e2e",
            ][..],
            &decoding[..],
        ]
        .concat(),
    );
    let status = cluster.wait_for_run(&run_id, RUN_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "{status}");

    // What `worker capture` writes for the same prompts, greedy.
    let expected_dir = tempfile::tempdir().unwrap();
    for set in ["adversarial", "dynamic"] {
        for mode in [
            &["--mode", "residual"][..],
            &["--mode", "internals", "--layers", "all"][..],
        ] {
            // Workers batch each 4-prompt job whole (auto), the third one
            // with the other jobs it holds: equal within float tolerance
            // (batches of the same prompts give the same bits).
            let args = [
                &["--prompt-set", set, "--batch-size", "4"][..],
                mode,
                &decoding[..],
            ]
            .concat();
            rust_capture(&tiny_model(), expected_dir.path(), &args);
        }
    }
    let expected = expected_keys(expected_dir.path());
    assert!(expected.len() > 20, "{expected:?}");
    let manifest = check_run_objects(&cluster, "e2e", &run_id, &expected);

    let downloaded = tempfile::tempdir().unwrap();
    cluster.download_run("e2e", &run_id, downloaded.path());
    // torch.load(weights_only=True) of every object, equal to worker capture.
    compare_captures(
        expected_dir.path(),
        downloaded.path(),
        &["--atol", "1e-5", "--rtol", "1e-4"],
    );

    let workers = manifest["workers"].as_array().unwrap();
    assert!(
        workers.len() >= 2,
        "the jobs should spread over the workers: {workers:?}"
    );
    assert!(
        manifest["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["state"] == "succeeded"),
        "{manifest}"
    );
    // The same facts are in the database.
    assert_eq!(
        sql(
            &cluster.database_url,
            "SELECT count(*) FROM artifacts WHERE run_id IN (SELECT id FROM runs)"
        ),
        expected.len().to_string()
    );
    assert_eq!(
        sql(
            &cluster.database_url,
            "SELECT count(*) FROM runs WHERE finalized_at IS NOT NULL"
        ),
        "1"
    );
}

#[test]
fn a_killed_worker_loses_its_job_to_another_and_nothing_is_lost_or_doubled() {
    let mut cluster = Cluster::start(ClusterTiming {
        lease_seconds: 3.0,
        heartbeat_seconds: 0.5,
    });
    let victim_id = "0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80";
    let victim = cluster.start_worker(&["--worker-id", victim_id]);
    let decoding = ["--max-new-tokens", "150"];
    let run_id = cluster.submit(
        &[
            &[
                "--prompt-set",
                "dynamic",
                "--shard-size",
                "8",
                "--experiment",
                "kill",
            ][..],
            &decoding[..],
        ]
        .concat(),
    );
    // Wait until the victim holds the job and is into it, then SIGKILL it.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let status = cluster.status(&run_id);
        let leased = status
            .as_ref()
            .is_some_and(|s| s["jobs"]["leased"].as_u64().unwrap_or(0) > 0);
        if leased {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job was never leased"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(800));
    cluster.workers[victim].kill();
    let status = cluster.status(&run_id).unwrap();
    assert_ne!(
        status["state"], "succeeded",
        "the job finished before the kill"
    );

    cluster.start_worker(&[]);
    let status = cluster.wait_for_run(&run_id, RUN_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "{status}");

    let expected_dir = tempfile::tempdir().unwrap();
    rust_capture(
        &tiny_model(),
        expected_dir.path(),
        &[
            &[
                "--prompt-set",
                "dynamic",
                "--mode",
                "residual",
                // the one 8-prompt job is batched whole (auto)
                "--batch-size",
                "8",
            ][..],
            &decoding[..],
        ]
        .concat(),
    );
    let expected = expected_keys(expected_dir.path());
    let manifest = check_run_objects(&cluster, "kill", &run_id, &expected);
    let job = &manifest["jobs"][0];
    let attempts = job["attempts"].as_array().unwrap();
    assert!(attempts.len() >= 2, "{job}");
    assert_eq!(attempts[0]["worker_id"], victim_id);
    assert_eq!(attempts[0]["outcome"], "lease_expired", "{job}");
    let accepted = job["accepted_attempt"].as_i64().unwrap();
    let accepted_worker = &attempts[(accepted - 1) as usize]["worker_id"];
    assert_ne!(accepted_worker, victim_id);

    let downloaded = tempfile::tempdir().unwrap();
    cluster.download_run("kill", &run_id, downloaded.path());
    compare_captures(expected_dir.path(), downloaded.path(), &["--atol", "0"]);
}

#[test]
fn bad_submissions_are_refused_clearly_and_create_nothing() {
    let cluster = Cluster::start(ClusterTiming::default());
    let dir = tempfile::tempdir().unwrap();
    let malformed = dir.path().join("mine.json");
    std::fs::write(&malformed, "{\"prompts\": [ {\"id\": 1, \"text\": ").unwrap();
    let badly_named = dir.path().join("bad name.json");
    std::fs::write(
        &badly_named,
        r#"{"name": "x", "description": "", "prompts": [{"id": 1, "text": "hi"}]}"#,
    )
    .unwrap();
    let tiny = tiny_model().display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--prompt-set".into(), "nope".into()], "nope"),
        (
            vec![
                "--prompt-set".into(),
                "dynamic".into(),
                "--mode".into(),
                "internals".into(),
                "--layers".into(),
                "9".into(),
            ],
            "layer 9",
        ),
        (
            vec!["--prompt-file".into(), malformed.display().to_string()],
            "mine",
        ),
        (
            vec!["--prompt-file".into(), badly_named.display().to_string()],
            "bad name",
        ),
        (
            vec![
                "--prompt-set".into(),
                "dynamic".into(),
                "--experiment".into(),
                "../x".into(),
            ],
            "../x",
        ),
        (
            vec![
                "--prompt-set".into(),
                "dynamic".into(),
                "--temperature=-1".into(),
                "--seed".into(),
                "1".into(),
            ],
            "temperature",
        ),
    ];
    for (args, needle) in &cases {
        let out = run(cluster
            .client("submit")
            .arg("--model")
            .arg(&tiny)
            .args(args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains(needle) && stderr.contains("error"),
            "{args:?}: the message should name {needle:?}: {stderr}"
        );
    }
    // A model the coordinator cannot read.
    let out = run(cluster.client("submit").args([
        "--prompt-set",
        "dynamic",
        "--model",
        "/nonexistent/model-dir",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("/nonexistent/model-dir"), "{stderr}");

    for table in ["runs", "jobs", "attempts", "artifacts"] {
        assert_eq!(
            sql(
                &cluster.database_url,
                &format!("SELECT count(*) FROM {table}")
            ),
            "0",
            "a refused submission wrote to {table}"
        );
    }
}
