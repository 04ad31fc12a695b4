// A decode step's attention: each query row's rotary embedding, its scores
// over the layer's KV cache, their scaling, soft-capping, mask and softmax,
// and the probabilities' product with the values, written straight into
// the layout the output projection reads:
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
// side): four or five kernels per layer.
// The worker's CPU implementation (`worker/src/model/decode_attention.rs`)
// computes each step in the same order and is the reference
// (`capture::gpu_tests`); `kernels/tests/host_emulation.cu` runs these
// bodies on the host.
//
// Two ways to launch it (`kernels/src/launch/decode_attention.rs` picks):
//
// - one kernel, one block per query row (`capture_decode_attention_*`): the
//   row's scores, query and value sums' parts in shared memory, (ctx + d +
//   max(block, d)) floats. For short contexts: one launch.
// - split over the keys, for long contexts, where one block per row would
//   read all of a row's keys and values on one multiprocessor (at batch 1,
//   8 of them for gemma-2-2b's 8 heads): blocks of `chunk` keys each.
//   `capture_decode_scores_*` writes each part's scores to global memory with
//   the part's maximum and its sum of exp(s - maximum);
//   `capture_decode_values_*` takes every part's maximum and sum to the row's
//   (in part order), rounds its keys' probabilities to T as above and writes
//   its part of the weighted value sums in f32; `capture_decode_combine_*`
//   adds the parts in order and rounds to T. Same steps and roundings; the
//   f32 sums go in another order.
//
// Rows are ordered (batch, head, query); the queries are read from the
// stacked projection `qkv` (`[b, t, heads + 2 kv_heads, d]`) with the pass's
// rotary table (`[t, d]`, or `[b, t, d]` when `table_batched`: each row's
// cos, then sin). Grouped-query attention reads key/value head `head /
// (heads / kv_heads)`. The keys and values are views of the cache (`[b,
// kv_heads, columns, d]` with any strides but a unit one on d), already
// rotated and written by rotary.cu's kernel. A key's product with the query
// is one warp's work (its lanes take every 32nd element, so a warp reads a
// key row's consecutive elements); block sizes are multiples of 32.
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

// Where query row `row` (ordered batch, head, query) reads and writes.
struct QueryRow {
    int batch, head, query, kv;

    HOST_DEVICE QueryRow(const AttentionShape &s, int row)
        : batch(row / (s.t * s.heads)), head((row / s.t) % s.heads), query(row % s.t),
          kv(head / (s.heads / s.kv_heads)) {}

    // Its query head in the stacked projection, unrotated.
    template <typename T> HOST_DEVICE const T *q(const T *qkv, const AttentionShape &s) const {
        return qkv + (((size_t)batch * s.t + query) * (s.heads + 2 * s.kv_heads) + head) * s.d;
    }
    // Its rotary table row.
    template <typename T>
    HOST_DEVICE const T *table(const T *tables, const AttentionShape &s) const {
        return tables + ((s.table_batched ? (size_t)batch * s.t : 0) + query) * s.d;
    }
    // Its key/value head's first key, and first value.
    template <typename T> HOST_DEVICE const T *keys(const T *k, const AttentionShape &s) const {
        return k + batch * s.k_batch + kv * s.k_head;
    }
    template <typename T> HOST_DEVICE const T *values(const T *v, const AttentionShape &s) const {
        return v + batch * s.v_batch + kv * s.v_head;
    }
    // Its mask row, or null.
    HOST_DEVICE const float *mask(const float *masks, const AttentionShape &s) const {
        return masks != nullptr ? masks + ((size_t)batch * s.t + query) * s.ctx : nullptr;
    }
    // Its output row's first element in `[b, t, heads, d]`.
    HOST_DEVICE size_t out(const AttentionShape &s) const {
        return (((size_t)batch * s.t + query) * s.heads + head) * s.d;
    }
};

// The query head row `q`, rotated with `table`, into `qs` (d floats); ends
// synchronised.
#pragma nv_exec_check_disable
template <typename T, typename Block>
HOST_DEVICE void rotate_query(const Block &block, float *qs, const T *q, const T *table,
                              const AttentionShape &s) {
    const int half = s.d / 2;
    for (int j = block.thread(); j < half; j += block.size()) {
        T first, second;
        rotated_pair(q, table, j, half, first, second);
        qs[j] = widen(first);
        qs[j + half] = widen(second);
    }
    block.sync();
}

// Keys a warp takes at a time in `score_keys` (their loads in flight
// together).
#define KEYS_PER_WARP 4

