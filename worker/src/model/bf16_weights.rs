//! f32 activations times bf16-stored weights on the CPU, exactly.
//!
//! Gemma-2 checkpoints are released in bf16. Widening a bf16 value to f32 is
//! exact (the bf16 bits are the high half of the f32 bits), so products with
//! weights kept in bf16 and widened on the fly equal products with the
//! weights converted to f32 up front, up to summation order: the f32 compute
//! path stays f32, while every decode step reads half the bytes (5.2 GB
//! instead of 10.4 GB for gemma-2-2b) and the model needs half the memory.
//!
//! The kernel reads each weight row as `u32` pairs of bf16 values: the low
//! half is the even element, the high half the odd one, so `pair << 16` and
//! `pair & 0xFFFF0000` are the two f32 values without any shuffle. The
//! activations are split once into their even and odd elements to match.
//! Rows are processed four at a time against up to four activation vectors
//! (16 accumulators in registers), the rows split across the thread pool,
//! 64 vectors at a time. From [`bf16_blocks::MIN_VECTORS`] vectors on (a
//! long prompt's pass, or a batch's) [`bf16_blocks`] takes the product
//! instead: this kernel stays near 40% of the machine's multiply-add rate
//! there (`bf16_blocks_speed`).
//!
//! Measured on the 2-core development machine (`bf16_rows_speed` below,
//! best of 20 calls): a 256000x2304 matrix (the embedding, 1.2 GB, past any
//! cache) times one vector streams at 21 GB/s, the machine's memory
//! bandwidth, as the f32 [`RowDot`] does (20 GB/s) with twice the bytes. At 9216x2304
//! against candle's f32 GEMM: 16 vectors 3.5 ms against 3.9, 64 vectors 13.8
//! against 13.2, 480 vectors (the prompt pass of 16 30-token prompts) 127
//! against 101 ms. Tried and dropped: widening row blocks to f32 for
//! candle's GEMM (slower up to 64 vectors, and at 480 too: page faults of
//! fresh buffers, small GEMMs), tiles of 2 rows by 8 vectors, vector groups
//! outside the row loop, 8 rows or 512-row tasks for one vector (no gain).
//!
//! [`RowDot`]: super::matvec::RowDot

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::bf16_blocks;
use super::matvec::contiguous;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Most activation rows multiplied in one pass over the weights: 64 rows of
/// 2304 f32 values (590 KB) stay in the L2 cache.
const KERNEL_MAX_ROWS: usize = 64;

/// Whether `x @ w^T` is f32 activations on the CPU against bf16 weights.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    // The pair trick reads the first element of a pair from the low half.
    cfg!(target_endian = "little")
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::BF16
}

/// `x @ w^T` for f32 `x` `[n, in]` and bf16 `w` `[out, in]`, in f32.
pub fn project(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &Bf16Rows)
}

/// The custom op behind [`project`]: a prompt pass's many vectors through
/// [`bf16_blocks`], a decode step's few through this module's kernel.
#[derive(Debug, Clone, Copy)]
pub struct Bf16Rows;

impl CustomOp2 for Bf16Rows {
    fn name(&self) -> &'static str {
        "bf16-rows"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = x_layout.shape().dims2()?;
        let (out, k_w) = w_layout.shape().dims2()?;
        if k != k_w {
            candle_core::bail!("bf16 row products: x has {k} columns, the weight {k_w}");
        }
        let x = contiguous::<f32>(x, x_layout)?;
        let w = contiguous::<bf16>(w, w_layout)?;
        let y = if n >= bf16_blocks::MIN_VECTORS {
            bf16_blocks::rows_times(x, n, w, out, k)
        } else {
            in_vector_blocks(x, n, w, out, k)
        };
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }
}

/// Activations split into even and odd elements, matching the weights'
/// `u32` pairs; an odd last element is kept apart.
struct SplitVectors {
    even: Vec<Vec<f32>>,
    odd: Vec<Vec<f32>>,
    last: Vec<Option<f32>>,
}

impl SplitVectors {
    fn new(x: &[f32], n: usize, k: usize) -> Self {
        let rows = || x.chunks_exact(k).take(n);
        Self {
            even: rows()
                .map(|r| r.iter().step_by(2).copied().collect())
                .collect(),
            odd: rows()
                .map(|r| r.iter().skip(1).step_by(2).copied().collect())
                .collect(),
            last: rows().map(|r| (k % 2 == 1).then(|| r[k - 1])).collect(),
        }
    }
}

