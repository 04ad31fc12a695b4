//! Gemma-2's attention scores to probabilities as one operation:
//!
//! ```text
//! s = T(raw * scale)                  the scaled q.k product, compute dtype T
//! s = tanh(s / cap) * cap             soft-capping, f32 (when the config caps)
//! s = s + mask                        additive f32 mask [b, 1, t, ctx]
//! p = softmax(s)                      f32, over the keys; then the output dtype
//! ```
//!
//! transformers' eager Gemma-2 attention computes the same (its softmax in
//! f32). With candle's operations it is an affine, a cast, two affines and a
//! tanh, a broadcast add, the softmax and a cast: up to eight kernels on a
//! GPU where this is one (`capture_kernels::attention_softmax`). On the CPU
//! each step is computed as those operations compute it, except that a
//! row's sum is taken in order where candle may add in SIMD lanes (test
//! `fused_attention_softmax_equals_candles_operations`: within 4e-6); the
//! CUDA kernel reduces in parallel, so it differs within f32 rounding too
//! (`capture::gpu_tests`). `CAPTURE_UNFUSED=1` selects candle's operations
//! instead (see [`super::fused`]).

use super::fused::{contiguous, for_each_row, unfused};
use super::softcap::soft_cap;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, WithDType};

/// The operations' name in errors.
const NAME: &str = "attention-softmax";

/// Scaling and soft-capping of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSoftmax {
    /// `query_pre_attn_scalar ** -0.5`.
    pub scale: f64,
    /// `attn_logit_softcapping`.
    pub cap: Option<f64>,
}

impl AttentionSoftmax {
    /// The probabilities, `[b, heads, t, ctx]` in `out` (f32 or the scores'
    /// dtype), from the raw products `scores` (`[b, heads, t, ctx]`) and an
    /// optional f32 `mask` (`[b, 1, t, ctx]`, 0 or -inf).
    pub fn forward(
        &self,
        scores: &Tensor,
        mask: Option<&Tensor>,
        out: DType,
    ) -> candle_core::Result<Tensor> {
        if unfused() {
            return self.candle_ops(scores, mask)?.to_dtype(out);
        }
        if out != DType::F32 && out != scores.dtype() {
            candle_core::bail!("{NAME}: output {out:?} for scores in {:?}", scores.dtype());
        }
        let op = Op { params: *self, out };
        let scores = scores.contiguous()?;
        match mask {
            None => scores.apply_op1_no_bwd(&op),
            Some(mask) => scores.apply_op2_no_bwd(&mask.contiguous()?, &op),
        }
    }

    /// The same with candle's operations, as the model computed it before
    /// (f32 probabilities).
    fn candle_ops(&self, scores: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let s = (scores * self.scale)?.to_dtype(DType::F32)?;
        let s = match self.cap {
            Some(cap) => ((s / cap)?.tanh()? * cap)?,
            None => s,
        };
        let s = match mask {
            Some(mask) => s.broadcast_add(mask)?,
            None => s,
        };
        candle_nn::ops::softmax_last_dim(&s)
    }
}

struct Op {
    params: AttentionSoftmax,
    out: DType,
}

/// `(batch, heads, t, ctx)` of the scores, checking the mask against them.
fn dims(
    scores: &Layout,
    mask: Option<&Layout>,
) -> candle_core::Result<(usize, usize, usize, usize)> {
    let &[b, heads, t, ctx] = scores.dims() else {
        candle_core::bail!("{NAME}: scores {:?}, not [b, heads, t, ctx]", scores.dims());
    };
    if let Some(mask) = mask
        && mask.dims() != [b, 1, t, ctx]
    {
        candle_core::bail!(
            "{NAME}: mask {:?} for scores {:?}",
            mask.dims(),
            scores.dims()
        );
    }
    Ok((b, heads, t, ctx))
}

