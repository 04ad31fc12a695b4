//! Gemma-2's RMS normalisation as one operation, optionally with the
//! residual addition that follows two of a layer's four norms:
//!
//! ```text
//! y   = T(x / sqrt(mean(x^2) + eps) * w)     f32 arithmetic, w = 1 + weight in f32
//! out = T(residual + y)                      (rms_norm_add)
//! ```
//!
//! This is transformers' `Gemma2RMSNorm` (`_norm(x.float()) * (1.0 +
//! weight.float())`, then `.type_as(x)`) followed by its `residual +
//! hidden_states`. With candle's own operations a bf16 norm is a cast to
//! f32, `rms_norm`, a cast back and an add: four kernels on a GPU, each with
//! its launch and its allocation, where this is one (`capture_kernels::rms_norm`);
//! a decode step at batch 1 waits mostly for launches (docs/benchmarks.md).
//! On the CPU the result is bit for bit what candle's operations give (the
//! same f32 formula in the same order; test
//! `fused_norms_equal_candles_operations_bit_for_bit`); the CUDA kernel sums
//! in parallel, so it differs within f32 rounding (`capture::gpu_tests`).
//!
//! `CAPTURE_UNFUSED=1` selects candle's operations instead (see
//! [`super::fused`]).

use super::fused::{contiguous, for_each_row, unfused};
use super::weights::Weights;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

/// `x / sqrt(mean(x^2) + eps) * (1 + w)`, computed in f32, in `x`'s dtype.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    one_plus_weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &mut Weights, name: &str, size: usize, eps: f64) -> crate::error::Result<Self> {
        Ok(Self::new(&w.take(name, &[size])?, eps)?)
    }

    /// From the checkpoint's `weight` (any float dtype).
    pub fn new(weight: &Tensor, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            one_plus_weight: (weight.to_dtype(DType::F32)? + 1.0)?,
            eps: eps as f32,
        })
    }

    /// The normalised `xs` (`[..., size]`).
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if unfused() {
            let dtype = xs.dtype();
            let xs = xs.to_dtype(DType::F32)?;
            return candle_nn::ops::rms_norm(&xs, &self.one_plus_weight, self.eps)?.to_dtype(dtype);
        }
        xs.contiguous()?
            .apply_op2_no_bwd(&self.one_plus_weight, &Fused { eps: self.eps })
    }

    /// `residual + forward(xs)`, rounded to the dtype after each step as
    /// two separate operations would be.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        if unfused() {
            return self.forward(xs)? + residual;
        }
        xs.contiguous()?.apply_op3_no_bwd(
            &residual.contiguous()?,
            &self.one_plus_weight,
            &Fused { eps: self.eps },
        )
    }
}

/// The operations' name in errors.
const NAME: &str = "rms-norm";

/// The operation: `(x, w)` through [`CustomOp2`], `(x, residual, w)`
/// through [`CustomOp3`].
struct Fused {
    eps: f32,
}

impl Fused {
    fn check(&self, x: &Layout, residual: Option<&Layout>, w: &Layout) -> candle_core::Result<()> {
        let size = *x.dims().last().unwrap_or(&0);
        if w.dims() != [size] {
            candle_core::bail!("{NAME}: weight {:?} for rows of {size}", w.dims());
        }
        if let Some(r) = residual
            && r.dims() != x.dims()
        {
            candle_core::bail!("{NAME}: residual {:?} for input {:?}", r.dims(), x.dims());
        }
        Ok(())
    }

    fn cpu(
        &self,
        x: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
        w: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check(x.1, residual.map(|r| r.1), w.1)?;
        let w = contiguous(w.0.as_slice::<f32>()?, w.1, NAME)?;
        let storage = match x.0.dtype() {
            DType::F32 => cpu_rows::<f32>(x, residual, w, self.eps)?,
            DType::BF16 => cpu_rows::<half::bf16>(x, residual, w, self.eps)?,
            DType::F16 => cpu_rows::<half::f16>(x, residual, w, self.eps)?,
            other => candle_core::bail!("{NAME}: unsupported dtype {other:?}"),
        };
        Ok((storage, x.1.shape().clone()))
    }
}

impl CustomOp2 for Fused {
    fn name(&self) -> &'static str {
        "capture-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), None, (s2, l2))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        // capture_kernels checks the shapes as `check` does.
        let out = capture_kernels::rms_norm((s1, l1), None, (s2, l2), self.eps)?;
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "capture-rms-norm-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), Some((s2, l2)), (s3, l3))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = capture_kernels::rms_norm((s1, l1), Some((s2, l2)), (s3, l3), self.eps)?;
        Ok((out, l1.shape().clone()))
    }
}

