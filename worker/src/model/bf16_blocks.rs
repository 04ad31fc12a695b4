//! A prompt pass's many f32 activation rows times bf16-stored weights on the
//! CPU, as a blocked matrix product: vectors in SIMD lanes, weights
//! broadcast, as BLAS libraries do.
//!
//! [`super::bf16_weights`]' kernel puts columns in the lanes and widens each
//! weight pair as it multiplies: right for a decode step's few vectors,
//! which read every weight once from memory, but with a prompt's many
//! vectors it stays near 40% of the machine's multiply-add rate (a tile's
//! vectors and weight rows do not fit the L1 cache together, and the
//! widening takes the multiplying ports). Here:
//!
//! - the vectors are laid out once in panels of [`NR`] (32): per column,
//!   the panel's 32 values side by side, so two 16-lane registers hold one
//!   column of the whole panel;
//! - a task takes [`TASK_ROWS`] weight rows and, per block of [`KC`]
//!   columns, widens them to f32 (exact: bf16 is the high half of an f32)
//!   into a buffer, each row [`KC`] values long (96 KiB per block, in the L2
//!   cache), so that a panel's 12 rows are one address and constant
//!   offsets apart;
//! - for each panel of vectors (its block, 32 KiB, in L1) and each panel of
//!   12 rows, a register tile of 12 rows by 32 vectors adds, per column,
//!   each broadcast weight times the two registers of activations: 24
//!   accumulators, two loads and 12 broadcasts per 24 multiply-adds. A
//!   block's sums are added to the previous blocks' in the output.
//!
//! Each output is its products summed in column order within a block, then
//! the blocks' sums in order. Widening the weights costs about what 32
//! vectors' products cost, so decode steps and short prompts keep the
//! other kernel ([`MIN_VECTORS`]). Measured on the 2-core development
//! machine (`bf16_blocks_speed` below; docs/benchmarks.md, "Long prompts'
//! products").

use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;

/// Weight rows per parallel task.
const TASK_ROWS: usize = 96;

/// Columns per block: a panel of activations (`KC x NR` f32, 32 KiB with 16
/// lanes) stays in the L1 cache while every weight row of the task passes.
const KC: usize = 256;

/// Fewest activation rows for which this kernel is used: at 32 the two
/// kernels were about equal, at 64 this one 1.0-1.6x faster
/// (`bf16_blocks_speed`).
pub const MIN_VECTORS: usize = 64;

/// Vectors per panel: two SIMD registers with 16 lanes, four with 8.
const NR: usize = 32;

/// `y[j][o] = sum_i x[j][i] * w[o][i]`, returned row-major `[n, out]`.
pub fn rows_times(x: &[f32], n: usize, w: &[bf16], out: usize, k: usize) -> Vec<f32> {
    rows_times_on(x, n, w, out, k, |task| pulp::Arch::new().dispatch(task))
}

