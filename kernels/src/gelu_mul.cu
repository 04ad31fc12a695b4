// Gemma-2's MLP activation in one kernel: from the stacked gate and up
// projections `gate_up` (`[rows, 2 width]`: gate, then up),
//
//   out = T(T(gelu(gate)) * up)        gelu with the tanh approximation
//
// (`gelu_pytorch_tanh`, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`),
// `[rows, width]`. With candle's operations it is a GELU and a product: two
// kernels, and the GELU's output written and read back. The GELU is
// computed in f32 and rounded once, as PyTorch computes it for bf16;
// candle's CPU GELU rounds each step in bf16, which the worker's CPU
// implementation (`worker/src/model/gelu_mul.rs`) follows, so the two agree
// within bf16 rounding (`capture::gpu_tests`).
//
// One thread per output element.
#include "common.cuh"

template <typename T>
HOST_DEVICE void gelu_mul_element(const T *gate_up, T *out, int width, size_t index) {
    const size_t row = index / width;
    const int j = index % width;
    const T *gate = gate_up + row * 2 * width;
    const float x = widen(gate[j]);
    const float inner = 0.7978845608028654f * x * (1.0f + 0.044715f * x * x);
    const T gelu = narrow_to<T>(0.5f * x * (1.0f + tanhf(inner)));
    out[index] = narrow_to<T>(widen(gelu) * widen(gate[width + j]));
}

#ifndef CAPTURE_HOST_EMULATION
#define GELU_MUL(T, SUFFIX)                                                               \
    extern "C" __global__ void capture_gelu_mul_##SUFFIX(const T *gate_up, T *out,        \
                                                         int width, size_t elements) {    \
        const size_t index = global_index();                                              \
        if (index < elements) {                                                           \
            gelu_mul_element(gate_up, out, width, index);                                 \
        }                                                                                 \
    }

GELU_MUL(float, f32)
GELU_MUL(__nv_bfloat16, bf16)
GELU_MUL(__half, f16)
#endif