fn cpu_rows<T: WithDType>(
    x: (&CpuStorage, &Layout),
    residual: Option<(&CpuStorage, &Layout)>,
    w: &[f32],
    eps: f32,
) -> candle_core::Result<CpuStorage> {
    let xs = contiguous(x.0.as_slice::<T>()?, x.1, NAME)?;
    let residual = match residual {
        Some((s, l)) => Some(contiguous(s.as_slice::<T>()?, l, NAME)?),
        None => None,
    };
    let n = w.len();
    let mut out = vec![T::zero(); xs.len()];
    let widen = |v: T| v.to_f64() as f32;
    for_each_row(xs, &mut out, n, |i, x, out| {
        // Sequential f32 sum and `x / rms * w`: candle's formula and order.
        let sum: f32 = x.iter().map(|&v| widen(v) * widen(v)).sum();
        let rms = (sum / n as f32 + eps).sqrt();
        let r = residual.map(|r| &r[i * n..(i + 1) * n]);
        for (j, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            let y = T::from_f64(f64::from(widen(v) / rms * w[j]));
            *o = match r {
                Some(r) => T::from_f64(f64::from(widen(r[j]) + widen(y))),
                None => y,
            };
        }
    });
    Ok(T::to_cpu_storage_owned(out))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor};

    use crate::model::matvec::tests::random as random_rows;

    use super::RmsNorm;

    /// Deterministic values in [-1, 1) (see `matvec::tests::random`).
    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        random_rows((n, 1), seed).reshape(shape).unwrap()
    }

    /// What the model computed before the fused operation: a cast to f32,
    /// candle's `rms_norm`, a cast back, then the addition in the dtype.
    fn candle_ops(norm: &RmsNorm, x: &Tensor, residual: Option<&Tensor>) -> Tensor {
        let y = candle_nn::ops::rms_norm(
            &x.to_dtype(DType::F32).unwrap(),
            &norm.one_plus_weight,
            norm.eps,
        )
        .unwrap()
        .to_dtype(x.dtype())
        .unwrap();
        match residual {
            Some(r) => (y + r).unwrap(),
            None => y,
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
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

    #[test]
    fn fused_norms_equal_candles_operations_bit_for_bit() {
        // Few rows (sequential) and many (parallel), in every float dtype.
        for (shape, seed) in [(vec![1, 1, 2304], 1), (vec![3, 17, 64], 2), (vec![5, 9], 3)] {
            let size = *shape.last().unwrap();
            let norm = RmsNorm::new(&(random(&[size], seed + 10) * 0.3).unwrap(), 1e-6).unwrap();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let x = (random(&shape, seed) * 7.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let r = random(&shape, seed + 20).to_dtype(dtype).unwrap();
                let fused = norm.forward(&x).unwrap();
                assert_eq!(fused.dtype(), dtype);
                assert_eq!(fused.dims(), x.dims());
                assert_eq!(
                    bits(&fused),
                    bits(&candle_ops(&norm, &x, None)),
                    "{dtype:?} {shape:?}"
                );
                let fused_add = norm.forward_add(&x, &r).unwrap();
                assert_eq!(
                    bits(&fused_add),
                    bits(&candle_ops(&norm, &x, Some(&r))),
                    "{dtype:?} {shape:?} with the residual"
                );
            }
        }
    }

    #[test]
    fn a_strided_input_is_normalised_as_its_contiguous_copy() {
        let norm = RmsNorm::new(&random(&[8], 4), 1e-6).unwrap();
        let x = random(&[8, 3], 5).t().unwrap();
        assert!(!x.is_contiguous());
        let r = random(&[8, 3], 6).t().unwrap();
        let want = norm.forward_add(&x.contiguous().unwrap(), &r.contiguous().unwrap());
        assert_eq!(
            bits(&norm.forward_add(&x, &r).unwrap()),
            bits(&want.unwrap())
        );
    }

    #[test]
    fn mismatched_shapes_are_errors_not_reads_out_of_bounds() {
        let norm = RmsNorm::new(&random(&[8], 7), 1e-6).unwrap();
        let err = norm.forward(&random(&[2, 6], 8)).unwrap_err().to_string();
        assert!(err.contains("weight [8] for rows of 6"), "{err}");
        let err = norm
            .forward_add(&random(&[2, 8], 9), &random(&[3, 8], 9))
            .unwrap_err()
            .to_string();
        assert!(err.contains("residual [3, 8] for input [2, 8]"), "{err}");
    }
}
