// A row of attention scores to probabilities in one kernel, for Gemma-2:
//
//   s = T(raw * T(scale))                 the scaled product, in the compute dtype
//   s = tanh(s * (1 / cap)) * cap         soft-capping in f32 (when cap > 0)
//   s = s + mask                          additive f32 mask, shared by the heads
//   p = exp(s - max s) / sum exp(s - max s)
//
// With candle's operations this is an affine, a cast, two affines and a
// tanh, a broadcast add, the softmax and a cast: up to eight kernels. The
// worker's CPU implementation (`worker/src/model/attention_softmax.rs`),
// which equals those operations on the CPU, is the reference;
// `capture::gpu_tests` compares this kernel with it.
//
// One block per row of `ctx` scores; rows are ordered (batch, head, query),
// the mask `[batch, 1, t, ctx]` (or null). The row is read three times
// (maximum, sum, output) instead of being kept, so any context fits.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float capped(const T *raw, int i, float scale, float cap,
                                       float inv_cap, const float *mask) {
    float s = scaled_score(raw[i], scale, cap, inv_cap);
    if (mask != nullptr) {
        s = s + mask[i];
    }
    return s;
}

template <typename T, typename O>
__device__ void softmax_row(const T *raw, const float *mask, O *out, int ctx, int t,
                            int heads, float scale, float cap) {
    const size_t row = blockIdx.x;
    raw += row * ctx;
    out += row * ctx;
    if (mask != nullptr) {
        const size_t batch = row / ((size_t)heads * t);
        const size_t query = row % t;
        mask += (batch * t + query) * ctx;
    }
    const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
    float max = -INFINITY;
    for (int i = threadIdx.x; i < ctx; i += blockDim.x) {
        max = fmaxf(max, capped(raw, i, scale, cap, inv_cap, mask));
    }
    max = block_reduce(max, Max(), -INFINITY);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < ctx; i += blockDim.x) {
        sum += expf(capped(raw, i, scale, cap, inv_cap, mask) - max);
    }
    sum = block_reduce(sum, Sum(), 0.0f);
    for (int i = threadIdx.x; i < ctx; i += blockDim.x) {
        out[i] = narrow_to<O>(expf(capped(raw, i, scale, cap, inv_cap, mask) - max) / sum);
    }
}

// `scale` is the compute dtype's rounding of the scale (as candle's affine
// takes it); `cap` <= 0 means no soft-capping; `mask` may be null.
#define ATTENTION_SOFTMAX(T, O, NAME)                                                    \
    extern "C" __global__ void NAME(const T *raw, const float *mask, O *out, int ctx,   \
                                    int t, int heads, float scale, float cap) {          \
        softmax_row<T, O>(raw, mask, out, ctx, t, heads, scale, cap);                    \
    }

ATTENTION_SOFTMAX(float, float, capture_attention_softmax_f32_f32)
ATTENTION_SOFTMAX(__nv_bfloat16, float, capture_attention_softmax_bf16_f32)
ATTENTION_SOFTMAX(__nv_bfloat16, __nv_bfloat16, capture_attention_softmax_bf16_bf16)
ATTENTION_SOFTMAX(__half, float, capture_attention_softmax_f16_f32)
ATTENTION_SOFTMAX(__half, __half, capture_attention_softmax_f16_f16)
