//! A memory-bound matrix-vector product for batch-1 decode steps on the CPU.
//!
//! A decode step of one sequence multiplies every weight matrix by a single
//! activation vector, `y = W x` with `W` row-major `[out, in]`. That is bound
//! by reading `W` once, not by arithmetic. candle's GEMM handles this shape
//! poorly (measured on the 2-core development machine, 9216x2304 f32: 5.6-6.6
//! ms, about 14 GB/s, slower than the same GEMM with two or four vectors);
//! [`RowDot`] streams each weight row once with SIMD dot products (AVX-512 or
//! AVX2 through pulp's run-time dispatch) and splits the rows across the
//! thread pool: 3.1-3.7 ms, 23-28 GB/s. For two or more
//! vectors `W @ X^T` through candle's GEMM is faster than a row loop (probe:
//! `row_dot_speed` below), so it is used for one vector only.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Weight rows per parallel task: enough to amortise scheduling, small enough
/// to balance the 2304-row and 256000-row matrices alike.
const ROWS_PER_TASK: usize = 64;

/// `W x` for `x` `[1, in]` and `W` `[out, in]` (contiguous, f32), returning
/// `[1, out]`.
#[derive(Debug, Clone, Copy)]
pub struct RowDot;

/// Whether [`RowDot`] applies to `x` (`[1, in]`) times `w` (`[out, in]`).
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.dims().first() == Some(&1)
        && w.is_contiguous()
}

/// `x @ w^T` through [`RowDot`] (see [`applies`]).
pub fn row_dot(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(w, &RowDot)
}

/// The elements of a contiguous CPU operand of a custom op.
pub(super) fn contiguous<'a, T: candle_core::WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("matrix-vector kernels need contiguous operands"),
    }
}

impl CustomOp2 for RowDot {
    fn name(&self) -> &'static str {
        "row-dot"
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
        if n != 1 {
            candle_core::bail!("row_dot multiplies one vector, got {n}");
        }
        if k != k_w {
            candle_core::bail!("row_dot: x has {k} columns, the weight {k_w}");
        }
        let x = contiguous::<f32>(x, x_layout)?;
        let w = contiguous::<f32>(w, w_layout)?;
        let mut y = vec![0f32; out];
        y.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(block, dst)| {
                let rows = &w[block * ROWS_PER_TASK * k..];
                for (value, row) in dst.iter_mut().zip(rows.chunks_exact(k)) {
                    *value = dot(row, x);
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((1, out))))
    }
}

/// `a . b` with the widest SIMD the CPU offers (AVX-512, else AVX2+FMA),
/// chosen at run time; four independent accumulators hide the FMA latency.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    struct Dot<'a>(&'a [f32], &'a [f32]);
    impl pulp::WithSimd for Dot<'_> {
        type Output = f32;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, simd: S) -> f32 {
            let (a, a_tail) = S::as_simd_f32s(self.0);
            let (b, b_tail) = S::as_simd_f32s(self.1);
            let zero = simd.splat_f32s(0.0);
            let mut acc = [zero; 4];
            let (a4, a_rest) = a.split_at(a.len() / 4 * 4);
            let (b4, b_rest) = b.split_at(a4.len());
            for (x, y) in a4.chunks_exact(4).zip(b4.chunks_exact(4)) {
                for i in 0..4 {
                    acc[i] = simd.mul_add_f32s(x[i], y[i], acc[i]);
                }
            }
            for (x, y) in a_rest.iter().zip(b_rest) {
                acc[0] = simd.mul_add_f32s(*x, *y, acc[0]);
            }
            let sum = simd.add_f32s(simd.add_f32s(acc[0], acc[1]), simd.add_f32s(acc[2], acc[3]));
            let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
            simd.reduce_sum_f32s(sum) + tail
        }
    }
    pulp::Arch::new().dispatch(Dot(a, b))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::Device;

    /// Deterministic values in [-1, 1).
    pub(in crate::model) fn random(shape: (usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1;
        let data: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn equals_the_gemm() {
        // 130 rows: two full tasks and a partial one; 37 columns: a SIMD tail.
        for cols in [37, 2304] {
            let w = random((130, cols), 1);
            let x = random((1, cols), 2);
            assert!(applies(&x, &w));
            let ours = row_dot(&x, &w).unwrap();
            let gemm = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(ours.dims(), &[1, 130]);
            let scale = max_abs(&gemm);
            let diff = max_abs(&(ours - gemm).unwrap());
            assert!(
                diff / scale < 1e-5,
                "{cols} columns: difference {diff} at scale {scale}"
            );
        }
    }

    /// Milliseconds per call of `f`, the best of 20 after a warm-up call.
    pub(in crate::model) fn time(f: &dyn Fn() -> Tensor) -> f64 {
        f();
        (0..20)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// The largest absolute value of `t`.
    pub(in crate::model) fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn refuses_what_it_does_not_handle() {
        let w = random((8, 4), 1);
        assert!(!applies(&random((2, 4), 2), &w));
        assert!(!applies(
            &random((1, 4), 2).to_dtype(DType::BF16).unwrap(),
            &w
        ));
        assert!(
            row_dot(&random((1, 5), 3), &w)
                .unwrap_err()
                .to_string()
                .contains("columns")
        );
        assert!(
            row_dot(&random((2, 4), 3), &w)
                .unwrap_err()
                .to_string()
                .contains("one vector")
        );
    }

    /// `cargo test --release -p capture-worker --lib row_dot_speed -- --ignored --nocapture --test-threads=1`
    #[test]
    #[ignore = "a timing probe, not a test"]
    fn row_dot_speed() {
        let w = random((9216, 2304), 1);
        for n in [1, 2, 4, 16, 64] {
            let x = random((n, 2304), 2);
            let ours = if n == 1 {
                time(&|| row_dot(&x, &w).unwrap())
            } else {
                f64::NAN
            };
            let gemm = time(&|| x.matmul(&w.t().unwrap()).unwrap());
            let gemv = time(&|| w.matmul(&x.t().unwrap()).unwrap());
            eprintln!(
                "n={n}: row_dot {ours:.2} ms ({:.1} GB/s), x@W^T {gemm:.2} ms, W@x^T {gemv:.2} ms",
                9216.0 * 2304.0 * 4.0 / ours / 1e6
            );
        }
    }
}