/// [`rows_times`] with each task run by `run` (the best SIMD the CPU has;
/// tests choose narrower ones).
fn rows_times_on(
    x: &[f32],
    n: usize,
    w: &[bf16],
    out: usize,
    k: usize,
    run: impl Fn(Task<'_>) + Sync,
) -> Vec<f32> {
    if n == 0 || out == 0 || k == 0 {
        return vec![0f32; n * out];
    }
    let panels = pack_vectors(x, n, k);
    // Results per weight row (`[out, n]`) so that tasks own contiguous blocks.
    let mut by_row = vec![0f32; out * n];
    by_row
        .par_chunks_mut(TASK_ROWS * n)
        .enumerate()
        .for_each(|(task, dst)| {
            let first = task * TASK_ROWS;
            let rows = dst.len() / n;
            // Taken out of the thread-local for the task: the SIMD code
            // must not run in a closure of its own (it would be compiled
            // without the CPU features `dispatch` enables).
            let mut packed = PACKED.take();
            run(Task {
                w: &w[first * k..(first + rows) * k],
                k,
                panels: &panels,
                n,
                dst,
                packed: &mut packed,
            });
            PACKED.set(packed);
        });
    transpose(&by_row, out, n)
}

/// `x` (`[n, k]`) in panels of [`NR`] vectors, each `[k, NR]` (column by
/// column, a column's values of the panel's vectors side by side); the
/// vectors past `n` zero.
fn pack_vectors(x: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut panels = vec![0f32; n.div_ceil(NR) * k * NR];
    panels
        .par_chunks_mut(k * NR)
        .enumerate()
        .for_each(|(panel, dst)| {
            let first = panel * NR;
            let vectors = x.chunks_exact(k).skip(first).take(NR);
            for (l, vector) in vectors.enumerate() {
                for (c, value) in vector.iter().enumerate() {
                    dst[c * NR + l] = *value;
                }
            }
        });
    panels
}

/// `[rows, cols]` to `[cols, rows]`, 16 output rows per parallel task (each
/// source row's 16 values one cache line).
pub(super) fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BLOCK: usize = 16;
    let mut dst = vec![0f32; rows * cols];
    dst.par_chunks_mut(BLOCK * rows)
        .enumerate()
        .for_each(|(block, dst)| {
            let first = block * BLOCK;
            let count = dst.len() / rows;
            for (r, src_row) in src.chunks_exact(cols).enumerate() {
                for (c, value) in src_row[first..first + count].iter().enumerate() {
                    dst[c * rows + r] = *value;
                }
            }
        });
    dst
}

thread_local! {
    /// A thread's widened weight block, kept between tasks (a fresh buffer
    /// of this size would be fresh pages each time).
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One task: a block of weight rows against every vector, results into
/// `dst` (`[rows, n]`).
struct Task<'a> {
    w: &'a [bf16],
    k: usize,
    /// The vectors as [`pack_vectors`] lays them out.
    panels: &'a [f32],
    n: usize,
    dst: &'a mut [f32],
    packed: &'a mut Vec<f32>,
}

impl pulp::WithSimd for Task<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        // Twelve weight rows by two registers of vectors where there are 32
        // SIMD registers of 16 lanes (24 accumulators), two by four where
        // there are 16 of 8 lanes (8 accumulators, 4 activations and a
        // broadcast), fewer with narrower ones (`NR / lanes` registers of
        // vectors in every case).
        match NR / S::F32_LANES {
            2 => self.run::<S, 12, 2>(simd),
            4 => self.run::<S, 2, 4>(simd),
            8 => self.run::<S, 2, 8>(simd),
            _ => self.run::<S, 1, NR>(simd),
        }
    }
}

