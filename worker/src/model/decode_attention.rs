//! A decode step's attention as one operation: the few new queries of each
//! sequence, read from the stacked q/k/v projection and rotated, against
//! every cached key and value of the layer,
//!
//! ```text
//! q = rope(qkv's query heads)         as super::rotary rotates queries
//! s = T(q . k)                        the product, as a matmul rounds it
//! p = attention softmax of s          scaling, soft-cap, mask, softmax
//!                                     (see super::attention_softmax), in T
//! out[b, query, head] = T(p . v)      the heads side by side
//! ```
//!
//! which is what `Attention::forward` otherwise computes with the query
//! rotation, a batched matmul, the fused softmax, a second batched matmul
//! (and, with more than one query per sequence, a copy to put the heads side
//! by side): four or five kernels per layer on a GPU where
//! `capture_kernels::decode_attention` is one. The keys must already be in
//! the cache (rotated by `PassRotary::keys_values`). It is used on CUDA
//! devices for passes of at most [`MAX_QUERIES`] tokens per sequence whose
//! attention probabilities are not recorded (the kernel keeps them in
//! shared memory); elsewhere the separate operations are as fast (the CPU
//! has no launches to save) or faster (a prompt's many queries are a
//! matmul's work). `CAPTURE_UNFUSED=1` turns it off with the other fused
//! operations (see [`super::fused`]). Past
//! [`capture_kernels::DECODE_SPLIT_FROM`] keys the kernel splits each query
//! row's keys into parts of 64, each part a block of its own (so a long
//! context is read by many multiprocessors, not by one per query row);
//! `CAPTURE_DECODE_SPLIT_FROM=N` sets that bound (a large N: never split),
//! to compare the two on a GPU.
//!
//! The CPU implementation below computes each step as the kernel does, in
//! order, and is the kernel's reference (`capture::gpu_tests`); it equals
//! candle's operations within float rounding (the tests here), and a whole
//! model run with it equals one without (`capture::batch_tests`).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

use super::attention_softmax::{AttentionSoftmax, score};
use super::fused::{contiguous, unfused};
use super::rotary::{QkvHeads, Queries};

/// The operation's name in errors.
const NAME: &str = "decode-attention";

/// Query tokens per sequence up to which a pass's attention is one kernel.
pub const MAX_QUERIES: usize = 8;

/// Gemma-2's attention of one layer over its KV cache.
#[derive(Debug, Clone, Copy)]
pub struct DecodeAttention {
    pub softmax: AttentionSoftmax,
    pub heads: QkvHeads,
    /// On a GPU, contexts past this many keys are split over the keys (see
    /// the module's documentation); the CPU computes every row at once.
    pub split_from: usize,
}

/// `CAPTURE_DECODE_SPLIT_FROM` if set (read once per process), else
/// [`capture_kernels::DECODE_SPLIT_FROM`].
pub fn split_from() -> usize {
    static SPLIT_FROM: OnceLock<usize> = OnceLock::new();
    *SPLIT_FROM.get_or_init(|| {
        let default = capture_kernels::DECODE_SPLIT_FROM;
        match std::env::var("CAPTURE_DECODE_SPLIT_FROM") {
            Err(_) => default,
            Ok(text) => text.trim().parse().unwrap_or_else(|_| {
                tracing::warn!(
                    "CAPTURE_DECODE_SPLIT_FROM={text:?} is not a number of keys; splitting past {default}"
                );
                default
            }),
        }
    })
}

impl DecodeAttention {
    /// Whether a pass of `t` tokens per sequence on `device` computes its
    /// attention with [`DecodeAttention::forward`] when the probabilities
    /// are not recorded (`on_cpu`: on the CPU too, for tests).
    pub fn applies_to_pass(device: &candle_core::Device, t: usize, on_cpu: bool) -> bool {
        (device.is_cuda() || on_cpu) && t <= MAX_QUERIES && !unfused()
    }

    /// Whether the kernel takes `ctx` keys of `head_dim` elements (its
    /// shared memory; gemma-2-2b's whole context fits either way).
    pub fn fits(&self, ctx: usize, head_dim: usize) -> bool {
        capture_kernels::decode_attention_fits(ctx, head_dim, self.split_from)
    }

