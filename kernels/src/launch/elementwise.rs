//! The kernels with one thread per element (or pair of elements): the
//! rotary embedding of queries and of keys written into the cache, the
//! MLP's GELU times up, and the final logit soft-cap.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout};
use half::{bf16, f16};

use super::{GELU_MUL, HEAD, ROTARY, view};
use crate::QkvHeads;

/// `QkvShape` of `rotary.cu`, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct QkvShape {
    b: i32,
    t: i32,
    heads: i32,
    kv_heads: i32,
    d: i32,
    table_batched: i32,
}

// SAFETY: plain `#[repr(C)]` data laid out as the kernels' `QkvShape` (six
// ints), with no pointers.
unsafe impl DeviceRepr for QkvShape {}

const ROTARY_WHAT: &str = "rotary";

/// The rotated query heads of `qkv` (`[b, t, heads + 2 kv_heads, d]`),
/// `[b, heads, t, d]`, with `table` holding each row's cos and then sin
/// (`[t, d]` for every sequence, or `[b, t, d]`), all of one dtype.
pub fn rotary_queries(
    qkv: (&CudaStorage, &Layout),
    table: (&CudaStorage, &Layout),
    heads: QkvHeads,
) -> candle_core::Result<CudaStorage> {
    let shape = qkv_shape(qkv, table, heads)?;
    let pairs = shape.b as usize * heads.heads * shape.t as usize * (shape.d as usize / 2);
    match qkv.0.dtype() {
        DType::F32 => queries::<f32>("f32", qkv, table, shape, pairs),
        DType::BF16 => queries::<bf16>("bf16", qkv, table, shape, pairs),
        DType::F16 => queries::<f16>("f16", qkv, table, shape, pairs),
        other => candle_core::bail!("{ROTARY_WHAT}: unsupported dtype {other:?}"),
    }
}

/// Writes the rotated key heads and the value heads of `qkv` (see
/// [`rotary_queries`]) into a layer's KV cache `buffer` (`[2, b, kv_heads,
/// capacity, d]`, keys then values, the whole of its storage) at columns
/// `start..start + t`, in place; every other column is left as it is.
pub fn rotary_keys_values(
    buffer: (&mut CudaStorage, &Layout),
    qkv: (&CudaStorage, &Layout),
    table: (&CudaStorage, &Layout),
    heads: QkvHeads,
    start: usize,
) -> candle_core::Result<()> {
    let shape = qkv_shape(qkv, table, heads)?;
    let (b, t, d) = (shape.b as usize, shape.t as usize, shape.d as usize);
    let &[two, buffer_b, kv_heads, capacity, buffer_d] = buffer.1.dims() else {
        candle_core::bail!("{ROTARY_WHAT}: cache buffer {:?}", buffer.1.dims());
    };
    if [two, buffer_b, kv_heads, buffer_d] != [2, b, heads.kv_heads, d]
        || start + t > capacity
        || buffer.1.contiguous_offsets() != Some((0, buffer.1.shape().elem_count()))
        || buffer.0.dtype() != qkv.0.dtype()
        || i32::try_from(capacity).is_err()
    {
        candle_core::bail!(
            "{ROTARY_WHAT}: cache buffer {:?} {:?} for {t} columns from {start} of {:?} {:?}",
            buffer.0.dtype(),
            buffer.1.dims(),
            qkv.0.dtype(),
            qkv.1.dims()
        );
    }
    let pairs = b * heads.kv_heads * t * (d / 2);
    let args = CacheArgs {
        shape,
        capacity: capacity as i32,
        start: start as i32,
        pairs,
    };
    match qkv.0.dtype() {
        DType::F32 => args.launch::<f32>("f32", buffer.0, qkv, table),
        DType::BF16 => args.launch::<bf16>("bf16", buffer.0, qkv, table),
        DType::F16 => args.launch::<f16>("f16", buffer.0, qkv, table),
        other => candle_core::bail!("{ROTARY_WHAT}: unsupported dtype {other:?}"),
    }
}

