//! A decode step's projections on a GPU: `x @ W^T` for a few activation
//! rows (one per sequence of the batch, at most
//! [`capture_kernels::MATVEC_MAX_ROWS`]) through the worker's matvec kernel
//! (`capture_kernels::matvec`), where candle's matmul calls cuBLAS's
//! general product. At batch 1 a step's time is reading gemma-2-2b's 5.2 GB
//! of bf16 weights once; the kernel reads each weight row in 16-byte
//! vectors with several in flight per lane and nothing else (cuBLAS's
//! kernels are tiled for many rows). Each output is the f32 sum of its
//! products rounded to the compute dtype, as with cuBLAS
//! (`CUBLAS_COMPUTE_32F`); only the summation order differs.
//!
//! On the CPU the operation computes the same sums in index order (the
//! reference of `capture::gpu_tests`); the model uses it on CUDA devices
//! only (the CPU has [`super::bf16_weights`] and [`super::matvec`]).
//!
//! `CAPTURE_CUBLAS_PROJECTIONS=1` (or `CAPTURE_UNFUSED=1`) keeps candle's
//! matmul, to compare the two on a GPU (`scripts/gpu_check.sh`).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor, WithDType};
use capture_kernels::matvec_fits;

use super::fused::{contiguous, env_flag, unfused};

/// The operation's name in errors.
const NAME: &str = "decode-projection";

/// Whether `CAPTURE_CUBLAS_PROJECTIONS` (or `CAPTURE_UNFUSED`) asks for
/// candle's matmul (read once per process).
fn cublas() -> bool {
    static CUBLAS: OnceLock<bool> = OnceLock::new();
    *CUBLAS.get_or_init(|| unfused() || env_flag("CAPTURE_CUBLAS_PROJECTIONS"))
}

/// Whether the model computes `x @ w^T` (`x` `[n, in]`, `w` `[out, in]`)
/// with [`project`]: on a CUDA device, unless told otherwise, both of one
/// float dtype, contiguous and starting on 16-byte boundaries, with rows
/// the kernel takes ([`matvec_fits`]).
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    (matches!(x.device(), Device::Cuda(_)) || forced_on_cpu()) && !cublas() && takes(x, w)
}

/// Whether a test told this thread to use the operation on the CPU too
/// (`tests::on_cpu_in`); never outside tests.
fn forced_on_cpu() -> bool {
    #[cfg(test)]
    return tests::on_cpu();
    #[cfg(not(test))]
    false
}

/// The shapes, dtypes and layouts the kernel takes.
fn takes(x: &Tensor, w: &Tensor) -> bool {
    let dtype = x.dtype();
    let aligned = |t: &Tensor| {
        t.is_contiguous() && (t.layout().start_offset() * dtype.size_in_bytes()).is_multiple_of(16)
    };
    let (Ok((n, k)), Ok((_, k_w))) = (x.dims2(), w.dims2()) else {
        return false;
    };
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && w.dtype() == dtype
        && k == k_w
        && matvec_fits(n, k, dtype.size_in_bytes())
        && aligned(x)
        && aligned(w)
}

/// `x @ w^T` through [`DecodeProjection`] (see [`applies`]).
pub fn project(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(w, &DecodeProjection)
}

/// The operation, through [`CustomOp2`]: `x` first, then the weight.
pub struct DecodeProjection;

/// `[n, out]` for `x` `[n, in]` and `w` `[out, in]`.
fn output_shape(x: &Layout, w: &Layout) -> candle_core::Result<Shape> {
    match (x.dims(), w.dims()) {
        (&[n, k], &[out, k_w]) if k == k_w => Ok(Shape::from((n, out))),
        (x, w) => candle_core::bail!("{NAME}: activations {x:?} and weight {w:?}"),
    }
}

/// Every output's f32 sum of products in index order, rounded to T.
fn cpu_sums<T: WithDType>(
    (x, x_layout): (&CpuStorage, &Layout),
    (w, w_layout): (&CpuStorage, &Layout),
) -> candle_core::Result<CpuStorage> {
    let (n, k) = x_layout.shape().dims2()?;
    let out = w_layout.dims()[0];
    if k == 0 {
        return Ok(WithDType::to_cpu_storage_owned(vec![T::zero(); n * out]));
    }
    let x = contiguous(x.as_slice::<T>()?, x_layout, NAME)?;
    let w = contiguous(w.as_slice::<T>()?, w_layout, NAME)?;
    let y: Vec<T> = x
        .chunks_exact(k)
        .flat_map(|row| {
            w.chunks_exact(k).map(move |weights| {
                let sum: f32 = row
                    .iter()
                    .zip(weights)
                    .map(|(a, b)| a.to_f64() as f32 * b.to_f64() as f32)
                    .sum();
                T::from_f64(sum as f64)
            })
        })
        .collect();
    Ok(WithDType::to_cpu_storage_owned(y))
}

