//! `worker bench`: seconds per generated token for plain generation, residual
//! capture of every layer and internals capture of one layer, on random
//! weights at a checkpoint's dimensions (the released gemma-2-2b by default).

use std::time::Instant;

use candle_core::DType;
use serde::Serialize;

use crate::capture::{
    CaptureMode, ResponsePlan, Sampling, TokenTexts, capture_prompt, generate, internals_artifact,
    residual_artifact,
};
use crate::error::Result;
use crate::loader::{DeviceArg, dtype_name};
use crate::model::{Gemma2, Gemma2Config, Weights};
use crate::pt::{StoreDtype, encode_pt};

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub config: Gemma2Config,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub internals_layer: usize,
    pub device: DeviceArg,
    pub compute_dtype: Option<DType>,
    pub repeats: usize,
}

/// One measured workload.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub workload: String,
    pub seconds_per_token: f64,
    /// Assembling and encoding the artifact(s), once per prompt.
    pub encode_seconds: f64,
    pub overhead_vs_plain: f64,
}

/// The benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub compute_dtype: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub rows: Vec<BenchRow>,
}

/// Runs the three workloads `repeats` times each (best time kept) and reports.
pub fn run_bench(options: &BenchOptions, log: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    let device = options.device.open()?;
    let dtype = options
        .compute_dtype
        .unwrap_or_else(|| options.device.default_dtype());
    let cfg = &options.config;
    log(&format!(
        "building random weights: {} layers, hidden {}, vocab {}, {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        dtype_name(dtype)
    ));
    let weights = Weights::random(cfg, 0.02, 0, dtype, &device)?;
    let model = Gemma2::new(cfg, &weights)?;
    drop(weights);
    let prompt: Vec<u32> = std::iter::once(cfg.bos_token_id)
        .chain(
            (0..options.prompt_tokens.saturating_sub(1))
                .map(|i| (1000 + 37 * i as u32) % cfg.vocab_size as u32),
        )
        .collect();
    // Greedy with no end tokens: every run generates exactly new_tokens.
    let sampling = Sampling::Greedy;
    let plan = ResponsePlan::Generate {
        sampling: &sampling,
        max_new_tokens: options.new_tokens,
        eos_ids: &[],
        prompt_key: "bench/1",
    };
    let texts = |ids: &[u32]| TokenTexts {
        text: String::new(),
        tokens: ids.iter().map(|i| i.to_string()).collect(),
        token_ids: ids.to_vec(),
    };
    let per_token = |seconds: f64| seconds / options.new_tokens as f64;

    log("warm-up");
    generate(&model, &prompt, plan, &mut || {})?;

    let mut plain = f64::INFINITY;
    for _ in 0..options.repeats {
        let start = Instant::now();
        generate(&model, &prompt, plan, &mut || {})?;
        plain = plain.min(start.elapsed().as_secs_f64());
    }
    log(&format!(
        "plain generation: {:.3} s/token",
        per_token(plain)
    ));
    let mut rows = vec![BenchRow {
        workload: "plain generation (KV cache)".into(),
        seconds_per_token: per_token(plain),
        encode_seconds: 0.0,
        overhead_vs_plain: 0.0,
    }];
    let modes = [
        (
            "residual capture, all layers".to_string(),
            CaptureMode::Residual,
        ),
        (
            format!("internals capture, layer {}", options.internals_layer),
            CaptureMode::Internals {
                layers: vec![options.internals_layer],
            },
        ),
    ];
    for (name, mode) in modes {
        let request = mode.request(cfg.num_hidden_layers);
        let mut best = f64::INFINITY;
        let mut encode = f64::INFINITY;
        for _ in 0..options.repeats {
            let start = Instant::now();
            let trace = capture_prompt(&model, &prompt, &request, plan, &mut || {})?;
            best = best.min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            let (p, r) = (texts(&trace.prompt_ids), texts(&trace.response_ids));
            let value = match &mode {
                CaptureMode::Residual => residual_artifact(&trace, &p, &r, StoreDtype::F32),
                CaptureMode::Internals { layers } => {
                    let layer = trace.layer(layers[0]).expect("traced layer");
                    internals_artifact(&trace, layer, &p, &r, StoreDtype::F32)
                }
            };
            encode_pt(&value, "bench")?;
            encode = encode.min(start.elapsed().as_secs_f64());
        }
        log(&format!("{name}: {:.3} s/token", per_token(best)));
        rows.push(BenchRow {
            workload: name,
            seconds_per_token: per_token(best),
            encode_seconds: encode,
            overhead_vs_plain: best / plain - 1.0,
        });
    }
    Ok(BenchReport {
        device: options.device.to_string(),
        compute_dtype: dtype_name(dtype).into(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        prompt_tokens: prompt.len(),
        new_tokens: options.new_tokens,
        rows,
    })
}

impl BenchReport {
    /// A markdown table of the results.
    pub fn to_markdown(&self) -> String {
        let mut out = format!(
            "device {}, compute {}, {} threads, {}-token prompt, {} new tokens\n\n| workload | s / generated token | overhead vs plain | artifact assembly + encode (s) |\n|---|---|---|---|\n",
            self.device, self.compute_dtype, self.threads, self.prompt_tokens, self.new_tokens
        );
        for row in &self.rows {
            out.push_str(&format!(
                "| {} | {:.3} | {:+.1}% | {:.3} |\n",
                row.workload,
                row.seconds_per_token,
                row.overhead_vs_plain * 100.0,
                row.encode_seconds
            ));
        }
        out
    }
}
