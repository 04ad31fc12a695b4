//! The worker's own CUDA kernels and their launch, for operations that
//! candle computes as several kernels where one does (a decode step at
//! batch 1 on a GPU waits mostly for kernel launches; see the worker's
//! docs/benchmarks.md):
//!
//! - [`rms_norm`]: Gemma-2's RMS norm in f32 arithmetic for any float
//!   input, optionally followed by the residual addition, and
//!   [`rms_norm_add_norm`]: two norms with the addition between them
//!   (`rms_norm.cu`);
//! - [`attention_softmax`]: the scaling, soft-capping, masking and softmax
//!   of attention scores (`attention_softmax.cu`);
//! - [`decode_attention`]: a decode step's whole attention over the KV
//!   cache: the query-key products, the softmax above and the product with
//!   the values, one block per query row, or for long contexts split over
//!   the keys in three kernels (`decode_attention.cu`);
//! - [`rotary_queries`], [`rotary_keys_values`]: the rotary embedding read
//!   straight from the stacked q/k/v projection, the keys (with the values)
//!   written into the KV cache in place (`rotary.cu`);
//! - [`gelu_mul`]: the MLP's `gelu(gate) * up` (`gelu_mul.cu`);
//! - [`matvec`]: a decode step's projections at small batches, the weights
//!   read once in 16-byte vectors (`matvec.cu`), where cuBLAS's general
//!   product is tiled for many rows;
//! - [`gather`]: many tensors' elements into one buffer (`gather.cu`), what
//!   `Tensor::cat` does with a kernel per tensor;
//! - [`logit_softcap`]: the final logits' cast to f32 and soft-cap, and
//!   [`argmax_rows`]: each row's greedy choice (`head.cu`).
//!
//! [`device::prepare`] sets up a device for the many small allocations of
//! a decode step (freed memory stays in the pool between steps).
//!
//! Each function checks its inputs' shapes and contiguity against what its
//! kernel reads and writes, so it is safe to call. The CPU references, and
//! the candle operations they replace, are in the worker (`model::norm`,
//! `model::attention_softmax`, `model::decode_attention`, `model::rotary`,
//! `model::gelu_mul`, `model::softcap`, `capture::decode::argmax_rows`);
//! `capture::gpu_tests` compares the two on a GPU, and
//! `tests/host_emulation.cu` runs the kernels' bodies on the host
//! (`scripts/check_kernels.sh`, in CI). Without the `cuda` feature this
//! crate holds only [`QkvHeads`] and the decode attention's limits (the
//! kernels are compiled to PTX by `build.rs`, which needs nvcc).

#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
mod launch;

/// The head counts of a stacked q/k/v projection `[b, t, heads + 2
/// kv_heads, head_dim]`: query heads, then key heads, then value heads
/// (the rotary kernels' layout; the worker's CPU implementation uses it
/// too, so it exists without the `cuda` feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvHeads {
    pub heads: usize,
    pub kv_heads: usize,
}

impl QkvHeads {
    /// Heads in all: `heads + 2 kv_heads`.
    pub fn total(self) -> usize {
        self.heads + 2 * self.kv_heads
    }
}

/// Threads per block of the decode attention kernel (one block per query
/// row).
pub const DECODE_ATTENTION_BLOCK: usize = 512;

/// Threads per block of the split decode attention's kernels.
pub const DECODE_SPLIT_BLOCK: usize = 256;

/// Keys per part of a split decode attention.
pub const DECODE_SPLIT_CHUNK: usize = 64;

/// Keys past which the decode attention is split over the keys unless told
/// otherwise: with one block per query row, a row's keys and values (256
/// KiB per 256 keys of gemma-2-2b's bf16 heads) are read by one
/// multiprocessor, and at batch 1 that is 8 of the GPU's; split, every
/// part of 64 keys is a block of its own, for two more launches.
pub const DECODE_SPLIT_FROM: usize = 256;

/// The most activation rows [`matvec`] takes (a decode step's batch). Each
/// 16-byte weight vector costs a lane its widening and 8 multiply-adds per
/// row: at 4 rows, about half of what a multiprocessor computes while its
/// share of the memory bandwidth (36 GB/s on an H200) delivers the vectors;
/// past that the arithmetic would catch up with the reading, and cuBLAS's
/// tiled product (tensor cores) is the better kernel. (`MATVEC_MAX_ROWS`
/// of `matvec.cu`.)
pub const MATVEC_MAX_ROWS: usize = 4;

/// Threads per block of the matvec kernel (its `__launch_bounds__`).
pub const MATVEC_BLOCK: usize = 128;

/// Output columns (weight rows) per warp of the matvec kernel
/// (`MATVEC_OUT_PER_WARP` of `matvec.cu`).
pub const MATVEC_OUT_PER_WARP: usize = 2;

/// Whether [`matvec`] takes `rows` activation rows of `in_dim` elements of
/// `element_bytes` each: 1 to [`MATVEC_MAX_ROWS`] rows, rows of whole
/// 16-byte vectors (the kernel's loads), sizes an `int` holds. Its inputs
/// must also start on 16-byte boundaries, as fresh storages do.
pub fn matvec_fits(rows: usize, in_dim: usize, element_bytes: usize) -> bool {
    (1..=MATVEC_MAX_ROWS).contains(&rows)
        && in_dim > 0
        && element_bytes > 0
        && (in_dim * element_bytes).is_multiple_of(16)
        && i32::try_from(in_dim).is_ok()
}