    /// The attention of the query heads of `qkv` (`[b, t, heads + 2
    /// kv_heads, d]`), rotated with the pass's rotary `table` (`[t, d]` or
    /// `[b, t, d]`, cos then sin), over the keys `k` and values `v` (`[b,
    /// kv_heads, ctx, d]`, views of the cache), with the f32 `mask` (`[b, 1,
    /// t, ctx]`) when given: `[b, t, heads * d]` in `qkv`'s dtype.
    pub fn forward(
        &self,
        qkv: &Tensor,
        table: &Tensor,
        (k, v): (&Tensor, &Tensor),
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let op = Op {
            params: *self,
            table: table.contiguous()?,
            mask: mask.map(Tensor::contiguous).transpose()?,
        };
        qkv.contiguous()?.apply_op3_no_bwd(k, v, &op)
    }

    /// The same with the rotary queries operation and candle's operations
    /// (and the fused softmax), as `Attention::forward` computes it
    /// otherwise.
    pub fn candle_ops(
        &self,
        qkv: &Tensor,
        table: &Tensor,
        (k, v): (&Tensor, &Tensor),
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let q = qkv
            .contiguous()?
            .apply_op2_no_bwd(&table.contiguous()?, &Queries { heads: self.heads })?;
        let (b, heads, t, d) = q.dims4()?;
        let (kv_heads, ctx) = (k.dim(1)?, k.dim(2)?);
        let groups = heads / kv_heads;
        let q = q.reshape((b, kv_heads, groups * t, d))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, heads, t, ctx))?;
        let probs = self.softmax.forward(&scores, mask, v.dtype())?.reshape((
            b,
            kv_heads,
            groups * t,
            ctx,
        ))?;
        probs
            .matmul(v)?
            .reshape((b, heads, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, heads * d))
    }
}

struct Op {
    params: DecodeAttention,
    table: Tensor,
    mask: Option<Tensor>,
}

/// `(b, t, d, ctx)`, checking the stacked projection, keys, values and mask
/// against each other and the heads.
fn dims(
    heads: QkvHeads,
    qkv: &Layout,
    k: &Layout,
    v: &Layout,
    mask: Option<&Tensor>,
) -> candle_core::Result<[usize; 4]> {
    let (&[b, t, total, d], &[kb, kv_heads, ctx, kd]) = (qkv.dims(), k.dims()) else {
        candle_core::bail!(
            "{NAME}: qkv {:?} and keys {:?}, not [b, t, heads, d] and [b, kv_heads, ctx, d]",
            qkv.dims(),
            k.dims()
        );
    };
    if total != heads.total()
        || kv_heads != heads.kv_heads
        || kv_heads == 0
        || !heads.heads.is_multiple_of(kv_heads)
        || !d.is_multiple_of(2)
        || kb != b
        || kd != d
        || v.dims() != k.dims()
    {
        candle_core::bail!(
            "{NAME}: keys {:?} and values {:?} for qkv {:?} of {heads:?}",
            k.dims(),
            v.dims(),
            qkv.dims()
        );
    }
    if let Some(mask) = mask
        && (mask.dims() != [b, 1, t, ctx] || mask.dtype() != DType::F32)
    {
        candle_core::bail!(
            "{NAME}: mask {:?} {:?} for {t} queries over {ctx} keys",
            mask.dtype(),
            mask.dims()
        );
    }
    Ok([b, t, d, ctx])
}

/// A strided view's elements: `at(b, head, column)` is where row (b, head,
/// column) starts.
struct Strided<'a, T> {
    data: &'a [T],
    start: usize,
    stride: [usize; 3],
}

impl<'a, T> Strided<'a, T> {
    fn new(data: &'a [T], layout: &Layout) -> candle_core::Result<Self> {
        let (dims, stride) = (layout.dims(), layout.stride());
        if stride[3] != 1 && dims[3] > 1 {
            candle_core::bail!("{NAME}: keys and values need a unit stride on d, not {stride:?}");
        }
        let last: usize = dims.iter().zip(stride).map(|(n, s)| (n - 1) * s).sum();
        if layout.start_offset() + last >= data.len() {
            candle_core::bail!("{NAME}: a layout {dims:?} {stride:?} reaches past its storage");
        }
        Ok(Self {
            data,
            start: layout.start_offset(),
            stride: [stride[0], stride[1], stride[2]],
        })
    }

    fn row(&self, b: usize, head: usize, column: usize, d: usize) -> &'a [T] {
        let at = self.start + b * self.stride[0] + head * self.stride[1] + column * self.stride[2];
        &self.data[at..at + d]
    }
}

