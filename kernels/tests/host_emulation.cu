// The kernels' bodies (rotary.cu, gelu_mul.cu, gather.cu, head.cu's soft-cap
// element by element; decode_attention.cu and head.cu's argmax a block at a
// time, its threads std::threads) run on the host against references written independently of them: a check of their
// indexing and arithmetic for a machine without a GPU.
// `scripts/check_kernels.sh` (CI, and scripts/build_cuda.sh) compiles and
// runs it with nvcc:
//
//   nvcc -std=c++20 -DCAPTURE_HOST_EMULATION -L$CUDA_HOME/lib -o host_emulation \
//       kernels/tests/host_emulation.cu && ./host_emulation
//
// Each launch is emulated as the worker launches it (one call per index
// below the element count the launch code computes); outputs start as NaN
// so that an element no index writes is caught, and a cache buffer's other
// columns must keep their values. Exit status 0 when every check passes.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "../src/decode_attention.cu"
#include "../src/gather.cu"
#include "../src/gelu_mul.cu"
#include "../src/head.cu"
#include "../src/matvec.cu"
#include "../src/rotary.cu"

static int failures = 0;

static void check(bool ok, const char *what, int i, float got, float want) {
    if (!ok) {
        if (failures < 20) {
            std::printf("FAIL %s at %d: got %.9g, want %.9g\n", what, i, got, want);
        }
        failures++;
    }
}

// Deterministic values in [-2, 2), rounded to T.
template <typename T> static std::vector<T> values(size_t n, unsigned seed) {
    std::vector<T> v(n);
    unsigned x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        v[i] = narrow_to<T>((float)(x >> 8) / (float)(1u << 24) * 4.0f - 2.0f);
    }
    return v;
}

template <typename T> static T nan_value() { return narrow_to<T>(NAN); }

// transformers' rotation of one head row: T(x * cos) + T(rotate_half(x) * sin),
// with cos and sin repeated over both halves.
template <typename T>
static float rope_reference(const T *x, const T *table, int d, int j) {
    const int half = d / 2;
    const float c = widen(table[j % half]), s = widen(table[half + j % half]);
    const float rotated = j < half ? -widen(x[j + half]) : widen(x[j - half]);
    return widen(narrow_to<T>(widen(narrow_to<T>(widen(x[j]) * c)) +
                              widen(narrow_to<T>(rotated * s))));
}

template <typename T>
static void rotary_case(const char *name, int b, int t, int heads, int kv_heads, int d,
                        bool batched, int capacity, int start) {
    const QkvShape s{b, t, heads, kv_heads, d, batched ? 1 : 0};
    const int total = heads + 2 * kv_heads;
    const std::vector<T> qkv = values<T>((size_t)b * t * total * d, 1);
    const std::vector<T> table = values<T>((size_t)(batched ? b : 1) * t * d, 2);
    // Queries: every element written, each the reference rotation.
    std::vector<T> q((size_t)b * heads * t * d, nan_value<T>());
    const size_t query_pairs = (size_t)b * heads * t * (d / 2);
    for (size_t i = 0; i < query_pairs; i++) {
        rotary_query_pair(qkv.data(), table.data(), q.data(), s, i);
    }
    for (int bi = 0; bi < b; bi++)
        for (int h = 0; h < heads; h++)
            for (int ti = 0; ti < t; ti++)
                for (int j = 0; j < d; j++) {
                    const size_t at = (((size_t)bi * heads + h) * t + ti) * d + j;
                    const float want = rope_reference(&qkv[s.qkv_row(bi, ti, h)],
                                                      &table[s.table_row(bi, ti)], d, j);
                    check(widen(q[at]) == want, name, (int)at, widen(q[at]), want);
                }
    // Keys and values: the pass's columns written, every other one kept.
    const size_t per_half = (size_t)b * kv_heads * capacity * d;
    std::vector<T> buffer = values<T>(2 * per_half, 3);
    const std::vector<T> before = buffer;
    const size_t kv_pairs = (size_t)b * kv_heads * t * (d / 2);
    for (size_t i = 0; i < kv_pairs; i++) {
        rotary_key_value_pair(qkv.data(), table.data(), buffer.data(), s, capacity, start, i);
    }
    for (int kv = 0; kv < 2; kv++)
        for (int bi = 0; bi < b; bi++)
            for (int h = 0; h < kv_heads; h++)
                for (int c = 0; c < capacity; c++)
                    for (int j = 0; j < d; j++) {
                        const size_t at = kv * per_half +
                                          (((size_t)bi * kv_heads + h) * capacity + c) * d + j;
                        float want = widen(before[at]);
                        const int ti = c - start;
                        if (ti >= 0 && ti < t) {
                            const T *x = &qkv[s.qkv_row(bi, ti, heads + kv * kv_heads + h)];
                            want = kv == 0 ? rope_reference(x, &table[s.table_row(bi, ti)], d, j)
                                           : widen(x[j]);
                        }
                        check(widen(buffer[at]) == want, name, (int)at, widen(buffer[at]), want);
                    }
}

