//! Bad input to `worker capture`: each is a clear error before any work, a
//! non-zero exit, and nothing written at the documented paths.

use std::path::Path;

use capture_tests::sandbox::{files_below, run, tiny_model, worker};

/// Runs `worker capture` with `args` (on the tiny model unless they name a
/// `--model`) into a fresh output root and checks it fails with a message
/// containing every one of `expected`, writing nothing.
fn assert_rejected(args: &[&str], expected: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = worker();
    cmd.arg("capture");
    if !args.contains(&"--model") {
        cmd.arg("--model").arg(tiny_model());
    }
    let output = run(cmd.args(args).arg("--out").arg(out.path()).arg("--quiet"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "{args:?} succeeded; stderr: {stderr}"
    );
    for fragment in expected {
        assert!(
            stderr.contains(fragment),
            "{args:?}: stderr lacks {fragment:?}:\n{stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    assert_eq!(
        files_below(out.path()),
        Vec::<String>::new(),
        "{args:?} wrote files"
    );
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

#[test]
fn unknown_prompt_set_lists_the_known_ones() {
    assert_rejected(
        &["--prompt-set", "nope", "--mode", "residual"],
        &[
            "unknown prompt set \"nope\"",
            "adversarial, baseline, dynamic, multi_trait, real_world, single_trait",
        ],
    );
    assert_rejected(
        &["--prompt-set", "../x", "--mode", "residual"],
        &["unknown prompt set"],
    );
}

#[test]
fn layer_out_of_range() {
    assert_rejected(
        &[
            "--prompt",
            "hello",
            "--mode",
            "internals",
            "--layers",
            "1,9",
        ],
        &["layer 9 is out of range: the model has 4 layers (0-3)"],
    );
    // the default layer 16 does not exist in a 4-layer model either
    assert_rejected(
        &["--prompt", "hello", "--mode", "internals"],
        &["layer 16 is out of range"],
    );
}

#[test]
fn empty_prompts() {
    assert_rejected(&["--prompt", "  \n ", "--mode", "residual"], &["empty"]);
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "blank.json",
        br#"{"prompts": [{"id": 1, "text": "ok"}, {"id": 2, "text": " "}]}"#,
    );
    assert_rejected(
        &["--prompt-file", &file, "--mode", "residual"],
        &["prompt \"2\"", "empty text"],
    );
}

#[test]
fn non_utf8_prompt_file_and_argument() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "latin1.json",
        b"{\"prompts\": [{\"id\": 1, \"text\": \"caf\xe9\"}]}",
    );
    assert_rejected(
        &["--prompt-file", &file, "--mode", "residual"],
        &["not valid UTF-8", "offset 35"],
    );

    use std::os::unix::ffi::OsStrExt;
    let out = tempfile::tempdir().unwrap();
    let output = run(worker()
        .args(["capture", "--mode", "residual", "--quiet", "--prompt"])
        .arg(std::ffi::OsStr::from_bytes(b"caf\xe9"))
        .arg("--out")
        .arg(out.path()));
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid UTF-8"));
    assert!(files_below(out.path()).is_empty());
}

#[test]
fn prompt_beyond_the_context() {
    // the tiny model has 512 positions
    assert_rejected(
        &[
            "--prompt",
            "hello there",
            "--mode",
            "residual",
            "--max-new-tokens",
            "600",
        ],
        &["exceeds the model's context of 512 positions"],
    );
}

#[test]
fn malformed_prompt_file_names_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "broken.json",
        b"{\n  \"prompts\": [\n    {\"id\": 1, \"text\": \"a\",}\n  ]\n}\n",
    );
    assert_rejected(
        &["--prompt-file", &file, "--mode", "residual"],
        &["broken.json", "line 3, column"],
    );
}

#[test]
fn duplicate_prompt_ids() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "dups.json",
        br#"{"prompts": [{"id": 7, "text": "a"}, {"id": "7", "text": "b"}]}"#,
    );
    assert_rejected(
        &["--prompt-file", &file, "--mode", "residual"],
        &["duplicate prompt id \"7\""],
    );
}

#[test]
fn unsafe_set_and_prompt_names() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "my set.json",
        br#"{"prompts": [{"id": 1, "text": "a"}]}"#,
    );
    assert_rejected(
        &["--prompt-file", &file, "--mode", "residual"],
        &["unsafe prompt set name \"my set\""],
    );
    let file = write(
        dir.path(),
        "ok.json",
        br#"{"prompts": [{"id": "../../etc", "text": "a"}]}"#,
    );
    assert_rejected(
        &["--prompt-file", &file, "--mode", "residual"],
        &["unsafe prompt id"],
    );
}

#[test]
fn missing_and_inconsistent_model_files() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let model_dir = dir.path().display().to_string();

    // a config that disagrees with the weights: the tensor is named
    let config_path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json["intermediate_size"] = 96.into();
    std::fs::write(&config_path, serde_json::to_string(&json).unwrap()).unwrap();
    assert_rejected(
        &[
            "--model", &model_dir, "--prompt", "hello", "--mode", "residual",
        ],
        &[
            "tensor model.layers.0.mlp.gate_proj.weight",
            "[128, 64]",
            "[96, 64]",
        ],
    );
    std::fs::write(&config_path, config).unwrap();

    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert_rejected(
        &[
            "--model", &model_dir, "--prompt", "hello", "--mode", "residual",
        ],
        &["tokenizer.json"],
    );

    assert_rejected(
        &[
            "--model",
            "./no/such/dir",
            "--prompt",
            "hello",
            "--mode",
            "residual",
        ],
        &["no/such/dir"],
    );
}

#[test]
fn sampling_flags_are_checked() {
    assert_rejected(
        &[
            "--prompt",
            "hi",
            "--mode",
            "residual",
            "--temperature",
            "0",
            "--seed",
            "1",
        ],
        &["--temperature must be a positive number"],
    );
    // --temperature without --seed is refused by the parser
    assert_rejected(
        &[
            "--prompt",
            "hi",
            "--mode",
            "residual",
            "--temperature",
            "0.7",
        ],
        &["--seed"],
    );
}