impl Task<'_> {
    /// `MR` weight rows by `NV` SIMD registers of vectors per register tile.
    #[inline(always)]
    fn run<S: pulp::Simd, const MR: usize, const NV: usize>(self, simd: S) {
        let Self {
            w,
            k,
            panels,
            n,
            dst,
            packed,
        } = self;
        let lanes = S::F32_LANES;
        let rows = w.len() / k;
        let row_panels = rows.div_ceil(MR);
        packed.resize(row_panels * KC * MR, 0.0);
        for first_col in (0..k).step_by(KC) {
            let cols = KC.min(k - first_col);
            pack_weights(w, k, first_col, cols, packed);
            for (panel, vectors) in panels.chunks_exact(k * NR).enumerate() {
                let vectors = &vectors[first_col * NR..(first_col + cols) * NR];
                let first_vector = panel * NR;
                let count = NR.min(n - first_vector);
                for (row_panel, weights) in packed.chunks_exact(KC * MR).enumerate() {
                    let sums = tile::<S, MR, NV>(simd, weights, vectors, cols);
                    for (i, row_sums) in sums.iter().enumerate() {
                        let row = row_panel * MR + i;
                        if row >= rows {
                            break;
                        }
                        let out = &mut dst[row * n + first_vector..][..count];
                        if count == NR {
                            let out = S::as_mut_simd_f32s(out).0;
                            for (d, s) in out.iter_mut().zip(row_sums) {
                                *d = if first_col == 0 {
                                    *s
                                } else {
                                    simd.add_f32s(*d, *s)
                                };
                            }
                            continue;
                        }
                        let row_sums = row_sums.iter().flat_map(|s| {
                            let mut values = [0f32; 16];
                            S::as_mut_simd_f32s(&mut values[..lanes]).0[0] = *s;
                            values.into_iter().take(lanes)
                        });
                        if first_col == 0 {
                            for (d, s) in out.iter_mut().zip(row_sums) {
                                *d = s;
                            }
                        } else {
                            for (d, s) in out.iter_mut().zip(row_sums) {
                                *d += s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Widens columns `first..first + cols` of `w`'s rows into `packed`, in
/// panels of `MR` rows of [`KC`] values each (a block's `cols` first); rows
/// past the last zero.
#[inline(always)]
fn pack_weights(w: &[bf16], k: usize, first: usize, cols: usize, packed: &mut [f32]) {
    let rows = w.len() / k;
    for (row, dst) in packed.chunks_exact_mut(KC).enumerate() {
        let dst = &mut dst[..cols];
        if row < rows {
            let src = &w[row * k + first..row * k + first + cols];
            for (d, s) in dst.iter_mut().zip(src) {
                *d = f32::from_bits(u32::from(s.to_bits()) << 16);
            }
        } else {
            dst.fill(0.0);
        }
    }
}

/// The sums of an `MR`-row panel of widened weights (`MR` rows of [`KC`],
/// `cols` of them used) times a panel of vectors (`[cols, NR]`): per row,
/// `NV` SIMD registers of the vectors' sums.
#[inline(always)]
fn tile<S: pulp::Simd, const MR: usize, const NV: usize>(
    simd: S,
    weights: &[f32],
    vectors: &[f32],
    cols: usize,
) -> [[S::f32s; NV]; MR] {
    let lanes = S::F32_LANES;
    // Rows of a length known when compiling: one pointer and constant
    // offsets for the twelve broadcasts, no bounds checks.
    let rows: [&[f32; KC]; MR] = std::array::from_fn(|i| {
        weights[i * KC..(i + 1) * KC]
            .try_into()
            .expect("a panel holds MR rows of KC")
    });
    let mut acc = [[simd.splat_f32s(0.0); NV]; MR];
    for c in 0..cols.min(KC) {
        let column = &vectors[c * NR..(c + 1) * NR];
        let x: [S::f32s; NV] =
            std::array::from_fn(|v| S::as_simd_f32s(&column[v * lanes..(v + 1) * lanes]).0[0]);
        for i in 0..MR {
            let weight = simd.splat_f32s(rows[i][c]);
            for v in 0..NV {
                acc[i][v] = simd.mul_add_f32s(weight, x[v], acc[i][v]);
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::bf16_weights::in_vector_blocks;
    use crate::model::matvec::tests::{random, time};
    use candle_core::{DType, Tensor};

    fn operands(rows: usize, cols: usize, n: usize) -> (Vec<f32>, Vec<bf16>) {
        let x = random((n, cols), 2).flatten_all().unwrap();
        let w = random((rows, cols), 1).to_dtype(DType::BF16).unwrap();
        (
            x.to_vec1().unwrap(),
            w.flatten_all().unwrap().to_vec1().unwrap(),
        )
    }

    /// The largest difference of `ours` from `reference`, relative to the
    /// reference's largest value.
    fn relative_difference(ours: &[f32], reference: &[f32]) -> f32 {
        assert_eq!(ours.len(), reference.len());
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = ours
            .iter()
            .zip(reference)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst / scale
    }

    #[test]
    fn equals_the_widening_kernel_and_the_gemm() {
        // 200 rows: two full tasks and one of eight (a tile of fewer rows
        // at the end). Columns: 2304, nine whole blocks; 600, two and a
        // short one; 37, part of one, odd. Vectors: the fewest taken, two
        // panels and one vector, and a part panel alone.
        for (cols, n) in [(2304, MIN_VECTORS), (600, 65), (37, 40), (70, 7)] {
            let (x, w) = operands(200, cols, n);
            let ours = rows_times(&x, n, &w, 200, cols);
            let widening = in_vector_blocks(&x, n, &w, 200, cols);
            let diff = relative_difference(&ours, &widening);
            assert!(diff < 1e-5, "{cols} columns, {n} vectors: {diff}");

            let x = Tensor::from_vec(x, (n, cols), &candle_core::Device::Cpu).unwrap();
            let w = Tensor::from_vec(w, (200, cols), &candle_core::Device::Cpu).unwrap();
            let gemm = x
                .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let diff = relative_difference(&ours, &gemm);
            assert!(diff < 1e-5, "{cols} columns, {n} vectors: {diff}");
        }
    }

    #[test]
    fn narrower_simd_gives_the_same_products() {
        // The tile shapes of 8-lane registers (AVX2) and of none (scalar);
        // the best the CPU has is what the other tests run.
        let (rows, cols, n) = (30, 600, 40);
        let (x, w) = operands(rows, cols, n);
        let best = rows_times(&x, n, &w, rows, cols);
        let scalar = rows_times_on(&x, n, &w, rows, cols, |task| {
            pulp::Simd::vectorize(pulp::Scalar::new(), task)
        });
        assert!(relative_difference(&scalar, &best) < 1e-5);
        #[cfg(target_arch = "x86_64")]
        if let Some(v3) = pulp::x86::V3::try_new() {
            let avx2 = rows_times_on(&x, n, &w, rows, cols, |task| {
                pulp::Simd::vectorize(v3, task)
            });
            assert!(relative_difference(&avx2, &best) < 1e-5);
        }
    }

    #[test]
    fn empty_operands_give_zero_products() {
        assert_eq!(rows_times(&[], 0, &[bf16::ONE; 8], 2, 4), Vec::<f32>::new());
        assert_eq!(rows_times(&[], 3, &[], 2, 0), vec![0.0; 6]);
    }

    #[test]
    fn transposes() {
        let src: Vec<f32> = (0..3 * 37).map(|i| i as f32).collect();
        let dst = transpose(&src, 3, 37);
        for r in 0..3 {
            for c in 0..37 {
                assert_eq!(dst[c * 3 + r], src[r * 37 + c]);
            }
        }
    }

    /// `cargo test --release -p capture-worker --lib bf16_blocks_speed -- --ignored --nocapture --test-threads=1`
    #[test]
    #[ignore = "a timing probe, not a test"]
    fn bf16_blocks_speed() {
        for (rows, cols) in [(9216, 2304), (2304, 9216)] {
            let w32 = random((rows, cols), 1);
            let w = w32.to_dtype(DType::BF16).unwrap();
            let w_values: Vec<bf16> = w.flatten_all().unwrap().to_vec1().unwrap();
            for n in [16, 32, 64, 128, 480] {
                let x = random((n, cols), 2);
                let values: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let probe = |f: &dyn Fn() -> Vec<f32>| {
                    time(&|| Tensor::from_vec(f(), (n, rows), &candle_core::Device::Cpu).unwrap())
                };
                let blocks = probe(&|| rows_times(&values, n, &w_values, rows, cols));
                let widening = probe(&|| in_vector_blocks(&values, n, &w_values, rows, cols));
                let gemm = time(&|| x.matmul(&w32.t().unwrap()).unwrap());
                let rate = |ms: f64| (n * rows * cols) as f64 / ms / 1e6;
                eprintln!(
                    "{rows}x{cols}, n={n}: blocks {blocks:.2} ms ({:.0} GMAC/s), widening {widening:.2} ms ({:.0}), f32 gemm {gemm:.2} ms ({:.0})",
                    rate(blocks),
                    rate(widening),
                    rate(gemm)
                );
            }
        }
    }
}
