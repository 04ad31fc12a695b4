//! `worker bench`: seconds per generated token for plain generation, residual
//! capture of every layer (alone and in batches) and internals capture of one
//! layer, on random weights at a checkpoint's dimensions (the released
//! gemma-2-2b by default), with each workload's peak memory; optionally the
//! transformers reference (`scripts/bench_transformers.py`) on the same
//! shapes, prompt and token count, run by the same command, side by side.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::capture::{
    BatchItem, CaptureMode, ResponsePlan, Sampling, StepPhases, TokenTexts, capture_batch,
    capture_batch_profiled, capture_prompt, generate, internals_artifact_owned,
    residual_artifact_owned,
};
use crate::error::{CaptureError, Result};
use crate::loader::{DeviceArg, dtype_name};
use crate::model::weights::keeps_bf16;
use crate::model::{CaptureRequest, Gemma2, Gemma2Config, Weights};
use crate::pt::{StoreDtype, encode_pt_parts};
use crate::run::peak_resident_memory;

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub config: Gemma2Config,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub internals_layer: usize,
    pub device: DeviceArg,
    pub compute_dtype: Option<DType>,
    /// Storage dtype of the weight matrices (none: what loading the released
    /// bf16 checkpoint gives, see `weights::keeps_bf16`).
    pub weight_dtype: Option<DType>,
    pub repeats: usize,
    /// Batch sizes of the batched residual workloads (none: skip them).
    pub batch_sizes: Vec<usize>,
    /// Run the transformers reference too, with this Python and script.
    pub transformers: Option<TransformersBench>,
}

/// How to run `scripts/bench_transformers.py`.
#[derive(Debug, Clone)]
pub struct TransformersBench {
    pub python: PathBuf,
    pub script: PathBuf,
    pub threads: usize,
}

/// One measured workload.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub workload: String,
    /// Prompts per forward pass.
    pub batch: usize,
    /// Wall time per generated token (all sequences of a batch counted).
    pub seconds_per_token: f64,
    /// Prompt plus response tokens whose activations were recorded, per
    /// second (0 for plain generation).
    pub captured_tokens_per_second: f64,
    /// Assembling and encoding the artifact(s), per prompt.
    pub encode_seconds: f64,
    /// Time over plain generation at the same batch size, minus one.
    pub overhead_vs_plain: f64,
    /// Peak resident memory of the process during this workload.
    pub peak_memory_bytes: Option<u64>,
    /// On a GPU, the most device memory the workload's buffers (the
    /// weights included) used at once, from the device's memory pool.
    pub peak_device_bytes: Option<u64>,
}

/// The transformers reference's results, from its JSON.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TransformersReport {
    pub rows: Vec<TransformersRow>,
    pub peak_rss_gib: f64,
    /// Peak GPU memory torch allocated (GPU runs only).
    #[serde(default)]
    pub peak_device_gib: Option<f64>,
    pub torch: String,
    #[serde(default)]
    pub transformers: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TransformersRow {
    pub workload: String,
    #[serde(default = "one")]
    pub batch: usize,
    pub seconds_per_token: f64,
    /// Peak GPU memory torch allocated during this workload (GPU runs
    /// only).
    #[serde(default)]
    pub peak_device_gib: Option<f64>,
}

fn one() -> usize {
    1
}

/// The benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub compute_dtype: String,
    /// Storage dtype of the weight matrices.
    pub weight_dtype: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Seconds per candle operation on one `[1, hidden]` row (see
    /// [`small_operation_seconds`]).
    pub small_operation_seconds: f64,
    pub rows: Vec<BenchRow>,
    pub transformers: Option<TransformersReport>,
}

