/* Decode attention straight from the paged KV cache, for the CPU.
 *
 * One query token per sequence attends to its own blocks in place: no gathered copy of the keys and
 * values, no padding to the longest sequence, and blocks shared by several sequences (the prompt of a
 * group, the prefix of beams) are read from the CPU cache after the first sequence pulls them in.
 *
 * Layouts (float32, row-major):
 *   query        [batch, num_heads, head_dim], rows `query_row_stride` floats apart
 *   key/value    [num_blocks, block_size, num_kv_heads, head_dim]
 *   block_tables [batch, max_blocks] int64, context_lens [batch] int64
 *   extra_positions [batch, max_extra] int64 and extra_counts [batch] (both NULL when no row has any):
 *                positions a row sees beyond its context, for the nodes of a speculative tree
 *   out          [batch, num_heads, head_dim], contiguous
 *   softcap      > 0: each score becomes softcap * tanh(score / softcap) (Gemma 2); 0: none
 *   sinks        [num_heads] or NULL: a logit per head that joins every softmax's denominator and no
 *                output (gpt-oss's attention sinks)
 *
 * A work item is one sequence and a range of its KV heads: all of them when the batch alone keeps every
 * thread busy (each token's keys are then one contiguous read, which is what a memory-bound kernel
 * wants), otherwise one KV head. Each item walks its blocks once with an online softmax: the scores of a
 * run of tokens (one block at most), then the running max, sum and output rescaled only when the run
 * raises the max, then the run's values while its keys are still in cache. The same math as SDPA up to
 * float32 summation order and a polynomial exp (vector_math.h).
 */
/* Without -ftrapping-math: the softmax's selects and exp_poly vectorise on AVX2 too (see fused_ops.c). */
#pragma GCC optimize("no-trapping-math")
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "threads.h"
#include "vector_math.h"

typedef struct {
    const float *query;
    int64_t query_row_stride;
    const float *key_cache, *value_cache;
    const int64_t *block_tables;
    int64_t max_blocks;
    const int64_t *context_lens;
    const int64_t *extra_positions;   /* [batch, max_extra] or NULL */
    int64_t max_extra;
    const int64_t *extra_counts;      /* [batch] or NULL */
    float *out;
    int64_t num_heads, num_kv_heads, block_size, window;
    float scale, softcap;
    const float *sinks;
} Problem;

/* A run of tokens stays inside one block and holds at most this many, which bounds the scratch. */
#define MAX_RUN 64

/* The running softmax of one work item: per query head the max score, the sum of exponentials and the
 * unnormalised output, all relative to that max. */
typedef struct {
    float *acc, *max_score, *denom, *scores;
    int64_t heads, group, token_stride;
} Softmax;

/* Fold `run` consecutive tokens (keys at k, values at v, token_stride apart) into the running softmax. */
static inline __attribute__((always_inline)) void attend_run(const Problem *p, const Softmax *st, const float *q,
                                                             const float *k, const float *v, int64_t run,
                                                             const int64_t head_dim) {
    const int64_t heads = st->heads, group = st->group, token_stride = st->token_stride;
    float *s = st->scores, *acc = st->acc;
    /* Scores of this run, per head. */
    for (int64_t t = 0; t < run; ++t) {
        const float *kt = k + t * token_stride;
        for (int64_t h = 0; h < heads; ++h) {
            const float *qh = q + h * head_dim, *kh = kt + (h / group) * head_dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * kh[d];
            s[h * MAX_RUN + t] = dot * p->scale;
        }
    }
    if (p->softcap > 0.0f)
        for (int64_t h = 0; h < heads; ++h)
            for (int64_t t = 0; t < run; ++t) s[h * MAX_RUN + t] = p->softcap * tanhf(s[h * MAX_RUN + t] / p->softcap);
    /* Online softmax: rescale what was accumulated when this run raises a head's max. */
    for (int64_t h = 0; h < heads; ++h) {
        float m = st->max_score[h];
        for (int64_t t = 0; t < run; ++t) m = s[h * MAX_RUN + t] > m ? s[h * MAX_RUN + t] : m;
        if (m > st->max_score[h]) {
            const float correction = exp_poly(st->max_score[h] - m);
            st->denom[h] *= correction;
            for (int64_t d = 0; d < head_dim; ++d) acc[h * head_dim + d] *= correction;
            st->max_score[h] = m;
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < run; ++t) {
            const float e = exp_poly(s[h * MAX_RUN + t] - m);
            s[h * MAX_RUN + t] = e;
            sum += e;
        }
        st->denom[h] += sum;
    }
    for (int64_t t = 0; t < run; ++t) {
        const float *vt = v + t * token_stride;
        for (int64_t h = 0; h < heads; ++h) {
            const float prob = s[h * MAX_RUN + t];
            const float *restrict vh = vt + (h / group) * head_dim;
            float *restrict a = acc + h * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) a[d] += prob * vh[d];
        }
    }
}