// The scores of keys [lo, hi) (`keys` the row's first, `mask` its mask row
// or null) into `scores[j - lo]`, a warp per key, KEYS_PER_WARP keys per
// warp at a time; returns their maximum (-inf when every one is masked) to
// every thread, after a synchronisation (the scores are then visible to
// the whole block).
#pragma nv_exec_check_disable
template <typename T, typename Block>
HOST_DEVICE float score_keys(const Block &block, const float *qs, const T *keys,
                             const float *mask, const AttentionShape &s, int lo, int hi,
                             float *scores) {
    const int lane = block.thread() % 32, warp = block.thread() / 32;
    const int warps = block.size() / 32;
    const float inv_cap = s.cap > 0.0f ? 1.0f / s.cap : 0.0f;
    float max = -INFINITY;
    // Every warp goes round as often as the others (a warp sum needs all of
    // its lanes; the host emulation, all of the block's threads).
    for (int first = lo; first < hi; first += warps * KEYS_PER_WARP) {
        float dots[KEYS_PER_WARP];
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
        for (int u = 0; u < KEYS_PER_WARP; u++) {
            const int j = first + u * warps + warp;
            dots[u] = 0.0f;
            if (j < hi) {
                const T *key = keys + j * s.k_column;
                for (int i = lane; i < s.d; i += 32) {
                    dots[u] += qs[i] * widen(key[i]);
                }
            }
        }
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
        for (int u = 0; u < KEYS_PER_WARP; u++) {
            const int j = first + u * warps + warp;
            const float dot = block.warp_sum(dots[u]);
            if (j < hi && lane == 0) {
                float score = scaled_score(narrow_to<T>(dot), s.scale, s.cap, inv_cap);
                if (mask != nullptr) {
                    score = score + mask[j];
                }
                scores[j - lo] = score;
                max = fmaxf(max, score);
            }
        }
    }
    return block.reduce(max, Max(), -INFINITY);
}

// The weighted value sums of keys [lo, hi) (`values` the row's first) with
// probabilities `probs[j - lo]`, in parts: `parts[part * d + i]` sums every
// parts-th key's element i (a warp reads a value row's consecutive
// elements). Returns the number of parts; ends synchronised.
#pragma nv_exec_check_disable
template <typename T, typename Block>
HOST_DEVICE int value_parts(const Block &block, const float *probs, const T *values,
                            const AttentionShape &s, int lo, int hi, float *parts) {
    const int count = s.d < block.size() ? block.size() / s.d : 1;
    for (int item = block.thread(); item < count * s.d; item += block.size()) {
        const int part = item / s.d, i = item % s.d;
        float acc = 0.0f;
#ifdef __CUDA_ARCH__
#pragma unroll 8
#endif
        for (int j = lo + part; j < hi; j += count) {
            acc += probs[j - lo] * widen(values[j * s.v_column + i]);
        }
        parts[item] = acc;
    }
    block.sync();
    return count;
}

// Element i of the value sums: the parts added in order.
HOST_DEVICE float parts_sum(const float *parts, int count, int d, int i) {
    float acc = 0.0f;
    for (int part = 0; part < count; part++) {
        acc += parts[part * d + i];
    }
    return acc;
}

// Row `row` in one block; `shared` holds (ctx + d + max(block size, d))
// floats. `mask` is `[b, 1, t, ctx]` or null. (The pragma lets host
// emulation instantiate it with a host-only block.)
#pragma nv_exec_check_disable
template <typename T, typename Block>
HOST_DEVICE void decode_attention_row(const Block &block, float *shared, const T *qkv,
                                      const T *table, const T *k, const T *v,
                                      const float *mask, T *out, const AttentionShape &s,
                                      int index) {
    const QueryRow row(s, index);
    float *scores = shared;
    float *qs = shared + s.ctx;
    float *parts = qs + s.d;
    rotate_query(block, qs, row.q(qkv, s), row.table(table, s), s);
    const float max = score_keys(block, qs, row.keys(k, s), row.mask(mask, s), s, 0, s.ctx, scores);
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
    const int count = value_parts(block, scores, row.values(v, s), s, 0, s.ctx, parts);
    out += row.out(s);
    for (int i = block.thread(); i < s.d; i += block.size()) {
        out[i] = narrow_to<T>(parts_sum(parts, count, s.d, i));
    }
}

// Split launches: block `index` is part `index % splits` (keys [part *
// chunk, min(ctx, (part + 1) * chunk))) of row `index / splits`.
struct Part {
    int row, part, lo, hi;
    HOST_DEVICE Part(const AttentionShape &s, int chunk, int splits, int index)
        : row(index / splits), part(index % splits), lo(part * chunk),
          hi(lo + chunk < s.ctx ? lo + chunk : s.ctx) {}
};

