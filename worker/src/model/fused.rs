//! What the worker's fused operations ([`super::norm`],
//! [`super::attention_softmax`]) share: the switch back to candle's separate
//! operations and contiguous input slices. Their CUDA kernels are in the
//! `capture-kernels` crate, the one crate of the workspace that may use
//! `unsafe` (a kernel launch is an FFI call).
//!
//! `CAPTURE_UNFUSED=1` in the environment makes the model use candle's
//! separate operations instead of the fused ones, to compare the two on a
//! GPU (`scripts/gpu_check.sh` benchmarks both) or to rule the kernels out.

use std::sync::OnceLock;

use candle_core::Layout;

/// Whether `CAPTURE_UNFUSED` asks for candle's separate operations (read
/// once per process).
pub fn unfused() -> bool {
    static UNFUSED: OnceLock<bool> = OnceLock::new();
    *UNFUSED
        .get_or_init(|| std::env::var("CAPTURE_UNFUSED").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// The elements of a contiguous layout; `what` names the operation.
pub fn contiguous<'a, T>(
    data: &'a [T],
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: the inputs must be contiguous"),
    }
}

/// Rows at which the CPU implementations work on rows in parallel.
pub const PARALLEL_ROWS: usize = 32;