impl Op {
    fn cpu(
        &self,
        scores: (&CpuStorage, &Layout),
        mask: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, heads, t, _) = dims(scores.1, mask.map(|m| m.1))?;
        let mask = match mask {
            Some((s, l)) => Some(contiguous(s.as_slice::<f32>()?, l, NAME)?),
            None => None,
        };
        let probs = match scores.0.dtype() {
            DType::F32 => self.cpu_probs::<f32>(scores, mask, heads, t)?,
            DType::BF16 => self.cpu_probs::<half::bf16>(scores, mask, heads, t)?,
            DType::F16 => self.cpu_probs::<half::f16>(scores, mask, heads, t)?,
            other => candle_core::bail!("{NAME}: unsupported dtype {other:?}"),
        };
        let storage = match self.out {
            DType::F32 => CpuStorage::F32(probs),
            DType::BF16 => {
                CpuStorage::BF16(probs.iter().map(|&p| half::bf16::from_f32(p)).collect())
            }
            DType::F16 => CpuStorage::F16(probs.iter().map(|&p| half::f16::from_f32(p)).collect()),
            other => candle_core::bail!("{NAME}: unsupported output dtype {other:?}"),
        };
        Ok((storage, scores.1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        scores: (&candle_core::CudaStorage, &Layout),
        mask: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> candle_core::Result<candle_core::CudaStorage> {
        // capture_kernels checks the shapes as `dims` does.
        let AttentionSoftmax { scale, cap } = self.params;
        capture_kernels::attention_softmax(scores, mask, self.out, scale, cap)
    }

    /// f32 probabilities, each step as candle's CPU operations compute it
    /// (the sum over a row in order, where candle's may use SIMD lanes).
    fn cpu_probs<T: WithDType>(
        &self,
        scores: (&CpuStorage, &Layout),
        mask: Option<&[f32]>,
        heads: usize,
        t: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let raw = contiguous(scores.0.as_slice::<T>()?, scores.1, NAME)?;
        let ctx = *scores.1.dims().last().unwrap_or(&0);
        let mut probs = vec![0f32; raw.len()];
        let scale = T::from_f64(self.params.scale);
        let cap = self.params.cap.map(|cap| ((1.0 / cap) as f32, cap as f32));
        for_each_row(raw, &mut probs, ctx, |r, raw, p| {
            let mask = mask.map(|m| {
                let (batch, query) = (r / (heads * t), r % t);
                &m[(batch * t + query) * ctx..][..ctx]
            });
            for (i, (&v, p)) in raw.iter().zip(p.iter_mut()).enumerate() {
                let mut s = score(v, scale, cap);
                if let Some(mask) = mask {
                    s += mask[i];
                }
                *p = s;
            }
            // candle_nn's softmax_last_dim.
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in p.iter_mut() {
                *x = (*x - max).exp();
            }
            let sum: f32 = p.iter().sum();
            for x in p.iter_mut() {
                *x /= sum;
            }
        });
        Ok(probs)
    }
}

/// One raw q.k product `raw` as a score, as candle's operations compute
/// it: `T(raw * scale)` (candle's affine takes its factors in the tensor's
/// dtype and computes `v * mul + add`), then in f32 `tanh(s * inv) * cap`
/// when `cap` is `(1 / cap, cap)`.
pub(super) fn score<T: WithDType>(raw: T, scale: T, cap: Option<(f32, f32)>) -> f32 {
    let s = (raw * scale + T::zero()).to_f64() as f32;
    match cap {
        Some((inv, cap)) => soft_cap(s, inv, cap),
        None => s,
    }
}

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        "capture-attention-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = self.cuda((s1, l1), None)?;
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp2 for Op {
    fn name(&self) -> &'static str {
        "capture-attention-softmax-masked"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), Some((s2, l2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = self.cuda((s1, l1), Some((s2, l2)))?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor};

    use crate::model::fused::tests::{random, values, window_mask};

    use super::AttentionSoftmax;

    /// A causal mask with a window of 3 and the first key of batch item 1
    /// padding.
    fn mask(b: usize, t: usize, ctx: usize) -> Tensor {
        window_mask(b, t, ctx, 3, 1)
    }

    /// Every element of `got` within `relative` of `want` (plus 2e-7 for
    /// the order of a row's sum), and zero exactly where `want` is.
    fn assert_close(got: &Tensor, want: &Tensor, relative: f32, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}");
        let (got, want) = (values(got), values(want));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(*g == 0.0, *w == 0.0, "{what}: element {i}: {g} against {w}");
            assert!(
                (g - w).abs() <= relative * w.abs() + 2e-7,
                "{what}: element {i}: {g} against {w}"
            );
        }
    }

