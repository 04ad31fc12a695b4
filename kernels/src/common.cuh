// Helpers shared by the worker's kernels: conversions between a storage
// dtype and the f32 arithmetic, and block-wide reductions. The conversions
// and `mul_rn` also compile for the host, where `kernels/tests/host_emulation.cu`
// runs the elementwise kernels' bodies without a GPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#define HOST_DEVICE __host__ __device__ __forceinline__

HOST_DEVICE float widen(float x) { return x; }
HOST_DEVICE float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
HOST_DEVICE float widen(__half x) { return __half2float(x); }

// Round to nearest even, as candle's casts do.
template <typename T> HOST_DEVICE T narrow_to(float x);
template <> HOST_DEVICE float narrow_to<float>(float x) { return x; }
template <> HOST_DEVICE __nv_bfloat16 narrow_to<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> HOST_DEVICE __half narrow_to<__half>(float x) { return __float2half(x); }

// A product rounded on its own: never contracted with a following addition
// into a fused multiply-add (which nvcc does by default), so that
// `T(T(a b) - T(c d))` is the two rounded products that candle's and
// transformers' separate operations subtract.
HOST_DEVICE float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

// The pair (j, j + half) of the head row `x` rotated with the table row
// `table` (cos, then sin) as candle's `rope` computes it, each product and
// sum rounded to T: into `first` and `second` (rotary.cu,
// decode_attention.cu).
template <typename T>
HOST_DEVICE void rotated_pair(const T *x, const T *table, int j, int half, T &first,
                              T &second) {
    const float x1 = widen(x[j]), x2 = widen(x[j + half]);
    const float c = widen(table[j]), s = widen(table[half + j]);
    const float x1c = widen(narrow_to<T>(mul_rn(x1, c)));
    const float x2s = widen(narrow_to<T>(mul_rn(x2, s)));
    const float x1s = widen(narrow_to<T>(mul_rn(x1, s)));
    const float x2c = widen(narrow_to<T>(mul_rn(x2, c)));
    first = narrow_to<T>(x1c - x2s);
    second = narrow_to<T>(x1s + x2c);
}

// Rotates the pair (j, j + half) of the row `x` into `out`.
template <typename T>
HOST_DEVICE void rotate_pair(const T *x, const T *table, T *out, int j, int half) {
    rotated_pair(x, table, j, half, out[j], out[j + half]);
}

// The index of this thread in a one-dimensional launch.
__device__ __forceinline__ size_t global_index() {
    return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}

struct Sum {
    HOST_DEVICE float operator()(float a, float b) const { return a + b; }
};
struct Max {
    HOST_DEVICE float operator()(float a, float b) const { return fmaxf(a, b); }
};

// `op` over every thread's `v` in the block, returned to every thread.
// blockDim.x must be a multiple of 32 (at most 1024); every thread calls it.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, Op op, float identity) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = op(v, __shfl_xor_sync(0xffffffff, v, offset));
    }
    __syncthreads(); // `partial` may still be read by an earlier call.
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : identity;
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = op(v, __shfl_xor_sync(0xffffffff, v, offset));
    }
    return v;
}

// A CUDA block as the reductions' bodies see it (`decode_attention.cu`): its
// threads, a barrier, a reduction over them, and a sum over a warp. Bodies
// written against this also run on the host, where
// `kernels/tests/host_emulation.cu` gives them a block of std::threads.
struct DeviceBlock {
    __device__ __forceinline__ int thread() const { return threadIdx.x; }
    __device__ __forceinline__ int size() const { return blockDim.x; }
    __device__ __forceinline__ void sync() const { __syncthreads(); }
    template <typename Op>
    __device__ __forceinline__ float reduce(float v, Op op, float identity) const {
        return block_reduce(v, op, identity);
    }
    // The sum of `v` over this thread's warp, to each of its lanes (the same
    // bits on every lane: each step adds the same two values). Every lane
    // of the warp calls it.
    __device__ __forceinline__ float warp_sum(float v) const {
        for (int offset = 16; offset > 0; offset >>= 1) {
            v += __shfl_xor_sync(0xffffffff, v, offset);
        }
        return v;
    }
};

// An attention score from its raw q.k product (in the compute dtype T):
// `T(raw * scale)` (the scale already rounded to T, as candle's affine takes
// it), then soft-capped in f32 as `tanh(s / cap) * cap` when cap > 0
// (`inv_cap` = 1 / cap).
template <typename T>
HOST_DEVICE float scaled_score(T raw, float scale, float cap, float inv_cap) {
    float s = widen(narrow_to<T>(widen(raw) * scale));
    if (cap > 0.0f) {
        s = tanhf(s * inv_cap) * cap;
    }
    return s;
}