template <typename T>
static void gelu_mul_case(const char *name, int rows, int width, float tolerance) {
    const std::vector<T> gate_up = values<T>((size_t)rows * 2 * width, 4);
    std::vector<T> out((size_t)rows * width, nan_value<T>());
    for (size_t i = 0; i < out.size(); i++) {
        gelu_mul_element(gate_up.data(), out.data(), width, i);
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < width; j++) {
            const double x = widen(gate_up[(size_t)r * 2 * width + j]);
            const double up = widen(gate_up[(size_t)r * 2 * width + width + j]);
            const double gelu = 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) *
                                                           (x + 0.044715 * x * x * x)));
            const float want = (float)(gelu * up);
            const float got = widen(out[(size_t)r * width + j]);
            check(std::fabs(got - want) <= tolerance * (std::fabs(want) + 1e-3f), name,
                  r * width + j, got, want);
        }
}

// Segments of these lengths (empty ones too) gathered one after the other:
// every output element is its source's, in order.
template <typename T> static void gather_case(const char *name, std::vector<size_t> lengths) {
    std::vector<std::vector<T>> sources;
    std::vector<uint64_t> table;
    std::vector<uint64_t> ends;
    uint64_t total = 0;
    for (size_t s = 0; s < lengths.size(); s++) {
        std::vector<T> source(lengths[s]);
        for (size_t i = 0; i < lengths[s]; i++) {
            source[i] = (T)(1000 * (s + 1) + i);
        }
        sources.push_back(source);
        total += lengths[s];
        ends.push_back(total);
    }
    for (const auto &source : sources) {
        table.push_back((uint64_t)(uintptr_t)source.data());
    }
    table.insert(table.end(), ends.begin(), ends.end());
    const T unwritten = (T)0xBEEF;
    std::vector<T> out(total, unwritten);
    for (size_t i = 0; i < total; i++) {
        gather_element(table.data(), (int)lengths.size(), out.data(), i);
    }
    size_t at = 0;
    for (size_t s = 0; s < lengths.size(); s++) {
        for (size_t i = 0; i < lengths[s]; i++, at++) {
            check(out[at] == sources[s][i], name, (int)at, (float)out[at], (float)sources[s][i]);
        }
    }
}

// A block of `size` std::threads as decode_attention.cu's body sees it: a
// barrier, and a reduction each thread computes over every thread's value
// (in thread order, where the GPU's goes by warps).
struct HostBlock {
    int id, count;
    std::barrier<> *barrier;
    std::vector<float> *slots;
    int thread() const { return id; }
    int size() const { return count; }
    void sync() const { barrier->arrive_and_wait(); }
    template <typename Op> float reduce(float v, Op op, float identity) const {
        sync(); // every thread has read the slots of an earlier reduction
        (*slots)[id] = v;
        sync();
        float r = identity;
        for (const float x : *slots) {
            r = op(r, x);
        }
        return r;
    }
    // The sum over this thread's warp of 32 (in lane order, where the GPU's
    // goes by halves); every thread of the block calls it together.
    float warp_sum(float v) const {
        sync();
        (*slots)[id] = v;
        sync();
        float r = 0.0f;
        for (int lane = id / 32 * 32; lane < id / 32 * 32 + 32; lane++) {
            r += (*slots)[lane];
        }
        return r;
    }
};

