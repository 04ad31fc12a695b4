//! A decode step's attention over the KV cache in one kernel
//! (`decode_attention.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, WithDType};
use half::{bf16, f16};

use super::{DECODE_ATTENTION, view};
use crate::{
    DECODE_ATTENTION_BLOCK, DECODE_SPLIT_BLOCK, DECODE_SPLIT_CHUNK, QkvHeads,
    decode_attention_fits, decode_attention_parts, decode_attention_shared_bytes,
    decode_attention_shared_need, decode_split_shared_bytes,
};

const WHAT: &str = "decode-attention";

/// `AttentionShape` of `decode_attention.cu`, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AttentionShape {
    k_batch: i64,
    k_head: i64,
    k_column: i64,
    v_batch: i64,
    v_head: i64,
    v_column: i64,
    heads: i32,
    kv_heads: i32,
    t: i32,
    ctx: i32,
    d: i32,
    table_batched: i32,
    scale: f32,
    cap: f32,
}

// SAFETY: plain `#[repr(C)]` data laid out as the kernel's `AttentionShape`
// (six long longs, six ints, two floats), with no pointers.
unsafe impl DeviceRepr for AttentionShape {}

/// Gemma-2's attention of the query heads of `qkv` (the stacked projection
/// `[b, t, heads + 2 kv_heads, d]`, contiguous), rotated with the pass's
/// rotary `table` (`[t, d]`, or `[b, t, d]` per sequence: each row's cos,
/// then sin; contiguous) as `rotary_queries` rotates them, over the keys `k`
/// and values `v` (`[b, kv_heads, ctx, d]` each, views with a unit stride on
/// `d`, such as the KV cache's): per query row the scores `T(T(q.k) *
/// T(scale))`, soft-capped in f32 as `tanh(s / cap) * cap` when `cap` is
/// given, plus the f32 `mask` (`[b, 1, t, ctx]`) when given, their softmax
/// in f32 rounded to T, and its product with the values; a new storage `[b,
/// t, heads * d]` (the heads side by side, as the output projection reads
/// them). f32, bf16 or f16. Contexts past `split_from` keys are split over
/// the keys ([`crate::decode_attention_parts`]); `ctx` and `d` must fit the
/// kernels' shared memory ([`crate::decode_attention_fits`]).
pub fn decode_attention(
    qkv: (&CudaStorage, &Layout),
    table: (&CudaStorage, &Layout),
    (k, v): ((&CudaStorage, &Layout), (&CudaStorage, &Layout)),
    mask: Option<(&CudaStorage, &Layout)>,
    heads: QkvHeads,
    (scale, cap): (f64, Option<f64>),
    split_from: usize,
) -> candle_core::Result<CudaStorage> {
    let &[b, t, total, d] = qkv.1.dims() else {
        candle_core::bail!("{WHAT}: qkv {:?}, not [b, t, heads, d]", qkv.1.dims());
    };
    let &[kb, kv_heads, ctx, kd] = k.1.dims() else {
        candle_core::bail!("{WHAT}: keys {:?}, not [b, kv_heads, ctx, d]", k.1.dims());
    };
    if total != heads.total()
        || kv_heads != heads.kv_heads
        || kv_heads == 0
        || !heads.heads.is_multiple_of(kv_heads)
        || !d.is_multiple_of(2)
        || kb != b
        || kd != d
        || v.1.dims() != k.1.dims()
        || k.0.dtype() != qkv.0.dtype()
        || v.0.dtype() != qkv.0.dtype()
        || table.0.dtype() != qkv.0.dtype()
    {
        candle_core::bail!(
            "{WHAT}: keys {:?} {:?}, values {:?} {:?}, table {:?} for qkv {:?} {:?} of {heads:?}",
            k.0.dtype(),
            k.1.dims(),
            v.0.dtype(),
            v.1.dims(),
            table.0.dtype(),
            qkv.0.dtype(),
            qkv.1.dims()
        );
    }
    let batched = match table.1.dims() {
        [rows, width] if (*rows, *width) == (t, d) => false,
        [tb, rows, width] if (*tb, *rows, *width) == (b, t, d) => true,
        other => candle_core::bail!("{WHAT}: table {other:?} for qkv {:?}", qkv.1.dims()),
    };
    if let Some(m) = mask
        && (m.1.dims() != [b, 1, t, ctx] || m.0.dtype() != DType::F32)
    {
        candle_core::bail!(
            "{WHAT}: mask {:?} {:?} for {t} queries over {ctx} keys",
            m.0.dtype(),
            m.1.dims()
        );
    }
    if !decode_attention_fits(ctx, d, split_from) {
        candle_core::bail!(
            "{WHAT}: {ctx} keys of {d} need {} bytes of shared memory, more than a block has",
            decode_attention_shared_need(ctx, d, split_from)
        );
    }
    let args = Args {
        table,
        batched,
        mask,
        heads,
        scale,
        cap,
        parts: decode_attention_parts(ctx, split_from),
    };
    match qkv.0.dtype() {
        DType::F32 => args.launch::<f32>("f32", qkv, k, v),
        DType::BF16 => args.launch::<bf16>("bf16", qkv, k, v),
        DType::F16 => args.launch::<f16>("f16", qkv, k, v),
        other => candle_core::bail!("{WHAT}: unsupported dtype {other:?}"),
    }
}