impl Op {
    /// The attention of the (rotated) `queries` (`[b, heads, t, d]`).
    fn cpu_as<T: WithDType>(
        &self,
        queries: &[T],
        k: (&CpuStorage, &Layout),
        v: (&CpuStorage, &Layout),
        mask: Option<&[f32]>,
        [b, t, d, ctx]: [usize; 4],
    ) -> candle_core::Result<Vec<T>> {
        let QkvHeads { heads, kv_heads } = self.params.heads;
        let keys = Strided::new(k.0.as_slice::<T>()?, k.1)?;
        let values = Strided::new(v.0.as_slice::<T>()?, v.1)?;
        let softmax = self.params.softmax;
        let scale = T::from_f64(softmax.scale);
        let cap = softmax.cap.map(|cap| ((1.0 / cap) as f32, cap as f32));
        let groups = heads / kv_heads;
        let mut out = vec![T::zero(); b * t * heads * d];
        // Output rows are (batch, query, head); each is one query row's
        // attention.
        out.par_chunks_mut(d.max(1))
            .enumerate()
            .for_each(|(o, out)| {
                let (batch, query, head) = (o / (t * heads), (o / heads) % t, o % heads);
                let kv = head / groups;
                let row = ((batch * heads + head) * t + query) * d;
                let q: Vec<f32> = queries[row..row + d]
                    .iter()
                    .map(|x| x.to_f64() as f32)
                    .collect();
                let mask = mask.map(|m| &m[(batch * t + query) * ctx..][..ctx]);
                let mut p: Vec<f32> = (0..ctx)
                    .map(|j| {
                        let key = keys.row(batch, kv, j, d);
                        let dot: f32 = q
                            .iter()
                            .zip(key)
                            .fold(0.0, |acc, (&x, &y)| acc + x * (y.to_f64() as f32));
                        let s = score(T::from_f64(dot as f64), scale, cap);
                        s + mask.map_or(0.0, |m| m[j])
                    })
                    .collect();
                let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for x in p.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                for x in p.iter_mut() {
                    *x = T::from_f64((*x / sum) as f64).to_f64() as f32;
                }
                let mut acc = vec![0f32; d];
                for (j, &pj) in p.iter().enumerate() {
                    for (a, &x) in acc.iter_mut().zip(values.row(batch, kv, j, d)) {
                        *a += pj * (x.to_f64() as f32);
                    }
                }
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = T::from_f64(a as f64);
                }
            });
        Ok(out)
    }
}

