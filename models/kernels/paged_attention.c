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
 * The work item is one (sequence, KV head): the query heads sharing that KV head (GQA) score each key
 * while it is in L1. Two passes per item (scores, then the weighted sum of values) with an exact
 * max-subtracted softmax, the same math as SDPA up to float32 summation order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

/* One (sequence, KV head) item. Always inlined into a switch on head_dim, so the common sizes get
 * constant trip counts: fully unrolled dot products and accumulators held in registers. */
static inline __attribute__((always_inline)) void attend(
    int64_t b, int64_t kvh, const float *query, int64_t query_row_stride, const float *key_cache,
    const float *value_cache, const int64_t *block_tables, int64_t max_blocks, const int64_t *context_lens,
    float *out, int64_t num_heads, int64_t num_kv_heads, const int64_t head_dim, int64_t block_size,
    int64_t window, float scale) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t context = context_lens[b];
    /* Sliding window: the query at position context - 1 sees keys after context - 1 - window. */
    const int64_t first = (window > 0 && context > window) ? context - window : 0;
    const int64_t span = context - first;
    const int64_t *table = block_tables + b * max_blocks;
    const float *q = query + b * query_row_stride + kvh * group * head_dim;
    float *o = out + (b * num_heads + kvh * group) * head_dim;
    float *scores = malloc(sizeof(float) * group * (span > 0 ? span : 1));

    float max_score[group];
    for (int64_t h = 0; h < group; ++h) max_score[h] = -INFINITY;
    /* Walk the table block by block: no division per key. */
    for (int64_t pos = first; pos < context;) {
        const int64_t offset = pos % block_size;
        const int64_t run = (block_size - offset < context - pos) ? block_size - offset : context - pos;
        const float *k = key_cache + (table[pos / block_size] * block_size + offset) * token_stride
                         + kvh * head_dim;
        for (int64_t t = 0; t < run; ++t, k += token_stride) {
            const int64_t j = pos - first + t;
            for (int64_t h = 0; h < group; ++h) {
                const float s = dot(q + h * head_dim, k, head_dim) * scale;
                scores[h * span + j] = s;
                if (s > max_score[h]) max_score[h] = s;
            }
        }
        pos += run;
    }
    float denom[group];
    for (int64_t h = 0; h < group; ++h) {
        float total = 0.0f;
        float *row = scores + h * span;
        for (int64_t j = 0; j < span; ++j) {
            row[j] = expf(row[j] - max_score[h]);
            total += row[j];
        }
        denom[h] = total;
    }
    /* Head by head, so the accumulator of a head stays in registers; a GQA group re-reads its values
     * from L1/L2. */
    for (int64_t h = 0; h < group; ++h) {
        float acc[head_dim];
        for (int64_t d = 0; d < head_dim; ++d) acc[d] = 0.0f;
        const float *restrict probs = scores + h * span;
        for (int64_t pos = first; pos < context;) {
            const int64_t offset = pos % block_size;
            const int64_t run = (block_size - offset < context - pos) ? block_size - offset : context - pos;
            const float *restrict v = value_cache + (table[pos / block_size] * block_size + offset) * token_stride
                                      + kvh * head_dim;
            const float *restrict p = probs + (pos - first);
            for (int64_t t = 0; t < run; ++t, v += token_stride) {
#pragma omp simd
                for (int64_t d = 0; d < head_dim; ++d) acc[d] += p[t] * v[d];
            }
            pos += run;
        }
        const float inv = 1.0f / denom[h];
        for (int64_t d = 0; d < head_dim; ++d) o[h * head_dim + d] = acc[d] * inv;
    }
    free(scores);
}

void paged_decode_attention(const float *query, int64_t query_row_stride, const float *key_cache,
                            const float *value_cache, const int64_t *block_tables, int64_t max_blocks,
                            const int64_t *context_lens, float *out, int64_t batch, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t window,
                            float scale) {
#define ATTEND(D) attend(b, kvh, query, query_row_stride, key_cache, value_cache, block_tables, max_blocks, \
                         context_lens, out, num_heads, num_kv_heads, D, block_size, window, scale)
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
            switch (head_dim) {
                case 64: ATTEND(64); break;
                case 128: ATTEND(128); break;
                case 32: ATTEND(32); break;
                default: ATTEND(head_dim);
            }
        }
    }
#undef ATTEND
}
