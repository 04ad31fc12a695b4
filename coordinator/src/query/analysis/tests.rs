//! Tests of the parent module.
use super::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn projection_is_the_scalar_projection_per_token() {
    // Two tokens of width 3, v = (3, 0, 4) with |v| = 5.
    let acts = [1.0, 2.0, 3.0, -5.0, 0.0, 0.0];
    let scores = project(&acts, 3, &[3.0, 0.0, 4.0]);
    assert_eq!(scores, vec![(3.0 + 12.0) / 5.0, -15.0 / 5.0]);
    assert!(project(&[], 3, &[1.0, 0.0, 0.0]).is_empty());
}

#[test]
#[should_panic(expected = "do not split into rows")]
fn projection_refuses_ragged_activations() {
    project(&[1.0, 2.0, 3.0], 2, &[1.0, 1.0]);
}

#[test]
fn scores_index_tokens_layers_and_sublayers() {
    let mut projection = Projection::zeros(vec![4, 9], 2, 3);
    projection
        .response
        .set_series(1, Sublayer::AfterAttn, &[1.0, 2.0, 3.0]);
    projection.prompt.set(1, 0, Sublayer::ResidualOut, 7.0);
    assert_eq!(projection.layer_index(9), Some(1));
    assert_eq!(projection.layer_index(5), None);
    assert_eq!(
        projection.response.series(1, Sublayer::AfterAttn),
        vec![1.0, 2.0, 3.0]
    );
    assert_eq!(projection.response.get(2, 1, Sublayer::AfterAttn), 3.0);
    // [token 2, layer index 1, after_attn] = (2 * 2 + 1) * 3 + 1.
    assert_eq!(projection.response.values[16], 3.0);
    // [token 1, layer index 0, residual_out] = (1 * 2 + 0) * 3 + 2.
    assert_eq!(projection.prompt.values[8], 7.0);
    assert_eq!(
        projection.response.series(0, Sublayer::AfterAttn),
        vec![0.0; 3]
    );
    assert_eq!(
        Sublayer::from_name("residual_out"),
        Some(Sublayer::ResidualOut)
    );
    assert_eq!(Sublayer::from_name("mlp"), None);
}

#[test]
fn dynamics_follow_the_documented_definitions() {
    // s:   0, 1, 3, 3.25, 3.0, -0.5
    // v:   1, 2, 0.25, -0.25, -3.5
    // a:   1, -1.75, -0.5, -3.25
    let s = [0.0, 1.0, 3.0, 3.25, 3.0, -0.5];
    let d = dynamics(&s, DEFAULT_COMMITMENT_THRESHOLD);
    assert_eq!(d.tokens, 6);
    assert_eq!(d.velocity, vec![1.0, 2.0, 0.25, -0.25, -3.5]);
    assert_eq!(d.acceleration, vec![1.0, -1.75, -0.5, -3.25]);
    assert_eq!(d.commitment_token, None, "no |a| is below 0.1");
    assert_eq!(dynamics(&s, 0.5).commitment_token, None, "strictly below");
    let d = dynamics(&s, 0.6);
    assert_eq!(d.commitment_token, Some(4), "a[2] maps to token 4");
    assert_eq!(
        d.peak_velocity,
        Some(Indexed {
            index: 4,
            value: -3.5
        })
    );
    assert!(close(d.mean_abs_velocity.unwrap(), 7.0 / 5.0));
    assert_eq!(
        d.peak_score,
        Some(Indexed {
            index: 3,
            value: 3.25
        })
    );
    // After token 3: |3.0| > 1.625 counts, |-0.5| does not.
    assert_eq!(d.persistence, 1);
}