/// Runs the three workloads `repeats` times each (best time kept) and reports.
pub fn run_bench(options: &BenchOptions, log: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    let device = options.device.open()?;
    let dtype = options
        .compute_dtype
        .unwrap_or_else(|| options.device.default_dtype());
    let matrices = options
        .weight_dtype
        .unwrap_or(if keeps_bf16(DType::BF16, dtype, &device) {
            DType::BF16
        } else {
            dtype
        });
    if matrices != dtype && !keeps_bf16(matrices, dtype, &device) {
        return Err(CaptureError::InvalidArgument(format!(
            "--weights {} with compute dtype {} on {}: matrices are stored in the compute dtype, or in bf16 on the CPU computing in f32",
            dtype_name(matrices),
            dtype_name(dtype),
            options.device
        )));
    }
    let cfg = &options.config;
    log(&format!(
        "building random weights: {} layers, hidden {}, vocab {}, compute {}, matrices stored in {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        dtype_name(dtype),
        dtype_name(matrices)
    ));
    let weights = Weights::random(cfg, 0.02, 0, dtype, matrices, &device)?;
    let model = Gemma2::new(cfg, weights)?;
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
    let captured_rate =
        |batch: usize, seconds: f64| (batch * (prompt.len() + options.new_tokens)) as f64 / seconds;

    let operation = small_operation_seconds(&device, dtype, cfg.hidden_size)?;
    log(&format!(
        "one small operation (a [1, {}] row through candle, chained): {:.1} us",
        cfg.hidden_size,
        operation * 1e6
    ));
    log("warm-up");
    let response = generate(&model, &prompt, plan, &mut || {})?;

    reset_peaks(&device)?;
    let plain = best_of(options.repeats, || {
        generate(&model, &prompt, plan, &mut || {})?;
        Ok(())
    })?;
    log(&format!(
        "plain generation: {:.3} s/token",
        per_token(plain)
    ));
    let mut rows = vec![BenchRow {
        workload: "plain generation (KV cache)".into(),
        batch: 1,
        seconds_per_token: per_token(plain),
        captured_tokens_per_second: 0.0,
        encode_seconds: 0.0,
        overhead_vs_plain: 0.0,
        peak_memory_bytes: peak_resident_memory(),
        peak_device_bytes: device_peak(&device),
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
    let mut residual_encode = 0.0;
    for (name, mode) in modes {
        let request = mode.request(cfg.num_hidden_layers);
        reset_peaks(&device)?;
        let mut best = f64::INFINITY;
        let mut encode = f64::INFINITY;
        for _ in 0..options.repeats {
            let start = Instant::now();
            let trace = capture_prompt(&model, &prompt, &request, plan, &mut || {})?;
            best = best.min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            let (p, r) = (texts(&trace.prompt_ids), texts(&trace.response_ids));
            // As the worker assembles them: the artifact takes its trace.
            let value = match &mode {
                CaptureMode::Residual => residual_artifact_owned(trace, &p, &r, StoreDtype::F32),
                CaptureMode::Internals { layers } => {
                    internals_artifact_owned(trace, layers[0], &p, &r, StoreDtype::F32)
                }
            };
            encode_pt_parts(value, "bench")?;
            encode = encode.min(start.elapsed().as_secs_f64());
        }
        log(&format!("{name}: {:.3} s/token", per_token(best)));
        if mode == CaptureMode::Residual {
            residual_encode = encode;
        }
        rows.push(BenchRow {
            workload: name,
            batch: 1,
            seconds_per_token: per_token(best),
            captured_tokens_per_second: captured_rate(1, best),
            encode_seconds: encode,
            overhead_vs_plain: best / plain - 1.0,
            peak_memory_bytes: peak_resident_memory(),
            peak_device_bytes: device_peak(&device),
        });
    }
    // Teacher forcing on the response just generated: the same passes and
    // records, without the LM head.
    let request = CaptureMode::Residual.request(cfg.num_hidden_layers);
    reset_peaks(&device)?;
    let best = best_of(options.repeats, || {
        let replay = ResponsePlan::Replay(&response);
        let trace = capture_prompt(&model, &prompt, &request, replay, &mut || {})?;
        debug_assert_eq!(trace.response_ids, response);
        Ok(())
    })?;
    let name = "residual capture, all layers, teacher-forced (replay)";
    log(&format!("{name}: {:.3} s/token", per_token(best)));
    rows.push(BenchRow {
        workload: name.into(),
        batch: 1,
        seconds_per_token: per_token(best),
        captured_tokens_per_second: captured_rate(1, best),
        // The same artifact as the generating residual capture's.
        encode_seconds: residual_encode,
        overhead_vs_plain: best / plain - 1.0,
        peak_memory_bytes: peak_resident_memory(),
        peak_device_bytes: device_peak(&device),
    });
    // Batches of distinct prompts of the same length.
    for &batch in options.batch_sizes.iter().filter(|&&b| b > 1) {
        let prompts: Vec<Vec<u32>> = (0..batch as u32)
            .map(|i| {
                prompt
                    .iter()
                    .enumerate()
                    .map(|(p, &t)| {
                        if p == 0 {
                            t
                        } else {
                            (t + 7919 * i) % cfg.vocab_size as u32
                        }
                    })
                    .collect()
            })
            .collect();
        let keys: Vec<String> = (0..batch).map(|i| format!("bench/{i}")).collect();
        let items: Vec<BatchItem<'_>> = prompts
            .iter()
            .zip(&keys)
            .map(|(ids, key)| BatchItem {
                prompt_ids: ids,
                plan: ResponsePlan::Generate {
                    sampling: &sampling,
                    max_new_tokens: options.new_tokens,
                    eos_ids: &[],
                    prompt_key: key,
                },
            })
            .collect();
        // The same batch without capture: what capture adds at this batch.
        reset_peaks(&device)?;
        let plain_batch = best_of(options.repeats, || {
            capture_batch(&model, &items, &CaptureRequest::default(), &mut |_| {})?;
            Ok(())
        })?;
        let plain_per_token = plain_batch / (batch * options.new_tokens) as f64;
        log(&format!(
            "plain generation, batch of {batch}: {plain_per_token:.4} s/token"
        ));
        rows.push(BenchRow {
            workload: format!("plain generation, batch of {batch}"),
            batch,
            seconds_per_token: plain_per_token,
            captured_tokens_per_second: 0.0,
            encode_seconds: 0.0,
            overhead_vs_plain: 0.0,
            peak_memory_bytes: peak_resident_memory(),
            peak_device_bytes: device_peak(&device),
        });
        reset_peaks(&device)?;
        let mut best = f64::INFINITY;
        let mut encode = f64::INFINITY;
        let mut assembly_share = 0.0;
        for _ in 0..options.repeats {
            let start = Instant::now();
            let traces = capture_batch(&model, &items, &request, &mut |_| {})?;
            best = best.min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            let mut assembly = Duration::ZERO;
            for trace in traces {
                let assembling = Instant::now();
                let (p, r) = (texts(&trace.prompt_ids), texts(&trace.response_ids));
                let value = residual_artifact_owned(trace, &p, &r, StoreDtype::F32);
                assembly += assembling.elapsed();
                encode_pt_parts(value, "bench")?;
            }
            let per_prompt = start.elapsed().as_secs_f64() / batch as f64;
            if per_prompt < encode {
                encode = per_prompt;
                assembly_share = assembly.as_secs_f64() / batch as f64;
            }
        }
        let name = format!("residual capture, all layers, batch of {batch}");
        let seconds_per_token = best / (batch * options.new_tokens) as f64;
        log(&format!(
            "{name}: {seconds_per_token:.3} s/token; per prompt {assembly_share:.4} s assembling, {:.4} s encoding",
            encode - assembly_share
        ));
        rows.push(BenchRow {
            workload: name,
            batch,
            seconds_per_token,
            captured_tokens_per_second: captured_rate(batch, best),
            encode_seconds: encode,
            overhead_vs_plain: seconds_per_token / plain_per_token - 1.0,
            peak_memory_bytes: peak_resident_memory(),
            peak_device_bytes: device_peak(&device),
        });
        // One more batch, timed phase by phase (not in the table: waiting
        // for the device between phases slows it down).
        let mut phases = StepPhases::default();
        capture_batch_profiled(&model, &items, &request, &mut phases)?;
        log(&phase_line(batch, &phases));
    }
    drop(model);
    let transformers = match &options.transformers {
        None => None,
        Some(reference) => {
            log("running the transformers reference (scripts/bench_transformers.py)");
            Some(run_transformers(
                reference,
                &ReferenceShape {
                    device: if device.is_cpu() { "cpu" } else { "cuda" },
                    dtype: dtype_name(dtype),
                    prompt_tokens: prompt.len(),
                    new_tokens: options.new_tokens,
                    batch_sizes: &options.batch_sizes,
                },
            )?)
        }
    };
    Ok(BenchReport {
        device: options.device.to_string(),
        compute_dtype: dtype_name(dtype).into(),
        weight_dtype: dtype_name(matrices).into(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        prompt_tokens: prompt.len(),
        new_tokens: options.new_tokens,
        small_operation_seconds: operation,
        rows,
        transformers,
    })
}

/// Seconds per candle operation on one `[1, width]` row, best of three
/// chains of 2,000 (each operation reads the last one's output). The
/// operation's own work is next to nothing, so on a GPU this is what
/// launching one kernel through candle costs the host (allocating the
/// output, the launch, freeing): a decode step at batch 1 runs about a
/// dozen per layer, and cannot be faster than their launches.
fn small_operation_seconds(device: &Device, dtype: DType, width: usize) -> Result<f64> {
    const CHAIN: usize = 2000;
    let mut x = Tensor::zeros((1, width), dtype, device)?;
    // The first launches load the kernel's module.
    for _ in 0..100 {
        x = x.affine(1.0, 0.0)?;
    }
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..CHAIN {
            x = x.affine(1.0, 0.0)?;
        }
        device.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64() / CHAIN as f64);
    }
    Ok(best)
}

/// Where one profiled batch's time went, per pass, as the bench logs it.
fn phase_line(batch: usize, phases: &StepPhases) -> String {
    let per_pass = |d: Duration| d.as_secs_f64() * 1e3 / phases.passes.max(1) as f64;
    format!(
        "residual capture, batch of {batch}, ms per pass ({} passes, profiled): forward {:.2} (queued by the host in {:.2}), to host {:.2}, record {:.2}, choose {:.2}",
        phases.passes,
        per_pass(phases.forward),
        per_pass(phases.queued),
        per_pass(phases.to_host),
        per_pass(phases.record),
        per_pass(phases.choose),
    )
}

/// The shortest of `repeats` runs of `run`, in seconds.
fn best_of(repeats: usize, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let start = Instant::now();
        run()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Starts a new peak for [`peak_resident_memory`] (Linux: writing 5 to
/// `/proc/self/clear_refs` resets `VmHWM` to the current resident size)
/// and, on a GPU, for [`device_peak`].
fn reset_peaks(device: &Device) -> Result<()> {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        capture_kernels::device::reset_pool_peak(cuda)?;
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(())
}

/// The most device memory in use at once since [`reset_peaks`], on a GPU
/// whose allocations come from its memory pool (candle's do: every tensor,
/// the weights included; cuBLAS's workspace does not); `None` on the CPU.
fn device_peak(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => capture_kernels::device::pool_memory(cuda)
            .ok()
            .flatten()
            .map(|pool| pool.peak()),
        _ => None,
    }
}

/// What the transformers reference runs: our device kind, dtype and shapes.
struct ReferenceShape<'a> {
    device: &'static str,
    dtype: &'static str,
    prompt_tokens: usize,
    new_tokens: usize,
    batch_sizes: &'a [usize],
}

/// Runs the transformers reference on the same shapes and reads its JSON.
fn run_transformers(
    reference: &TransformersBench,
    shape: &ReferenceShape<'_>,
) -> Result<TransformersReport> {
    let batches: Vec<String> = shape.batch_sizes.iter().map(ToString::to_string).collect();
    let json = std::env::temp_dir().join(format!("capture-bench-{}.json", std::process::id()));
    let status = Command::new(&reference.python)
        .arg(&reference.script)
        .args(["--prompt-tokens", &shape.prompt_tokens.to_string()])
        .args(["--new-tokens", &shape.new_tokens.to_string()])
        .args(["--device", shape.device, "--dtype", shape.dtype])
        .args(["--threads", &reference.threads.to_string()])
        .args(["--batch-sizes", &batches.join(",")])
        .arg("--json")
        .arg(&json)
        .status()
        .map_err(|e| {
            CaptureError::InvalidArgument(format!(
                "cannot run {} {}: {e} (set --python or CAPTURE_PYTHON to a Python with torch and transformers)",
                reference.python.display(),
                reference.script.display()
            ))
        })?;
    if !status.success() {
        return Err(CaptureError::InvalidArgument(format!(
            "the transformers reference failed ({status}): see its output above"
        )));
    }
    let text = std::fs::read_to_string(&json).map_err(|source| CaptureError::Io {
        path: json.clone(),
        source,
    })?;
    let _ = std::fs::remove_file(&json);
    serde_json::from_str(&text).map_err(|e| {
        CaptureError::InvalidArgument(format!(
            "unreadable transformers results {}: {e}",
            json.display()
        ))
    })
}

impl BenchReport {
    /// A markdown table of the results; with the transformers reference,
    /// its rows follow ours and every row gets its speed relative to
    /// transformers with a KV cache and capture hooks.
    pub fn to_markdown(&self) -> String {
        let gib = |b: Option<u64>| {
            b.map_or("—".to_string(), |b| {
                format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
            })
        };
        // The fair competitor of a row: transformers with a KV cache and
        // hooks at the same batch size.
        let fair = |batch: usize| {
            self.transformers.as_ref().and_then(|t| {
                t.rows
                    .iter()
                    .find(|r| {
                        r.batch == batch
                            && r.workload.contains("hooks")
                            && !r.workload.contains("recompute")
                    })
                    .map(|r| r.seconds_per_token)
            })
        };
        let versus = |batch: usize, seconds: f64| {
            fair(batch).map_or("—".to_string(), |f| format!("{:.2}x", f / seconds))
        };
        let mut out = format!(
            "device {}, compute {}, weights {}, {} threads, {}-token prompt, {} new tokens, {:.1} us per small operation\n\n\
             | workload | batch | s / generated token | captured tokens / s | peak memory | overhead vs plain | assembly + encode per prompt (s) | speed vs transformers KV cache + hooks |\n\
             |---|---|---|---|---|---|---|---|\n",
            self.device,
            self.compute_dtype,
            self.weight_dtype,
            self.threads,
            self.prompt_tokens,
            self.new_tokens,
            self.small_operation_seconds * 1e6
        );
        for row in &self.rows {
            let rate = if row.captured_tokens_per_second > 0.0 {
                format!("{:.1}", row.captured_tokens_per_second)
            } else {
                "—".into()
            };
            out.push_str(&format!(
                "| capture: {} | {} | {} | {rate} | {} | {:+.1}% | {:.3} | {} |\n",
                row.workload,
                row.batch,
                seconds(row.seconds_per_token),
                match row.peak_device_bytes {
                    Some(device) => format!(
                        "{} host, {} device",
                        gib(row.peak_memory_bytes),
                        gib(Some(device))
                    ),
                    None => gib(row.peak_memory_bytes),
                },
                row.overhead_vs_plain * 100.0,
                row.encode_seconds,
                versus(row.batch, row.seconds_per_token),
            ));
        }
        if let Some(t) = &self.transformers {
            let tokens = (self.prompt_tokens + self.new_tokens) as f64;
            for row in &t.rows {
                // The host's peak is the whole script's; the device's is the
                // workload's where the script reports it.
                let memory = match (row.peak_device_gib, t.peak_device_gib) {
                    (Some(device), _) => format!(
                        "{:.1} GiB host (whole script), {device:.1} GiB device",
                        t.peak_rss_gib
                    ),
                    (None, Some(device)) => format!(
                        "{:.1} GiB host, {device:.1} GiB device (whole script)",
                        t.peak_rss_gib
                    ),
                    (None, None) => format!("{:.1} GiB (whole script)", t.peak_rss_gib),
                };
                // Tokens per second of a batch: batch x tokens over the
                // batch's time (seconds per token x generated tokens).
                let rate = if row.workload.contains("hooks") {
                    format!(
                        "{:.1}",
                        row.batch as f64 * tokens
                            / (row.seconds_per_token * (row.batch * self.new_tokens) as f64)
                    )
                } else {
                    "—".into()
                };
                out.push_str(&format!(
                    "| {} | {} | {} | {rate} | {memory} | — | — | {} |\n",
                    row.workload,
                    row.batch,
                    seconds(row.seconds_per_token),
                    versus(row.batch, row.seconds_per_token),
                ));
            }
            out.push_str(&format!(
                "\ntransformers {} on torch {}\n",
                if t.transformers.is_empty() {
                    "?"
                } else {
                    &t.transformers
                },
                t.torch
            ));
        }
        out
    }
}

/// Seconds with three significant digits (at least three decimals), so
/// that GPU steps of a few milliseconds keep their precision.
fn seconds(value: f64) -> String {
    let decimals = if value > 0.0 && value < 1.0 {
        (2 - value.log10().floor() as i32).max(3) as usize
    } else {
        3
    };
    format!("{value:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_keep_three_significant_digits() {
        assert_eq!(seconds(0.503), "0.503");
        assert_eq!(seconds(2.5), "2.500");
        assert_eq!(seconds(0.00431), "0.00431");
        assert_eq!(seconds(0.0123), "0.0123");
    }

    #[test]
    fn the_table_puts_both_engines_side_by_side() {
        let row = |workload: &str, batch, seconds| BenchRow {
            workload: workload.into(),
            batch,
            seconds_per_token: seconds,
            captured_tokens_per_second: 0.0,
            encode_seconds: 0.01,
            overhead_vs_plain: 0.0,
            peak_memory_bytes: Some(3 << 30),
            peak_device_bytes: None,
        };
        let mut report = BenchReport {
            device: "cpu".into(),
            compute_dtype: "f32".into(),
            weight_dtype: "bf16".into(),
            threads: 2,
            prompt_tokens: 30,
            new_tokens: 20,
            small_operation_seconds: 4.5e-6,
            rows: vec![
                row("plain generation (KV cache)", 1, 1.0),
                BenchRow {
                    captured_tokens_per_second: 50.0,
                    ..row("residual capture, all layers", 1, 1.25)
                },
                row("residual capture, all layers, batch of 4", 4, 0.25),
            ],
            transformers: Some(TransformersReport {
                rows: vec![
                    TransformersRow {
                        workload: "transformers: KV cache + capture hooks".into(),
                        batch: 1,
                        seconds_per_token: 2.5,
                        peak_device_gib: None,
                    },
                    TransformersRow {
                        workload: "transformers: full recompute + hooks (original tool)".into(),
                        batch: 1,
                        seconds_per_token: 7.5,
                        peak_device_gib: None,
                    },
                    TransformersRow {
                        workload: "transformers: KV cache + capture hooks, batch of 4".into(),
                        batch: 4,
                        seconds_per_token: 0.5,
                        peak_device_gib: None,
                    },
                ],
                peak_rss_gib: 13.1,
                peak_device_gib: None,
                torch: "2.9".into(),
                transformers: "5.0".into(),
            }),
        };
        let table = report.to_markdown();
        assert!(
            table.starts_with("device cpu, compute f32, weights bf16, 2 threads, 30-token prompt, 20 new tokens, 4.5 us per small operation\n"),
            "{table}"
        );
        assert!(table.contains("| capture: residual capture, all layers | 1 | 1.250 | 50.0 | 3.0 GiB | +0.0% | 0.010 | 2.00x |"), "{table}");
        assert!(table.contains("| transformers: KV cache + capture hooks | 1 | 2.500 | 1.0 | 13.1 GiB (whole script) | — | — | 1.00x |"), "{table}");
        assert!(
            table.contains("full recompute + hooks (original tool) | 1 | 7.500 | 0.3 |"),
            "{table}"
        );
        assert!(table.contains("| 0.33x |"), "{table}");
        // batched rows compare with transformers at the same batch size
        assert!(
            table.contains("batch of 4 | 4 | 0.250 | — | 3.0 GiB | +0.0% | 0.010 | 2.00x |"),
            "{table}"
        );
        assert!(
            table.contains("hooks, batch of 4 | 4 | 0.500 | 5.0 |"),
            "{table}"
        );
        // On a GPU: each row's device peak beside the host's; the
        // reference's per workload when it reports them, else its whole
        // script's.
        report.rows[1].peak_device_bytes = Some(6 << 29);
        let reference = report.transformers.as_mut().expect("set above");
        reference.peak_device_gib = Some(13.1);
        reference.rows[0].peak_device_gib = Some(6.3);
        let table = report.to_markdown();
        assert!(
            table.contains("| 1.250 | 50.0 | 3.0 GiB host, 3.0 GiB device | +0.0% |"),
            "{table}"
        );
        assert!(
            table.contains(
                "| capture: plain generation (KV cache) | 1 | 1.000 | — | 3.0 GiB | +0.0% |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| 2.500 | 1.0 | 13.1 GiB host (whole script), 6.3 GiB device | — |"),
            "{table}"
        );
        assert!(
            table.contains("| 7.500 | 0.3 | 13.1 GiB host, 13.1 GiB device (whole script) | — |"),
            "{table}"
        );
        report.transformers = None;
        assert!(report.to_markdown().contains("| 0.010 | — |"));
    }
}
