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
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, IndexOp, Layout, Shape, Tensor, WithDType,
};

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
    for_each_row(xs, &mut out, n, |i, x, out| {
        norm_row(x, residual.map(|r| &r[i * n..(i + 1) * n]), w, eps, out);
    });
    Ok(T::to_cpu_storage_owned(out))
}

fn widen<T: WithDType>(v: T) -> f32 {
    v.to_f64() as f32
}

/// One row: `x / rms * w` in f32 (candle's formula and order, the sum
/// sequential), rounded to T, then `T(residual + y)` when there is one.
fn norm_row<T: WithDType>(x: &[T], residual: Option<&[T]>, w: &[f32], eps: f32, out: &mut [T]) {
    let sum: f32 = x.iter().map(|&v| widen(v) * widen(v)).sum();
    let rms = (sum / x.len() as f32 + eps).sqrt();
    for (j, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let y = T::from_f64(f64::from(widen(v) / rms * w[j]));
        *o = match residual {
            Some(r) => T::from_f64(f64::from(widen(r[j]) + widen(y))),
            None => y,
        };
    }
}

/// Two norms with the residual addition between them, as a decoder layer
/// runs them twice (its post-attention norm, the addition and its
/// pre-feedforward norm; its post-feedforward norm, the addition and the
/// next layer's input norm):
///
/// ```text
/// sum    = first.forward_add(xs, residual)      the residual stream
/// normed = second.forward(sum)                  the next block's input
/// ```
///
/// One operation (`capture_kernels::rms_norm_add_norm` on a GPU) where two
/// fused norms are two kernels; on the CPU bit for bit the two (test
/// `fused_norm_pairs_equal_two_norms_bit_for_bit`). Its output is one
/// storage holding both, so a tensor kept from it (a residual record)
/// keeps both alive: a caller recording the residual of a long pass runs
/// the norms apart (see [`NormPair::forward`]).
#[derive(Debug, Clone)]
pub struct NormPair {
    first: RmsNorm,
    second: RmsNorm,
    /// `[2, size]` in f32: `first`'s `1 + weight`, then `second`'s.
    weights: Tensor,
}

impl NormPair {
    pub fn new(first: &RmsNorm, second: &RmsNorm) -> candle_core::Result<Self> {
        Ok(Self {
            first: first.clone(),
            second: second.clone(),
            weights: Tensor::stack(&[&first.one_plus_weight, &second.one_plus_weight], 0)?,
        })
    }

    /// `(sum, normed)` as above; as two operations when `apart` (or with
    /// `CAPTURE_UNFUSED=1`), else as one whose two outputs are views of one
    /// storage.
    pub fn forward(
        &self,
        xs: &Tensor,
        residual: &Tensor,
        apart: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        if apart || unfused() {
            let sum = self.first.forward_add(xs, residual)?;
            let normed = self.second.forward(&sum)?;
            return Ok((sum, normed));
        }
        let op = Pair {
            eps: (self.first.eps, self.second.eps),
        };
        let both =
            xs.contiguous()?
                .apply_op3_no_bwd(&residual.contiguous()?, &self.weights, &op)?;
        Ok((both.i(0)?, both.i(1)?))
    }
}

/// The pair's operation: `(x, residual, weights [2, size])` through
/// [`CustomOp3`], giving `[2, ...x's shape]`.
struct Pair {
    eps: (f32, f32),
}

/// The operation's name in errors.
const PAIR_NAME: &str = "rms-norm-add-norm";

impl Pair {
    /// `x`'s shape with a leading 2, after checking the other inputs.
    fn shape(&self, x: &Layout, residual: &Layout, w: &Layout) -> candle_core::Result<Shape> {
        let size = *x.dims().last().unwrap_or(&0);
        if w.dims() != [2, size] || residual.dims() != x.dims() {
            candle_core::bail!(
                "{PAIR_NAME}: weights {:?} and residual {:?} for input {:?}",
                w.dims(),
                residual.dims(),
                x.dims()
            );
        }
        Ok(Shape::from([&[2], x.dims()].concat()))
    }

    fn cpu<T: WithDType>(
        &self,
        x: (&CpuStorage, &Layout),
        residual: (&CpuStorage, &Layout),
        w: &[f32],
    ) -> candle_core::Result<CpuStorage> {
        let xs = contiguous(x.0.as_slice::<T>()?, x.1, PAIR_NAME)?;
        let residual = contiguous(residual.0.as_slice::<T>()?, residual.1, PAIR_NAME)?;
        let n = w.len() / 2;
        let (w1, w2) = w.split_at(n);
        let mut out = vec![T::zero(); 2 * xs.len()];
        if n == 0 {
            return Ok(T::to_cpu_storage_owned(out));
        }
        let (sums, normed) = out.split_at_mut(xs.len());
        for_each_row(xs, sums, n, |i, x, sum| {
            norm_row(x, Some(&residual[i * n..(i + 1) * n]), w1, self.eps.0, sum);
        });
        for_each_row(sums, normed, n, |_, sum, out| {
            norm_row(sum, None, w2, self.eps.1, out)
        });
        Ok(T::to_cpu_storage_owned(out))
    }
}