    #[test]
    fn fused_attention_softmax_equals_candles_operations() {
        // Few rows and many (parallel); large scores so the cap bites.
        for (shape, seed) in [([1, 8, 1, 5], 1), ([2, 4, 6, 9], 2), ([3, 8, 4, 40], 3)] {
            let [b, _, t, ctx] = shape;
            let mask = mask(b, t, ctx);
            for cap in [Some(50.0), None] {
                let op = AttentionSoftmax {
                    scale: 24f64.powf(-0.5),
                    cap,
                };
                // Output rounding: one step of the dtype at most.
                for (dtype, step) in [
                    (DType::F32, 4e-6),
                    (DType::BF16, 1.0 / 128.0),
                    (DType::F16, 1.0 / 1024.0),
                ] {
                    let raw = random(&shape, seed, 300.0).to_dtype(dtype).unwrap();
                    for m in [None, Some(&mask)] {
                        let want = op.candle_ops(&raw, m).unwrap();
                        let what = format!("{shape:?} {dtype:?} cap {cap:?} mask {}", m.is_some());
                        let got = op.forward(&raw, m, DType::F32).unwrap();
                        assert_eq!(got.dtype(), DType::F32);
                        assert_close(&got, &want, 4e-6, &what);
                        let got = op.forward(&raw, m, dtype).unwrap();
                        assert_eq!(got.dtype(), dtype);
                        assert_close(&got, &want.to_dtype(dtype).unwrap(), step, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn masked_keys_get_no_probability_and_rows_sum_to_one() {
        let op = AttentionSoftmax {
            scale: 0.0625,
            cap: Some(50.0),
        };
        let (b, t, ctx) = (2, 3, 5);
        let rows = op
            .forward(
                &random(&[b, 2, t, ctx], 4, 5.0),
                Some(&mask(b, t, ctx)),
                DType::F32,
            )
            .unwrap()
            .reshape((b * 2 * t, ctx))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, row) in rows.iter().enumerate() {
            let (batch, q) = (r / (2 * t), r % t);
            let pos = ctx - t + q;
            for (k, p) in row.iter().enumerate() {
                let visible = k <= pos && pos - k < 3 && !(batch == 1 && k == 0);
                assert_eq!(*p > 0.0, visible, "row {r} key {k}: {p}");
            }
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "row {r} sums to {sum}");
        }
    }

    #[test]
    fn wrong_shapes_and_dtypes_are_errors() {
        let op = AttentionSoftmax {
            scale: 1.0,
            cap: None,
        };
        let scores = random(&[2, 4, 3, 5], 5, 0.5);
        let err = op
            .forward(&random(&[4, 3, 5], 5, 0.5), None, DType::F32)
            .unwrap_err();
        assert!(err.to_string().contains("not [b, heads, t, ctx]"), "{err}");
        let err = op
            .forward(&scores, Some(&mask(1, 3, 5)), DType::F32)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("mask [1, 1, 3, 5] for scores [2, 4, 3, 5]"),
            "{err}"
        );
        let err = op.forward(&scores, None, DType::BF16).unwrap_err();
        assert!(
            err.to_string().contains("output BF16 for scores in F32"),
            "{err}"
        );
    }
}
