//! Embedded mode: `coordinator submit` without `--coordinator` runs queue
//! (SQLite), services and a worker in one process and writes the same
//! artifacts as `worker capture`.

use std::process::Command;

use capture_tests::sandbox::{
    compare_captures, files_below, run_ok, rust_capture, tiny_model, workspace_bin,
};

#[test]
fn embedded_submit_captures_locally_like_worker_capture() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let store = dir.path().join("captures");
    let out = run_ok(
        Command::new(workspace_bin("coordinator"))
            .env("RUST_LOG", "warn")
            .args(["submit", "--prompt-set", "dynamic", "--max-new-tokens", "6"])
            .args(["--experiment", "local", "--model"])
            .arg(tiny_model())
            .arg("--state-dir")
            .arg(&state)
            .arg("--store")
            .arg(&store),
    );
    let run_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(run_id.len(), 36, "stdout is the run id: {run_id:?}");
    let root = store.join("local").join(&run_id);
    assert!(root.join("manifest.json").is_file());
    assert!(state.join("queue.db").is_file());
    assert!(
        !files_below(&root).iter().any(|f| f.starts_with("_staging")),
        "{:?}",
        files_below(&root)
    );

    let expected = tempfile::tempdir().unwrap();
    rust_capture(
        &tiny_model(),
        expected.path(),
        &[
            "--prompt-set",
            "dynamic",
            "--mode",
            "residual",
            "--max-new-tokens",
            "6",
            // the embedded worker batches each 4-prompt job whole (auto);
            // batches of the same prompts give the same bits
            "--batch-size",
            "4",
        ],
    );
    compare_captures(expected.path(), &root, &["--atol", "0"]);
}
