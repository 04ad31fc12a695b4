// A decode step's projections at small batches: `rows` activation rows `x`
// (`[rows, in]`, at most MATVEC_MAX_ROWS) times a row-major weight `w`
// (`[out, in]`, as the checkpoint stores it), transposed:
//
//   y[r, o] = T(sum_i x[r, i] w[o, i])      f32 products and sums, then T
//
// `[rows, out]`. candle computes it with cuBLAS's general matrix product,
// whose kernels are tiled for many rows; a decode step has one row per
// sequence, so its time is reading `w` once, and this kernel is written
// for that: each warp takes MATVEC_OUT_PER_WARP output columns (weight
// rows), its lanes read 16-byte vectors of them (every 32nd vector, so a
// warp reads consecutive memory), MATVEC_UNROLL vectors per weight row in
// flight before the products, and `x`'s vectors (a few KiB, cached) for
// every activation row. The lanes' partial sums are added by the warp.
// The same f32 accumulation as cuBLAS's (CUBLAS_COMPUTE_32F), in another
// order.
//
// `in` must be a multiple of a vector's elements (16 bytes of T) and `w`,
// `x` 16-byte aligned; the launch code (`kernels/src/launch/matvec.rs`)
// checks both. `kernels/tests/host_emulation.cu` runs the body on the host.
#include "common.cuh"

#define MATVEC_MAX_ROWS 4
#define MATVEC_OUT_PER_WARP 2
#define MATVEC_UNROLL 4

// 16 bytes of T, loaded at once.
template <typename T> struct __align__(16) Vector16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

template <typename T> HOST_DEVICE Vector16<T> load16(const T *p) {
    return *reinterpret_cast<const Vector16<T> *>(p);
}

// Block `block_index`'s output columns: warp `w` of the block takes columns
// (block_index * warps + w) * MATVEC_OUT_PER_WARP onwards.
#pragma nv_exec_check_disable
template <typename T, typename Block>
HOST_DEVICE void matvec_block(const Block &block, int block_index, const T *w, const T *x, T *y,
                              int rows, int in, int out) {
    constexpr int N = Vector16<T>::N;
    const int lane = block.thread() % 32, warp = block.thread() / 32;
    const int first = (block_index * (block.size() / 32) + warp) * MATVEC_OUT_PER_WARP;
    const int vectors = in / N;
    float sums[MATVEC_OUT_PER_WARP][MATVEC_MAX_ROWS];
    for (int u = 0; u < MATVEC_OUT_PER_WARP; u++) {
        for (int r = 0; r < MATVEC_MAX_ROWS; r++) {
            sums[u][r] = 0.0f;
        }
    }
    for (int base = lane; base < vectors; base += 32 * MATVEC_UNROLL) {
        Vector16<T> weights[MATVEC_UNROLL][MATVEC_OUT_PER_WARP];
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
        for (int k = 0; k < MATVEC_UNROLL; k++) {
            const int vector = base + 32 * k;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
            for (int u = 0; u < MATVEC_OUT_PER_WARP; u++) {
                // A column past `out` (the last warp's) multiplies zeros.
                if (vector < vectors && first + u < out) {
                    weights[k][u] = load16(w + (size_t)(first + u) * in + (size_t)vector * N);
                } else {
                    weights[k][u] = Vector16<T>{};
                }
            }
        }
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
        for (int k = 0; k < MATVEC_UNROLL; k++) {
            const int vector = base + 32 * k;
            if (vector >= vectors) {
                break;
            }
            // Every row's vector, then each weight vector, widened once.
            float xf[MATVEC_MAX_ROWS][N];
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
            for (int r = 0; r < MATVEC_MAX_ROWS; r++) {
                if (r < rows) {
                    const Vector16<T> xs = load16(x + (size_t)r * in + (size_t)vector * N);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
                    for (int e = 0; e < N; e++) {
                        xf[r][e] = widen(xs.v[e]);
                    }
                }
            }
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
            for (int u = 0; u < MATVEC_OUT_PER_WARP; u++) {
                float wf[N];
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
                for (int e = 0; e < N; e++) {
                    wf[e] = widen(weights[k][u].v[e]);
                }
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
                for (int r = 0; r < MATVEC_MAX_ROWS; r++) {
                    if (r < rows) {
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
                        for (int e = 0; e < N; e++) {
                            sums[u][r] += xf[r][e] * wf[e];
                        }
                    }
                }
            }
        }
    }
    // Every lane of the block adds (the host emulation's warp sum needs the
    // whole block, the GPU's the whole warp); lane 0 writes.
    for (int u = 0; u < MATVEC_OUT_PER_WARP; u++) {
        for (int r = 0; r < MATVEC_MAX_ROWS; r++) {
            if (r < rows) {
                const float sum = block.warp_sum(sums[u][r]);
                if (lane == 0 && first + u < out) {
                    y[(size_t)r * out + first + u] = narrow_to<T>(sum);
                }
            }
        }
    }
}

#ifndef CAPTURE_HOST_EMULATION
// Launched with blocks of 128 threads (MATVEC_BLOCK of the launch code).
// With sm_90's registers (ptxas: 128 to 162 a thread, no spills) three
// blocks fit a multiprocessor: 12 warps whose lanes hold 8 weight vectors
// in flight each, 48 KiB a multiprocessor, more than the ~30 KiB an H200's
// bandwidth times its memory latency needs. (Asking for four blocks
// spills.)
#define MATVEC(T, SUFFIX)                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                  \
        capture_matvec_##SUFFIX(const T *w, const T *x, T *y, int rows, int in, int out) { \
        matvec_block(DeviceBlock(), blockIdx.x, w, x, y, rows, in, out);                  \
    }

MATVEC(float, f32)
MATVEC(__nv_bfloat16, bf16)
MATVEC(__half, f16)
#endif