// Runs `body(block)` for one block of `threads` std::threads (whole warps,
// as every launch has).
template <typename Body> static void run_block(int threads, Body body) {
    if (threads % 32 != 0) {
        std::printf("a block of %d threads is not whole warps\n", threads);
        std::exit(2);
    }
    std::vector<float> slots(threads);
    std::barrier<> barrier(threads);
    std::vector<std::thread> block;
    for (int id = 0; id < threads; id++) {
        block.emplace_back([&, id] { body(HostBlock{id, threads, &barrier, &slots}); });
    }
    for (auto &thread : block) {
        thread.join();
    }
}

// Gemma-2's attention of `t` queries per sequence over a cache of `capacity`
// columns (the first `ctx` read), keys and values in one buffer `[2, b,
// kv_heads, capacity, d]` as the worker's cache holds them, with a window
// mask (and sequence 1's first key padding) when `masked`; each row run as
// a block of `threads`, or with `chunk` > 0 split over the keys in parts
// of `chunk` (the scores, values and combining kernels, one after the
// other, each block as `threads`). The reference rounds where the kernel
// does, in double arithmetic otherwise.
template <typename T>
static void decode_attention_case(const char *name, int b, int heads, int kv_heads, int t,
                                  int ctx, int capacity, int d, bool masked, bool batched,
                                  float cap, int threads, float tolerance, int chunk = 0) {
    const int total = heads + 2 * kv_heads;
    const std::vector<T> qkv = values<T>((size_t)b * t * total * d, 5);
    const std::vector<T> table = values<T>((size_t)(batched ? b : 1) * t * d, 8);
    const std::vector<T> buffer = values<T>(2 * (size_t)b * kv_heads * capacity * d, 6);
    std::vector<float> mask;
    if (masked) {
        for (int bi = 0; bi < b; bi++)
            for (int qi = 0; qi < t; qi++)
                for (int j = 0; j < ctx; j++) {
                    const int pos = ctx - t + qi;
                    const bool visible = j <= pos && pos - j < 5 && !(bi == 1 && j == 0);
                    mask.push_back(visible ? 0.0f : -INFINITY);
                }
    }
    const long long head = (long long)capacity * d;
    const float scale = widen(narrow_to<T>(0.0625f));
    const AttentionShape s{(long long)kv_heads * head,
                           head,
                           d,
                           (long long)kv_heads * head,
                           head,
                           d,
                           heads,
                           kv_heads,
                           t,
                           ctx,
                           d,
                           batched ? 1 : 0,
                           scale,
                           cap};
    const T *k = buffer.data();
    const T *v = buffer.data() + (size_t)b * kv_heads * capacity * d;
    std::vector<T> out((size_t)b * t * heads * d, nan_value<T>());
    const int rows = b * heads * t;
    const float *mask_data = masked ? mask.data() : nullptr;
    if (chunk == 0) {
        for (int row = 0; row < rows; row++) {
            std::vector<float> shared(ctx + d + std::max(threads, d), NAN);
            run_block(threads, [&](HostBlock h) {
                decode_attention_row(h, shared.data(), qkv.data(), table.data(), k, v,
                                     mask_data, out.data(), s, row);
            });
        }
    } else {
        const int splits = (ctx + chunk - 1) / chunk;
        std::vector<float> scores((size_t)rows * ctx, NAN);
        std::vector<float> stats((size_t)rows * splits * 2, NAN);
        std::vector<float> partials((size_t)rows * splits * d, NAN);
        for (int index = 0; index < rows * splits; index++) {
            std::vector<float> shared(d, NAN);
            run_block(threads, [&](HostBlock h) {
                decode_scores_part(h, shared.data(), qkv.data(), table.data(), k, mask_data,
                                   scores.data(), stats.data(), s, chunk, splits, index);
            });
        }
        for (size_t i = 0; i < scores.size(); i++) {
            check(!std::isnan(scores[i]), name, (int)i, scores[i], 0.0f);
        }
        for (int index = 0; index < rows * splits; index++) {
            std::vector<float> shared(chunk + std::max(threads, d), NAN);
            run_block(threads, [&](HostBlock h) {
                decode_values_part(h, shared.data(), v, scores.data(), stats.data(),
                                   partials.data(), s, chunk, splits, index);
            });
        }
        for (int row = 0; row < rows; row++) {
            run_block(threads, [&](HostBlock h) {
                decode_combine_row(h, partials.data(), out.data(), s, splits, row);
            });
        }
    }
    const int groups = heads / kv_heads;
    for (int bi = 0; bi < b; bi++)
        for (int h = 0; h < heads; h++)
            for (int qi = 0; qi < t; qi++) {
                // The query: the head row rotated as the rotary kernels' reference does.
                const T *x = &qkv[(((size_t)bi * t + qi) * total + h) * d];
                const T *row_table = &table[((batched ? (size_t)bi * t : 0) + qi) * d];
                std::vector<float> qr(d);
                for (int i = 0; i < d; i++) {
                    qr[i] = rope_reference(x, row_table, d, i);
                }
                const size_t base = ((size_t)bi * kv_heads + h / groups) * head;
                std::vector<double> p(ctx);
                double max = -INFINITY, sum = 0;
                for (int j = 0; j < ctx; j++) {
                    double dot = 0;
                    for (int i = 0; i < d; i++) {
                        dot += (double)qr[i] * widen(k[base + (size_t)j * d + i]);
                    }
                    double x = widen(narrow_to<T>(widen(narrow_to<T>((float)dot)) * scale));
                    if (cap > 0) {
                        x = std::tanh(x / cap) * cap;
                    }
                    if (masked) {
                        x += mask[((size_t)bi * t + qi) * ctx + j];
                    }
                    p[j] = x;
                    max = std::max(max, x);
                }
                for (int j = 0; j < ctx; j++) {
                    p[j] = std::exp(p[j] - max);
                    sum += p[j];
                }
                for (int i = 0; i < d; i++) {
                    double acc = 0;
                    for (int j = 0; j < ctx; j++) {
                        acc += (double)widen(narrow_to<T>((float)(p[j] / sum))) *
                               widen(v[base + (size_t)j * d + i]);
                    }
                    const size_t at = (((size_t)bi * t + qi) * heads + h) * d + i;
                    const float got = widen(out[at]), want = (float)acc;
                    check(std::fabs(got - want) <= tolerance * (std::fabs(want) + 0.05f), name,
                          (int)at, got, want);
                }
            }
}