#[test]
fn dynamics_of_short_series_do_not_panic() {
    let empty = dynamics(&[], 0.1);
    assert_eq!(empty.tokens, 0);
    assert!(empty.velocity.is_empty() && empty.acceleration.is_empty());
    assert_eq!(empty.peak_velocity, None);
    assert_eq!(empty.mean_abs_velocity, None);
    assert_eq!(empty.peak_score, None);
    assert_eq!(empty.persistence, 0);

    let one = dynamics(&[-2.0], 0.1);
    assert_eq!(
        one.peak_score,
        Some(Indexed {
            index: 0,
            value: -2.0
        })
    );
    assert_eq!(one.peak_velocity, None);
    assert_eq!(one.persistence, 0);

    let two = dynamics(&[1.0, 4.0], 0.1);
    assert_eq!(two.velocity, vec![3.0]);
    assert!(two.acceleration.is_empty());
    assert_eq!(two.commitment_token, None);
    assert_eq!(two.mean_abs_velocity, Some(3.0));

    let flat = dynamics(&[1.0, 1.0, 1.0], 0.1);
    assert_eq!(flat.commitment_token, Some(2));
    assert_eq!(
        flat.peak_velocity,
        Some(Indexed {
            index: 0,
            value: 0.0
        })
    );
    assert_eq!(
        flat.peak_score,
        Some(Indexed {
            index: 0,
            value: 1.0
        })
    );
    assert_eq!(flat.persistence, 2);
}

#[test]
fn nan_scores_are_never_the_peak_when_a_number_exists() {
    let d = dynamics(&[f32::NAN, 2.0, -1.0], 0.1);
    assert_eq!(
        d.peak_score,
        Some(Indexed {
            index: 1,
            value: 2.0
        })
    );
    let all_nan = dynamics(&[f32::NAN], 0.1);
    assert_eq!(all_nan.peak_score.map(|p| p.index), Some(0));
}

#[test]
fn cohens_d_uses_the_pooled_standard_deviation() {
    // a: mean 2, sample variance 1 (n 3); b: mean 5, sample variance 4 (n 3)
    let a = [1.0, 2.0, 3.0];
    let b = [3.0, 5.0, 7.0];
    let effect = effect_size(&a, &b).unwrap();
    assert_eq!((effect.n_a, effect.n_b), (3, 3));
    assert!(close(effect.mean_difference, 3.0));
    let pooled = ((2.0 * 1.0 + 2.0 * 4.0) / 4.0f64).sqrt();
    assert!(close(effect.pooled_sd.unwrap(), pooled));
    assert!(close(effect.cohens_d.unwrap(), 3.0 / pooled));

    let constant = effect_size(&[2.0, 2.0], &[3.0, 3.0]).unwrap();
    assert_eq!(constant.pooled_sd, Some(0.0));
    assert_eq!(constant.cohens_d, None, "zero variance gives None, not NaN");
    let singles = effect_size(&[1.0], &[2.0]).unwrap();
    assert_eq!(singles.pooled_sd, None);
    assert_eq!(singles.cohens_d, None);
    // One value on one side: its (n - 1)·s² term is 0.
    let lopsided = effect_size(&[1.0], &[2.0, 4.0]).unwrap();
    assert!(close(lopsided.pooled_sd.unwrap(), 2.0f64.sqrt()));
    assert!(effect_size(&[], &[1.0]).is_none());
}

#[test]
fn compare_aligns_tokens_and_summarises_common_layers() {
    let mut a = Projection::zeros(vec![3, 5], 1, 3);
    let mut b = Projection::zeros(vec![5, 7], 1, 2);
    a.response
        .set_series(1, Sublayer::ResidualOut, &[1.0, 2.0, 3.0]);
    b.response.set_series(0, Sublayer::ResidualOut, &[4.0, 4.5]);
    let comparison = compare(&a, &b);
    assert_eq!(comparison.layers, vec![5]);

    let response = &comparison.response;
    assert_eq!((response.tokens_a, response.tokens_b), (3, 2));
    assert!(response.lengths_differ);
    assert_eq!(response.differences.tokens, 2);
    assert_eq!(response.differences.layer_count, 1);
    assert_eq!(
        response.differences.series(0, Sublayer::ResidualOut),
        vec![3.0, 2.5]
    );
    assert_eq!(response.summary.len(), 3);
    let out = &response.summary[2];
    assert_eq!((out.layer, out.sublayer), (5, Sublayer::ResidualOut));
    let effect = out.effect.as_ref().unwrap();
    assert_eq!((effect.n_a, effect.n_b), (3, 2));
    assert!(close(effect.mean_difference, 4.25 - 2.0));
    // residual_in is all zeros on both sides: no effect size.
    assert_eq!(response.summary[0].effect.as_ref().unwrap().cohens_d, None);

    assert!(!comparison.prompt.lengths_differ);
    assert_eq!(comparison.prompt.differences.values, vec![0.0; 3]);
    let json = serde_json::to_value(&comparison).unwrap();
    assert_eq!(json["response"]["summary"][2]["sublayer"], "residual_out");
}