struct Args<'a> {
    table: (&'a CudaStorage, &'a Layout),
    batched: bool,
    mask: Option<(&'a CudaStorage, &'a Layout)>,
    heads: QkvHeads,
    scale: f64,
    cap: Option<f64>,
    /// Split over the keys into this many parts, or one block per row.
    parts: Option<usize>,
}

/// The part of `storage` from `layout`'s start, and the (batch, head,
/// column) strides, checking that every element the layout reaches is in
/// it and that `d` is its unit-stride last axis.
fn strided<'a, T: CudaDType + DeviceRepr>(
    (storage, layout): (&'a CudaStorage, &Layout),
) -> candle_core::Result<(
    candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>,
    [i64; 3],
)> {
    let slice = storage.as_cuda_slice::<T>()?;
    let (dims, stride, start) = (layout.dims(), layout.stride(), layout.start_offset());
    if stride[3] != 1 && dims[3] > 1 {
        candle_core::bail!("{WHAT}: keys and values need a unit stride on d, not {stride:?}");
    }
    let last: usize = dims.iter().zip(stride).map(|(n, s)| (n - 1) * s).sum();
    if start + last >= slice.len() {
        candle_core::bail!(
            "{WHAT}: a layout {dims:?} {stride:?} from {start} reaches past {} elements",
            slice.len()
        );
    }
    let strides = [stride[0] as i64, stride[1] as i64, stride[2] as i64];
    Ok((slice.slice(start..), strides))
}