impl CustomOp3 for Op {
    fn name(&self) -> &'static str {
        "capture-decode-attention"
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
        let dims = dims(self.params.heads, l1, l2, l3, self.mask.as_ref())?;
        let [b, t, d, _] = dims;
        let heads = self.params.heads.heads;
        let (table_storage, table_layout) = self.table.storage_and_layout();
        let Storage::Cpu(table) = &*table_storage else {
            candle_core::bail!("{NAME}: the rotary table is not on the queries' device");
        };
        let dtype = s1.dtype();
        if [s2.dtype(), s3.dtype(), table.dtype()] != [dtype; 3] {
            candle_core::bail!(
                "{NAME}: qkv {dtype:?}, keys {:?}, values {:?}, table {:?}",
                s2.dtype(),
                s3.dtype(),
                table.dtype()
            );
        }
        // The queries rotated as the rotary operation rotates them.
        let queries = Queries {
            heads: self.params.heads,
        };
        let (q, _) = queries.cpu_fwd(s1, l1, table, table_layout)?;
        let mask_storage = self.mask.as_ref().map(Tensor::storage_and_layout);
        let mask = match &mask_storage {
            Some((storage, layout)) => match &**storage {
                Storage::Cpu(s) => Some(contiguous(s.as_slice::<f32>()?, layout, NAME)?),
                _ => candle_core::bail!("{NAME}: the mask is not on the queries' device"),
            },
            None => None,
        };
        let (k, v) = ((s2, l2), (s3, l3));
        let storage = match &q {
            CpuStorage::F32(q) => CpuStorage::F32(self.cpu_as(q, k, v, mask, dims)?),
            CpuStorage::BF16(q) => CpuStorage::BF16(self.cpu_as(q, k, v, mask, dims)?),
            CpuStorage::F16(q) => CpuStorage::F16(self.cpu_as(q, k, v, mask, dims)?),
            other => candle_core::bail!("{NAME}: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, Shape::from((b, t, heads * d))))
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
        let [b, t, d, _] = dims(self.params.heads, l1, l2, l3, self.mask.as_ref())?;
        let (table_storage, table_layout) = self.table.storage_and_layout();
        let Storage::Cuda(table) = &*table_storage else {
            candle_core::bail!("{NAME}: the rotary table is not on the queries' device");
        };
        let mask_storage = self.mask.as_ref().map(Tensor::storage_and_layout);
        let mask = match &mask_storage {
            Some((storage, layout)) => match &**storage {
                Storage::Cuda(s) => Some((s, *layout)),
                _ => candle_core::bail!("{NAME}: the mask is not on the queries' device"),
            },
            None => None,
        };
        let DecodeAttention {
            softmax,
            heads,
            split_from,
        } = self.params;
        let out = capture_kernels::decode_attention(
            (s1, l1),
            (table, table_layout),
            ((s2, l2), (s3, l3)),
            mask,
            heads,
            (softmax.scale, softmax.cap),
            split_from,
        )?;
        Ok((out, Shape::from((b, t, heads.heads * d))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, IndexOp, Tensor};

    use crate::model::fused::tests::{random, values, window_mask};

    use super::{AttentionSoftmax, DecodeAttention, QkvHeads};

    /// Keys and values as the cache holds them: views of the first `ctx`
    /// columns of a `[2, b, kv_heads, capacity, d]` buffer.
    fn cache(b: usize, kv_heads: usize, ctx: usize, d: usize, seed: u64) -> (Tensor, Tensor) {
        let buffer = random(&[2, b, kv_heads, ctx + 3, d], seed, 1.0);
        (
            buffer.i(0).unwrap().narrow(2, 0, ctx).unwrap(),
            buffer.i(1).unwrap().narrow(2, 0, ctx).unwrap(),
        )
    }

    /// A window of 4 keys, and batch item 1's first key padding.
    fn mask(b: usize, t: usize, ctx: usize) -> Tensor {
        window_mask(b, t, ctx, 4, 1)
    }

    /// A rotary table of cos and sin rows: `[t, d]`, or `[b, t, d]` when
    /// `batched`.
    fn table(b: usize, t: usize, d: usize, batched: bool, seed: u64) -> Tensor {
        let angles = random(&[if batched { b } else { 1 }, t, d / 2], seed, 3.0);
        let table = Tensor::cat(&[angles.cos().unwrap(), angles.sin().unwrap()], 2).unwrap();
        if batched {
            table
        } else {
            table.squeeze(0).unwrap()
        }
    }

    fn op(heads: usize, kv_heads: usize, scale: f64, cap: Option<f64>) -> DecodeAttention {
        DecodeAttention {
            softmax: AttentionSoftmax { scale, cap },
            heads: QkvHeads { heads, kv_heads },
            split_from: capture_kernels::DECODE_SPLIT_FROM,
        }
    }

    /// The largest difference between `a` and `b` relative to `1 + |b|`
    /// (infinite where either is NaN).
    fn worst(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        values(a)
            .iter()
            .zip(values(b))
            .map(|(x, y)| match (x - y).abs() / (1.0 + y.abs()) {
                d if d.is_nan() => f32::INFINITY,
                d => d,
            })
            .fold(0f32, f32::max)
    }

    #[test]
    fn decode_attention_equals_candles_operations() {
        // A decode step of gemma-2-2b's heads, a padded and windowed batch
        // with a few queries each (a table per sequence), and two keys.
        for ([b, heads, kv_heads, t, ctx, d], batched, seed) in [
            ([1, 8, 4, 1, 37, 256], false, 1),
            ([2, 4, 2, 3, 11, 16], true, 2),
            ([3, 2, 2, 1, 2, 8], true, 3),
        ] {
            let (k, v) = cache(b, kv_heads, ctx, d, seed);
            // Large products so that the soft cap bites.
            let qkv = random(&[b, t, heads + 2 * kv_heads, d], seed + 10, 4.0);
            let table = table(b, t, d, batched, seed + 20);
            let mask = mask(b, t, ctx);
            for cap in [Some(50.0), None] {
                let op = op(heads, kv_heads, 24f64.powf(-0.5), cap);
                // f32: the products' sums in another order; bf16 and f16 have
                // come out the same (within one step of the dtype).
                for (dtype, tolerance) in [
                    (DType::F32, 1e-5),
                    (DType::BF16, 1.0 / 128.0),
                    (DType::F16, 1.0 / 1024.0),
                ] {
                    let [qkv, table, k, v] =
                        [&qkv, &table, &k, &v].map(|x| x.to_dtype(dtype).unwrap());
                    for m in [None, Some(&mask)] {
                        let what = format!("{b}x{heads}x{t} over {ctx} {dtype:?} cap {cap:?}");
                        let got = op.forward(&qkv, &table, (&k, &v), m).unwrap();
                        let want = op.candle_ops(&qkv, &table, (&k, &v), m).unwrap();
                        assert_eq!(got.dtype(), dtype, "{what}");
                        assert_eq!(got.dims(), [b, t, heads * d], "{what}");
                        let worst = worst(&got, &want);
                        assert!(worst <= tolerance, "{what}, mask {}: {worst}", m.is_some());
                    }
                }
            }
        }
    }

    #[test]
    fn the_mask_the_rotation_and_the_key_value_heads_matter() {
        // Without each the output would be another: the test above can fail.
        let (b, heads, kv_heads, t, ctx, d) = (2, 4, 2, 2, 9, 8);
        let (k, v) = cache(b, kv_heads, ctx, d, 4);
        let qkv = random(&[b, t, heads + 2 * kv_heads, d], 5, 2.0);
        let table = table(b, t, d, true, 6);
        let op = op(heads, kv_heads, 0.25, Some(50.0));
        let got = op.forward(&qkv, &table, (&k, &v), None).unwrap();
        let masked = op
            .forward(&qkv, &table, (&k, &v), Some(&mask(b, t, ctx)))
            .unwrap();
        assert!(worst(&masked, &got) > 1e-2);
        // No rotation: cos 1, sin 0.
        let half = table.narrow(2, 0, d / 2).unwrap();
        let identity =
            Tensor::cat(&[half.ones_like().unwrap(), half.zeros_like().unwrap()], 2).unwrap();
        let unrotated = op.candle_ops(&qkv, &identity, (&k, &v), None).unwrap();
        assert!(worst(&got, &unrotated) > 1e-2);
        // Heads 0 and 1 share key/value head 0: swapping the two key/value
        // heads changes what heads 0 and 1 see.
        let swapped =
            |x: &Tensor| Tensor::cat(&[x.i((.., 1..2))?, x.i((.., 0..1))?], 1)?.contiguous();
        let (ks, vs) = (swapped(&k).unwrap(), swapped(&v).unwrap());
        let other = op.candle_ops(&qkv, &table, (&ks, &vs), None).unwrap();
        assert!(worst(&got, &other) > 1e-2);
    }

    #[test]
    fn gemma_2_2b_s_whole_context_fits_the_kernel() {
        // One block per query row: 48 KiB of shared memory less the
        // reductions' 256 bytes, in f32: the scores, the query and the value
        // sums' parts (512 threads).
        let one_block = DecodeAttention {
            split_from: usize::MAX,
            ..op(8, 4, 1.0, None)
        };
        assert!(one_block.fits(8192, 256));
        assert!(one_block.fits(11_456, 256));
        assert!(!one_block.fits(11_457, 256));
        assert!(one_block.fits(11_704, 8));
        assert!(!one_block.fits(11_705, 8));
        // Split over the keys (the default past 256 keys): any context.
        let split = op(8, 4, 1.0, None);
        assert_eq!(split.split_from, capture_kernels::DECODE_SPLIT_FROM);
        assert!(split.fits(8192, 256));
        assert!(split.fits(100_000, 256));
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let op = op(4, 2, 1.0, None);
        let (k, v) = cache(2, 2, 5, 8, 6);
        let qkv = random(&[2, 1, 8, 8], 7, 1.0);
        let table = table(2, 1, 8, false, 8);
        let error = |qkv: &Tensor, table: &Tensor, k: &Tensor, v: &Tensor, m: Option<&Tensor>| {
            op.forward(qkv, table, (k, v), m).unwrap_err().to_string()
        };
        let seven_heads = random(&[2, 1, 7, 8], 7, 1.0);
        let e = error(&seven_heads, &table, &k, &v, None);
        assert!(e.contains("for qkv [2, 1, 7, 8]"), "{e}");
        let short = v.narrow(2, 0, 4).unwrap();
        let e = error(&qkv, &table, &k, &short, None);
        assert!(e.contains("values [2, 2, 4, 8]"), "{e}");
        let e = error(&qkv, &table, &k, &v, Some(&mask(2, 2, 5)));
        assert!(
            e.contains("mask F32 [2, 1, 2, 5] for 1 queries over 5 keys"),
            "{e}"
        );
        let e = error(&qkv.to_dtype(DType::BF16).unwrap(), &table, &k, &v, None);
        assert!(
            e.contains("qkv BF16, keys F32, values F32, table F32"),
            "{e}"
        );
        let e = error(&qkv, &table.narrow(1, 0, 6).unwrap(), &k, &v, None);
        assert!(e.contains("table [1, 6]"), "{e}");
        let flat = random(&[2, 8, 8], 7, 1.0);
        assert!(error(&flat, &table, &k, &v, None).contains("not [b, t, heads, d]"));
    }
}