/// Writes trait vectors with torch (float32 `[1, d]`, float16 `[d, 1]`,
/// bfloat16 `[d]`) and two runs' activations, and prints what numpy
/// computes from them: projections (float64, rounded to float32 as the
/// Rust side stores them), dynamics of those projections, and the
/// per-token differences and Cohen's d of run b against run a.
const PARITY_SCRIPT: &str = r#"
import json, os, sys
import numpy as np
import torch

out = sys.argv[1]
threshold = float(sys.argv[2])
rng = np.random.default_rng(20240611)
d, tokens_a, tokens_b = 48, 40, 35
acts_a = rng.standard_normal((tokens_a, d)).astype(np.float32)
acts_b = (rng.standard_normal((tokens_b, d)) + 0.3).astype(np.float32)
acts_a.tofile(os.path.join(out, "acts_a.f32"))
acts_b.tofile(os.path.join(out, "acts_b.f32"))
base = rng.standard_normal(d) * 3.0

def project(acts, v):
    return ((acts.astype(np.float64) @ v) / np.linalg.norm(v)).astype(np.float32)

cases = {}
for name, dtype, shape in [
    ("f32", torch.float32, (1, d)),
    ("f16", torch.float16, (d, 1)),
    ("bf16", torch.bfloat16, (d,)),
]:
    tensor = torch.tensor(base).reshape(shape).to(dtype)
    torch.save(tensor, os.path.join(out, name + ".pt"))
    v = tensor.to(torch.float64).reshape(-1).numpy()
    pa, pb = project(acts_a, v), project(acts_b, v)
    s = pa.astype(np.float64)
    vel = np.diff(s)
    acc = np.diff(vel)
    below = np.nonzero(np.abs(acc) < threshold)[0]
    peak_v = int(np.argmax(np.abs(vel)))
    peak_s = int(np.argmax(np.abs(s)))
    a64, b64 = pa.astype(np.float64), pb.astype(np.float64)
    n1, n2 = len(a64), len(b64)
    pooled = np.sqrt(((n1 - 1) * a64.var(ddof=1) + (n2 - 1) * b64.var(ddof=1)) / (n1 + n2 - 2))
    aligned = min(n1, n2)
    cases[name] = {
        "values": v.tolist(),
        "projection_a": pa.astype(np.float64).tolist(),
        "projection_b": pb.astype(np.float64).tolist(),
        "velocity": vel.tolist(),
        "acceleration": acc.tolist(),
        "commitment_token": int(below[0]) + 2 if len(below) else None,
        "peak_velocity_index": peak_v,
        "peak_velocity": float(vel[peak_v]),
        "mean_abs_velocity": float(np.mean(np.abs(vel))),
        "peak_score_index": peak_s,
        "persistence": int(np.sum(np.abs(s[peak_s + 1:]) > 0.5 * abs(s[peak_s]))),
        "differences": (b64[:aligned] - a64[:aligned]).tolist(),
        "mean_difference": float(b64.mean() - a64.mean()),
        "pooled_sd": float(pooled),
        "cohens_d": float((b64.mean() - a64.mean()) / pooled),
    }
print(json.dumps({"d": d, "cases": cases}))
"#;

/// `actual` within 1e-5 of `expected`, relative to `max(|expected|, 1)`.
fn assert_parity(what: &str, actual: f64, expected: &serde_json::Value) {
    let expected = expected
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: {expected}"));
    let tolerance = 1e-5 * expected.abs().max(1.0);
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: rust {actual} numpy {expected}"
    );
}

fn assert_series(what: &str, actual: &[f64], expected: &serde_json::Value) {
    let expected = expected.as_array().unwrap();
    assert_eq!(actual.len(), expected.len(), "{what}: lengths");
    for (index, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_parity(&format!("{what}[{index}]"), *a, e);
    }
}