/// Checks `qkv` and `table` against each other and `heads`.
fn qkv_shape(
    qkv: (&CudaStorage, &Layout),
    table: (&CudaStorage, &Layout),
    heads: QkvHeads,
) -> candle_core::Result<QkvShape> {
    let &[b, t, total, d] = qkv.1.dims() else {
        candle_core::bail!(
            "{ROTARY_WHAT}: qkv {:?}, not [b, t, heads, d]",
            qkv.1.dims()
        );
    };
    let table_batched = match table.1.dims() {
        [rows, width] if (*rows, *width) == (t, d) => false,
        [tb, rows, width] if (*tb, *rows, *width) == (b, t, d) => true,
        other => candle_core::bail!("{ROTARY_WHAT}: table {other:?} for qkv {:?}", qkv.1.dims()),
    };
    if total != heads.total()
        || !d.is_multiple_of(2)
        || table.0.dtype() != qkv.0.dtype()
        || b * t * total * d > i32::MAX as usize
    {
        candle_core::bail!(
            "{ROTARY_WHAT}: qkv {:?} {:?}, table {:?}, for {heads:?}",
            qkv.0.dtype(),
            qkv.1.dims(),
            table.0.dtype()
        );
    }
    Ok(QkvShape {
        b: b as i32,
        t: t as i32,
        heads: heads.heads as i32,
        kv_heads: heads.kv_heads as i32,
        d: d as i32,
        table_batched: i32::from(table_batched),
    })
}