// `rows` activation rows times a weight `[out, in]`, transposed, each block
// of `threads` as the launch code sizes the grid (MATVEC_OUT_PER_WARP
// columns per warp), against double sums of the same T inputs: within the
// f32 accumulation's error bound (in * 2^-24 of the absolute products' sum)
// and T's rounding of the result; every output written.
template <typename T>
static void matvec_case(const char *name, int rows, int in, int out, int threads,
                        float rounding) {
    const std::vector<T> w = values<T>((size_t)out * in, 9);
    const std::vector<T> x = values<T>((size_t)rows * in, 10);
    std::vector<T> y((size_t)rows * out, nan_value<T>());
    const int per_block = threads / 32 * MATVEC_OUT_PER_WARP;
    const int blocks = (out + per_block - 1) / per_block;
    for (int index = 0; index < blocks; index++) {
        run_block(threads, [&](HostBlock h) {
            matvec_block(h, index, w.data(), x.data(), y.data(), rows, in, out);
        });
    }
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < out; o++) {
            double want = 0.0, magnitude = 0.0;
            for (int i = 0; i < in; i++) {
                const double product = (double)widen(x[(size_t)r * in + i]) *
                                       (double)widen(w[(size_t)o * in + i]);
                want += product;
                magnitude += std::fabs(product);
            }
            const float got = widen(y[(size_t)r * out + o]);
            const double bound = in * 6e-8 * magnitude + rounding * std::fabs(want);
            check(std::fabs(got - want) <= bound, name, r * out + o, got, (float)want);
        }
}

