//! The kernels that reduce over a row (one block per row): the RMS norm
//! (alone, with the residual addition, or two with the addition between
//! them), the attention softmax and the logits' argmax.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, WithDType};
use half::{bf16, f16};

use super::{ATTENTION_SOFTMAX, HEAD, RMS_NORM, view};

/// `residual + T(x / sqrt(mean(x^2) + eps) * weight)` over the last axis
/// of `x` (f32, bf16 or f16; without `residual`, just the norm), with an
/// f32 `weight` as long as that axis; a new storage shaped as `x`.
pub fn rms_norm(
    x: (&CudaStorage, &Layout),
    residual: Option<(&CudaStorage, &Layout)>,
    weight: (&CudaStorage, &Layout),
    eps: f32,
) -> candle_core::Result<CudaStorage> {
    const WHAT: &str = "rms-norm";
    let width = *x.1.dims().last().unwrap_or(&0);
    if weight.1.dims() != [width] || weight.0.dtype() != DType::F32 {
        candle_core::bail!(
            "{WHAT}: weight {:?} {:?} for rows of {width}",
            weight.0.dtype(),
            weight.1.dims()
        );
    }
    if let Some(r) = residual
        && (r.1.dims() != x.1.dims() || r.0.dtype() != x.0.dtype())
    {
        candle_core::bail!(
            "{WHAT}: residual {:?} for input {:?}",
            r.1.dims(),
            x.1.dims()
        );
    }
    match x.0.dtype() {
        DType::F32 => norm::<f32>("f32", x, residual, weight, eps, None),
        DType::BF16 => norm::<bf16>("bf16", x, residual, weight, eps, None),
        DType::F16 => norm::<f16>("f16", x, residual, weight, eps, None),
        other => candle_core::bail!("{WHAT}: unsupported dtype {other:?}"),
    }
}