// A part's scores into `scores` (`[rows, ctx]`, f32) and its maximum and
// sum of exp(score - maximum) into `stats[2 index]`, `stats[2 index + 1]`
// (0 when every key of the part is masked). `shared` holds d floats.
#pragma nv_exec_check_disable
template <typename T, typename Block>
HOST_DEVICE void decode_scores_part(const Block &block, float *shared, const T *qkv,
                                    const T *table, const T *k, const float *mask,
                                    float *scores, float *stats, const AttentionShape &s,
                                    int chunk, int splits, int index) {
    const Part p(s, chunk, splits, index);
    const QueryRow row(s, p.row);
    rotate_query(block, shared, row.q(qkv, s), row.table(table, s), s);
    float *row_scores = scores + (size_t)p.row * s.ctx;
    const float max = score_keys(block, shared, row.keys(k, s), row.mask(mask, s), s, p.lo,
                                 p.hi, row_scores + p.lo);
    float sum = 0.0f;
    if (max != -INFINITY) {
        for (int j = p.lo + block.thread(); j < p.hi; j += block.size()) {
            sum += expf(row_scores[j] - max);
        }
    }
    sum = block.reduce(sum, Sum(), 0.0f);
    if (block.thread() == 0) {
        stats[2 * (size_t)index] = max;
        stats[2 * (size_t)index + 1] = sum;
    }
}

// A part's keys' probabilities (the row's maximum and sum from every part's
// stats, in part order), rounded to T, and its part of the weighted value
// sums into `partials[index * d + i]` (f32). `shared` holds (chunk +
// max(block size, d)) floats.
#pragma nv_exec_check_disable
template <typename T, typename Block>
HOST_DEVICE void decode_values_part(const Block &block, float *shared, const T *v,
                                    const float *scores, const float *stats, float *partials,
                                    const AttentionShape &s, int chunk, int splits, int index) {
    const Part p(s, chunk, splits, index);
    const QueryRow row(s, p.row);
    const float *row_stats = stats + 2 * (size_t)p.row * splits;
    float max = -INFINITY;
    for (int part = 0; part < splits; part++) {
        max = fmaxf(max, row_stats[2 * part]);
    }
    // A part with every key masked adds 0 * exp(-inf) (its sum is 0).
    float sum = 0.0f;
    for (int part = 0; part < splits; part++) {
        sum += row_stats[2 * part + 1] * expf(row_stats[2 * part] - max);
    }
    const float *row_scores = scores + (size_t)p.row * s.ctx;
    float *probs = shared;
    float *parts = shared + chunk;
    for (int j = p.lo + block.thread(); j < p.hi; j += block.size()) {
        probs[j - p.lo] = widen(narrow_to<T>(expf(row_scores[j] - max) / sum));
    }
    block.sync();
    const int count = value_parts(block, probs, row.values(v, s), s, p.lo, p.hi, parts);
    for (int i = block.thread(); i < s.d; i += block.size()) {
        partials[(size_t)index * s.d + i] = parts_sum(parts, count, s.d, i);
    }
}

// Row `index`'s output: its parts' value sums added in part order, in T.
#pragma nv_exec_check_disable
template <typename T, typename Block>
HOST_DEVICE void decode_combine_row(const Block &block, const float *partials, T *out,
                                    const AttentionShape &s, int splits, int index) {
    out += QueryRow(s, index).out(s);
    for (int i = block.thread(); i < s.d; i += block.size()) {
        float acc = 0.0f;
        for (int part = 0; part < splits; part++) {
            acc += partials[((size_t)index * splits + part) * s.d + i];
        }
        out[i] = narrow_to<T>(acc);
    }
}

#define DECODE_ATTENTION(T, SUFFIX)                                                         \
    extern "C" __global__ void capture_decode_attention_##SUFFIX(                            \
        const T *qkv, const T *table, const T *k, const T *v, const float *mask, T *out,     \
        AttentionShape s) {                                                                  \
        extern __shared__ float shared[];                                                    \
        decode_attention_row(DeviceBlock(), shared, qkv, table, k, v, mask, out, s,          \
                             blockIdx.x);                                                    \
    }                                                                                        \
    extern "C" __global__ void capture_decode_scores_##SUFFIX(                               \
        const T *qkv, const T *table, const T *k, const float *mask, float *scores,          \
        float *stats, AttentionShape s, int chunk, int splits) {                             \
        extern __shared__ float shared[];                                                    \
        decode_scores_part(DeviceBlock(), shared, qkv, table, k, mask, scores, stats, s,     \
                           chunk, splits, blockIdx.x);                                       \
    }                                                                                        \
    extern "C" __global__ void capture_decode_values_##SUFFIX(                               \
        const T *v, const float *scores, const float *stats, float *partials,                \
        AttentionShape s, int chunk, int splits) {                                           \
        extern __shared__ float shared[];                                                    \
        decode_values_part(DeviceBlock(), shared, v, scores, stats, partials, s, chunk,      \
                           splits, blockIdx.x);                                              \
    }                                                                                        \
    extern "C" __global__ void capture_decode_combine_##SUFFIX(                              \
        const float *partials, T *out, AttentionShape s, int splits) {                       \
        decode_combine_row(DeviceBlock(), partials, out, s, splits, blockIdx.x);             \
    }

DECODE_ATTENTION(float, f32)
DECODE_ATTENTION(__nv_bfloat16, bf16)
DECODE_ATTENTION(__half, f16)
