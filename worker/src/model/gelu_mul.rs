//! Gemma-2's MLP activation as one operation: from the stacked gate and up
//! projections (`[..., 2 intermediate]`: gate, then up),
//!
//! ```text
//! out = T(gelu(gate) * up)       gelu with the tanh approximation, in T
//! ```
//!
//! transformers' `act_fn(gate_proj(x)) * up_proj(x)` with
//! `gelu_pytorch_tanh`. With candle's operations it is a GELU and a product,
//! two kernels on a GPU with the GELU written out and read back; here one
//! (`capture_kernels::gelu_mul`). On the CPU the result is candle's bit for
//! bit (candle's own GELU of each element, then T's product; test
//! `fused_gelu_mul_equals_candles_operations_bit_for_bit`). The CUDA kernel
//! computes the GELU in f32 and rounds once, as PyTorch does, where candle's
//! CPU GELU rounds each step in bf16; the two agree within bf16 rounding
//! (`capture::gpu_tests`). When the MLP's activations are recorded the
//! model keeps candle's operations: the GELU is one of the records.
//!
//! `CAPTURE_UNFUSED=1` selects candle's operations instead (see
//! [`super::fused`]).

use candle_core::backend::BackendStorage;
use candle_core::op::{Gelu, UnaryOpT};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};

use super::fused::{contiguous, for_each_row_of, unfused};

/// The operation's name in errors.
const NAME: &str = "gelu-mul";

/// `gelu(gate) * up` from `gate_up` (`[..., 2 intermediate]`), `[...,
/// intermediate]`.
pub fn gelu_mul(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    if unfused() {
        let (gelu, up) = gelu_and_up(gate_up)?;
        return gelu * up;
    }
    gate_up.contiguous()?.apply_op1_no_bwd(&GeluMul)
}

/// The GELU of the gate and the up projection (a view of `gate_up`), with
/// candle's operations: for when both are recorded.
pub fn gelu_and_up(gate_up: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let i = gate_up.dim(candle_core::D::Minus1)? / 2;
    let last = gate_up.rank() - 1;
    Ok((
        gate_up.narrow(last, 0, i)?.gelu()?,
        gate_up.narrow(last, i, i)?,
    ))
}

/// The operation, through [`CustomOp1`].
pub(crate) struct GeluMul;

/// The output shape: `gate_up`'s with half its last axis.
fn halved(gate_up: &Layout) -> candle_core::Result<Shape> {
    let mut dims = gate_up.dims().to_vec();
    match dims.last_mut() {
        Some(last) if last.is_multiple_of(2) => *last /= 2,
        _ => candle_core::bail!(
            "{NAME}: gate and up {:?}, not [..., 2 width]",
            gate_up.dims()
        ),
    }
    Ok(Shape::from(dims))
}

/// Every row's `gelu(gate) * up`, with candle's GELU of T (`gelu` below).
fn cpu_rows<T: WithDType>(
    gate_up: (&CpuStorage, &Layout),
    gelu: impl Fn(T) -> T + Sync + Send,
) -> candle_core::Result<CpuStorage> {
    let src = contiguous(gate_up.0.as_slice::<T>()?, gate_up.1, NAME)?;
    let width = *gate_up.1.dims().last().unwrap_or(&0);
    let mut out = vec![T::zero(); src.len() / 2];
    for_each_row_of(src, width, &mut out, width / 2, |_, row, out| {
        let (gate, up) = row.split_at(width / 2);
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = gelu(g) * u;
        }
    });
    Ok(WithDType::to_cpu_storage_owned(out))
}

impl CustomOp1 for GeluMul {
    fn name(&self) -> &'static str {
        "capture-gelu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = halved(l1)?;
        let storage = match s1.dtype() {
            DType::F32 => cpu_rows::<f32>((s1, l1), Gelu::f32)?,
            DType::BF16 => cpu_rows::<half::bf16>((s1, l1), Gelu::bf16)?,
            DType::F16 => cpu_rows::<half::f16>((s1, l1), Gelu::f16)?,
            other => candle_core::bail!("{NAME}: unsupported dtype {other:?}"),
        };
        Ok((storage, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let shape = halved(l1)?;
        Ok((capture_kernels::gelu_mul((s1, l1))?, shape))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{CustomOp1, DType};

    use crate::model::fused::tests::{bits, random};

    use super::{GeluMul, gelu_and_up};

    #[test]
    fn fused_gelu_mul_equals_candles_operations_bit_for_bit() {
        // A decode step at gemma-2-2b's width, many rows (parallel), odd widths.
        for (shape, seed) in [
            (vec![1, 1, 2 * 9216], 1),
            (vec![3, 17, 2 * 64], 2),
            (vec![5, 2 * 7], 3),
        ] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let gate_up = random(&shape, seed, 4.0).to_dtype(dtype).unwrap();
                let fused = gate_up.apply_op1_no_bwd(&GeluMul).unwrap();
                let (gelu, up) = gelu_and_up(&gate_up).unwrap();
                let want = (gelu * up).unwrap();
                assert_eq!(fused.dims(), want.dims());
                assert_eq!(fused.dtype(), dtype);
                assert_eq!(bits(&fused), bits(&want), "{dtype:?} {shape:?}");
            }
        }
    }

    #[test]
    fn an_odd_last_axis_is_an_error() {
        let e = random(&[2, 7], 4, 4.0)
            .apply_op1_no_bwd(&GeluMul)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gate and up [2, 7]"), "{e}");
        assert_eq!(GeluMul.name(), "capture-gelu-mul");
    }
}