/// [`rows_times`] for any number of vectors, [`KERNEL_MAX_ROWS`] at a time
/// (small enough to stay in the L2 cache while the weights stream past).
/// `project` gives it fewer than [`bf16_blocks::MIN_VECTORS`]; the blocked
/// product's tests and speed probe compare against it with more.
pub(super) fn in_vector_blocks(x: &[f32], n: usize, w: &[bf16], out: usize, k: usize) -> Vec<f32> {
    if n <= KERNEL_MAX_ROWS {
        return rows_times(x, n, w, out, k);
    }
    let mut y = Vec::with_capacity(n * out);
    for first in (0..n).step_by(KERNEL_MAX_ROWS) {
        let count = KERNEL_MAX_ROWS.min(n - first);
        y.extend(rows_times(&x[first * k..], count, w, out, k));
    }
    y
}

/// `y[j][o] = sum_i x[j][i] * w[o][i]`, returned row-major `[n, out]`.
fn rows_times(x: &[f32], n: usize, w: &[bf16], out: usize, k: usize) -> Vec<f32> {
    if n == 0 || out == 0 || k == 0 {
        return vec![0f32; n * out];
    }
    let split = SplitVectors::new(x, n, k);
    // Results per weight row (`[out, n]`) so that tasks own contiguous blocks.
    let mut by_row = vec![0f32; out * n];
    by_row
        .par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each(|(block, dst)| {
            let first = block * ROWS_PER_TASK;
            let rows = &w[first * k..(first + dst.len() / n) * k];
            pulp::Arch::new().dispatch(Block {
                rows,
                k,
                split: &split,
                dst,
            });
        });
    if n == 1 {
        return by_row;
    }
    bf16_blocks::transpose(&by_row, out, n)
}

/// One task: a block of weight rows against every vector.
struct Block<'a> {
    rows: &'a [bf16],
    k: usize,
    split: &'a SplitVectors,
    dst: &'a mut [f32],
}

impl pulp::WithSimd for Block<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Self {
            rows,
            k,
            split,
            dst,
        } = self;
        let n = split.even.len();
        let row_count = rows.len() / k;
        let mut r = 0;
        while r < row_count {
            // Four rows at a time (four weight streams in flight, their
            // rows in the L1 cache for every vector group), one at the end.
            let four = row_count - r >= 4;
            let mut j = 0;
            while j < n {
                let at = Tile {
                    rows,
                    r,
                    k,
                    split,
                    j,
                    dst: &mut *dst,
                    n,
                };
                j += match (four, n - j >= 4) {
                    (true, true) => at.run::<S, 4, 4>(simd),
                    (true, false) => at.run::<S, 4, 1>(simd),
                    (false, true) => at.run::<S, 1, 4>(simd),
                    (false, false) => at.run::<S, 1, 1>(simd),
                };
            }
            r += if four { 4 } else { 1 };
        }
    }
}

/// Where a tile goes: weight rows from `r`, vectors from `j`.
struct Tile<'a, 'b> {
    rows: &'a [bf16],
    r: usize,
    k: usize,
    split: &'a SplitVectors,
    j: usize,
    dst: &'b mut [f32],
    n: usize,
}

impl Tile<'_, '_> {
    /// Computes an `R` by `V` tile into `dst`; returns `V`.
    #[inline(always)]
    fn run<S: pulp::Simd, const R: usize, const V: usize>(self, simd: S) -> usize {
        let Self {
            rows,
            r,
            k,
            split,
            j,
            dst,
            n,
        } = self;
        let sums = tile::<S, R, V>(simd, rows, r, k, split, j);
        for (i, row_sums) in sums.iter().enumerate() {
            dst[(r + i) * n + j..][..V].copy_from_slice(row_sums);
        }
        V
    }
}