impl CustomOp3 for Pair {
    fn name(&self) -> &'static str {
        "capture-rms-norm-add-norm"
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
        let shape = self.shape(l1, l2, l3)?;
        let w = contiguous(s3.as_slice::<f32>()?, l3, PAIR_NAME)?;
        let storage = match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => self.cpu::<f32>((s1, l1), (s2, l2), w)?,
            (DType::BF16, DType::BF16) => self.cpu::<half::bf16>((s1, l1), (s2, l2), w)?,
            (DType::F16, DType::F16) => self.cpu::<half::f16>((s1, l1), (s2, l2), w)?,
            (x, r) => candle_core::bail!("{PAIR_NAME}: input {x:?}, residual {r:?}"),
        };
        Ok((storage, shape))
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
        let shape = self.shape(l1, l2, l3)?;
        let out = capture_kernels::rms_norm_add_norm((s1, l1), (s2, l2), (s3, l3), self.eps)?;
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor};

    use crate::model::fused::tests::{bits, random};

    use super::{NormPair, Pair, RmsNorm};

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

    #[test]
    fn fused_norms_equal_candles_operations_bit_for_bit() {
        // Few rows (sequential) and many (parallel), in every float dtype.
        for (shape, seed) in [(vec![1, 1, 2304], 1), (vec![3, 17, 64], 2), (vec![5, 9], 3)] {
            let size = *shape.last().unwrap();
            let norm =
                RmsNorm::new(&(random(&[size], seed + 10, 1.0) * 0.3).unwrap(), 1e-6).unwrap();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let x = (random(&shape, seed, 1.0) * 7.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let r = random(&shape, seed + 20, 1.0).to_dtype(dtype).unwrap();
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
        let norm = RmsNorm::new(&random(&[8], 4, 1.0), 1e-6).unwrap();
        let x = random(&[8, 3], 5, 1.0).t().unwrap();
        assert!(!x.is_contiguous());
        let r = random(&[8, 3], 6, 1.0).t().unwrap();
        let want = norm.forward_add(&x.contiguous().unwrap(), &r.contiguous().unwrap());
        assert_eq!(
            bits(&norm.forward_add(&x, &r).unwrap()),
            bits(&want.unwrap())
        );
    }

    #[test]
    fn mismatched_shapes_are_errors_not_reads_out_of_bounds() {
        let norm = RmsNorm::new(&random(&[8], 7, 1.0), 1e-6).unwrap();
        let err = norm
            .forward(&random(&[2, 6], 8, 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("weight [8] for rows of 6"), "{err}");
        let err = norm
            .forward_add(&random(&[2, 8], 9, 1.0), &random(&[3, 8], 9, 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("residual [3, 8] for input [2, 8]"), "{err}");
    }

    #[test]
    fn fused_norm_pairs_equal_two_norms_bit_for_bit() {
        use candle_core::IndexOp;
        // A decode step at gemma-2-2b's width, many rows (parallel), odd sizes.
        for (shape, seed) in [(vec![1, 1, 2304], 1), (vec![3, 17, 64], 2), (vec![5, 9], 3)] {
            let size = *shape.last().unwrap();
            let first =
                RmsNorm::new(&(random(&[size], seed + 10, 1.0) * 0.3).unwrap(), 1e-6).unwrap();
            let second =
                RmsNorm::new(&(random(&[size], seed + 11, 1.0) * 0.2).unwrap(), 1e-5).unwrap();
            let pair = NormPair::new(&first, &second).unwrap();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let x = (random(&shape, seed, 1.0) * 7.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let r = (random(&shape, seed + 20, 1.0) * 3.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let op = Pair {
                    eps: (first.eps, second.eps),
                };
                let both = x.apply_op3_no_bwd(&r, &pair.weights, &op).unwrap();
                assert_eq!(both.dims(), [&[2], shape.as_slice()].concat());
                let sum = candle_ops(&first, &x, Some(&r));
                let normed = candle_ops(&second, &sum, None);
                assert_eq!(
                    bits(&both.i(0).unwrap()),
                    bits(&sum),
                    "{dtype:?} {shape:?} sum"
                );
                assert_eq!(
                    bits(&both.i(1).unwrap()),
                    bits(&normed),
                    "{dtype:?} {shape:?} normalised"
                );
                // The public path (fused unless CAPTURE_UNFUSED is set), and
                // the two norms run apart.
                for apart in [false, true] {
                    let (s, n) = pair.forward(&x, &r, apart).unwrap();
                    assert_eq!((bits(&s), bits(&n)), (bits(&sum), bits(&normed)));
                }
            }
        }
        let pair = NormPair::new(
            &RmsNorm::new(&random(&[8], 1, 1.0), 1e-6).unwrap(),
            &RmsNorm::new(&random(&[8], 2, 1.0), 1e-6).unwrap(),
        )
        .unwrap();
        let err = pair
            .forward(&random(&[2, 8], 3, 1.0), &random(&[3, 8], 4, 1.0), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("residual [3, 8] for input [2, 8]"), "{err}");
    }
}
