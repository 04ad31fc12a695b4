//! `--batch-size`: how many prompts share a forward pass, given or chosen
//! from the memory available.
//!
//! `auto` estimates what one more sequence costs at the longest prompt and
//! response of the run (its KV cache and one pass's activations on the
//! device; its trace on the host, twice: the next batch's trace grows while
//! the previous one is written) and what does not grow with the batch (the
//! largest artifact, once per encoder: `worker capture` assembles and
//! encodes one at a time, `worker run` one per job it holds, its
//! tensors' buffers becoming the file's parts), and fits as many sequences
//! as half of the free memory allows on each side, between 1 and
//! [`AUTO_MAX`].

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::capture::CaptureMode;
use crate::capture::artifact::artifact_data_bytes;
use crate::model::Gemma2Config;
use crate::pt::StoreDtype;

/// The most prompts `auto` puts in one batch. On the CPU a decode step
/// stops being bound by reading the weights within a few rows (at 2 cores,
/// about 150 GFLOP/s against 25 GB/s), so larger batches add memory without
/// adding speed. On a GPU that bound holds much longer (an H200 computes
/// about 200 bf16 rows in the time it reads the weights), but when last
/// measured there (docs/benchmarks.md, 2026-11-27) batches of 64 and 128
/// were slower per token than 16: host work per sequence and step, since
/// cut and not yet measured on a GPU. Until a GPU run says otherwise, the
/// same bound.
pub const AUTO_MAX: usize = 32;

/// `--batch-size N` or `--batch-size auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchSize {
    #[default]
    Auto,
    Fixed(usize),
}

impl FromStr for BatchSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(BatchSize::Auto);
        }
        match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(BatchSize::Fixed(n)),
            _ => Err(format!(
                "invalid batch size \"{s}\": use a number of prompts (1 or more) or auto"
            )),
        }
    }
}

impl fmt::Display for BatchSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSize::Auto => f.write_str("auto"),
            BatchSize::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// The longest prompt and the longest response of a run, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLengths {
    pub prompt: usize,
    pub response: usize,
}

impl RunLengths {
    /// The most positions a pass holds.
    pub fn context(&self) -> usize {
        self.prompt + self.response
    }
}

/// Bytes one sequence costs, on the device and on the host, when captured
/// in `mode`, and host bytes that do not grow with the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceCost {
    pub device: u64,
    pub host: u64,
    /// The largest artifacts (stored in f32, the widest store dtype), held
    /// while they are encoded and written or uploaded: one per encoder
    /// ([`SequenceCost::encoded_at_once`]).
    pub artifact: u64,
}

impl SequenceCost {
    /// The cost when `encoders` artifacts can be assembled at once (each
    /// upload task of `worker run` encodes its job's artifacts in turn).
    pub fn encoded_at_once(self, encoders: usize) -> Self {
        Self {
            artifact: self.artifact * encoders.max(1) as u64,
            ..self
        }
    }
}

/// The memory estimate behind `auto` (see the module docs).
pub fn sequence_cost(
    cfg: &Gemma2Config,
    mode: &CaptureMode,
    lengths: RunLengths,
    dtype: DType,
) -> SequenceCost {
    let context = lengths.context();
    let (layers, hidden, inter) = (
        cfg.num_hidden_layers as u64,
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
    );
    let heads = cfg.num_attention_heads as u64;
    let ctx = context as u64;
    let width = dtype.size_in_bytes() as u64;
    let kv = layers * 2 * (cfg.kv_dim() as u64) * ctx * width;
    // The prompt pass of one layer: q/k/v, the MLP's three intermediate
    // tensors, a few hidden-sized temporaries, and f32 scores and
    // probabilities (about three copies) of every head.
    let pass_layer =
        ctx * (cfg.q_dim() as u64 + 2 * cfg.kv_dim() as u64 + 3 * inter + 6 * hidden) * width
            + 3 * heads * ctx * ctx * 4;
    // Per position of every traced layer, f32 on the host; attention rows
    // hold the whole context (a triangle, counted as a square).
    let (traced_layers, per_position, attention_heads) = match mode {
        CaptureMode::Residual => (layers, 3 * hidden, 1),
        CaptureMode::Internals { layers: l } => (
            l.len() as u64,
            cfg.q_dim() as u64 + 2 * cfg.kv_dim() as u64 + 3 * inter + 3 * hidden,
            heads,
        ),
    };
    let trace = traced_layers * (ctx * per_position + attention_heads * ctx * ctx) * 4;
    // A pass's records stay on the device until copied off.
    let records = traced_layers * ctx * per_position * width;
    SequenceCost {
        device: kv + pass_layer + records,
        // The trace, written, and the next batch's, growing meanwhile.
        host: 2 * trace,
        artifact: artifact_data_bytes(cfg, mode, lengths.prompt, lengths.response, StoreDtype::F32),
    }
}

