// Gemma-2's RMS normalisation in one kernel, optionally followed by the
// residual addition that comes after two of a layer's four norms:
//
//   y   = T(x / sqrt(mean(x^2) + eps) * w)      (f32 arithmetic, w in f32)
//   out = residual ? T(residual + y) : y
//
// For x in bf16 this is what candle computes with a cast to f32, its
// rms_norm, a cast back and an add (four kernels), and what transformers
// computes (`_norm(x.float()) * (1 + w.float())`, then `.type_as(x)`);
// here each row is read once and written once.
//
// `capture_rms_norm_add_norm_T` runs two norms with the addition between
// them, as a layer does twice (post-attention norm, add, pre-feedforward
// norm; post-feedforward norm, add, the next layer's input norm):
//
//   sum  = T(residual + T(x / rms(x) * w1))       out[0] (the residual stream)
//   norm = T(sum / rms(sum) * w2)                 out[1] (the next block's input)
//
// one kernel and one read of x where there would be two. The worker's CPU
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

// `out` is `[2, rows, n]`: the sums, then the normalised sums; `w` is
// `[2, n]`: w1, then w2.
template <typename T>
__device__ void rms_norm_add_norm(const T *x, const T *residual, const float *w, T *out, int n,
                                  float eps1, float eps2) {
    const size_t row = blockIdx.x;
    x += row * n;
    residual += row * n;
    T *sums = out + row * n;
    T *normed = out + ((size_t)gridDim.x + row) * n;
    float square = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = widen(x[i]);
        square += v * v;
    }
    const float rms = sqrtf(block_reduce(square, Sum(), 0.0f) / (float)n + eps1);
    float sum_square = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const T y = narrow_to<T>(widen(x[i]) / rms * w[i]);
        const T s = narrow_to<T>(widen(residual[i]) + widen(y));
        sums[i] = s;
        const float v = widen(s);
        sum_square += v * v;
    }
    const float rms_sum = sqrtf(block_reduce(sum_square, Sum(), 0.0f) / (float)n + eps2);
    // Each thread reads back only the elements it wrote.
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        normed[i] = narrow_to<T>(widen(sums[i]) / rms_sum * w[n + i]);
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
    }                                                                                    \
    extern "C" __global__ void capture_rms_norm_add_norm_##SUFFIX(                       \
        const T *x, const T *residual, const float *w, T *out, int n, float eps1,        \
        float eps2) {                                                                    \
        rms_norm_add_norm<T>(x, residual, w, out, n, eps1, eps2);                        \
    }

RMS_NORM(float, f32)
RMS_NORM(__nv_bfloat16, bf16)
RMS_NORM(__half, f16)
