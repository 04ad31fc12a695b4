//! Gemma-2's final logit soft-cap as one operation, from the head's output
//! in the compute dtype to f32:
//!
//! ```text
//! out = tanh(f32(x) / cap) * cap
//! ```
//!
//! With candle's operations it is a cast to f32, an affine, a tanh and an
//! affine: four kernels per decode step on a GPU where this is one
//! (`capture_kernels::logit_softcap`). Both implementations round as
//! candle's operations do (`x * (1 / cap) + 0`, `tanh`, `t * cap + 0`, each
//! in f32), so on the CPU the result is candle's bit for bit (test
//! `fused_softcap_equals_candles_operations_bit_for_bit`), and on a GPU the
//! kernel's (`capture::gpu_tests`). `CAPTURE_UNFUSED=1` selects candle's
//! operations instead (see [`super::fused`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};

use super::fused::{contiguous, unfused};

/// The operation's name in errors.
const NAME: &str = "logit-softcap";

/// `tanh(s * inv + 0) * cap + 0` in f32: a soft-cap as candle's affine,
/// tanh and affine compute it (`inv` is `1 / cap`; the `+ 0`s turn -0 into
/// +0 as candle's affine does).
pub fn soft_cap(s: f32, inv: f32, cap: f32) -> f32 {
    ((s * inv + 0.0).tanh()) * cap + 0.0
}

/// The soft-capped f32 logits of `logits` (f32, bf16 or f16, any shape).
pub fn logit_softcap(logits: &Tensor, cap: f64) -> candle_core::Result<Tensor> {
    if unfused() {
        return (logits.to_dtype(DType::F32)? / cap)?.tanh()? * cap;
    }
    logits.contiguous()?.apply_op1_no_bwd(&Softcap { cap })
}

struct Softcap {
    cap: f64,
}

impl Softcap {
    fn cpu_as<T: WithDType>(&self, x: &[T]) -> Vec<f32> {
        // candle's affines take their factors as f32 for f32 tensors.
        let (inv, cap) = ((1.0 / self.cap) as f32, self.cap as f32);
        x.iter()
            .map(|v| soft_cap(v.to_f64() as f32, inv, cap))
            .collect()
    }
}

impl CustomOp1 for Softcap {
    fn name(&self) -> &'static str {
        "capture-logit-softcap"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(x) => self.cpu_as(contiguous(x, l1, NAME)?),
            CpuStorage::BF16(x) => self.cpu_as(contiguous(x, l1, NAME)?),
            CpuStorage::F16(x) => self.cpu_as(contiguous(x, l1, NAME)?),
            other => candle_core::bail!("{NAME}: unsupported dtype {:?}", other.dtype()),
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = capture_kernels::logit_softcap((s1, l1), self.cap)?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::model::fused::tests::{bits, random};

    use super::logit_softcap;

    #[test]
    fn fused_softcap_equals_candles_operations_bit_for_bit() {
        // Past the cap, where tanh bends, and the edges: -0 (which candle's
        // affine turns into +0), infinities, NaN.
        let edges = Tensor::new(
            &[
                -0.0f32,
                0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                1e-30,
            ],
            &Device::Cpu,
        )
        .unwrap();
        let logits = Tensor::cat(
            &[random(&[3, 1000], 1, 100.0).flatten_all().unwrap(), edges],
            0,
        )
        .unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = logits.to_dtype(dtype).unwrap();
            let got = logit_softcap(&x, 30.0).unwrap();
            let want = ((x.to_dtype(DType::F32).unwrap() / 30.0)
                .unwrap()
                .tanh()
                .unwrap()
                * 30.0)
                .unwrap();
            assert_eq!(got.dtype(), DType::F32);
            assert_eq!(bits(&got), bits(&want), "{dtype:?}");
        }
        // A cap changes the logits (the comparison above can fail).
        let capped = logit_softcap(&logits, 30.0).unwrap();
        assert_ne!(bits(&capped), bits(&logits));
    }
}