/// Free memory in bytes on `device` (`MemAvailable` for the CPU; for a GPU
/// the CUDA driver's free memory plus what this process's memory pool holds
/// unused, which the driver counts as taken: earlier batches' buffers stay
/// pooled, see `capture_kernels::device`), if it can be read.
pub fn free_device_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => host_available_memory(),
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let (free, _) = cuda.cuda_stream().context().mem_get_info().ok()?;
            let pooled = capture_kernels::device::pool_memory(cuda)
                .ok()
                .flatten()
                .map_or(0, |pool| pool.idle());
            Some(free as u64 + pooled)
        }
        _ => None,
    }
}

/// `MemAvailable` from `/proc/meminfo`.
pub fn host_available_memory() -> Option<u64> {
    proc_kib("/proc/meminfo", "MemAvailable:")
}

/// The `{key} N kB` line of a `/proc` file, in bytes.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let kib = text.lines().find_map(|line| line.strip_prefix(key))?;
    kib.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

/// The batch size `auto` picks for sequences costing `cost`, given free
/// device and host memory (`None`: unknown, which allows [`AUTO_MAX`] on that
/// side): as many as half of each side's free memory holds, on the host
/// after the artifact. On the CPU the device is the host: both costs count
/// against it.
pub fn auto_batch_size(
    cost: SequenceCost,
    on_cpu: bool,
    free_device: Option<u64>,
    free_host: Option<u64>,
) -> usize {
    let fits = |budget: Option<u64>, per: u64| budget.map_or(AUTO_MAX as u64, |b| b / per.max(1));
    let host_budget = free_host.map(|free| (free / 2).saturating_sub(cost.artifact));
    let n = if on_cpu {
        fits(host_budget, cost.device + cost.host)
    } else {
        fits(free_device.map(|free| free / 2), cost.device).min(fits(host_budget, cost.host))
    };
    (n as usize).clamp(1, AUTO_MAX)
}

impl BatchSize {
    /// The number of prompts per batch for a run on `device` in `mode`
    /// whose longest prompt and response are `lengths`, with `encoders`
    /// artifacts assembled at once; measures free memory for `auto`, so
    /// call it once the model is loaded.
    pub fn resolve(
        self,
        cfg: &Gemma2Config,
        mode: &CaptureMode,
        lengths: RunLengths,
        dtype: DType,
        device: &Device,
        encoders: usize,
    ) -> usize {
        match self {
            BatchSize::Fixed(n) => n,
            BatchSize::Auto => auto_batch_size(
                sequence_cost(cfg, mode, lengths, dtype).encoded_at_once(encoders),
                device.is_cpu(),
                free_device_memory(device),
                host_available_memory(),
            ),
        }
    }
}

