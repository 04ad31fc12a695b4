//! Paths and process helpers for tests that run the real `worker` binary and
//! the transformers reference scripts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository root")
        .to_path_buf()
}

/// The committed tiny Gemma-2 checkpoint (made by scripts/make_tiny_model.py).
pub fn tiny_model() -> PathBuf {
    repo_root().join("tests/fixtures/tiny-gemma2")
}

/// A binary of the workspace, built next to the test executable's directory
/// (`cargo build --workspace --bins` runs first in scripts/test.sh).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The Python of the reference environment: `$CAPTURE_PYTHON`, else the venv
/// that scripts/test.sh installs.
pub fn python() -> PathBuf {
    let path = std::env::var_os("CAPTURE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/capture/venv/bin/python")
        });
    assert!(
        path.is_file(),
        "the Python reference environment is missing at {}: run scripts/test.sh, or set CAPTURE_PYTHON to a python with torch and transformers",
        path.display()
    );
    path
}

/// Runs a command, returning its output (whatever the exit status).
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `python scripts/<script> args...`, single-threaded torch.
pub fn python_script(script: &str) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("scripts").join(script))
        .env("OMP_NUM_THREADS", "1")
        .env("TOKENIZERS_PARALLELISM", "false");
    cmd
}

/// `worker args...` with the progress bar off.
pub fn worker() -> Command {
    let mut cmd = Command::new(workspace_bin("worker"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Every file below `dir`, relative, sorted.
pub fn files_below(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.push(
                    path.strip_prefix(base)
                        .expect("below base")
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// `worker capture --model MODEL --out OUT --quiet extra...`, which must succeed.
pub fn rust_capture(model: &Path, out: &Path, extra: &[&str]) {
    run_ok(
        worker()
            .arg("capture")
            .arg("--model")
            .arg(model)
            .arg("--out")
            .arg(out)
            .arg("--quiet")
            .args(extra),
    );
}

/// The transformers reference capture (scripts/reference_capture.py) with the
/// same flags, which must succeed.
pub fn reference_capture(model: &Path, out: &Path, extra: &[&str]) {
    run_ok(
        python_script("reference_capture.py")
            .arg("--model")
            .arg(model)
            .arg("--out")
            .arg(out)
            .args(extra),
    );
}

/// scripts/compare_captures.py EXPECTED ACTUAL extra...: loads every artifact
/// with `torch.load(weights_only=True)` and compares structure and values;
/// panics with its report on any difference. Returns the report.
pub fn compare_captures(expected: &Path, actual: &Path, extra: &[&str]) -> String {
    let out = run_ok(
        python_script("compare_captures.py")
            .arg(expected)
            .arg(actual)
            .args(extra),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
