//! A decode step's projection at small batches in one kernel
//! (`matvec.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, WithDType};
use half::{bf16, f16};

use super::{MATVEC, view};
use crate::{MATVEC_BLOCK, MATVEC_OUT_PER_WARP, matvec_fits};

const WHAT: &str = "matvec";

/// `x @ w^T` for activation rows `x` (`[rows, in]`) and a row-major weight
/// `w` (`[out, in]`), both contiguous, of one dtype (f32, bf16 or f16):
/// each output the f32 sum of its products, rounded to the dtype; a new
/// storage `[rows, out]`. For decode steps: at most
/// [`crate::MATVEC_MAX_ROWS`] rows, `in` a multiple of 16 bytes' elements
/// and both inputs 16-byte aligned ([`crate::matvec_fits`]).
pub fn matvec(
    w: (&CudaStorage, &Layout),
    x: (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    let (&[out, in_dim], &[rows, x_in]) = (w.1.dims(), x.1.dims()) else {
        candle_core::bail!(
            "{WHAT}: weight {:?} and activations {:?}, not [out, in] and [rows, in]",
            w.1.dims(),
            x.1.dims()
        );
    };
    let dtype = x.0.dtype();
    if x_in != in_dim
        || w.0.dtype() != dtype
        || !matvec_fits(rows, in_dim, dtype.size_in_bytes())
        || out == 0
        || i32::try_from(out).is_err()
    {
        candle_core::bail!(
            "{WHAT}: {:?} weight {:?} and {dtype:?} activations {:?} (at most {} rows, a width \
             of whole 16-byte vectors)",
            w.0.dtype(),
            w.1.dims(),
            x.1.dims(),
            crate::MATVEC_MAX_ROWS
        );
    }
    match dtype {
        DType::F32 => launch::<f32>("f32", w, x, (rows, in_dim, out)),
        DType::BF16 => launch::<bf16>("bf16", w, x, (rows, in_dim, out)),
        DType::F16 => launch::<f16>("f16", w, x, (rows, in_dim, out)),
        other => candle_core::bail!("{WHAT}: unsupported dtype {other:?}"),
    }
}

fn launch<T: CudaDType + DeviceRepr + WithDType>(
    suffix: &str,
    w: (&CudaStorage, &Layout),
    x: (&CudaStorage, &Layout),
    (rows, in_dim, out): (usize, usize, usize),
) -> candle_core::Result<CudaStorage> {
    let dev = x.0.device().clone();
    let weights = view::<T>(w, WHAT)?;
    let activations = view::<T>(x, WHAT)?;
    for (name, part) in [("weight", &weights), ("activations", &activations)] {
        if !aligned(part, &dev) {
            candle_core::bail!("{WHAT}: the {name} do not start on a 16-byte boundary");
        }
    }
    let func =
        dev.get_or_load_custom_func(&format!("capture_matvec_{suffix}"), MATVEC.0, MATVEC.1)?;
    // SAFETY: the kernel below writes every element (see the launch's).
    let y = unsafe { dev.alloc::<T>(rows * out)? };
    let (rows_arg, in_arg, out_arg) = (rows as i32, in_dim as i32, out as i32);
    let mut builder = func.builder();
    builder.arg(&weights);
    builder.arg(&activations);
    builder.arg(&y);
    builder.arg(&rows_arg);
    builder.arg(&in_arg);
    builder.arg(&out_arg);
    let per_block = MATVEC_BLOCK / 32 * MATVEC_OUT_PER_WARP;
    let config = LaunchConfig {
        grid_dim: (out.div_ceil(per_block) as u32, 1, 1),
        block_dim: (MATVEC_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments are the kernel's, in its order and types;
    // `weights` holds `out` rows of `in_dim` elements and `activations`
    // `rows` of them (checked above), both 16-byte aligned with `in_dim` a
    // multiple of a 16-byte vector's elements (`matvec_fits`), so every
    // vector the kernel loads lies inside them; `rows` is at most the
    // kernel's MATVEC_MAX_ROWS. Warp `w` of block `b` writes columns
    // `(b * warps + w) * MATVEC_OUT_PER_WARP` onwards of every row, those
    // below `out`, and the grid covers all `out` columns, so every element
    // of `y` (`rows * out`) is written, none past it.
    unsafe { builder.launch(config) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// Whether `part` starts on a 16-byte boundary.
fn aligned<T>(part: &CudaView<'_, T>, dev: &candle_core::CudaDevice) -> bool {
    let stream = dev.cuda_stream();
    let (address, _read) = part.device_ptr(&stream);
    address.is_multiple_of(16)
}
