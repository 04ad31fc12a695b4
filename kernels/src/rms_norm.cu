// Gemma-2's RMS normalisation in one kernel, optionally followed by the
// residual addition that comes after two of a layer's four norms:
//
//   y   = T(x / sqrt(mean(x^2) + eps) * w)      (f32 arithmetic, w in f32)
//   out = residual ? T(residual + y) : y
//
// For x in bf16 this is what candle computes with a cast to f32, its
// rms_norm, a cast back and an add (four kernels), and what transformers
// computes (`_norm(x.float()) * (1 + w.float())`, then `.type_as(x)`);
// here each row is read once and written once. The worker's CPU
// implementation (`worker/src/model/norm.rs`) is the reference
// (`capture::gpu_tests` compares the two).
//
// One block per row; blockDim.x is a multiple of 32, at most 1024.
#include "common.cuh"

template <typename T, bool ADD>
__device__ void rms_norm(const T *x, const T *residual, const float *w, T *out, int n,
                         float eps) {
    const size_t row = blockIdx.x;
    x += row * n;
    out += row * n;
    if (ADD) {
        residual += row * n;
    }
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = widen(x[i]);
        sum += v * v;
    }
    const float rms = sqrtf(block_reduce(sum, Sum(), 0.0f) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        T y = narrow_to<T>(widen(x[i]) / rms * w[i]);
        if (ADD) {
            y = narrow_to<T>(widen(residual[i]) + widen(y));
        }
        out[i] = y;
    }
}

#define RMS_NORM(T, SUFFIX)                                                              \
    extern "C" __global__ void capture_rms_norm_##SUFFIX(const T *x, const float *w,     \
                                                         T *out, int n, float eps) {     \
        rms_norm<T, false>(x, nullptr, w, out, n, eps);                                  \
    }                                                                                    \
    extern "C" __global__ void capture_rms_norm_add_##SUFFIX(                            \
        const T *x, const T *residual, const float *w, T *out, int n, float eps) {       \
        rms_norm<T, true>(x, residual, w, out, n, eps);                                  \
    }

RMS_NORM(float, f32)
RMS_NORM(__nv_bfloat16, bf16)
RMS_NORM(__half, f16)
