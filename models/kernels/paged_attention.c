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
 * A work item is one sequence and a range of its query heads: all of them when the batch alone keeps every
 * thread busy, otherwise one KV head's group, or, where the KV heads cannot be shared out evenly (batch 1 of
 * SmolLM2's 3 KV heads on 2 threads), one thread's share of the row's query heads (cold cache, 30 layers:
 * 20 -> 16 us a layer at 128 positions, 104 -> 81 at 512). Each item walks its row's keys once per KV head
 * it touches, a chunk of the position grid
 * at a time (attention_row.h): every query head of the KV group scores the chunk's keys, folds them into
 * its online softmax and adds their values while they are still in cache, two heads at a time sharing the
 * loads (batch 1, SmolLM2's 3 heads per KV head: 3-8% less time). A row's arithmetic is the
 * prefill kernel's for a token at the same position, key for key (attention_row.h says why).
 */
/* Without -ftrapping-math: the softmax's selects and exp_poly vectorise on AVX2 too (see fused_ops.c). */
#pragma GCC optimize("no-trapping-math")
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "attention_row.h"
#include "threads.h"

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

/* Sequence b, query heads [h_begin, h_end). Its keys, in position order, are its first context_lens[b]
 * positions, then its extra positions (a speculative tree node's ancestors and itself, scattered after
 * the context): the row sees them as one run of logical positions, the last `window` of them with a
 * sliding window, and chunks them on the same grid as a prefill row at its logical position. Each KV head
 * the range touches is read once for the range's heads of its group. Every head's arithmetic is its own
 * whichever heads share an item or a pair, so the split changes no bit. Always inlined into a switch on
 * head_dim, so the common sizes get constant trip counts. */
static inline __attribute__((always_inline)) void attend(const Problem *p, int64_t b, int64_t h_begin,
                                                         int64_t h_end, const int64_t head_dim) {
    const int64_t d = head_dim;
    const int64_t group = p->num_heads / p->num_kv_heads;
    const int64_t token_stride = p->num_kv_heads * d;
    const int64_t heads = h_end - h_begin;
    const int64_t kv_begin = h_begin / group, kv_end = (h_end - 1) / group + 1;
    const int64_t context = p->context_lens[b];
    const int64_t extras = p->extra_counts ? p->extra_counts[b] : 0;
    const int64_t *extra = p->extra_positions ? p->extra_positions + b * p->max_extra : NULL;
    const int64_t end = context + extras;     /* logical positions [first, end) */
    const int64_t first = (p->window > 0 && end > p->window) ? end - p->window : 0;
    const int64_t *table = p->block_tables + b * p->max_blocks;
    const float *q = p->query + b * p->query_row_stride + h_begin * d;
    float *o = p->out + (b * p->num_heads + h_begin) * d;
    float acc[heads * d], queries[heads * d];
    RowSoftmax state[heads];
    float scores[2][KEY_CHUNK];
    for (int64_t i = 0; i < heads * d; ++i) acc[i] = 0.0f;
    for (int64_t h = 0; h < heads; ++h) {
        state[h] = row_softmax_start(p->sinks ? p->sinks + h_begin + h : NULL);
        scaled_query(q + h * d, p->scale, queries + h * d, d);
    }
    for (int64_t chunk = first - first % KEY_CHUNK; chunk < end; chunk += KEY_CHUNK) {
        const int64_t lo = first > chunk ? first - chunk : 0;
        const int64_t hi = (end - chunk < KEY_CHUNK ? end - chunk : KEY_CHUNK) - 1;
        /* The context's part of the chunk, then the extra positions, which sit anywhere. */
        int64_t offsets[KEY_CHUNK];
        const int64_t in_context = context - 1 - chunk < hi ? context - 1 - chunk : hi;
        chunk_offsets(table, p->block_size, token_stride, chunk, lo, in_context, offsets);
        for (int64_t t = in_context + 1 > lo ? in_context + 1 : lo; t <= hi; ++t) {
            const int64_t pos = extra[chunk + t - context];
            offsets[t] = (table[pos / p->block_size] * p->block_size + pos % p->block_size) * token_stride;
        }
        for (int64_t kvh = kv_begin; kvh < kv_end; ++kvh) {
            const float *key_rows[KEY_CHUNK], *value_rows[KEY_CHUNK];
            chunk_rows(p->key_cache, p->value_cache, offsets, lo, hi, kvh * d, key_rows, value_rows);
            /* This KV head's query heads in the range, two at a time sharing the key and value loads (each
             * head's arithmetic is its own, as for the prefill kernel's pairs of rows). */
            const int64_t group_begin = kvh * group > h_begin ? kvh * group : h_begin;
            const int64_t group_end = ((kvh + 1) * group < h_end ? (kvh + 1) * group : h_end) - h_begin;
            int64_t h = group_begin - h_begin;
            for (; h + 1 < group_end; h += 2) {
                float *acc0 = acc + h * d, *acc1 = acc + (h + 1) * d;
                chunk_scores_pair(queries + h * d, queries + (h + 1) * d, key_rows, scores[0], scores[1], d);
                if (d % 32 == 0) {
                    float e[2][KEY_CHUNK];
                    chunk_weights(&state[h], acc0, scores[0], lo, hi, p->softcap, e[0], d);
                    chunk_weights(&state[h + 1], acc1, scores[1], lo, hi, p->softcap, e[1], d);
                    add_values_pair(acc0, e[0], lo, hi, acc1, e[1], lo, hi, value_rows, d);
                } else {
                    fold_chunk(&state[h], acc0, scores[0], lo, hi, value_rows, p->softcap, d);
                    fold_chunk(&state[h + 1], acc1, scores[1], lo, hi, value_rows, p->softcap, d);
                }
            }
            if (h < group_end) {
                chunk_scores(queries + h * d, key_rows, scores[0], d);
                fold_chunk(&state[h], acc + h * d, scores[0], lo, hi, value_rows, p->softcap, d);
            }
        }
    }
    for (int64_t h = 0; h < heads; ++h) row_output(&state[h], acc + h * d, o + h * d, d);
}

static void attend_any(const Problem *p, int64_t b, int64_t h_begin, int64_t h_end, int64_t head_dim) {
    switch (head_dim) {
        case 64: attend(p, b, h_begin, h_end, 64); break;
        case 128: attend(p, b, h_begin, h_end, 128); break;
        case 32: attend(p, b, h_begin, h_end, 32); break;
        default: attend(p, b, h_begin, h_end, head_dim);
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
    const int threads = kernel_threads();
    if (batch >= 4 * threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; ++b) attend_any(&p, b, 0, num_heads, head_dim);
    } else if (batch * num_kv_heads >= 4 * threads || (batch * num_kv_heads) % threads == 0) {
#pragma omp parallel for num_threads(threads) collapse(2) schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh)
                attend_any(&p, b, kvh * (num_heads / num_kv_heads), (kvh + 1) * (num_heads / num_kv_heads), head_dim);
    } else {
        /* Too few KV heads to share out evenly (batch 1 of SmolLM2's 3 on 2 threads left one thread idle
         * for a third of the time): each row's query heads in `threads` near-equal ranges, one per thread. */
        const int64_t parts = threads < num_heads ? threads : num_heads;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t item = 0; item < batch * parts; ++item) {
            const int64_t b = item / parts, part = item % parts;
            attend_any(&p, b, num_heads * part / parts, num_heads * (part + 1) / parts, head_dim);
        }
    }
}