impl Args<'_> {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        suffix: &str,
        qkv: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
    ) -> candle_core::Result<CudaStorage> {
        let dims = qkv.1.dims();
        let (b, t, d) = (dims[0], dims[1], dims[3]);
        let QkvHeads { heads, kv_heads } = self.heads;
        let ctx = k.1.dims()[2];
        let dev = qkv.0.device().clone();
        let stacked = view::<T>(qkv, WHAT)?;
        let table = view::<T>(self.table, WHAT)?;
        let (keys, ks) = strided::<T>(k)?;
        let (values, vs) = strided::<T>(v)?;
        let mask = self.mask.map(|m| view::<f32>(m, WHAT)).transpose()?;
        let rows = b * t * heads;
        // SAFETY: the kernels below write every element (each query row's
        // `d` elements, by one block).
        let out = unsafe { dev.alloc::<T>(rows * d)? };
        if rows == 0 || ctx == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(out, dev));
        }
        let shape = AttentionShape {
            k_batch: ks[0],
            k_head: ks[1],
            k_column: ks[2],
            v_batch: vs[0],
            v_head: vs[1],
            v_column: vs[2],
            heads: heads as i32,
            kv_heads: kv_heads as i32,
            t: t as i32,
            ctx: ctx as i32,
            d: d as i32,
            table_batched: i32::from(self.batched),
            // The scale as candle's affine applies it: in the dtype.
            scale: T::from_f64(self.scale).to_f64() as f32,
            cap: self.cap.map_or(0.0, |c| c as f32),
        };
        let func = |kernel: &str| {
            dev.get_or_load_custom_func(
                &format!("capture_decode_{kernel}_{suffix}"),
                DECODE_ATTENTION.0,
                DECODE_ATTENTION.1,
            )
        };
        let null = 0u64;
        // The arguments' safety, for every launch below: they are the
        // kernel's, in its order and types (a null mask pointer is "no
        // mask"); `stacked` holds the `[b, t, heads + 2 kv_heads, d]`
        // elements (d even), `table` `[t, d]` or, batched, `[b, t, d]`,
        // `out` `[b, t, heads, d]`, the mask `[b, 1, t, ctx]` (all checked
        // by `decode_attention`), and every key and value element the
        // strides reach for `[b, kv_heads, ctx, d]` lies in its view
        // (`strided`); `heads` is a multiple of `kv_heads`. A block reads
        // its query head row, its table row, its batch item's and key/value
        // head's keys, values and mask row, and writes its own output row or
        // part; the dynamic shared memory is what its body uses, within a
        // block's 48 KiB (`decode_attention_fits`, checked by
        // `decode_attention`).
        let Some(parts) = self.parts else {
            let func = func("attention")?;
            let mut builder = func.builder();
            builder.arg(&stacked);
            builder.arg(&table);
            builder.arg(&keys);
            builder.arg(&values);
            match &mask {
                Some(mask) => builder.arg(mask),
                None => builder.arg(&null),
            };
            builder.arg(&out);
            builder.arg(&shape);
            let config = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (DECODE_ATTENTION_BLOCK as u32, 1, 1),
                shared_mem_bytes: decode_attention_shared_bytes(ctx, d) as u32,
            };
            // SAFETY: see above; one block per query row, each with the
            // `ctx + d + max(block, d)` floats of shared memory it uses.
            unsafe { builder.launch(config) }.w()?;
            return Ok(CudaStorage::wrap_cuda_slice(out, dev));
        };
        // Split: each part's scores and its maximum and sum, then each
        // part's probabilities and value sums, then each row's parts added.
        let (chunk, splits) = (DECODE_SPLIT_CHUNK as i32, parts as i32);
        // SAFETY: written in full by the scores kernel (every key of every
        // row, and every part's two statistics) before the values kernel
        // reads them, and by the values kernel (every part's `d` sums)
        // before the combining kernel reads them: one stream, in order.
        let (scores, stats, partials) = unsafe {
            (
                dev.alloc::<f32>(rows * ctx)?,
                dev.alloc::<f32>(rows * parts * 2)?,
                dev.alloc::<f32>(rows * parts * d)?,
            )
        };
        let blocks = |count: usize, shared_bytes: usize| LaunchConfig {
            grid_dim: (count as u32, 1, 1),
            block_dim: (DECODE_SPLIT_BLOCK as u32, 1, 1),
            shared_mem_bytes: shared_bytes as u32,
        };
        let func_scores = func("scores")?;
        let mut builder = func_scores.builder();
        builder.arg(&stacked);
        builder.arg(&table);
        builder.arg(&keys);
        match &mask {
            Some(mask) => builder.arg(mask),
            None => builder.arg(&null),
        };
        builder.arg(&scores);
        builder.arg(&stats);
        builder.arg(&shape);
        builder.arg(&chunk);
        builder.arg(&splits);
        // SAFETY: see above; a block per (row, part), `d` floats of shared
        // memory for the rotated query; `scores` holds `[rows, ctx]`,
        // `stats` `[rows, parts, 2]`.
        unsafe { builder.launch(blocks(rows * parts, d * 4)) }.w()?;
        let func_values = func("values")?;
        let mut builder = func_values.builder();
        builder.arg(&values);
        builder.arg(&scores);
        builder.arg(&stats);
        builder.arg(&partials);
        builder.arg(&shape);
        builder.arg(&chunk);
        builder.arg(&splits);
        // SAFETY: see above; a block per (row, part), with a part's
        // probabilities and the value sums' parts in shared memory (`chunk
        // + max(block, d)` floats, `decode_split_shared_bytes`);
        // `partials` holds `[rows, parts, d]`.
        unsafe { builder.launch(blocks(rows * parts, decode_split_shared_bytes(d))) }.w()?;
        let func_combine = func("combine")?;
        let mut builder = func_combine.builder();
        builder.arg(&partials);
        builder.arg(&out);
        builder.arg(&shape);
        builder.arg(&splits);
        // SAFETY: see above; a block per row, reading its parts' sums and
        // writing its output row; no shared memory.
        unsafe { builder.launch(blocks(rows, 0)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
