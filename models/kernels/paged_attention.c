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
 *   out          [batch, num_heads, head_dim], contiguous
 *
 * A work item is one sequence and a range of its KV heads: all of them when the batch alone keeps every
 * thread busy (each token's keys are then one contiguous read, which is what a memory-bound kernel
 * wants), otherwise one KV head. Two passes per item (scores, then the weighted sum of values) with an
 * exact max-subtracted softmax: the same math as SDPA up to float32 summation order.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

typedef struct {
    const float *query;
    int64_t query_row_stride;
    const float *key_cache, *value_cache;
    const int64_t *block_tables;
    int64_t max_blocks;
    const int64_t *context_lens;
    float *out;
    int64_t num_heads, num_kv_heads, block_size, window;
    float scale;
} Problem;

/* Sequence b, KV heads [kv_begin, kv_end). Always inlined into a switch on head_dim, so the common
 * sizes get constant trip counts: unrolled dot products and register accumulators. */
static inline __attribute__((always_inline)) void attend(const Problem *p, int64_t b, int64_t kv_begin,
                                                         int64_t kv_end, const int64_t head_dim) {
    const int64_t group = p->num_heads / p->num_kv_heads;
    const int64_t token_stride = p->num_kv_heads * head_dim;
    const int64_t heads = (kv_end - kv_begin) * group;          /* query heads of this item */
    const int64_t context = p->context_lens[b];
    /* Sliding window: the query at position context - 1 sees keys after context - 1 - window. */
    const int64_t first = (p->window > 0 && context > p->window) ? context - p->window : 0;
    const int64_t span = context - first;
    const int64_t *table = p->block_tables + b * p->max_blocks;
    const float *q = p->query + b * p->query_row_stride + kv_begin * group * head_dim;
    float *o = p->out + (b * p->num_heads + kv_begin * group) * head_dim;
    const int64_t kv_offset = kv_begin * head_dim;
    float *scores = malloc(sizeof(float) * heads * (span > 0 ? span : 1));   /* [heads, span] */
    float *acc = calloc(heads * head_dim, sizeof(float));

    float max_score[heads];
    for (int64_t h = 0; h < heads; ++h) max_score[h] = -INFINITY;
    /* Walk the table block by block (no division per key); within a block the tokens of one item are
     * a regular stride apart, which the hardware prefetcher follows. */
    for (int64_t pos = first; pos < context;) {
        const int64_t offset = pos % p->block_size;
        const int64_t left = p->block_size - offset;
        const int64_t run = left < context - pos ? left : context - pos;
        const float *k = p->key_cache + (table[pos / p->block_size] * p->block_size + offset) * token_stride + kv_offset;
        for (int64_t t = 0; t < run; ++t, k += token_stride) {
            const int64_t j = pos - first + t;
            for (int64_t h = 0; h < heads; ++h) {
                const float s = dot(q + h * head_dim, k + (h / group) * head_dim, head_dim) * p->scale;
                scores[h * span + j] = s;
                if (s > max_score[h]) max_score[h] = s;
            }
        }
        pos += run;
    }
    float inv_denom[heads];
    for (int64_t h = 0; h < heads; ++h) {
        float total = 0.0f;
        float *row = scores + h * span;
        for (int64_t j = 0; j < span; ++j) {
            row[j] = expf(row[j] - max_score[h]);
            total += row[j];
        }
        inv_denom[h] = 1.0f / total;
    }
    for (int64_t pos = first; pos < context;) {
        const int64_t offset = pos % p->block_size;
        const int64_t left = p->block_size - offset;
        const int64_t run = left < context - pos ? left : context - pos;
        const float *v = p->value_cache + (table[pos / p->block_size] * p->block_size + offset) * token_stride + kv_offset;
        for (int64_t t = 0; t < run; ++t, v += token_stride) {
            const int64_t j = pos - first + t;
            for (int64_t h = 0; h < heads; ++h) {
                const float prob = scores[h * span + j];
                const float *restrict vh = v + (h / group) * head_dim;
                float *restrict a = acc + h * head_dim;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; ++d) a[d] += prob * vh[d];
            }
        }
        pos += run;
    }
    for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < head_dim; ++d) o[h * head_dim + d] = acc[h * head_dim + d] * inv_denom[h];
    free(acc);
    free(scores);
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
                            const int64_t *context_lens, float *out, int64_t batch, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t window,
                            float scale) {
    const Problem p = {query, query_row_stride, key_cache, value_cache, block_tables, max_blocks,
                       context_lens, out, num_heads, num_kv_heads, block_size, window, scale};
    if (batch >= 4 * omp_get_max_threads()) {
#pragma omp parallel for schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; ++b) attend_any(&p, b, 0, num_kv_heads, head_dim);
    } else {
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) attend_any(&p, b, kvh, kvh + 1, head_dim);
    }
}
