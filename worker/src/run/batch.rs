//! `--batch-size`: how many prompts share a forward pass, given or chosen
//! from the memory available.
//!
//! `auto` estimates what one more sequence costs at the longest context of
//! the run (its KV cache and one pass's activations on the device; its trace,
//! assembled artifact and encoded bytes on the host, with the next batch's
//! trace growing while the previous one is written) and fits as many as half
//! of the free memory allows on each side, between 1 and [`AUTO_MAX`].

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::capture::CaptureMode;
use crate::model::Gemma2Config;

/// The most prompts `auto` puts in one batch: beyond it a decode step is no
/// longer bound by reading the weights on either device kind, so larger
/// batches add memory without adding speed.
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

/// Bytes one sequence of `context` positions costs, on the device and on
/// the host, when captured in `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceCost {
    pub device: u64,
    pub host: u64,
}

/// The memory estimate behind `auto` (see the module docs).
pub fn sequence_cost(
    cfg: &Gemma2Config,
    mode: &CaptureMode,
    context: usize,
    dtype: DType,
) -> SequenceCost {
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
        // Trace, its assembled artifact and its encoded bytes; the next
        // batch's trace grows while this one is written.
        host: 4 * trace,
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
/// side). On the CPU the device is the host: both costs count against it.
pub fn auto_batch_size(
    cost: SequenceCost,
    on_cpu: bool,
    free_device: Option<u64>,
    free_host: Option<u64>,
) -> usize {
    let fits = |budget: Option<u64>, per: u64| {
        budget.map_or(AUTO_MAX as u64, |free| (free / 2) / per.max(1))
    };
    let n = if on_cpu {
        fits(free_host, cost.device + cost.host)
    } else {
        fits(free_device, cost.device).min(fits(free_host, cost.host))
    };
    (n as usize).clamp(1, AUTO_MAX)
}

impl BatchSize {
    /// The number of prompts per batch for a run on `device` in `mode` whose
    /// longest pass holds `context` positions; measures free memory for
    /// `auto`, so call it once the model is loaded.
    pub fn resolve(
        self,
        cfg: &Gemma2Config,
        mode: &CaptureMode,
        context: usize,
        dtype: DType,
        device: &Device,
    ) -> usize {
        match self {
            BatchSize::Fixed(n) => n,
            BatchSize::Auto => auto_batch_size(
                sequence_cost(cfg, mode, context, dtype),
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

    #[test]
    fn cost_grows_with_context_and_mode() {
        let cfg = gemma_2b();
        let residual = sequence_cost(&cfg, &CaptureMode::Residual, 100, DType::F32);
        let longer = sequence_cost(&cfg, &CaptureMode::Residual, 200, DType::F32);
        assert!(longer.device > residual.device && longer.host > 2 * residual.host);
        // KV cache of 100 positions: 26 layers x 2 x 1024 x 100 x 4 bytes
        assert!(residual.device > 26 * 2 * 1024 * 100 * 4);
        // residual trace: 26 layers x 3 x 2304 floats per position
        assert!(residual.host >= 4 * 26 * 3 * 2304 * 100 * 4);
        let one_layer = sequence_cost(
            &cfg,
            &CaptureMode::Internals { layers: vec![16] },
            100,
            DType::F32,
        );
        assert!(one_layer.host < residual.host);
        let bf16 = sequence_cost(&cfg, &CaptureMode::Residual, 100, DType::BF16);
        assert!(bf16.device < residual.device && bf16.host == residual.host);
    }

    #[test]
    fn auto_fits_half_of_the_free_memory() {
        let cost = SequenceCost {
            device: 100,
            host: 300,
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
    }

    #[test]
    fn this_machine_reports_its_memory() {
        assert!(host_available_memory().is_some_and(|m| m > 0));
        assert!(peak_resident_memory().is_some_and(|m| m > 0));
        let n = BatchSize::Auto.resolve(
            &gemma_2b(),
            &CaptureMode::Residual,
            80,
            DType::F32,
            &Device::Cpu,
        );
        assert!((1..=AUTO_MAX).contains(&n));
        assert_eq!(
            BatchSize::Fixed(3).resolve(
                &gemma_2b(),
                &CaptureMode::Residual,
                80,
                DType::F32,
                &Device::Cpu
            ),
            3
        );
    }
}
