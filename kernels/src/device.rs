//! Settings of a CUDA device for a model that allocates and frees a few
//! hundred small buffers per decode step.
//!
//! candle allocates every operation's output with `cuMemAllocAsync` from
//! the device's memory pool and frees it with `cuMemFreeAsync`. The pool's
//! release threshold is 0 unless set: at every synchronisation (each decode
//! step has one, to read its tokens) the driver hands all freed memory back
//! to the system, and the next step's allocations map it again. cudarc also
//! creates and destroys two CUDA events with every allocation, for
//! synchronising buffers shared between streams; candle's device has one
//! stream, so they are never recorded or waited on. [`prepare`] keeps freed
//! memory in the pool and stops the events.

use candle_core::CudaDevice;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaContext, result, sys};

type PoolAttribute = sys::CUmemPool_attribute;

/// Keeps the memory a step frees in the device's pool (release threshold
/// `u64::MAX`) and stops cudarc's per-allocation events on `device`.
///
/// Call it once, right after opening the device and before any tensor is
/// made on it. The events stay off for every tensor made later, which is
/// sound as long as nothing creates a second stream on this device's
/// context (candle's device uses one; the worker creates none).
pub fn prepare(device: &CudaDevice) -> candle_core::Result<()> {
    let context = device.cuda_stream().context().clone();
    if context.is_in_multi_stream_mode() {
        candle_core::bail!(
            "the CUDA context already has more than one stream; cudarc's events must stay on"
        );
    }
    if let Some(pool) = current_pool(&context)? {
        let mut threshold = u64::MAX;
        // SAFETY: a pool of this device; the release threshold is a
        // `cuuint64_t`.
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                PoolAttribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        }
        .w()?;
    }
    // SAFETY: one stream on this context (checked above; see the doc comment).
    unsafe { device.disable_event_tracking() };
    Ok(())
}

/// The device pool's memory: what it holds from the system (`reserved`),
/// what live buffers use of it (`used`), the most they used since the
/// peak was last reset ([`reset_pool_peak`]), and its release threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolMemory {
    pub reserved: u64,
    pub used: u64,
    pub used_high: u64,
    pub release_threshold: u64,
}

impl PoolMemory {
    /// Memory the pool holds but no buffer uses: free for the next
    /// allocations of this process, though the driver counts it as taken.
    pub fn idle(&self) -> u64 {
        self.reserved.saturating_sub(self.used)
    }

    /// The most memory buffers used at once since the peak was last reset:
    /// the driver's high watermark, which a reset sets to 0 until the next
    /// allocation, so never less than what is in use now.
    pub fn peak(&self) -> u64 {
        self.used_high.max(self.used)
    }
}

/// The current pool memory of `device`, or `None` when the device has no
/// stream-ordered allocator (every allocation then goes to the driver).
pub fn pool_memory(device: &CudaDevice) -> candle_core::Result<Option<PoolMemory>> {
    let Some(pool) = current_pool(device.cuda_stream().context())? else {
        return Ok(None);
    };
    let read = |attribute: PoolAttribute| -> candle_core::Result<u64> {
        let mut value = 0u64;
        // SAFETY: a pool of this device; the attributes read below are
        // `cuuint64_t`.
        unsafe {
            result::mem_pool::get_attribute(pool, attribute, (&mut value as *mut u64).cast())
        }
        .w()?;
        Ok(value)
    };
    Ok(Some(PoolMemory {
        reserved: read(PoolAttribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
        used: read(PoolAttribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        used_high: read(PoolAttribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        release_threshold: read(PoolAttribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD)?,
    }))
}

/// Starts a new peak for [`PoolMemory::peak`]: the pool's high watermark
/// of used memory goes back to 0 (the only value the driver lets it be set
/// to) and follows the allocations from here. Buffers that candle does not
/// take from the pool (cuBLAS's workspace) are not counted. Returns whether
/// the device has a pool.
pub fn reset_pool_peak(device: &CudaDevice) -> candle_core::Result<bool> {
    let Some(pool) = current_pool(device.cuda_stream().context())? else {
        return Ok(false);
    };
    // Pending frees land before the watermark is cleared.
    device.cuda_stream().synchronize().w()?;
    let mut zero = 0u64;
    // SAFETY: a pool of this device; the high watermark is a `cuuint64_t`,
    // and 0 is the value it may be set to.
    unsafe {
        result::mem_pool::set_attribute(
            pool,
            PoolAttribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
    }
    .w()?;
    Ok(true)
}

/// The pool `cuMemAllocAsync` draws from on this context's device, if the
/// device has one.
fn current_pool(context: &CudaContext) -> candle_core::Result<Option<sys::CUmemoryPool>> {
    if !context.has_async_alloc() {
        return Ok(None);
    }
    context.bind_to_thread().w()?;
    // SAFETY: `cu_device` is the device the context was created on.
    let pool = unsafe { result::device::get_mem_pool(context.cu_device()) }.w()?;
    Ok(Some(pool))
}
