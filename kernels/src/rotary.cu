// Gemma-2's rotary position embedding straight from the stacked q/k/v
// projection, in two kernels:
//
//   capture_rotary_queries_T:     q = rope(qkv's query heads)  -> [b, heads, t, d]
//   capture_rotary_keys_values_T: buffer[0, :, :, start + i] = rope(qkv's key heads)
//                                 buffer[1, :, :, start + i] = qkv's value heads
//
// where `qkv` is `[b, t, heads + 2 kv_heads, d]` (query heads, then key
// heads, then value heads) and `buffer` is a layer's KV cache,
// `[2, b, kv_heads, capacity, d]`, written in place at the pass's columns.
// With candle's operations this is a copy to make each of q, k and v
// contiguous, a rotary kernel each for q and k, and a copy of each of k and
// v into the cache: up to seven kernels where these are two.
//
// The rotation is candle's `rope` (and transformers' `q * cos +
// rotate_half(q) * sin`), each product and sum rounded to T:
//
//   out[j]        = T(T(x[j] cos[j]) - T(x[j + d/2] sin[j]))
//   out[j + d/2]  = T(T(x[j] sin[j]) + T(x[j + d/2] cos[j]))      j < d/2
//
// `table` holds each row's cos (first d/2) and sin (last d/2): `[t, d]`,
// shared by the batch, when `table_batched` is 0, else `[b, t, d]`. Rounding
// each step to T in f32 arithmetic equals T's own arithmetic (f32 has more
// than twice the bits of bf16 and f16, plus two), so this equals the
// worker's CPU implementation (`worker/src/model/rotary.rs`) bit for bit.
//
// One thread per rotated pair (and, for the cache, the value pair beside it).
#include "common.cuh"

// A pair's rotation is `rotate_pair` (common.cuh), which
// decode_attention.cu shares.

// The shape of one pass's stacked projection.
struct QkvShape {
    int b, t, heads, kv_heads, d;
    int table_batched;
    __host__ __device__ int total_heads() const { return heads + 2 * kv_heads; }
    // Row (batch, query, head) of qkv.
    __host__ __device__ size_t qkv_row(int batch, int query, int head) const {
        return (((size_t)batch * t + query) * total_heads() + head) * d;
    }
    __host__ __device__ size_t table_row(int batch, int query) const {
        return ((table_batched ? (size_t)batch * t : 0) + query) * d;
    }
};

// Launch element `index` as pair `j` (of d/2) of row (batch, head, query),
// rows ordered as `[b, heads, t]`.
struct PairIndex {
    int j, query, head, batch;
    HOST_DEVICE PairIndex(size_t index, int half, int t, int heads) {
        j = index % half;
        size_t row = index / half;
        query = row % t;
        row /= t;
        head = row % heads;
        batch = row / heads;
    }
};

// Element `index` of the query launch: a pair of the output `[b, heads, t,
// d]`.
template <typename T>
HOST_DEVICE void rotary_query_pair(const T *qkv, const T *table, T *q, QkvShape s,
                                   size_t index) {
    const int half = s.d / 2;
    const PairIndex p(index, half, s.t, s.heads);
    const int j = p.j, query = p.query, head = p.head, batch = p.batch;
    rotate_pair(qkv + s.qkv_row(batch, query, head), table + s.table_row(batch, query),
                q + (((size_t)batch * s.heads + head) * s.t + query) * s.d, j, half);
}

// Element `index` of the cache launch: a pair of key head (batch, kv head,
// query), rotated into the keys, and the same pair of the
// value head copied into the values, at column start + query.
template <typename T>
HOST_DEVICE void rotary_key_value_pair(const T *qkv, const T *table, T *buffer, QkvShape s,
                                       int capacity, int start, size_t index) {
    const int half = s.d / 2;
    const PairIndex p(index, half, s.t, s.kv_heads);
    const int j = p.j, query = p.query, head = p.head, batch = p.batch;
    const size_t column = (((size_t)batch * s.kv_heads + head) * capacity + start + query) * s.d;
    const size_t values = (size_t)s.b * s.kv_heads * capacity * s.d;
    rotate_pair(qkv + s.qkv_row(batch, query, s.heads + head), table + s.table_row(batch, query),
                buffer + column, j, half);
    const T *v = qkv + s.qkv_row(batch, query, s.heads + s.kv_heads + head);
    buffer[values + column + j] = v[j];
    buffer[values + column + j + half] = v[j + half];
}

#ifndef CAPTURE_HOST_EMULATION
#define ROTARY(T, SUFFIX)                                                                   \
    extern "C" __global__ void capture_rotary_queries_##SUFFIX(                             \
        const T *qkv, const T *table, T *q, QkvShape shape, size_t pairs) {                 \
        const size_t index = global_index();                                                \
        if (index < pairs) {                                                                \
            rotary_query_pair(qkv, table, q, shape, index);                                 \
        }                                                                                   \
    }                                                                                       \
    extern "C" __global__ void capture_rotary_keys_values_##SUFFIX(                         \
        const T *qkv, const T *table, T *buffer, QkvShape shape, int capacity, int start,   \
        size_t pairs) {                                                                     \
        const size_t index = global_index();                                                \
        if (index < pairs) {                                                                \
            rotary_key_value_pair(qkv, table, buffer, shape, capacity, start, index);       \
        }                                                                                   \
    }

ROTARY(float, f32)
ROTARY(__nv_bfloat16, bf16)
ROTARY(__half, f16)
#endif