/* Sequence b, KV heads [kv_begin, kv_end): its first context_lens[b] positions (the last `window` of
 * them with a sliding window), then its extra positions, one at a time (the ancestors of a node of a
 * speculative tree, which sit after the context at scattered positions). Always inlined into a switch on
 * head_dim, so the common sizes get constant trip counts. */
static inline __attribute__((always_inline)) void attend(const Problem *p, int64_t b, int64_t kv_begin,
                                                         int64_t kv_end, const int64_t head_dim) {
    const int64_t group = p->num_heads / p->num_kv_heads;
    const int64_t token_stride = p->num_kv_heads * head_dim;
    const int64_t heads = (kv_end - kv_begin) * group;
    const int64_t context = p->context_lens[b];
    const int64_t first = (p->window > 0 && context > p->window) ? context - p->window : 0;
    const int64_t *table = p->block_tables + b * p->max_blocks;
    const float *q = p->query + b * p->query_row_stride + kv_begin * group * head_dim;
    float *o = p->out + (b * p->num_heads + kv_begin * group) * head_dim;
    const float *keys = p->key_cache + kv_begin * head_dim, *values = p->value_cache + kv_begin * head_dim;
    float acc[heads * head_dim];
    float max_score[heads], denom[heads];
    float scores[heads * MAX_RUN];
    for (int64_t i = 0; i < heads * head_dim; ++i) acc[i] = 0.0f;
    /* A sink starts each head's softmax as one more score, whose exponential is 1 at its own max. */
    for (int64_t h = 0; h < heads; ++h) {
        max_score[h] = p->sinks ? p->sinks[kv_begin * group + h] : -INFINITY;
        denom[h] = p->sinks ? 1.0f : 0.0f;
    }
    const Softmax st = {acc, max_score, denom, scores, heads, group, token_stride};
    for (int64_t pos = first; pos < context;) {
        const int64_t offset = pos % p->block_size;
        const int64_t left = p->block_size - offset;
        int64_t run = left < context - pos ? left : context - pos;
        if (run > MAX_RUN) run = MAX_RUN;
        const int64_t slot = table[pos / p->block_size] * p->block_size + offset;
        attend_run(p, &st, q, keys + slot * token_stride, values + slot * token_stride, run, head_dim);
        pos += run;
    }
    const int64_t extras = p->extra_counts ? p->extra_counts[b] : 0;
    for (int64_t e = 0; e < extras; ++e) {
        const int64_t pos = p->extra_positions[b * p->max_extra + e];
        const int64_t slot = table[pos / p->block_size] * p->block_size + pos % p->block_size;
        attend_run(p, &st, q, keys + slot * token_stride, values + slot * token_stride, 1, head_dim);
    }
    for (int64_t h = 0; h < heads; ++h) {
        const float inv = 1.0f / denom[h];
        for (int64_t d = 0; d < head_dim; ++d) o[h * head_dim + d] = acc[h * head_dim + d] * inv;
    }
}

static void attend_any(const Problem *p, int64_t b, int64_t kv_begin, int64_t kv_end, int64_t head_dim) {
    switch (head_dim) {
        case 64: attend(p, b, kv_begin, kv_end, 64); break;
        case 128: attend(p, b, kv_begin, kv_end, 128); break;
        case 32: attend(p, b, kv_begin, kv_end, 32); break;
        default: attend(p, b, kv_begin, kv_end, head_dim);
    }
}

void paged_decode_attention(const float *query, int64_t query_row_stride, const float *key_cache,
                            const float *value_cache, const int64_t *block_tables, int64_t max_blocks,
                            const int64_t *context_lens, const int64_t *extra_positions, int64_t max_extra,
                            const int64_t *extra_counts, float *out, int64_t batch, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t window,
                            float scale, float softcap, const float *sinks) {
    const Problem p = {query, query_row_stride, key_cache, value_cache, block_tables, max_blocks,
                       context_lens, extra_positions, max_extra, extra_counts, out, num_heads, num_kv_heads,
                       block_size, window, scale, softcap, sinks};
    if (batch >= 4 * omp_get_max_threads()) {
#pragma omp parallel for num_threads(kernel_threads()) schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; ++b) attend_any(&p, b, 0, num_kv_heads, head_dim);
    } else {
#pragma omp parallel for num_threads(kernel_threads()) collapse(2) schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) attend_any(&p, b, kvh, kvh + 1, head_dim);
    }
}
