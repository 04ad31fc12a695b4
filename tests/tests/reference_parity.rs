//! The Rust engine against the transformers reference (eager attention, full
//! recompute every step, as the original tool captured): every tensor of both
//! modes for all six prompt sets, greedy and replayed, within 1e-4 in f32.

use capture_tests::sandbox::{compare_captures, reference_capture, rust_capture, tiny_model};

const SETS: [&str; 6] = [
    "single_trait",
    "multi_trait",
    "dynamic",
    "baseline",
    "adversarial",
    "real_world",
];

#[test]
fn all_prompt_sets_match_transformers_in_both_modes() {
    let model = tiny_model();
    let reference = tempfile::tempdir().unwrap();
    let ours = tempfile::tempdir().unwrap();
    for set in SETS {
        for (mode, layers) in [("residual", None), ("internals", Some("all"))] {
            // 30 steps: long enough for the prompts that reach an end token
            let mut args = vec![
                "--prompt-set",
                set,
                "--mode",
                mode,
                "--max-new-tokens",
                "30",
            ];
            if let Some(layers) = layers {
                args.extend(["--layers", layers]);
            }
            reference_capture(&model, reference.path(), &args);
            rust_capture(&model, ours.path(), &args);
        }
    }
    let report = compare_captures(
        reference.path(),
        ours.path(),
        &["--atol", "1e-4", "--expect-dtype", "f32"],
    );
    println!("{report}");
}

#[test]
fn replayed_sampled_responses_match_transformers() {
    let model = tiny_model();
    let sampled = tempfile::tempdir().unwrap();
    // a sampled run gives responses the greedy path would not produce
    let sampling = ["--temperature", "1.3", "--top-p", "0.95", "--seed", "11"];
    let set = ["--prompt-set", "dynamic"];
    rust_capture(
        &model,
        sampled.path(),
        &[&set[..], &["--mode", "residual"], &sampling[..]].concat(),
    );
    let replay = ["--replay", sampled.path().to_str().unwrap()];

    // replaying a run on the same model reproduces it
    let ours_residual = tempfile::tempdir().unwrap();
    let residual = [&set[..], &["--mode", "residual"], &replay[..]].concat();
    rust_capture(&model, ours_residual.path(), &residual);
    compare_captures(sampled.path(), ours_residual.path(), &["--atol", "1e-4"]);

    // and agrees with transformers teacher-forced on the same tokens
    let reference_residual = tempfile::tempdir().unwrap();
    reference_capture(&model, reference_residual.path(), &residual);
    compare_captures(
        reference_residual.path(),
        ours_residual.path(),
        &["--atol", "1e-4"],
    );

    let internals = [
        &set[..],
        &["--mode", "internals", "--layers", "0,3"],
        &replay[..],
    ]
    .concat();
    let reference_internals = tempfile::tempdir().unwrap();
    let ours_internals = tempfile::tempdir().unwrap();
    reference_capture(&model, reference_internals.path(), &internals);
    rust_capture(&model, ours_internals.path(), &internals);
    compare_captures(
        reference_internals.path(),
        ours_internals.path(),
        &["--atol", "1e-4", "--expect-dtype", "f32"],
    );
}
