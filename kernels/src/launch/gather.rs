//! Many tensors into one buffer with one kernel (`gather.cu`).

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};

use super::GATHER;
use super::elementwise::elementwise;

const WHAT: &str = "gather";

/// The elements of `tensors` (each contiguous, all of one dtype on one CUDA
/// device), one tensor after the other: `[total]`, the result of
/// `Tensor::cat` of their flattened forms, in one kernel instead of one per
/// tensor.
pub fn gather(tensors: &[Tensor]) -> candle_core::Result<Tensor> {
    let Some(first) = tensors.first() else {
        candle_core::bail!("{WHAT}: no tensors");
    };
    let Device::Cuda(device) = first.device() else {
        candle_core::bail!("{WHAT}: the tensors must be on a CUDA device");
    };
    for tensor in tensors {
        if tensor.dtype() != first.dtype() || !tensor.device().same_device(first.device()) {
            candle_core::bail!(
                "{WHAT}: tensors of {:?} on {:?} and {:?} on {:?}",
                first.dtype(),
                first.device().location(),
                tensor.dtype(),
                tensor.device().location()
            );
        }
    }
    match first.dtype() {
        DType::F32 => gather_as::<f32>(tensors, device),
        DType::U32 => gather_as::<u32>(tensors, device),
        DType::BF16 => gather_as::<bf16>(tensors, device),
        DType::F16 => gather_as::<f16>(tensors, device),
        other => candle_core::bail!("{WHAT}: unsupported dtype {other:?}"),
    }
}

fn gather_as<T: CudaDType + DeviceRepr>(
    tensors: &[Tensor],
    device: &CudaDevice,
) -> candle_core::Result<Tensor> {
    let stream = device.cuda_stream();
    // Each source's address, then each segment's end.
    let mut table = Vec::with_capacity(2 * tensors.len());
    let mut ends = Vec::with_capacity(tensors.len());
    let mut total = 0u64;
    for tensor in tensors {
        let (storage, layout) = tensor.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            candle_core::bail!("{WHAT}: the tensors must be on a CUDA device");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{WHAT}: the tensors must be contiguous");
        };
        let view = storage.as_cuda_slice::<T>()?.slice(start..end);
        // The kernel runs on this same stream after whatever wrote the
        // source, so the read needs no event (see `device::prepare`).
        let (address, _read) = view.device_ptr(&stream);
        table.push(address);
        total += (end - start) as u64;
        ends.push(total);
    }
    table.extend(ends);
    let total = total as usize;
    if total == 0 {
        // CUDA allocates no empty buffers (and `Tensor::cat` would fail too).
        candle_core::bail!("{WHAT}: no elements to gather");
    }
    // SAFETY: the kernel below writes every element (one thread each).
    let out = unsafe { device.alloc::<T>(total)? };
    {
        let table = stream.clone_htod(&table[..]).w()?;
        let segments = tensors.len() as i32;
        let name = match std::mem::size_of::<T>() {
            2 => "capture_gather_u16",
            4 => "capture_gather_u32",
            other => candle_core::bail!("{WHAT}: no kernel for {other}-byte elements"),
        };
        let func = device.get_or_load_custom_func(name, GATHER.0, GATHER.1)?;
        let mut builder = func.builder();
        builder.arg(&table);
        builder.arg(&segments);
        builder.arg(&out);
        builder.arg(&total);
        // SAFETY: the arguments are the kernel's, in its order and types
        // (`out` as elements of T's width); `table` holds `segments`
        // addresses of live device memory on this stream, each of the
        // elements its segment covers, then the segments' increasing ends,
        // the last one `total`, the length of `out`; threads at or past
        // `total` do nothing. The sources' storages are freed, if at all,
        // in stream order after the kernel.
        unsafe { builder.launch(elementwise(total)) }.w()?;
    }
    let storage = CudaStorage::wrap_cuda_slice(out, device.clone());
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        total,
        BackpropOp::none(),
        false,
    ))
}
