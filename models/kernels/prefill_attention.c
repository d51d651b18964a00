/* Causal attention of prompt chunks over the paged KV cache, for the CPU.
 *
 * A prefill chunk's queries attend to everything cached before the chunk and, causally, to the chunk
 * itself, whose keys and values the layer has just written to the cache. A work item is one segment, one
 * query head and a block of up to 8 consecutive queries; it walks the keys up to its last query a chunk
 * of the position grid at a time (attention_row.h), and each query of the block folds the chunk's keys it
 * sees while they are in cache, two queries at a time sharing the loads of keys and values (each query's
 * arithmetic unchanged: measured 15% faster on an AVX2 build, 17% with AVX-512's registers, SmolLM2's
 * heads at 512 tokens). A query's arithmetic is the decode kernel's for a token at the same
 * position, key for key: however a prompt is split into chunks and steps, and whichever kernel a token
 * meets, its output is the same (attention_row.h says why).
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

#include "attention_row.h"
#include "threads.h"

#define QUERY_BLOCK 8

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

/* Queries [first, first + rows) of segment s (rows <= QUERY_BLOCK), query head `head`. */
static inline __attribute__((always_inline)) void attend_block(const Prefill *p, int64_t s, int64_t head,
                                                               int64_t first, int64_t rows, const int64_t d) {
    const int64_t group = p->num_heads / p->num_kv_heads, kvh = head / group;
    const int64_t token_stride = p->num_kv_heads * d;
    const int64_t *table = p->block_tables + s * p->max_blocks;
    const int64_t first_pos = p->cached[s] + first, last_pos = first_pos + rows - 1;
    /* The first position any query of the block sees. */
    const int64_t lowest = (p->window > 0 && first_pos - p->window + 1 > 0) ? first_pos - p->window + 1 : 0;
    float queries[QUERY_BLOCK][d], acc[QUERY_BLOCK][d];
    RowSoftmax state[QUERY_BLOCK];
    float scores[2][KEY_CHUNK];
    for (int64_t r = 0; r < rows; ++r) {
        const float *q = p->query + (p->q_starts[s] + first + r) * p->query_row_stride + head * d;
        scaled_query(q, p->scale, queries[r], d);
        state[r] = row_softmax_start(p->sinks ? p->sinks + head : NULL);
        for (int64_t i = 0; i < d; ++i) acc[r][i] = 0.0f;
    }
    for (int64_t chunk = lowest - lowest % KEY_CHUNK; chunk <= last_pos; chunk += KEY_CHUNK) {
        const int64_t lo = lowest > chunk ? lowest - chunk : 0;
        const int64_t hi = last_pos - chunk < KEY_CHUNK - 1 ? last_pos - chunk : KEY_CHUNK - 1;
        int64_t offsets[KEY_CHUNK];
        chunk_offsets(table, p->block_size, token_stride, chunk, lo, hi, offsets);
        const float *key_rows[KEY_CHUNK], *value_rows[KEY_CHUNK];
        chunk_rows(p->key_cache, p->value_cache, offsets, lo, hi, kvh * d, key_rows, value_rows);
        /* Two rows at a time share the key loads of their scores (a row's arithmetic is its own). */
        for (int64_t r = 0; r < rows; r += 2) {
            int64_t row_lo[2], row_hi[2];
            const int64_t pair = r + 1 < rows ? 2 : 1;
            for (int64_t j = 0; j < pair; ++j) {
                const int64_t pos = first_pos + r + j;
                const int64_t seen_from = (p->window > 0 && pos - p->window + 1 > 0) ? pos - p->window + 1 : 0;
                row_lo[j] = seen_from > chunk ? seen_from - chunk : 0;
                row_hi[j] = pos - chunk < KEY_CHUNK - 1 ? pos - chunk : KEY_CHUNK - 1;
            }
            const int seen0 = row_lo[0] <= row_hi[0], seen1 = pair == 2 && row_lo[1] <= row_hi[1];
            if (seen0 && seen1)
                chunk_scores_pair(queries[r], queries[r + 1], key_rows, scores[0], scores[1], d);
            else if (seen0 || seen1)
                chunk_scores(queries[r + (seen0 ? 0 : 1)], key_rows, scores[seen0 ? 0 : 1], d);
            if (seen0 && seen1 && d % 32 == 0) {       /* and the loads of the values both see */
                float e[2][KEY_CHUNK];
                for (int j = 0; j < 2; ++j)
                    chunk_weights(&state[r + j], acc[r + j], scores[j], row_lo[j], row_hi[j], p->softcap, e[j], d);
                add_values_pair(acc[r], e[0], row_lo[0], row_hi[0], acc[r + 1], e[1], row_lo[1], row_hi[1],
                                value_rows, d);
            } else {
                for (int64_t j = 0; j < pair; ++j)
                    if (row_lo[j] <= row_hi[j])
                        fold_chunk(&state[r + j], acc[r + j], scores[j], row_lo[j], row_hi[j], value_rows,
                                   p->softcap, d);
            }
        }
    }
    for (int64_t r = 0; r < rows; ++r)
        row_output(&state[r], acc[r], p->out + ((p->q_starts[s] + first + r) * p->num_heads + head) * d, d);
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
