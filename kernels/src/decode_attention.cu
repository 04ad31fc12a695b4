// A decode step's attention in one kernel: each query row's rotary
// embedding, its scores over the layer's KV cache, their scaling,
// soft-capping, mask and softmax, and the probabilities' product with the
// values, written straight into the layout the output projection reads:
//
//   q    = rope(qkv's query head)         as rotary.cu rotates queries
//   s[j] = T(q . k[j])                    the product, rounded as a matmul's
//   s[j] = T(s[j] * T(scale))             soft-capped in f32 when cap > 0,
//   s[j] = tanh(s[j] / cap) * cap + mask  plus the additive f32 mask
//   p[j] = T(softmax(s)[j])               in f32, then the compute dtype T
//   out  = T(sum_j p[j] v[j])             -> out[b, query, head, :]
//
// With the worker's other kernels and candle's operations this is the query
// rotation, a batched matmul, the attention softmax, a second batched matmul
// (and with more than one query per sequence a copy to put the heads side by
// side): four or five kernels per layer where this is one.
// The worker's CPU implementation (`worker/src/model/decode_attention.rs`)
// computes each step in the same order and is the reference
// (`capture::gpu_tests`); `kernels/tests/host_emulation.cu` runs this body
// on the host.
//
// One block per query row, rows ordered (batch, head, query); the queries
// are read from the stacked projection `qkv` (`[b, t, heads + 2 kv_heads,
// d]`) with the pass's rotary table (`[t, d]`, or `[b, t, d]` when
// `table_batched`: each row's cos, then sin). Grouped-query attention reads
// key/value head `head / (heads / kv_heads)`. The keys and values are views
// of the cache (`[b, kv_heads, columns, d]` with any strides but a unit one
// on d), already rotated and written by rotary.cu's kernel. The
// block keeps the row's scores, its query and the value sums' parts in
// shared memory: (ctx + d + max(block, d)) floats (the launch checks that
// they fit).
#include "common.cuh"

// The shapes and strides of one launch (passed by value; mirrored by the
// launch code, `kernels/src/launch/decode_attention.rs`).
struct AttentionShape {
    // Strides, in elements, of the keys' and values' batch, head and column
    // axes.
    long long k_batch, k_head, k_column;
    long long v_batch, v_head, v_column;
    int heads, kv_heads, t, ctx, d, table_batched;
    // The scale rounded to T; the soft cap (<= 0: none).
    float scale, cap;
};

// Row `row` of the launch, with `block`'s threads; `shared` holds (ctx + d
// + max(block size, d)) floats. `mask` is `[b, 1, t, ctx]` or null. (The
// pragma lets host emulation instantiate it with a host-only block.)
#pragma nv_exec_check_disable
template <typename T, typename Block>
HOST_DEVICE void decode_attention_row(const Block &block, float *shared, const T *qkv,
                                      const T *table, const T *k, const T *v,
                                      const float *mask, T *out, const AttentionShape &s,
                                      int row) {
    const int query = row % s.t;
    const int head = (row / s.t) % s.heads;
    const int batch = row / (s.t * s.heads);
    const int kv = head / (s.heads / s.kv_heads);
    float *scores = shared;
    float *qs = shared + s.ctx;
    float *parts = qs + s.d;
    const T *q = qkv + (((size_t)batch * s.t + query) * (s.heads + 2 * s.kv_heads) + head) * s.d;
    table += ((s.table_batched ? (size_t)batch * s.t : 0) + query) * s.d;
    k += batch * s.k_batch + kv * s.k_head;
    v += batch * s.v_batch + kv * s.v_head;
    if (mask != nullptr) {
        mask += ((size_t)batch * s.t + query) * s.ctx;
    }
    const int half = s.d / 2;
    for (int j = block.thread(); j < half; j += block.size()) {
        T first, second;
        rotated_pair(q, table, j, half, first, second);
        qs[j] = widen(first);
        qs[j + half] = widen(second);
    }
    block.sync();

    // A thread per key: its score, and the row's maximum.
    const float inv_cap = s.cap > 0.0f ? 1.0f / s.cap : 0.0f;
    float max = -INFINITY;
    for (int j = block.thread(); j < s.ctx; j += block.size()) {
        const T *key = k + j * s.k_column;
        float dot = 0.0f;
        for (int i = 0; i < s.d; i++) {
            dot += qs[i] * widen(key[i]);
        }
        float score = scaled_score(narrow_to<T>(dot), s.scale, s.cap, inv_cap);
        if (mask != nullptr) {
            score = score + mask[j];
        }
        scores[j] = score;
        max = fmaxf(max, score);
    }
    max = block.reduce(max, Max(), -INFINITY);
    float sum = 0.0f;
    for (int j = block.thread(); j < s.ctx; j += block.size()) {
        const float e = expf(scores[j] - max);
        scores[j] = e;
        sum += e;
    }
    sum = block.reduce(sum, Sum(), 0.0f);
    for (int j = block.thread(); j < s.ctx; j += block.size()) {
        scores[j] = widen(narrow_to<T>(scores[j] / sum));
    }
    block.sync();

    // The values' weighted sum: `parts` sums of every parts-th key per
    // element of d (a warp reads a value row's consecutive elements), then
    // those sums in order.
    const int parts_count = s.d < block.size() ? block.size() / s.d : 1;
    for (int item = block.thread(); item < parts_count * s.d; item += block.size()) {
        const int part = item / s.d, i = item % s.d;
        float acc = 0.0f;
        for (int j = part; j < s.ctx; j += parts_count) {
            acc += scores[j] * widen(v[j * s.v_column + i]);
        }
        parts[item] = acc;
    }
    block.sync();
    out += (((size_t)batch * s.t + query) * s.heads + head) * s.d;
    for (int i = block.thread(); i < s.d; i += block.size()) {
        float acc = 0.0f;
        for (int part = 0; part < parts_count; part++) {
            acc += parts[part * s.d + i];
        }
        out[i] = narrow_to<T>(acc);
    }
}

#define DECODE_ATTENTION(T, NAME)                                                        \
    extern "C" __global__ void NAME(const T *qkv, const T *table, const T *k, const T *v,   \
                                    const float *mask, T *out, AttentionShape s) {          \
        extern __shared__ float shared[];                                                   \
        decode_attention_row(DeviceBlock(), shared, qkv, table, k, v, mask, out, s,         \
                             blockIdx.x);                                                   \
    }

DECODE_ATTENTION(float, capture_decode_attention_f32)
DECODE_ATTENTION(__nv_bfloat16, capture_decode_attention_bf16)
DECODE_ATTENTION(__half, capture_decode_attention_f16)