/// Dynamic shared memory a block of the decode attention kernel may use:
/// the 48 KiB every CUDA device gives a block without opting in to more,
/// less 256 bytes for the static shared memory of its two reductions (the
/// maximum's and the sum's, 128 bytes each).
const SHARED_BYTES: usize = 48 * 1024 - 256;

/// The decode attention kernel's shared memory per block, for `ctx` keys of
/// `d` elements, one block per query row: the row's scores, its query and
/// the value sums' parts, in f32.
pub fn decode_attention_shared_bytes(ctx: usize, d: usize) -> usize {
    (ctx + d + DECODE_ATTENTION_BLOCK.max(d)) * 4
}

/// The split decode attention's shared memory per block (its values
/// kernel: a part's probabilities and the value sums' parts; the scores
/// kernel keeps the query, `d` floats).
pub fn decode_split_shared_bytes(d: usize) -> usize {
    (DECODE_SPLIT_CHUNK + DECODE_SPLIT_BLOCK.max(d)) * 4
}

/// How many parts a decode attention over `ctx` keys is split into, or
/// `None` for one block per query row: split past `split_from` keys (the
/// worker's default is [`DECODE_SPLIT_FROM`]).
pub fn decode_attention_parts(ctx: usize, split_from: usize) -> Option<usize> {
    (ctx > split_from).then(|| ctx.div_ceil(DECODE_SPLIT_CHUNK))
}

/// The most shared memory a block of the decode attention over `ctx` keys
/// of `d` elements uses, split past `split_from` keys.
pub fn decode_attention_shared_need(ctx: usize, d: usize, split_from: usize) -> usize {
    match decode_attention_parts(ctx, split_from) {
        Some(_) => decode_split_shared_bytes(d),
        None => decode_attention_shared_bytes(ctx, d),
    }
}

/// Whether the decode attention takes `ctx` keys of `d` elements, split
/// past `split_from` keys (one block per row holds up to 11,456 of
/// gemma-2-2b's keys in shared memory; split, any number).
pub fn decode_attention_fits(ctx: usize, d: usize, split_from: usize) -> bool {
    decode_attention_shared_need(ctx, d, split_from) <= SHARED_BYTES
}

#[cfg(feature = "cuda")]
pub use launch::{
    argmax_rows, attention_softmax, decode_attention, gather, gelu_mul, logit_softcap, matvec,
    rms_norm, rms_norm_add_norm, rotary_keys_values, rotary_queries,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_contexts_split_into_parts_of_a_chunk() {
        assert_eq!(decode_attention_parts(256, DECODE_SPLIT_FROM), None);
        assert_eq!(decode_attention_parts(257, DECODE_SPLIT_FROM), Some(5));
        assert_eq!(decode_attention_parts(600, DECODE_SPLIT_FROM), Some(10));
        assert_eq!(decode_attention_parts(8192, DECODE_SPLIT_FROM), Some(128));
        assert_eq!(decode_attention_parts(8192, usize::MAX), None);
        assert_eq!(decode_attention_parts(1, 0), Some(1));
    }

    #[test]
    fn matvec_takes_a_decode_step_s_rows_of_whole_vectors() {
        // gemma-2-2b's projection inputs in bf16 and f32, batches 1 to 4.
        for in_dim in [2304, 2048, 9216] {
            for bytes in [2, 4] {
                assert!(matvec_fits(1, in_dim, bytes));
                assert!(matvec_fits(MATVEC_MAX_ROWS, in_dim, bytes));
                assert!(!matvec_fits(MATVEC_MAX_ROWS + 1, in_dim, bytes));
            }
        }
        assert!(!matvec_fits(0, 2304, 2));
        assert!(!matvec_fits(1, 0, 2));
        // Rows of a part of a vector.
        assert!(matvec_fits(1, 8, 2));
        assert!(!matvec_fits(1, 12, 2));
        assert!(!matvec_fits(1, 6, 4));
        assert!(matvec_fits(1, 4, 4));
        assert!(!matvec_fits(1, 1 << 31, 2));
    }

    #[test]
    fn matvec_constants_are_the_kernel_s() {
        // The launch sizes its grid and checks its rows with these; the
        // kernel's arrays and launch bounds are sized by its own copies.
        let source = include_str!("matvec.cu");
        for (name, value) in [
            ("MATVEC_MAX_ROWS", MATVEC_MAX_ROWS),
            ("MATVEC_OUT_PER_WARP", MATVEC_OUT_PER_WARP),
        ] {
            assert!(
                source.contains(&format!("#define {name} {value}\n")),
                "{name} is not {value} in matvec.cu"
            );
        }
        assert!(source.contains(&format!("__launch_bounds__({MATVEC_BLOCK})")));
    }

    #[test]
    fn one_block_per_row_holds_its_scores_and_a_split_any_number() {
        // gemma-2-2b's heads: 11,456 keys in one block's 48 KiB.
        assert!(decode_attention_fits(11_456, 256, usize::MAX));
        assert!(!decode_attention_fits(11_457, 256, usize::MAX));
        assert!(decode_attention_fits(11_457, 256, DECODE_SPLIT_FROM));
        assert!(decode_attention_fits(1 << 20, 256, DECODE_SPLIT_FROM));
        assert!(decode_attention_fits(100, 256, DECODE_SPLIT_FROM));
        // A head too wide for a split part's shared memory.
        assert!(!decode_attention_fits(1000, 20_000, 0));
    }
}