/// Launches one of the norm kernels: the norm, with the residual addition
/// when `residual` is given, and then the second norm (`[2, width]`
/// weights, a second `eps`, an output twice the input's size) when
/// `second_eps` is given (only with a residual).
fn norm<T: CudaDType + DeviceRepr>(
    suffix: &str,
    x: (&CudaStorage, &Layout),
    residual: Option<(&CudaStorage, &Layout)>,
    weight: (&CudaStorage, &Layout),
    eps: f32,
    second_eps: Option<f32>,
) -> candle_core::Result<CudaStorage> {
    const WHAT: &str = "rms-norm";
    let dev = x.0.device().clone();
    let xs = view::<T>(x, WHAT)?;
    let ws = view::<f32>(weight, WHAT)?;
    let rs = residual.map(|r| view::<T>(r, WHAT)).transpose()?;
    let (name, halves) = match (&rs, second_eps) {
        (None, None) => ("capture_rms_norm", 1),
        (Some(_), None) => ("capture_rms_norm_add", 1),
        (Some(_), Some(_)) => ("capture_rms_norm_add_norm", 2),
        (None, Some(_)) => candle_core::bail!("{WHAT}: a second norm needs the residual"),
    };
    let (elements, width) = (xs.len(), ws.len() / halves);
    // Loaded once per device.
    let func = dev.get_or_load_custom_func(&format!("{name}_{suffix}"), RMS_NORM.0, RMS_NORM.1)?;
    // SAFETY: the kernel below writes every element (one block per row,
    // of each half).
    let out = unsafe { dev.alloc::<T>(halves * elements)? };
    if width > 0 && elements > 0 {
        let width_arg = width as i32;
        let mut builder = func.builder();
        builder.arg(&xs);
        if let Some(rs) = &rs {
            builder.arg(rs);
        }
        builder.arg(&ws);
        builder.arg(&out);
        builder.arg(&width_arg);
        builder.arg(&eps);
        if let Some(second) = &second_eps {
            builder.arg(second);
        }
        // SAFETY: the arguments are the kernel's, in its order and types;
        // `xs`, `rs` hold `elements`, a whole number of rows of `width` (the
        // last axis, checked against the weights: `[width]`, or `[2,
        // width]` for two norms), and `out` that many times `halves`; block
        // `r` reads row `r` and writes row `r` (of each half: the kernel
        // takes the grid's size as a half's rows).
        unsafe { builder.launch(rows(elements / width, width)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Two norms with the residual addition between them, over the last axis
/// of `x` (f32, bf16 or f16): `sum = residual + T(x / rms(x) * w1)` and
/// `T(sum / rms(sum) * w2)`, with `weights` `[2, width]` in f32 (w1, then
/// w2) and `eps` for each; a new storage `[2, ...x's shape]`: the sums,
/// then the normalised sums.
pub fn rms_norm_add_norm(
    x: (&CudaStorage, &Layout),
    residual: (&CudaStorage, &Layout),
    weights: (&CudaStorage, &Layout),
    eps: (f32, f32),
) -> candle_core::Result<CudaStorage> {
    const WHAT: &str = "rms-norm-add-norm";
    let width = *x.1.dims().last().unwrap_or(&0);
    if weights.1.dims() != [2, width]
        || weights.0.dtype() != DType::F32
        || residual.1.dims() != x.1.dims()
        || residual.0.dtype() != x.0.dtype()
    {
        candle_core::bail!(
            "{WHAT}: weights {:?} {:?} and residual {:?} for input {:?}",
            weights.0.dtype(),
            weights.1.dims(),
            residual.1.dims(),
            x.1.dims()
        );
    }
    let (eps, second) = (eps.0, Some(eps.1));
    let residual = Some(residual);
    match x.0.dtype() {
        DType::F32 => norm::<f32>("f32", x, residual, weights, eps, second),
        DType::BF16 => norm::<bf16>("bf16", x, residual, weights, eps, second),
        DType::F16 => norm::<f16>("f16", x, residual, weights, eps, second),
        other => candle_core::bail!("{WHAT}: unsupported dtype {other:?}"),
    }
}

/// Attention probabilities `[b, heads, t, ctx]` in `out` (f32, or the
/// scores' dtype) from raw query-key products `scores` (`[b, heads, t,
/// ctx]`; f32, bf16 or f16): `T(raw * T(scale))`, soft-capped in f32 as
/// `tanh(s / cap) * cap` when `cap` is given, plus the f32 `mask` (`[b, 1,
/// t, ctx]`) when given, then the softmax over the keys in f32.
pub fn attention_softmax(
    scores: (&CudaStorage, &Layout),
    mask: Option<(&CudaStorage, &Layout)>,
    out: DType,
    scale: f64,
    cap: Option<f64>,
) -> candle_core::Result<CudaStorage> {
    const WHAT: &str = "attention-softmax";
    let &[b, _, t, ctx] = scores.1.dims() else {
        candle_core::bail!(
            "{WHAT}: scores {:?}, not [b, heads, t, ctx]",
            scores.1.dims()
        );
    };
    if let Some(m) = mask
        && (m.1.dims() != [b, 1, t, ctx] || m.0.dtype() != DType::F32)
    {
        candle_core::bail!(
            "{WHAT}: mask {:?} for scores {:?}",
            m.1.dims(),
            scores.1.dims()
        );
    }
    let args = Softmax { mask, scale, cap };
    match (scores.0.dtype(), out) {
        (DType::F32, DType::F32) => args.launch::<f32, f32>("f32_f32", scores),
        (DType::BF16, DType::F32) => args.launch::<bf16, f32>("bf16_f32", scores),
        (DType::BF16, DType::BF16) => args.launch::<bf16, bf16>("bf16_bf16", scores),
        (DType::F16, DType::F32) => args.launch::<f16, f32>("f16_f32", scores),
        (DType::F16, DType::F16) => args.launch::<f16, f16>("f16_f16", scores),
        (s, o) => candle_core::bail!("{WHAT}: unsupported dtypes {s:?} to {o:?}"),
    }
}

struct Softmax<'a> {
    mask: Option<(&'a CudaStorage, &'a Layout)>,
    scale: f64,
    cap: Option<f64>,
}

impl Softmax<'_> {
    fn launch<T: CudaDType + DeviceRepr + WithDType, O: CudaDType + DeviceRepr>(
        &self,
        suffix: &str,
        scores: (&CudaStorage, &Layout),
    ) -> candle_core::Result<CudaStorage> {
        const WHAT: &str = "attention-softmax";
        let dims = scores.1.dims();
        let (heads, t, ctx) = (dims[1], dims[2], dims[3]);
        let dev = scores.0.device().clone();
        let raw = view::<T>(scores, WHAT)?;
        let mask = self.mask.map(|m| view::<f32>(m, WHAT)).transpose()?;
        let elements = raw.len();
        let name = format!("capture_attention_softmax_{suffix}");
        let func = dev.get_or_load_custom_func(&name, ATTENTION_SOFTMAX.0, ATTENTION_SOFTMAX.1)?;
        // SAFETY: the kernel below writes every element (one block per row).
        let out = unsafe { dev.alloc::<O>(elements)? };
        if elements > 0 {
            // The scale as candle's affine applies it: in the scores' dtype.
            let scale = T::from_f64(self.scale).to_f64() as f32;
            let cap = self.cap.map_or(0.0, |c| c as f32);
            let (ctx_arg, t_arg, heads_arg) = (ctx as i32, t as i32, heads as i32);
            let null = 0u64;
            let mut builder = func.builder();
            builder.arg(&raw);
            match &mask {
                Some(mask) => builder.arg(mask),
                None => builder.arg(&null),
            };
            builder.arg(&out);
            builder.arg(&ctx_arg);
            builder.arg(&t_arg);
            builder.arg(&heads_arg);
            builder.arg(&scale);
            builder.arg(&cap);
            // SAFETY: the arguments are the kernel's, in its order and types
            // (a null mask pointer is "no mask"); `raw` and `out` hold the
            // `[b, heads, t, ctx]` elements, the mask `[b, 1, t, ctx]` (both
            // checked above); block `r` reads row `r` of the scores and row
            // `(r / (heads t)) t + r % t` of the mask, and writes row `r`.
            unsafe { builder.launch(rows(elements / ctx, ctx)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

/// Per row of `[rows, vocab]` f32 logits (contiguous), the first column
/// holding the row's maximum, or `u32::MAX` when the row holds a NaN: a
/// new u32 storage of `rows` elements. `vocab` must be below 2^24 (the
/// kernel compares columns in f32).
pub fn argmax_rows(logits: (&CudaStorage, &Layout)) -> candle_core::Result<CudaStorage> {
    const WHAT: &str = "argmax-rows";
    let &[rows_count, vocab] = logits.1.dims() else {
        candle_core::bail!("{WHAT}: logits {:?}, not [rows, vocab]", logits.1.dims());
    };
    if logits.0.dtype() != DType::F32 || vocab == 0 || vocab >= 1 << 24 {
        candle_core::bail!(
            "{WHAT}: {:?} logits of {vocab} columns (f32, 1 to 2^24 - 1 columns)",
            logits.0.dtype()
        );
    }
    let dev = logits.0.device().clone();
    let src = view::<f32>(logits, WHAT)?;
    let func = dev.get_or_load_custom_func("capture_argmax_rows", HEAD.0, HEAD.1)?;
    // SAFETY: the kernel below writes every element (block `r`, row `r`).
    let out = unsafe { dev.alloc::<u32>(rows_count)? };
    if rows_count > 0 {
        let vocab_arg = vocab as i32;
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&out);
        builder.arg(&vocab_arg);
        // SAFETY: the arguments are the kernel's, in its order and types;
        // `src` holds `rows_count` rows of `vocab` (checked above) and
        // `out` `rows_count` elements; block `r` reads row `r` and its
        // first thread writes element `r`.
        unsafe { builder.launch(rows(rows_count, vocab)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// One block per row of `width` elements, a thread per element up to 1024
/// (a multiple of 32, as the kernels' reductions need).
fn rows(rows: usize, width: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (width.next_multiple_of(32).clamp(32, 1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}