// Rows of logits through the argmax body, against the first maximum found
// in order (NaN: no choice).
static void argmax_case(const char *name, std::vector<std::vector<float>> rows, int threads) {
    const int vocab = (int)rows[0].size();
    std::vector<float> logits;
    for (const auto &row : rows) {
        logits.insert(logits.end(), row.begin(), row.end());
    }
    std::vector<unsigned> out(rows.size(), 12345u);
    for (int r = 0; r < (int)rows.size(); r++) {
        run_block(threads, [&](HostBlock h) { argmax_row(h, logits.data(), out.data(), vocab, r); });
    }
    for (int r = 0; r < (int)rows.size(); r++) {
        unsigned want = 0;
        float best = -INFINITY;
        for (int i = 0; i < vocab; i++) {
            if (rows[r][i] != rows[r][i]) {
                want = NO_CHOICE;
                break;
            }
            if (rows[r][i] > best) {
                best = rows[r][i];
                want = i;
            }
        }
        check(out[r] == want, name, r, (float)out[r], (float)want);
    }
}

// The soft-cap of every element against tanh in double arithmetic.
template <typename T> static void softcap_case(const char *name, size_t n, float cap) {
    std::vector<T> x = values<T>(n, 7);
    for (auto &v : x) {
        v = narrow_to<T>(widen(v) * 40.0f); // past the cap, where tanh bends
    }
    std::vector<float> out(n, NAN);
    for (size_t i = 0; i < n; i++) {
        softcap_element(x.data(), out.data(), 1.0f / cap, cap, i);
    }
    for (size_t i = 0; i < n; i++) {
        const double want = std::tanh((double)widen(x[i]) / cap) * cap;
        check(std::fabs(out[i] - want) <= 2e-6 * cap, name, (int)i, out[i], (float)want);
    }
}

