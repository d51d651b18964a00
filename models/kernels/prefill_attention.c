/* Causal attention of prompt chunks over the paged KV cache, for the CPU.
 *
 * A prefill chunk's queries attend to everything cached before the chunk and, causally, to the chunk
 * itself, whose keys and values the layer has just written to the cache. A work item is one segment,
 * one KV head and a block of up to 8 consecutive queries; it walks the keys up to its last query in
 * chunks of up to 16 tokens (never across a cache block) with an online softmax: the chunk's keys are
 * transposed once into a [head_dim][16] tile that every query head of the KV group reuses, a query
 * block's 16 scores per row come from one vector accumulator per row, and each row's output stays in
 * registers while the chunk's values stream past it. Keys past a query's own position (and before its
 * sliding window) are masked. Same math as SDPA up to float32 summation order and a polynomial exp.
 *
 *   query        [tokens, num_heads, head_dim], rows `query_row_stride` floats apart
 *   key/value    [num_blocks, block_size, num_kv_heads, head_dim]
 *   per segment s: rows [q_starts[s], q_starts[s] + counts[s]) of query and out, whose first token is
 *                at position cached[s]; block_tables [segments, max_blocks] int64
 *   out          [tokens, num_heads, head_dim], contiguous (only the segments' rows are written)
 *   softcap, sinks as in paged_attention.c
 */
/* Without -ftrapping-math: the softmax's selects and exp_poly vectorise on AVX2 too (see fused_ops.c). */
#pragma GCC optimize("no-trapping-math")
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "threads.h"
#include "vector_math.h"

#define QUERY_BLOCK 8
#define KEY_CHUNK 16
/* Score accumulators in flight at once: 16 fit AVX-512's 32 registers; AVX2's 16 hold 8 beside the query
 * and the key (16 spilled to the stack on every multiply-add). */
#if defined(__AVX512F__) || defined(__aarch64__)
#define SCORE_GROUP 16
#else
#define SCORE_GROUP 8
#endif

/* One lane per query row of a block. */
typedef float v8f __attribute__((vector_size(QUERY_BLOCK * sizeof(float))));

static inline v8f max8(v8f a, v8f b) {
    v8f out;
    for (int r = 0; r < QUERY_BLOCK; ++r) out[r] = a[r] > b[r] ? a[r] : b[r];
    return out;
}

typedef struct {
    const float *query;
    int64_t query_row_stride;
    const float *key_cache, *value_cache;
    const int64_t *q_starts, *counts, *cached, *block_tables;
    int64_t max_blocks;
    float *out;
    int64_t num_heads, num_kv_heads, head_dim, block_size, window;
    float scale, softcap;
    const float *sinks;
} Prefill;

/* Queries [first, first + rows) of segment s (rows <= QUERY_BLOCK), query head `head` (KV head kvh).
 * The block's queries are transposed once, [head_dim][8], so a key's scores for all 8 rows are one
 * vector: scores[t] = sum_i key_t[i] * query_t[i]. The running max, sum and rescaling are vectors over
 * the rows too; each row's output accumulates from the chunk's values in place. */
