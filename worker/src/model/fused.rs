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
use rayon::prelude::*;

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

/// Rows above which the CPU implementations work on rows in parallel.
const PARALLEL_ROWS: usize = 32;

/// `row(i, input row i, output row i)` for every row of `width` elements,
/// in parallel when there are many rows (as candle's CPU operations do).
pub fn for_each_row<A: Sync, B: Send>(
    input: &[A],
    output: &mut [B],
    width: usize,
    row: impl Fn(usize, &[A], &mut [B]) + Sync + Send,
) {
    if width == 0 {
        return;
    }
    let row = |(i, (a, b)): (usize, (&[A], &mut [B]))| row(i, a, b);
    if input.len() / width <= PARALLEL_ROWS {
        input
            .chunks(width)
            .zip(output.chunks_mut(width))
            .enumerate()
            .for_each(row);
    } else {
        input
            .par_chunks(width)
            .zip(output.par_chunks_mut(width))
            .enumerate()
            .for_each(row);
    }
}
