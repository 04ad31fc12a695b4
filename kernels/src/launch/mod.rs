//! Launching the kernels on candle's CUDA storage.

mod decode_attention;
mod elementwise;
mod gather;
mod matvec;
mod reductions;

pub use decode_attention::decode_attention;
pub use elementwise::{gelu_mul, logit_softcap, rotary_keys_values, rotary_queries};
pub use gather::gather;
pub use matvec::matvec;
pub use reductions::{argmax_rows, attention_softmax, rms_norm, rms_norm_add_norm};

use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::{CudaStorage, Layout};

/// The PTX modules, compiled by `build.rs`: (module name, text).
type Module = (&'static str, &'static str);

const RMS_NORM: Module = (
    "capture_rms_norm",
    include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx")),
);
const ATTENTION_SOFTMAX: Module = (
    "capture_attention_softmax",
    include_str!(concat!(env!("OUT_DIR"), "/attention_softmax.ptx")),
);
const DECODE_ATTENTION: Module = (
    "capture_decode_attention",
    include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx")),
);
const ROTARY: Module = (
    "capture_rotary",
    include_str!(concat!(env!("OUT_DIR"), "/rotary.ptx")),
);
const GATHER: Module = (
    "capture_gather",
    include_str!(concat!(env!("OUT_DIR"), "/gather.ptx")),
);
const HEAD: Module = (
    "capture_head",
    include_str!(concat!(env!("OUT_DIR"), "/head.ptx")),
);
const MATVEC: Module = (
    "capture_matvec",
    include_str!(concat!(env!("OUT_DIR"), "/matvec.ptx")),
);
const GELU_MUL: Module = (
    "capture_gelu_mul",
    include_str!(concat!(env!("OUT_DIR"), "/gelu_mul.ptx")),
);

/// The elements of a contiguous layout of `storage`, as `T`.
pub(super) fn view<'a, T: CudaDType + DeviceRepr>(
    (storage, layout): (&'a CudaStorage, &Layout),
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => candle_core::bail!("{what}: the inputs must be contiguous"),
    }
}
