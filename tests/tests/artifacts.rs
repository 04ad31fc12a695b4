//! Artifacts as users meet them: every storage dtype loads with
//! `torch.load(weights_only=True)`, the manifest describes every file truly,
//! and checkpoint variants (hub-style config, sharded weights) capture the same.

use std::path::Path;

use capture_tests::sandbox::{
    compare_captures, files_below, python_script, run_ok, rust_capture, tiny_model, worker,
};
use sha2::{Digest, Sha256};

fn capture_both_modes(model: &Path, out: &Path, extra: &[&str]) {
    for mode in [
        &["--mode", "residual"][..],
        &["--mode", "internals", "--layers", "1,2"][..],
    ] {
        rust_capture(
            model,
            out,
            &[
                &["--prompt-set", "baseline", "--max-new-tokens", "12"][..],
                mode,
                extra,
            ]
            .concat(),
        );
    }
}

#[test]
fn every_store_dtype_loads_with_torch_weights_only() {
    let model = tiny_model();
    let f32_dir = tempfile::tempdir().unwrap();
    capture_both_modes(&model, f32_dir.path(), &[]);
    for dtype in ["f16", "bf16"] {
        let dir = tempfile::tempdir().unwrap();
        capture_both_modes(&model, dir.path(), &["--store-dtype", dtype]);
        // compare_captures loads every file with torch.load(weights_only=True)
        // and checks the stored dtype
        compare_captures(
            f32_dir.path(),
            dir.path(),
            &["--atol", "2e-2", "--rtol", "1e-2", "--expect-dtype", dtype],
        );
    }
}

#[test]
fn manifest_records_every_artifact_truly() {
    let out = tempfile::tempdir().unwrap();
    capture_both_modes(&tiny_model(), out.path(), &[]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    let artifacts = manifest["artifacts"].as_array().unwrap();
    // 5 baseline prompts: one residual file and two internals files each
    assert_eq!(artifacts.len(), 15);
    let mut keys: Vec<String> = artifacts
        .iter()
        .map(|a| a["key"].as_str().unwrap().to_string())
        .collect();
    keys.sort();
    let mut on_disk = files_below(out.path());
    on_disk.retain(|f| f != "manifest.json");
    assert_eq!(keys, on_disk);
    for artifact in artifacts {
        let bytes = std::fs::read(out.path().join(artifact["key"].as_str().unwrap())).unwrap();
        assert_eq!(artifact["bytes"].as_u64().unwrap(), bytes.len() as u64);
        assert_eq!(
            artifact["sha256"].as_str().unwrap(),
            hex::encode(Sha256::digest(&bytes))
        );
        assert!(
            artifact["shapes"]["prompt.residual.input"].is_array()
                || artifact["shapes"]["prompt.activations.0.residual_in"].is_array()
        );
    }
    assert_eq!(
        manifest["model"]["config_sha256"].as_str().unwrap().len(),
        64
    );
    assert_eq!(manifest["parameters"]["store_dtype"], "f32");
    // a second capture with other parameters into the same root is refused
    let output = capture_tests::sandbox::run(
        worker()
            .args([
                "capture",
                "--prompt-set",
                "baseline",
                "--mode",
                "residual",
                "--max-new-tokens",
                "3",
                "--quiet",
                "--model",
            ])
            .arg(tiny_model())
            .arg("--out")
            .arg(out.path()),
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("other settings (max_new_tokens)"));
}

#[test]
fn hub_style_config_and_sharded_weights_capture_identically() {
    let variant = tempfile::tempdir().unwrap();
    run_ok(
        python_script("make_tiny_model.py")
            .arg("--out")
            .arg(variant.path())
            .args(["--config-style", "hub", "--max-shard-size", "200KB"]),
    );
    let files = files_below(variant.path());
    assert!(
        files.contains(&"model.safetensors.index.json".to_string()),
        "{files:?}"
    );
    assert!(
        files.iter().filter(|f| f.ends_with(".safetensors")).count() > 1,
        "{files:?}"
    );
    let config = std::fs::read_to_string(variant.path().join("config.json")).unwrap();
    assert!(
        !config.contains("layer_types") && config.contains("rope_theta"),
        "{config}"
    );

    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let args = [
        "--prompt-set",
        "adversarial",
        "--mode",
        "residual",
        "--max-new-tokens",
        "10",
    ];
    rust_capture(&tiny_model(), a.path(), &args);
    rust_capture(variant.path(), b.path(), &args);
    compare_captures(a.path(), b.path(), &["--atol", "0"]);
}

#[test]
fn sampling_is_reproducible_from_the_seed() {
    let sample = |seed: &str| {
        let out = tempfile::tempdir().unwrap();
        rust_capture(
            &tiny_model(),
            out.path(),
            &[
                "--prompt-set",
                "baseline",
                "--mode",
                "residual",
                "--max-new-tokens",
                "8",
                "--temperature",
                "1.5",
                "--top-p",
                "0.9",
                "--seed",
                seed,
            ],
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap())
                .unwrap();
        let hashes: Vec<String> = manifest["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["sha256"].as_str().unwrap().to_string())
            .collect();
        hashes
    };
    let first = sample("42");
    assert_eq!(first, sample("42"), "same seed, same artifacts");
    assert_ne!(first, sample("43"), "another seed, other responses");
}
