// Many tensors' elements, one after the other, into one buffer in one
// kernel: what candle's `Tensor::cat` does with a copy kernel per tensor. A
// capture moves a pass's records to the host in one transfer per dtype
// after gathering them (53 tensors for a residual capture of gemma-2-2b).
//
// `table` holds `segments` source addresses, then each segment's end: the
// number of elements in it and every segment before it, so segment `s`
// fills `out[ends[s - 1], ends[s])` (from 0 for the first). A copy does
// not look at the values, so the kernels are by element width: 2 bytes
// (bf16, f16) and 4 (f32, u32).
//
// One thread per output element.
#include "common.cuh"

template <typename T>
HOST_DEVICE void gather_element(const uint64_t *table, int segments, T *out, size_t index) {
    const uint64_t *ends = table + segments;
    // The first segment ending past `index`.
    int lo = 0, hi = segments - 1;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (ends[mid] > index) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    const uint64_t start = lo == 0 ? 0 : ends[lo - 1];
    const T *source = reinterpret_cast<const T *>(table[lo]);
    out[index] = source[index - start];
}

#ifndef CAPTURE_HOST_EMULATION
#define GATHER(T, SUFFIX)                                                                  \
    extern "C" __global__ void capture_gather_##SUFFIX(const uint64_t *table, int segments,   \
                                                       T *out, size_t elements) {            \
        const size_t index = global_index();                                               \
        if (index < elements) {                                                            \
            gather_element(table, segments, out, index);                                   \
        }                                                                                  \
    }

GATHER(uint16_t, u16)
GATHER(uint32_t, u32)
#endif
