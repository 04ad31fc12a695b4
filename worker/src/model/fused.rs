//! What the worker's fused operations ([`super::norm`],
//! [`super::attention_softmax`], [`super::rotary`], [`super::gelu_mul`])
//! share: the switch back to candle's separate
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
    *UNFUSED.get_or_init(|| env_flag("CAPTURE_UNFUSED"))
}

/// Whether the environment variable `name` is set to something other than
/// empty or `0`.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
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
    for_each_row_of(input, width, output, width, row);
}

/// [`for_each_row`] with input rows of `in_width` and output rows of
/// `out_width` elements.
pub fn for_each_row_of<A: Sync, B: Send>(
    input: &[A],
    in_width: usize,
    output: &mut [B],
    out_width: usize,
    row: impl Fn(usize, &[A], &mut [B]) + Sync + Send,
) {
    if in_width == 0 || out_width == 0 {
        return;
    }
    let row = |(i, (a, b)): (usize, (&[A], &mut [B]))| row(i, a, b);
    if input.len() / in_width <= PARALLEL_ROWS {
        input
            .chunks(in_width)
            .zip(output.chunks_mut(out_width))
            .enumerate()
            .for_each(row);
    } else {
        input
            .par_chunks(in_width)
            .zip(output.par_chunks_mut(out_width))
            .enumerate()
            .for_each(row);
    }
}

#[cfg(test)]
pub mod tests {
    use candle_core::{DType, Tensor};

    use crate::model::matvec::tests::random as random_rows;

    /// Deterministic values in `[-scale, scale)` shaped `shape` (see
    /// `matvec::tests::random`).
    pub fn random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        let n = shape.iter().product();
        (random_rows((n, 1), seed) * scale)
            .unwrap()
            .reshape(shape)
            .unwrap()
    }

    /// Every element as f32, flattened.
    pub fn values(t: &Tensor) -> Vec<f32> {
        let t = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
        t.to_vec1::<f32>().unwrap()
    }

    /// An additive attention mask `[b, 1, t, ctx]` on the CPU: the last `t`
    /// of `ctx` positions as queries, each seeing itself and the `window - 1`
    /// keys before it, except batch item 1's first `padding` keys.
    pub fn window_mask(b: usize, t: usize, ctx: usize, window: usize, padding: usize) -> Tensor {
        let mut m = Vec::with_capacity(b * t * ctx);
        for i in 0..b {
            for q in 0..t {
                let pos = ctx - t + q;
                for k in 0..ctx {
                    let visible = k <= pos && pos - k < window && !(i == 1 && k < padding);
                    m.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        Tensor::from_vec(m, (b, 1, t, ctx), &candle_core::Device::Cpu).unwrap()
    }

    /// Every element's f32 bits, to compare tensors bit for bit.
    pub fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }
}