fn read_f32(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Runs only with `CAPTURE_PYTHON` naming a python that has numpy and torch.
#[tokio::test]
async fn numpy_parity_of_vectors_projections_dynamics_and_cohens_d() {
    use crate::query::vectors::{VectorRequest, VectorSource, load_vectors, vector_for};

    let Some(python) = std::env::var_os("CAPTURE_PYTHON") else {
        eprintln!("skipping numpy parity: set CAPTURE_PYTHON to a python with numpy and torch");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let threshold = 0.5;
    let output = std::process::Command::new(&python)
        .arg("-c")
        .arg(PARITY_SCRIPT)
        .arg(dir.path())
        .arg(threshold.to_string())
        .output()
        .expect("run CAPTURE_PYTHON");
    assert!(
        output.status.success(),
        "parity script failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let d = expected["d"].as_u64().unwrap() as usize;
    let acts_a = read_f32(&dir.path().join("acts_a.f32"));
    let acts_b = read_f32(&dir.path().join("acts_b.f32"));

    let names = ["f32", "f16", "bf16"];
    let request = VectorRequest {
        sources: names
            .iter()
            .map(|name| {
                let path = dir.path().join(format!("{name}.pt"));
                VectorSource::File(path.to_str().unwrap().to_owned())
            })
            .collect(),
        ..VectorRequest::default()
    };
    let vectors = load_vectors(&request).await.unwrap();
    assert_eq!(vectors.len(), 3);
    let mut commitments = 0;
    for name in names {
        let case = &expected["cases"][name];
        let vector = vector_for(&vectors, name, 0).unwrap();
        // f16 and bf16 values widen to f32 exactly; JSON numbers parse
        // to within an f64 ulp, which rounding to f32 removes.
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(vector.values, want, "{name}: values");

        let projection_a = project(&acts_a, d, &vector.values);
        let projection_b = project(&acts_b, d, &vector.values);
        let widen = |xs: &[f32]| xs.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
        assert_series(
            &format!("{name} projection a"),
            &widen(&projection_a),
            &case["projection_a"],
        );
        assert_series(
            &format!("{name} projection b"),
            &widen(&projection_b),
            &case["projection_b"],
        );

        let dynamics = dynamics(&projection_a, threshold);
        assert_series(
            &format!("{name} velocity"),
            &dynamics.velocity,
            &case["velocity"],
        );
        assert_series(
            &format!("{name} acceleration"),
            &dynamics.acceleration,
            &case["acceleration"],
        );
        assert_eq!(
            dynamics.commitment_token,
            case["commitment_token"].as_u64().map(|t| t as usize),
            "{name}: commitment token"
        );
        commitments += usize::from(dynamics.commitment_token.is_some());
        let peak = dynamics.peak_velocity.unwrap();
        assert_eq!(
            peak.index as u64,
            case["peak_velocity_index"].as_u64().unwrap()
        );
        assert_parity(
            &format!("{name} peak velocity"),
            peak.value,
            &case["peak_velocity"],
        );
        assert_parity(
            &format!("{name} mean |velocity|"),
            dynamics.mean_abs_velocity.unwrap(),
            &case["mean_abs_velocity"],
        );
        assert_eq!(
            dynamics.peak_score.unwrap().index as u64,
            case["peak_score_index"].as_u64().unwrap()
        );
        assert_eq!(
            dynamics.persistence as u64,
            case["persistence"].as_u64().unwrap(),
            "{name}: persistence"
        );

        let mut a = Projection::zeros(vec![16], 0, projection_a.len());
        let mut b = Projection::zeros(vec![16], 0, projection_b.len());
        a.response
            .set_series(0, Sublayer::ResidualOut, &projection_a);
        b.response
            .set_series(0, Sublayer::ResidualOut, &projection_b);
        let comparison = compare(&a, &b);
        assert!(comparison.response.lengths_differ);
        let differences = comparison
            .response
            .differences
            .series(0, Sublayer::ResidualOut);
        assert_series(
            &format!("{name} differences"),
            &widen(&differences),
            &case["differences"],
        );
        let effect = comparison.response.summary[2].effect.clone().unwrap();
        assert_parity(
            &format!("{name} mean difference"),
            effect.mean_difference,
            &case["mean_difference"],
        );
        assert_parity(
            &format!("{name} pooled sd"),
            effect.pooled_sd.unwrap(),
            &case["pooled_sd"],
        );
        assert_parity(
            &format!("{name} cohen's d"),
            effect.cohens_d.unwrap(),
            &case["cohens_d"],
        );
        assert_eq!(
            comparison.prompt.summary[2].effect, None,
            "no prompt tokens"
        );
    }
    assert!(commitments > 0, "the data should commit at least once");
}