static inline __attribute__((always_inline)) void attend_block(const Prefill *p, int64_t s, int64_t head,
                                                               int64_t first, int64_t rows, const int64_t d) {
    const int64_t group = p->num_heads / p->num_kv_heads, kvh = head / group;
    const int64_t token_stride = p->num_kv_heads * d;
    const int64_t *table = p->block_tables + s * p->max_blocks;
    const int64_t first_pos = p->cached[s] + first, last_pos = first_pos + rows - 1;
    const int64_t lo = (p->window > 0 && first_pos - p->window + 1 > 0) ? first_pos - p->window + 1 : 0;
    float queries[d * QUERY_BLOCK];          /* [d][8], scaled; rows past `rows` are zero */
    for (int64_t r = 0; r < QUERY_BLOCK; ++r) {
        const float *q = p->query + (p->q_starts[s] + first + r) * p->query_row_stride + head * d;
        for (int64_t i = 0; i < d; ++i) queries[i * QUERY_BLOCK + r] = r < rows ? q[i] * p->scale : 0.0f;
    }
    float acc[QUERY_BLOCK][d];
    memset(acc, 0, sizeof acc);
    /* A sink starts the softmax as one more score, whose exponential is 1 at its own max. */
    v8f max_score = (v8f){0} + (p->sinks ? p->sinks[head] : -INFINITY), denom = (v8f){0} + (p->sinks ? 1.0f : 0.0f);
    v8f query_pos;
    for (int64_t r = 0; r < QUERY_BLOCK; ++r) query_pos[r] = (float)(first_pos + r);
    for (int64_t pos = lo; pos <= last_pos;) {
        const int64_t offset = pos % p->block_size;
        int64_t chunk = p->block_size - offset;
        if (chunk > KEY_CHUNK) chunk = KEY_CHUNK;
        if (chunk > last_pos + 1 - pos) chunk = last_pos + 1 - pos;
        const int64_t slot = table[pos / p->block_size] * p->block_size + offset;
        const float *keys = p->key_cache + slot * token_stride + kvh * d;
        const float *values = p->value_cache + slot * token_stride + kvh * d;
        /* Every key of the chunk visible to every row of the block: no mask. */
        const int all_visible = pos + chunk - 1 <= first_pos && (p->window <= 0 || last_pos - pos < p->window);
        /* All the chunk's keys at once: 16 independent accumulators hide the multiply-add latency.
         * Lanes past the chunk reread its last key and are masked below. */
        const float *key_rows[KEY_CHUNK];
        for (int64_t t = 0; t < KEY_CHUNK; ++t) key_rows[t] = keys + (t < chunk ? t : chunk - 1) * token_stride;
        v8f scores[KEY_CHUNK];
        for (int64_t t = 0; t < KEY_CHUNK; ++t) scores[t] = (v8f){0};
        for (int64_t t0 = 0; t0 < KEY_CHUNK; t0 += SCORE_GROUP)
            for (int64_t i = 0; i < d; ++i) {
                v8f q;
                memcpy(&q, queries + i * QUERY_BLOCK, sizeof q);
                for (int64_t t = t0; t < t0 + SCORE_GROUP; ++t) scores[t] += key_rows[t][i] * q;
            }
        if (p->softcap > 0.0f)
            for (int64_t t = 0; t < chunk; ++t)
                for (int64_t r = 0; r < QUERY_BLOCK; ++r) scores[t][r] = p->softcap * tanhf(scores[t][r] / p->softcap);
        v8f chunk_max = (v8f){0} - INFINITY;
        for (int64_t t = 0; t < chunk; ++t) {
            if (!all_visible) {
                const float key_pos = (float)(pos + t);
                for (int64_t r = 0; r < QUERY_BLOCK; ++r) {
                    const int visible = key_pos <= query_pos[r] && (p->window <= 0 || query_pos[r] - key_pos < p->window);
                    scores[t][r] = visible ? scores[t][r] : -INFINITY;
                }
            }
            chunk_max = max8(chunk_max, scores[t]);
        }
        /* Online softmax, all rows at once; a row that sees none of the chunk keeps its state. */
        const v8f new_max = max8(max_score, chunk_max);
        v8f correction;
#pragma omp simd
        for (int64_t r = 0; r < QUERY_BLOCK; ++r)
            correction[r] = new_max[r] == -INFINITY ? 1.0f : exp_poly(max_score[r] - new_max[r]);
        max_score = new_max;
        denom *= correction;
        for (int64_t r = 0; r < rows; ++r)
            if (correction[r] != 1.0f)
                for (int64_t i = 0; i < d; ++i) acc[r][i] *= correction[r];
        for (int64_t t = 0; t < chunk; ++t) {
            v8f prob;
#pragma omp simd
            for (int64_t r = 0; r < QUERY_BLOCK; ++r)
                prob[r] = max_score[r] == -INFINITY ? 0.0f : exp_poly(scores[t][r] - max_score[r]);
            denom += prob;
            scores[t] = prob;
        }
        /* Two rows at a time: twice the independent multiply-adds per value read. */
        for (int64_t r = 0; r < rows; r += 2) {
            const int64_t r2 = r + 1 < rows ? r + 1 : r;
            float first_acc[d], second_acc[d];
            memcpy(first_acc, acc[r], sizeof first_acc);
            memcpy(second_acc, acc[r2], sizeof second_acc);
            for (int64_t t = 0; t < chunk; ++t) {
                const float w1 = scores[t][r], w2 = scores[t][r2];
                const float *restrict v = values + t * token_stride;
#pragma omp simd
                for (int64_t i = 0; i < d; ++i) {
                    first_acc[i] += w1 * v[i];
                    second_acc[i] += w2 * v[i];
                }
            }
            memcpy(acc[r], first_acc, sizeof first_acc);
            if (r2 != r) memcpy(acc[r2], second_acc, sizeof second_acc);
        }
        pos += chunk;
    }
    for (int64_t r = 0; r < rows; ++r) {
        float *o = p->out + ((p->q_starts[s] + first + r) * p->num_heads + head) * d;
        const float inv = 1.0f / denom[r];
        for (int64_t i = 0; i < d; ++i) o[i] = acc[r][i] * inv;
    }
}

void paged_prefill_attention(const float *query, int64_t query_row_stride, const float *key_cache,
                             const float *value_cache, const int64_t *q_starts, const int64_t *counts,
                             const int64_t *cached, const int64_t *block_tables, int64_t max_blocks,
                             int64_t segments, float *out, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t block_size, int64_t window, float scale, float softcap, const float *sinks) {
    const Prefill p = {query, query_row_stride, key_cache, value_cache, q_starts, counts, cached, block_tables,
                       max_blocks, out, num_heads, num_kv_heads, head_dim, block_size, window, scale, softcap,
                       sinks};
    /* Work items (segment, query head, query block), numbered segment by segment. */
    int64_t items = 0;
    for (int64_t s = 0; s < segments; ++s) items += num_heads * ((counts[s] + QUERY_BLOCK - 1) / QUERY_BLOCK);
#pragma omp parallel for num_threads(kernel_threads()) schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
        int64_t s = 0, rest = item;
        for (;; ++s) {
            const int64_t here = num_heads * ((counts[s] + QUERY_BLOCK - 1) / QUERY_BLOCK);
            if (rest < here) break;
            rest -= here;
        }
        const int64_t blocks = (counts[s] + QUERY_BLOCK - 1) / QUERY_BLOCK;
        /* Latest query blocks first within a segment: they have the most keys, so dynamic scheduling
         * hands the long items out early. */
        const int64_t block = blocks - 1 - rest / num_heads, head = rest % num_heads;
        const int64_t first = block * QUERY_BLOCK;
        const int64_t rows = counts[s] - first < QUERY_BLOCK ? counts[s] - first : QUERY_BLOCK;
        switch (head_dim) {   /* constant trip counts for the common sizes */
            case 64: attend_block(&p, s, head, first, rows, 64); break;
            case 128: attend_block(&p, s, head, first, rows, 128); break;
            default: attend_block(&p, s, head, first, rows, head_dim);
        }
    }
}
