// The language-model head's last steps in a decode step, one kernel each:
//
//   capture_logit_softcap_T:  out = tanh(x * inv + 0) * cap + 0     in f32
//   capture_argmax_rows:      out[row] = the first column of the row's
//                             maximum, or 0xFFFFFFFF if the row holds a NaN
//
// The soft-cap is candle's cast to f32, affine, tanh and affine (four
// kernels) with the same roundings, `+ 0` included (it turns -0 into +0 as
// candle's affine does), so the worker's CPU implementation
// (`worker/src/model/softcap.rs`) equals it. The argmax is what the
// worker's `capture::decode::argmax` chooses on the host (the first column
// on ties; a row with a NaN is left to the host, which never lets NaN win),
// where candle's operations took about a dozen kernels
// (`capture::decode::argmax_rows`).
//
// Soft-cap: one thread per element. Argmax: one block per row of f32
// logits; its body runs on the host in `kernels/tests/host_emulation.cu`.
#include "common.cuh"

template <typename T>
HOST_DEVICE void softcap_element(const T *x, float *out, float inv, float cap, size_t index) {
    out[index] = tanhf(widen(x[index]) * inv + 0.0f) * cap + 0.0f;
}

// The choice no row of a vocabulary below 2^24 columns can make.
#define NO_CHOICE 0xFFFFFFFFu

// Row `row` of `[rows, vocab]` logits with `block`'s threads: the maximum
// (NaNs aside), whether there is a NaN, and the first column holding the
// maximum, as the largest `vocab - column` (exact in f32 below 2^24
// columns: the reductions are in f32).
#pragma nv_exec_check_disable
template <typename Block>
HOST_DEVICE void argmax_row(const Block &block, const float *logits, unsigned *out, int vocab,
                            int row) {
    logits += (size_t)row * vocab;
    float max = -INFINITY, nan = 0.0f;
    for (int i = block.thread(); i < vocab; i += block.size()) {
        const float x = logits[i];
        if (x != x) {
            nan = 1.0f;
        } else {
            max = fmaxf(max, x);
        }
    }
    max = block.reduce(max, Max(), -INFINITY);
    nan = block.reduce(nan, Max(), 0.0f);
    float first = 0.0f;
    // A thread's columns increase: its first hit is its earliest.
    for (int i = block.thread(); i < vocab; i += block.size()) {
        if (logits[i] == max) {
            first = (float)(vocab - i);
            break;
        }
    }
    first = block.reduce(first, Max(), 0.0f);
    if (block.thread() == 0) {
        out[row] = nan > 0.0f || first == 0.0f ? NO_CHOICE : (unsigned)(vocab - (int)first);
    }
}

#define LOGIT_SOFTCAP(T, SUFFIX)                                                          \
    extern "C" __global__ void capture_logit_softcap_##SUFFIX(                            \
        const T *x, float *out, float inv, float cap, size_t elements) {                  \
        const size_t index = global_index();                                              \
        if (index < elements) {                                                           \
            softcap_element(x, out, inv, cap, index);                                     \
        }                                                                                 \
    }

LOGIT_SOFTCAP(float, f32)
LOGIT_SOFTCAP(__nv_bfloat16, bf16)
LOGIT_SOFTCAP(__half, f16)

extern "C" __global__ void capture_argmax_rows(const float *logits, unsigned *out, int vocab) {
    argmax_row(DeviceBlock(), logits, out, vocab, blockIdx.x);
}