/// Peak resident memory of this process (`VmHWM`), in bytes.
pub fn peak_resident_memory() -> Option<u64> {
    proc_kib("/proc/self/status", "VmHWM:")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemma_2b() -> Gemma2Config {
        Gemma2Config::gemma2_2b()
    }

    #[test]
    fn parses_numbers_and_auto() {
        assert_eq!("auto".parse::<BatchSize>().unwrap(), BatchSize::Auto);
        assert_eq!(" 8 ".parse::<BatchSize>().unwrap(), BatchSize::Fixed(8));
        for bad in ["0", "-1", "many", ""] {
            let err = bad.parse::<BatchSize>().unwrap_err();
            assert!(err.contains("number of prompts"), "{err}");
        }
        assert_eq!(BatchSize::Fixed(4).to_string(), "4");
    }

    fn lengths(prompt: usize, response: usize) -> RunLengths {
        RunLengths { prompt, response }
    }

    #[test]
    fn cost_grows_with_context_and_mode() {
        let cfg = gemma_2b();
        let residual = sequence_cost(&cfg, &CaptureMode::Residual, lengths(50, 50), DType::F32);
        let longer = sequence_cost(&cfg, &CaptureMode::Residual, lengths(100, 100), DType::F32);
        assert!(longer.device > residual.device && longer.host > 2 * residual.host);
        // KV cache of 100 positions: 26 layers x 2 x 1024 x 100 x 4 bytes
        assert!(residual.device > 26 * 2 * 1024 * 100 * 4);
        // residual trace, twice: 26 layers x 3 x 2304 floats per position
        assert!(residual.host >= 2 * 26 * 3 * 2304 * 100 * 4);
        let one_layer = sequence_cost(
            &cfg,
            &CaptureMode::Internals { layers: vec![16] },
            lengths(50, 50),
            DType::F32,
        );
        assert!(one_layer.host < residual.host);
        let bf16 = sequence_cost(&cfg, &CaptureMode::Residual, lengths(50, 50), DType::BF16);
        assert!(bf16.device < residual.device && bf16.host == residual.host);
    }

    /// The artifact's per-step attention matrices grow with the cube of the
    /// response: 500 generated tokens after a short prompt make a residual
    /// artifact of about 6.1 GB, far more than the trace.
    #[test]
    fn long_responses_cost_their_artifact() {
        let cfg = gemma_2b();
        let cost = sequence_cost(&cfg, &CaptureMode::Residual, lengths(50, 500), DType::BF16);
        let squares: u64 = (0..500u64).map(|i| (50 + i) * (50 + i)).sum::<u64>() + 50 * 50;
        let rows = 26 * 3 * 2304 * 550;
        assert_eq!(cost.artifact, (rows + 26 * squares) * 4);
        assert!(cost.artifact > 5_000_000_000 && cost.artifact > 5 * cost.host);
        // With 16 GB free on a GPU's host: (8 GB - the artifact) / trace.
        let n = auto_batch_size(cost, false, None, Some(16_000_000_000));
        assert_eq!(n as u64, (8_000_000_000 - cost.artifact) / cost.host);
        // Less free memory than the artifact: one at a time.
        assert_eq!(auto_batch_size(cost, false, None, Some(8_000_000_000)), 1);
        // A pull worker holding 4 jobs may encode 4 such artifacts at once:
        // 60 GB free leaves (30 GB - 4 artifacts) for traces, where one
        // encoder would leave room for more than 3 times as many.
        let four = cost.encoded_at_once(4);
        assert_eq!(four.artifact, 4 * cost.artifact);
        assert_eq!((four.device, four.host), (cost.device, cost.host));
        let n4 = auto_batch_size(four, false, None, Some(60_000_000_000));
        assert_eq!(n4 as u64, (30_000_000_000 - four.artifact) / cost.host);
        let n1 = auto_batch_size(cost, false, None, Some(60_000_000_000));
        assert!(n4 >= 2 && n1 > 3 * n4, "{n1} vs {n4}");
        assert_eq!(cost.encoded_at_once(0), cost);
    }

    #[test]
    fn auto_fits_half_of_the_free_memory() {
        let cost = SequenceCost {
            device: 100,
            host: 300,
            artifact: 0,
        };
        // CPU: both sides on the host, half of 8000 / 400 = 10
        assert_eq!(auto_batch_size(cost, true, Some(8000), Some(8000)), 10);
        // GPU: device allows 40, host 10
        assert_eq!(auto_batch_size(cost, false, Some(8000), Some(6000)), 10);
        assert_eq!(auto_batch_size(cost, false, Some(800), Some(60_000)), 4);
        // never below 1 or above the cap
        assert_eq!(auto_batch_size(cost, true, Some(10), Some(10)), 1);
        assert_eq!(auto_batch_size(cost, true, None, None), AUTO_MAX);
        assert_eq!(
            auto_batch_size(cost, false, Some(u64::MAX), Some(u64::MAX)),
            AUTO_MAX
        );
        // The artifact comes off the host's half first: (4000 - 1000) / 400
        let with_artifact = SequenceCost {
            artifact: 1000,
            ..cost
        };
        assert_eq!(
            auto_batch_size(with_artifact, true, Some(8000), Some(8000)),
            7
        );
        assert_eq!(
            auto_batch_size(with_artifact, false, Some(8000), Some(6000)),
            6
        );
    }

    #[test]
    fn this_machine_reports_its_memory() {
        assert!(host_available_memory().is_some_and(|m| m > 0));
        assert!(peak_resident_memory().is_some_and(|m| m > 0));
        let n = BatchSize::Auto.resolve(
            &gemma_2b(),
            &CaptureMode::Residual,
            lengths(40, 40),
            DType::F32,
            &Device::Cpu,
            1,
        );
        assert!((1..=AUTO_MAX).contains(&n));
        assert_eq!(
            BatchSize::Fixed(3).resolve(
                &gemma_2b(),
                &CaptureMode::Residual,
                lengths(40, 40),
                DType::F32,
                &Device::Cpu,
                8,
            ),
            3
        );
    }
}