impl CustomOp2 for DecodeProjection {
    fn name(&self) -> &'static str {
        "capture-decode-projection"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = output_shape(l1, l2)?;
        if s1.dtype() != s2.dtype() {
            candle_core::bail!(
                "{NAME}: {:?} activations, {:?} weight",
                s1.dtype(),
                s2.dtype()
            );
        }
        let storage = match s1.dtype() {
            DType::F32 => cpu_sums::<f32>((s1, l1), (s2, l2))?,
            DType::BF16 => cpu_sums::<half::bf16>((s1, l1), (s2, l2))?,
            DType::F16 => cpu_sums::<half::f16>((s1, l1), (s2, l2))?,
            other => candle_core::bail!("{NAME}: unsupported dtype {other:?}"),
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
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let shape = output_shape(l1, l2)?;
        Ok((capture_kernels::matvec((s2, l2), (s1, l1))?, shape))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    use candle_core::{DType, Device, Tensor};

    use super::{project, takes};
    use crate::model::fused::tests::{random, values};

    thread_local! {
        static ON_CPU: Cell<bool> = const { Cell::new(false) };
    }

    /// Whether this thread runs the model's projections through the
    /// operation on the CPU too ([`on_cpu_in`]).
    pub(super) fn on_cpu() -> bool {
        ON_CPU.get()
    }

    /// `f()` with the model's small projections on the CPU computed by the
    /// operation's CPU form, as a GPU computes them with the kernel (the
    /// model's passes run on the calling thread).
    pub(crate) fn on_cpu_in<R>(f: impl FnOnce() -> R) -> R {
        ON_CPU.set(true);
        let result = f();
        ON_CPU.set(false);
        result
    }

    #[test]
    fn the_cpu_sums_are_a_matmul_s_within_f32_rounding() {
        // gemma-2-2b's o_proj at batch 1, 4 wide rows, odd output counts.
        for (n, k, out, seed) in [(1, 2048, 40, 1), (4, 2304, 7, 2), (3, 8, 5, 3)] {
            let x = random(&[n, k], seed, 1.0);
            let w = random(&[out, k], seed + 10, 1.0);
            let got = values(&project(&x, &w).unwrap());
            let want = values(&x.matmul(&w.t().unwrap()).unwrap());
            assert_eq!(got.len(), n * out);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{n}x{k}x{out}: {g} {w}"
                );
            }
            // In bf16: each output the f32 sum of the bf16 products, rounded.
            let (xb, wb) = (
                x.to_dtype(DType::BF16).unwrap(),
                w.to_dtype(DType::BF16).unwrap(),
            );
            let got = project(&xb, &wb).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let want = values(
                &xb.to_dtype(DType::F32)
                    .unwrap()
                    .matmul(&wb.to_dtype(DType::F32).unwrap().t().unwrap())
                    .unwrap(),
            );
            for (g, w) in values(&got).iter().zip(&want) {
                assert!((g - w).abs() <= w.abs() / 128.0 + 1e-3, "bf16 {g} {w}");
            }
        }
    }

    #[test]
    fn rows_of_no_elements_sum_to_zero() {
        let x = Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((3, 0), DType::F32, &Device::Cpu).unwrap();
        let y = project(&x, &w).unwrap();
        assert_eq!(y.dims(), &[2, 3]);
        assert_eq!(values(&y), vec![0.0; 6]);
    }

    #[test]
    fn the_kernel_takes_decode_steps_of_whole_aligned_vectors() {
        let w = Tensor::zeros((16, 2304), DType::BF16, &Device::Cpu).unwrap();
        let x = |n: usize| Tensor::zeros((n, 2304), DType::BF16, &Device::Cpu).unwrap();
        assert!(takes(&x(1), &w));
        assert!(takes(&x(4), &w));
        assert!(!takes(&x(5), &w), "more rows than the kernel holds");
        assert!(
            !takes(&x(1).to_dtype(DType::F32).unwrap(), &w),
            "mixed dtypes"
        );
        assert!(!takes(
            &x(1).to_dtype(DType::U32).unwrap(),
            &w.to_dtype(DType::U32).unwrap()
        ));
        let wide = Tensor::zeros((1, 2312), DType::BF16, &Device::Cpu).unwrap();
        // A view starting 4 elements (8 bytes) in: not on a 16-byte boundary.
        assert!(!takes(&wide.narrow(1, 4, 2304).unwrap(), &w));
        // 8 elements (16 bytes) in, but a view with a row stride is not
        // contiguous for two rows.
        assert!(takes(&wide.narrow(1, 8, 2304).unwrap(), &w));
        let two = Tensor::zeros((2, 2312), DType::BF16, &Device::Cpu).unwrap();
        assert!(!takes(&two.narrow(1, 8, 2304).unwrap(), &w));
        let odd = Tensor::zeros((1, 12), DType::BF16, &Device::Cpu).unwrap();
        let odd_w = Tensor::zeros((3, 12), DType::BF16, &Device::Cpu).unwrap();
        assert!(!takes(&odd, &odd_w), "rows of part of a 16-byte vector");
        assert!(!takes(
            &x(1),
            &Tensor::zeros((16, 2048), DType::BF16, &Device::Cpu).unwrap()
        ));
    }
}