/// The dot products of weight rows `r..r + R` with vectors `j..j + V`.
#[inline(always)]
fn tile<S: pulp::Simd, const R: usize, const V: usize>(
    simd: S,
    rows: &[bf16],
    r: usize,
    k: usize,
    split: &SplitVectors,
    j: usize,
) -> [[f32; V]; R] {
    let pairs = k / 2;
    let row = |i: usize| &rows[(r + i) * k..(r + i + 1) * k];
    // Rows whose pairs are not 4-byte aligned (never for even `k` and a
    // normal allocation) take the scalar path.
    let words: [Option<&[u32]>; R] =
        std::array::from_fn(|i| bytemuck::try_cast_slice(&row(i)[..pairs * 2]).ok());
    let mut sums = [[0f32; V]; R];
    if words.iter().all(Option::is_some) {
        let words: [&[u32]; R] = std::array::from_fn(|i| words[i].unwrap_or_default());
        let (heads, tails): ([&[S::u32s]; R], [&[u32]; R]) = {
            let split_rows: [(&[S::u32s], &[u32]); R] =
                std::array::from_fn(|i| S::as_simd_u32s(words[i]));
            (
                std::array::from_fn(|i| split_rows[i].0),
                std::array::from_fn(|i| split_rows[i].1),
            )
        };
        let chunks = heads[0].len();
        let even: [&[S::f32s]; V] =
            std::array::from_fn(|v| &S::as_simd_f32s(&split.even[j + v][..pairs]).0[..chunks]);
        let odd: [&[S::f32s]; V] =
            std::array::from_fn(|v| &S::as_simd_f32s(&split.odd[j + v][..pairs]).0[..chunks]);
        let heads: [&[S::u32s]; R] = std::array::from_fn(|i| &heads[i][..chunks]);
        let shift = simd.splat_u32s(16);
        let high = simd.splat_u32s(0xFFFF_0000);
        let zero = simd.splat_f32s(0.0);
        let mut acc = [[zero; V]; R];
        for c in 0..chunks {
            let mut w_even = [zero; R];
            let mut w_odd = [zero; R];
            for i in 0..R {
                let word = heads[i][c];
                w_even[i] = simd.transmute_f32s_u32s(simd.wrapping_dyn_shl_u32s(word, shift));
                w_odd[i] = simd.transmute_f32s_u32s(simd.and_u32s(word, high));
            }
            for v in 0..V {
                let (e, o) = (even[v][c], odd[v][c]);
                for i in 0..R {
                    acc[i][v] = simd.mul_add_f32s(w_even[i], e, acc[i][v]);
                    acc[i][v] = simd.mul_add_f32s(w_odd[i], o, acc[i][v]);
                }
            }
        }
        let done = words[0].len() - tails[0].len();
        for i in 0..R {
            for v in 0..V {
                let mut sum = simd.reduce_sum_f32s(acc[i][v]);
                for (p, word) in tails[i].iter().enumerate() {
                    let (we, wo) = widen(*word);
                    sum += we * split.even[j + v][done + p] + wo * split.odd[j + v][done + p];
                }
                sums[i][v] = sum;
            }
        }
    } else {
        for (i, row_sums) in sums.iter_mut().enumerate() {
            let row = row(i);
            for (v, sum) in row_sums.iter_mut().enumerate() {
                *sum = (0..pairs)
                    .map(|p| {
                        row[2 * p].to_f32() * split.even[j + v][p]
                            + row[2 * p + 1].to_f32() * split.odd[j + v][p]
                    })
                    .sum();
            }
        }
    }
    for (i, row_sums) in sums.iter_mut().enumerate() {
        for (v, sum) in row_sums.iter_mut().enumerate() {
            if let Some(last) = split.last[j + v] {
                *sum += row(i)[k - 1].to_f32() * last;
            }
        }
    }
    sums
}

