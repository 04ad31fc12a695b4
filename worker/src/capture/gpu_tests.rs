//! The engine on a CUDA GPU (`--features cuda`, run on a machine with one):
//! capture in f32 and bf16 against the CPU in f32, batched against
//! one-at-a-time on the GPU, and the device memory read for
//! `--batch-size auto`. Run with `--nocapture` to see the measured errors.

use candle_core::{DType, Device};

use super::batch_tests::{batched_equals_one_at_a_time, everything, tiny_on};
use super::decode::Sampling;
use super::engine::{ResponsePlan, capture_prompt};
use super::trace::{PromptTrace, Rows};
use crate::run::free_device_memory;

fn cuda() -> Device {
    Device::new_cuda(0).expect("a CUDA device (these tests need a GPU)")
}

/// `|a - b| / |b|` over whole tensors (Euclidean norms).
fn norm_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut base) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        diff += f64::from(x - y).powi(2);
        base += f64::from(*y).powi(2);
    }
    (diff / base.max(f64::MIN_POSITIVE)).sqrt()
}

/// The worst norm-relative error over every recorded tensor of two traces
/// of the same tokens, with the tensor that had it.
fn worst_error(gpu: &PromptTrace, cpu: &PromptTrace) -> (f64, String) {
    assert_eq!(gpu.prompt_ids, cpu.prompt_ids);
    assert_eq!(gpu.response_ids, cpu.response_ids);
    assert_eq!(gpu.layers.len(), cpu.layers.len());
    let mut worst = (0f64, String::new());
    let mut see = |what: String, a: &Rows, b: &Rows| {
        assert_eq!((a.width, a.data.len()), (b.width, b.data.len()), "{what}");
        let e = norm_error(&a.data, &b.data);
        if e > worst.0 {
            worst = (e, what);
        }
    };
    for (g, c) in gpu.layers.iter().zip(&cpu.layers) {
        for (kind, x, y) in [
            ("residual_in", &g.residual_in, &c.residual_in),
            ("after_attn", &g.after_attn, &c.after_attn),
            ("residual_out", &g.residual_out, &c.residual_out),
            ("q_proj", &g.q_proj, &c.q_proj),
            ("k_proj", &g.k_proj, &c.k_proj),
            ("v_proj", &g.v_proj, &c.v_proj),
            ("up_proj", &g.up_proj, &c.up_proj),
            ("gelu", &g.gelu, &c.gelu),
            ("down_proj", &g.down_proj, &c.down_proj),
        ] {
            see(format!("layer {} {kind}", c.layer), x, y);
        }
        assert_eq!(g.attention.heads, c.attention.heads);
        let flat = |rows: &Vec<Vec<Vec<f32>>>| Rows {
            width: 1,
            data: rows.iter().flatten().flatten().copied().collect(),
        };
        see(
            format!("layer {} attention", c.layer),
            &flat(&g.attention.rows),
            &flat(&c.attention.rows),
        );
    }
    worst
}

/// Teacher-forced capture of one prompt on the GPU in `dtype` and on the
/// CPU in f32: the same tokens, every tensor within `tolerance`.
fn gpu_matches_cpu(dtype: DType, tolerance: f64) {
    let (meta, cpu_model) = tiny_on(&Device::Cpu, DType::F32);
    let (_, gpu_model) = tiny_on(&cuda(), dtype);
    let prompt = meta
        .tokenizer
        .encode_prompt("Write a careful answer about the history of bridges and tunnels, please.")
        .unwrap();
    let response = [3u32, 30, 300, 12, 44, 9, 700, 5];
    let request = everything(cpu_model.config().num_hidden_layers);
    let plan = ResponsePlan::Replay(&response);
    let cpu = capture_prompt(&cpu_model, &prompt, &request, plan, &mut || {}).unwrap();
    let gpu = capture_prompt(&gpu_model, &prompt, &request, plan, &mut || {}).unwrap();
    let (error, at) = worst_error(&gpu, &cpu);
    eprintln!(
        "cuda {dtype:?} vs cpu f32: worst norm-relative error {error:.2e} ({at}), tolerance {tolerance:.0e}"
    );
    assert!(error < tolerance, "{at}: {error} >= {tolerance}");
}

#[test]
fn cuda_f32_capture_matches_the_cpu() {
    gpu_matches_cpu(DType::F32, 1e-4);
}

#[test]
fn cuda_bf16_capture_matches_the_cpu_within_bf16_tolerance() {
    // bf16 keeps 8 significant bits (relative step 2^-8 = 3.9e-3); errors
    // compound over layers, so allow a few steps.
    gpu_matches_cpu(DType::BF16, 3e-2);
}

#[test]
fn cuda_greedy_generation_picks_the_cpu_tokens_in_f32() {
    let (meta, cpu_model) = tiny_on(&Device::Cpu, DType::F32);
    let (_, gpu_model) = tiny_on(&cuda(), DType::F32);
    let prompt = meta.tokenizer.encode_prompt("Is it safe?").unwrap();
    let request = everything(cpu_model.config().num_hidden_layers);
    let plan = ResponsePlan::Generate {
        sampling: &Sampling::Greedy,
        max_new_tokens: 12,
        eos_ids: &[],
        prompt_key: "gpu/1",
    };
    let cpu = capture_prompt(&cpu_model, &prompt, &request, plan, &mut || {}).unwrap();
    let gpu = capture_prompt(&gpu_model, &prompt, &request, plan, &mut || {}).unwrap();
    assert_eq!(gpu.response_ids, cpu.response_ids);
    let (error, at) = worst_error(&gpu, &cpu);
    eprintln!("cuda f32 greedy vs cpu: worst {error:.2e} ({at})");
    assert!(error < 1e-4, "{at}: {error}");
}

#[test]
fn cuda_batched_capture_equals_one_at_a_time() {
    let (meta, model) = tiny_on(&cuda(), DType::F32);
    batched_equals_one_at_a_time(&meta, &model);
}

#[test]
fn cuda_free_memory_is_read_from_the_driver() {
    let free = free_device_memory(&cuda()).expect("the driver's free memory");
    eprintln!(
        "cuda free memory: {:.1} GiB",
        free as f64 / (1u64 << 30) as f64
    );
    assert!(free > 1 << 30, "{free} bytes free on a GPU");
}