fn queries<T: CudaDType + DeviceRepr>(
    suffix: &str,
    qkv: (&CudaStorage, &Layout),
    table: (&CudaStorage, &Layout),
    shape: QkvShape,
    pairs: usize,
) -> candle_core::Result<CudaStorage> {
    let dev = qkv.0.device().clone();
    let src = view::<T>(qkv, ROTARY_WHAT)?;
    let table = view::<T>(table, ROTARY_WHAT)?;
    let name = format!("capture_rotary_queries_{suffix}");
    let func = dev.get_or_load_custom_func(&name, ROTARY.0, ROTARY.1)?;
    // SAFETY: the kernel below writes every element: one thread per pair
    // (j, j + d/2) of each of the b * heads * t rows of d.
    let out = unsafe { dev.alloc::<T>(2 * pairs)? };
    if pairs > 0 {
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&table);
        builder.arg(&out);
        builder.arg(&shape);
        builder.arg(&pairs);
        // SAFETY: the arguments are the kernel's, in its order and types;
        // `src` holds `[b, t, heads + 2 kv_heads, d]` and `table` `[t, d]`
        // or `[b, t, d]` (checked by `qkv_shape`, and `table_batched` says
        // which), `out` the `[b, heads, t, d]` that `pairs` covers; threads
        // at or past `pairs` do nothing.
        unsafe { builder.launch(elementwise(pairs)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// The cache launch's scalars.
struct CacheArgs {
    shape: QkvShape,
    capacity: i32,
    start: i32,
    pairs: usize,
}

impl CacheArgs {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        suffix: &str,
        buffer: &mut CudaStorage,
        qkv: (&CudaStorage, &Layout),
        table: (&CudaStorage, &Layout),
    ) -> candle_core::Result<()> {
        if self.pairs == 0 {
            return Ok(());
        }
        let dev = qkv.0.device().clone();
        let src = view::<T>(qkv, ROTARY_WHAT)?;
        let table = view::<T>(table, ROTARY_WHAT)?;
        let name = format!("capture_rotary_keys_values_{suffix}");
        let func = dev.get_or_load_custom_func(&name, ROTARY.0, ROTARY.1)?;
        let out = buffer.as_cuda_slice_mut::<T>()?;
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&table);
        builder.arg(out);
        builder.arg(&self.shape);
        builder.arg(&self.capacity);
        builder.arg(&self.start);
        builder.arg(&self.pairs);
        // SAFETY: the arguments are the kernel's, in its order and types;
        // `src` and `table` as in `queries`; the buffer is the whole storage
        // (offset 0, contiguous), `[2, b, kv_heads, capacity, d]`, and the
        // kernel writes columns `start..start + t` of it, within capacity
        // (checked by `rotary_keys_values`).
        unsafe { builder.launch(elementwise(self.pairs)) }.w()?;
        Ok(())
    }
}

/// `T(T(gelu(gate)) * up)` from `gate_up` (`[..., 2 width]`: gate, then
/// up; f32, bf16 or f16), `[..., width]`: a new storage of `elements / 2`.
pub fn gelu_mul(gate_up: (&CudaStorage, &Layout)) -> candle_core::Result<CudaStorage> {
    const WHAT: &str = "gelu-mul";
    let stacked = *gate_up.1.dims().last().unwrap_or(&0);
    if !stacked.is_multiple_of(2) || i32::try_from(stacked).is_err() {
        candle_core::bail!(
            "{WHAT}: gate and up {:?}, not [..., 2 width]",
            gate_up.1.dims()
        );
    }
    match gate_up.0.dtype() {
        DType::F32 => gelu_mul_as::<f32>("f32", gate_up, stacked / 2),
        DType::BF16 => gelu_mul_as::<bf16>("bf16", gate_up, stacked / 2),
        DType::F16 => gelu_mul_as::<f16>("f16", gate_up, stacked / 2),
        other => candle_core::bail!("{WHAT}: unsupported dtype {other:?}"),
    }
}

fn gelu_mul_as<T: CudaDType + DeviceRepr>(
    suffix: &str,
    gate_up: (&CudaStorage, &Layout),
    width: usize,
) -> candle_core::Result<CudaStorage> {
    let dev = gate_up.0.device().clone();
    let src = view::<T>(gate_up, "gelu-mul")?;
    let elements = src.len() / 2;
    let name = format!("capture_gelu_mul_{suffix}");
    let func = dev.get_or_load_custom_func(&name, GELU_MUL.0, GELU_MUL.1)?;
    // SAFETY: the kernel below writes every element (one thread each).
    let out = unsafe { dev.alloc::<T>(elements)? };
    if elements > 0 {
        let width_arg = width as i32;
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&out);
        builder.arg(&width_arg);
        builder.arg(&elements);
        // SAFETY: the arguments are the kernel's, in its order and types;
        // `src` holds whole rows of `2 width` (checked by `gelu_mul`) and
        // `out` the same rows of `width`; threads at or past `elements` do
        // nothing.
        unsafe { builder.launch(elementwise(elements)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Gemma-2's final logit soft-cap of `x` (f32, bf16 or f16, contiguous):
/// `tanh(x * inv + 0) * cap + 0` in f32 with `inv = 1 / cap`, as candle's
/// cast to f32, affine, tanh and affine compute it; a new f32 storage with
/// `x`'s elements.
pub fn logit_softcap(x: (&CudaStorage, &Layout), cap: f64) -> candle_core::Result<CudaStorage> {
    match x.0.dtype() {
        DType::F32 => softcap_as::<f32>("f32", x, cap),
        DType::BF16 => softcap_as::<bf16>("bf16", x, cap),
        DType::F16 => softcap_as::<f16>("f16", x, cap),
        other => candle_core::bail!("logit-softcap: unsupported dtype {other:?}"),
    }
}

fn softcap_as<T: CudaDType + DeviceRepr>(
    suffix: &str,
    x: (&CudaStorage, &Layout),
    cap: f64,
) -> candle_core::Result<CudaStorage> {
    let dev = x.0.device().clone();
    let src = view::<T>(x, "logit-softcap")?;
    let elements = src.len();
    let name = format!("capture_logit_softcap_{suffix}");
    let func = dev.get_or_load_custom_func(&name, HEAD.0, HEAD.1)?;
    // SAFETY: the kernel below writes every element (one thread each).
    let out = unsafe { dev.alloc::<f32>(elements)? };
    if elements > 0 {
        // candle's affines take their factors as f32 for f32 tensors.
        let (inv, cap) = ((1.0 / cap) as f32, cap as f32);
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&out);
        builder.arg(&inv);
        builder.arg(&cap);
        builder.arg(&elements);
        // SAFETY: the arguments are the kernel's, in its order and types;
        // `src` and `out` hold `elements` each; threads at or past
        // `elements` do nothing.
        unsafe { builder.launch(elementwise(elements)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// One thread per element, 256 to a block.
pub(super) fn elementwise(elements: usize) -> LaunchConfig {
    const THREADS: usize = 256;
    LaunchConfig {
        grid_dim: (elements.div_ceil(THREADS) as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}