/// The two f32 values of a `u32` pair of bf16 values (low half first).
fn widen(word: u32) -> (f32, f32) {
    (
        f32::from_bits(word << 16),
        f32::from_bits(word & 0xFFFF_0000),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::matvec::tests::{max_abs, random, time};
    use candle_core::Device;

    /// The kernel against candle's f32 GEMM on the same (widened) weights.
    fn check(rows: usize, cols: usize, n: usize) {
        let w = random((rows, cols), 1).to_dtype(DType::BF16).unwrap();
        let x = random((n, cols), 2);
        assert!(applies(&x, &w));
        let ours = project(&x, &w).unwrap();
        let widened = w.to_dtype(DType::F32).unwrap();
        let gemm = x.matmul(&widened.t().unwrap()).unwrap();
        assert_eq!(ours.dims(), &[n, rows]);
        let diff = max_abs(&(ours - &gemm).unwrap()) / max_abs(&gemm);
        assert!(
            diff < 1e-5,
            "{rows}x{cols} times {n} vectors: relative difference {diff}"
        );
    }

    #[test]
    fn equals_the_gemm_on_widened_weights() {
        // 130 rows: two full tasks, a partial one, and a row group of 1 + 1;
        // 2304 columns: whole SIMD chunks; 37 and 70: an odd last element
        // and a tail of pairs; vectors: 1, groups of 4 with 1-3 left, the
        // most this kernel is given, and the blocked product's first and
        // two of its panels and one vector (`project` passes those on).
        for (cols, n) in [
            (2304, 1),
            (2304, 2),
            (2304, 7),
            (70, 5),
            (37, 1),
            (37, 6),
            (2304, bf16_blocks::MIN_VECTORS - 1),
            (2304, bf16_blocks::MIN_VECTORS),
            (70, 65),
        ] {
            check(130, cols, n);
        }
    }

    #[test]
    fn misaligned_rows_take_the_scalar_path() {
        // Starting one element in, no row's pairs are 4-byte aligned.
        let w = random((9, 65), 1).to_dtype(DType::BF16).unwrap();
        let w = w.flatten_all().unwrap().narrow(0, 1, 8 * 64).unwrap();
        let w = w.reshape((8, 64)).unwrap();
        let x = random((3, 64), 2);
        let ours = project(&x, &w).unwrap();
        let gemm = x
            .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap();
        let diff = max_abs(&(ours - &gemm).unwrap()) / max_abs(&gemm);
        assert!(diff < 1e-5, "relative difference {diff}");
    }

    #[test]
    fn empty_operands_give_empty_or_zero_products() {
        let x = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        let w = random((3, 4), 1).to_dtype(DType::BF16).unwrap();
        assert_eq!(project(&x, &w).unwrap().dims(), &[0, 3]);
        let x = Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((3, 0), DType::BF16, &Device::Cpu).unwrap();
        let y = project(&x, &w).unwrap();
        assert_eq!(y.dims(), &[2, 3]);
        assert_eq!(max_abs(&y), 0.0);
    }

    #[test]
    fn pairs_widen_exactly() {
        let (a, b) = (bf16::from_f32(-1.5), bf16::from_f32(3.0e-5));
        let word = u32::from(a.to_bits()) | (u32::from(b.to_bits()) << 16);
        assert_eq!(widen(word), (a.to_f32(), b.to_f32()));
    }

    #[test]
    fn refuses_what_it_does_not_handle() {
        let w = random((8, 4), 1);
        assert!(!applies(&random((1, 4), 2), &w));
        let w = w.to_dtype(DType::BF16).unwrap();
        assert!(!applies(
            &random((1, 4), 2).to_dtype(DType::BF16).unwrap(),
            &w
        ));
        assert!(
            project(&random((1, 5), 3), &w)
                .unwrap_err()
                .to_string()
                .contains("columns")
        );
    }

    /// `cargo test --release -p capture-worker --lib bf16_rows_speed -- --ignored --nocapture --test-threads=1`
    #[test]
    #[ignore = "a timing probe, not a test"]
    fn bf16_rows_speed() {
        let w32 = random((9216, 2304), 1);
        let w = w32.to_dtype(DType::BF16).unwrap();
        for n in [1, 2, 4, 8, 16, 32, 64, 480] {
            let x = random((n, 2304), 2);
            let ours = time(&|| project(&x, &w).unwrap());
            let f32_gemm = time(&|| w32.matmul(&x.t().unwrap()).unwrap());
            eprintln!(
                "n={n}: bf16 rows {ours:.2} ms ({:.1} GB/s of weights), f32 W@x^T {f32_gemm:.2} ms",
                9216.0 * 2304.0 * 2.0 / ours / 1e6
            );
        }
        // The embedding's size (1.2 GB of bf16, past any cache): what a
        // decode step's products stream from memory.
        let (rows, k) = (256_000, 2304);
        let data = (0..rows * k).map(|i| bf16::from_f32((i % 1000) as f32 / 1000.0));
        let w = Tensor::from_iter(data, &Device::Cpu)
            .and_then(|t| t.reshape((rows, k)))
            .unwrap();
        let x = random((1, k), 2);
        let ours = time(&|| project(&x, &w).unwrap());
        eprintln!(
            "{rows}x{k}, one vector: {ours:.1} ms ({:.1} GB/s)",
            (rows * k * 2) as f64 / ours / 1e6
        );
    }
}