int main() {
    // A prompt pass (padded batch, tables per sequence), a decode step with
    // gemma-2-2b's heads and a shared table, and odd sizes.
    rotary_case<float>("rotary f32, batched table", 3, 5, 4, 2, 8, true, 9, 2);
    rotary_case<float>("rotary f32, decode step", 2, 1, 8, 4, 256, false, 40, 31);
    rotary_case<__nv_bfloat16>("rotary bf16, batched table", 3, 5, 4, 2, 8, true, 9, 2);
    rotary_case<__nv_bfloat16>("rotary bf16, decode step", 2, 1, 8, 4, 256, true, 40, 39);
    rotary_case<__half>("rotary f16, shared table", 1, 7, 2, 1, 6, false, 7, 0);
    gelu_mul_case<float>("gelu-mul f32", 5, 37, 1e-5f);
    gelu_mul_case<__nv_bfloat16>("gelu-mul bf16", 3, 64, 2e-2f);
    gelu_mul_case<__half>("gelu-mul f16", 2, 9, 2e-3f);
    gather_case<uint16_t>("gather u16", {5, 0, 1, 300, 7});
    gather_case<uint32_t>("gather u32, one segment", {1});
    gather_case<uint32_t>("gather u32, gemma-2-2b residual decode step",
                          std::vector<size_t>(53, 2304));
    gather_case<uint32_t>("gather u32, empty first and last", {0, 3, 2, 0});
    // gemma-2-2b's heads at a decode step (its block of 512 threads), a
    // padded and windowed batch with a few queries each, more of d than
    // threads, and more threads than keys.
    decode_attention_case<float>("decode attention f32, gemma-2-2b step", 1, 8, 4, 1, 37, 40,
                                 256, false, false, 50.0f, 512, 4e-5f);
    decode_attention_case<float>("decode attention f32, masked batch", 2, 4, 2, 3, 11, 16, 8,
                                 true, true, 50.0f, 64, 4e-5f);
    decode_attention_case<__nv_bfloat16>("decode attention bf16, masked batch", 2, 8, 4, 2, 9,
                                         12, 256, true, true, 50.0f, 64, 1.0f / 64);
    decode_attention_case<__half>("decode attention f16, no cap, wide block", 1, 2, 1, 1, 3,
                                  3, 16, false, false, 0.0f, 96, 1.0f / 512);
    // Split over the keys: gemma-2-2b's heads over 600 keys in parts of 64
    // (the last of 24); a windowed batch whose first parts are all masked;
    // uneven parts in bf16; f16 without a cap, more threads than d.
    decode_attention_case<float>("split decode attention f32, gemma-2-2b step", 1, 8, 4, 1, 600,
                                 610, 256, false, false, 50.0f, 256, 4e-5f, 64);
    decode_attention_case<float>("split decode attention f32, masked parts", 2, 4, 2, 3, 40, 48,
                                 8, true, true, 50.0f, 64, 4e-5f, 8);
    decode_attention_case<__nv_bfloat16>("split decode attention bf16, uneven parts", 2, 8, 4,
                                         2, 30, 32, 256, true, true, 50.0f, 64, 1.0f / 64, 7);
    decode_attention_case<__half>("split decode attention f16, no cap", 1, 2, 1, 1, 50, 50, 16,
                                  false, false, 0.0f, 96, 1.0f / 512, 16);
    // Projections at decode steps: gemma-2-2b's o_proj input width at batch
    // 1 and 4 (vectors past a whole round of the warp's unrolled loads), a
    // column count no warp fills, one vector per row, f32 and f16.
    matvec_case<__nv_bfloat16>("matvec bf16, gemma-2-2b width, batch 1", 1, 2048, 37, 128,
                               1.0f / 256);
    matvec_case<__nv_bfloat16>("matvec bf16, batch 4, uneven columns", 4, 2304, 13, 64,
                               1.0f / 256);
    matvec_case<float>("matvec f32, three rows", 3, 1100, 9, 128, 0.0f);
    matvec_case<float>("matvec f32, one vector per row", 2, 4, 5, 32, 0.0f);
    matvec_case<__half>("matvec f16, batch 3", 3, 136, 20, 96, 1.0f / 2048);
    std::vector<float> wide(256000, 0.25f);
    wide[255998] = wide[255999] = 9.0f;
    std::vector<float> one_nan(256000, 0.25f);
    one_nan[200000] = NAN;
    argmax_case("argmax, ties and edges",
                {{0.0f, 3.0f, 3.0f, -1.0f, 3.0f},
                 {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY},
                 {1.0f, 2.0f, INFINITY, INFINITY, 0.0f},
                 {-5.0f, -4.0f, -3.0f, -2.0f, -1.0f},
                 {7.0f, -1.0f, 0.5f, 6.9f, 7.0f - 1e-6f},
                 {NAN, 1.0f, 4.0f, 2.0f, 0.0f},
                 {1.0f, NAN, 4.0f, 2.0f, 4.0f}},
                64);
    argmax_case("argmax, gemma-2's vocabulary", {wide, one_nan}, 1024);
    // Ties in one thread's columns (every 64th).
    std::vector<float> strided(200, -1.0f);
    strided[5] = strided[69] = strided[133] = 2.0f;
    argmax_case("argmax, ties in one thread", {strided}, 64);
    softcap_case<float>("logit soft-cap f32", 1000, 30.0f);
    softcap_case<__nv_bfloat16>("logit soft-cap bf16", 1000, 30.0f);
    softcap_case<__half>("logit soft-cap f16", 100, 30.0f);
    if (failures > 0) {
        std::printf("host emulation: %d mismatches\n", failures);
        return 1;
    }
    std::printf("host emulation: rotary, gelu-mul, gather, decode attention, matvec, soft-cap and argmax kernels match their references\n");
    return 0;
}
