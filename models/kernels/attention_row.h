/* The arithmetic of one query row's attention, shared by the decode and the prefill kernels.
 *
 * A token's attention output must not depend on how its step was put together: whether its prompt was
 * prefilled whole, in chunks beside other requests, read back from the prefix cache or recomputed after a
 * preemption, and whether the token itself was a decode row, a verified draft or a prefill row. Only then
 * are a rollout's logprobs a function of the tokens alone, which a trainer can reproduce bit for bit
 * (decoding/matched_forward.py). Both kernels therefore fold a row's keys in the same order with the same
 * operations:
 *
 * - Keys go in chunks of KEY_CHUNK on a grid of absolute positions (chunk c holds positions
 *   [16c, 16c + 16)), whatever the cache's block size: a chunk's keys are read through one pointer each.
 *   A row folds the chunks its visible positions touch, and within them only the visible positions.
 * - A score is q.k with q scaled first: eight lane partials, each a chain of fused multiply-adds over
 *   head_dim in steps of 8, then one fixed tree ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)),
 *   computed for eight keys at a time by a transposing reduction.
 * - Online softmax per chunk: the running max rises to the chunk's max (rescaling the sum and the output
 *   only when it rises), the chunk's exponentials are summed by a fixed tree over its 16 slots (invisible
 *   ones 0), then its values are added in position order, one fused multiply-add per value.
 *
 * Same math as SDPA up to float32 summation order and a polynomial exp (vector_math.h).
 */
#ifndef GORGON_ATTENTION_ROW_H
#define GORGON_ATTENTION_ROW_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector_math.h"

#define KEY_CHUNK 16

/* Eight dot products from their partials, lane k of the result from the p that holds key k: each is
 * ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)) of its partial's lanes. Every shuffle but the first
 * level's keeps to 128-bit lanes (one instruction each on AVX2). */
static const int REDUCE_ORDER[8] = {0, 4, 1, 5, 2, 6, 3, 7};   /* p[t] holds key REDUCE_ORDER[t] */

static inline __attribute__((always_inline)) v8f reduce_partials(const v8f p[8]) {
    v8f halves[4], quarters[2];
    for (int j = 0; j < 4; ++j)          /* [a0+a4, a1+a5, a2+a6, a3+a7 | b0+b4, b1+b5, b2+b6, b3+b7] */
        halves[j] = SHUFFLE8(p[2 * j], p[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
                    SHUFFLE8(p[2 * j], p[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int j = 0; j < 2; ++j)          /* [a02, a13, c02, c13 | b02, b13, d02, d13] */
        quarters[j] = SHUFFLE8(halves[2 * j], halves[2 * j + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
                      SHUFFLE8(halves[2 * j], halves[2 * j + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    /* [a, c, e, g | b, d, f, h] */
    return SHUFFLE8(quarters[0], quarters[1], 0, 2, 8, 10, 4, 6, 12, 14) +
           SHUFFLE8(quarters[0], quarters[1], 1, 3, 9, 11, 5, 7, 13, 15);
}

/* scores[t] = q.key_rows[t] for the KEY_CHUNK keys of a chunk (q already scaled): eight keys at a time,
 * eight independent chains of lane partials fed by one query load (the lanes past head_dim are 0). */
static inline __attribute__((always_inline)) void chunk_scores(const float *q, const float *const *key_rows,
                                                               float *scores, const int64_t d) {
    for (int g = 0; g < KEY_CHUNK; g += 8) {
        v8f partials[8];
        for (int t = 0; t < 8; ++t) partials[t] = (v8f){0};
        for (int64_t i = 0; i < d; i += 8) {
            const v8f qi = load_upto8(q + i, d - i);
            for (int t = 0; t < 8; ++t) partials[t] += qi * load_upto8(key_rows[g + REDUCE_ORDER[t]] + i, d - i);
        }
        const v8f sums = reduce_partials(partials);
        memcpy(scores + g, &sums, sizeof sums);
    }
}

/* offsets[t] = the cache offset (in floats) of position chunk + t for t in [lo, hi], the block walked
 * without a division per slot. Positions are the sequence's own: block table[pos / block_size], slot
 * pos % block_size. */
static inline void chunk_offsets(const int64_t *table, int64_t block_size, int64_t token_stride, int64_t chunk,
                                 int64_t lo, int64_t hi, int64_t *offsets) {
    int64_t pos = chunk + lo, block = pos / block_size, slot = pos % block_size;
    for (int64_t t = lo; t <= hi; ++t) {
        offsets[t] = (table[block] * block_size + slot) * token_stride;
        if (++slot == block_size) slot = 0, ++block;
    }
}

/* The rows of a chunk's keys and values for one KV head (head_offset floats into a token), from the
 * offsets of its slots [lo, hi]; the slots before lo and after hi repeat lo's and hi's (scored, then left
 * out). */
static inline void chunk_rows(const float *key_cache, const float *value_cache, const int64_t *offsets,
                              int64_t lo, int64_t hi, int64_t head_offset, const float **key_rows,
                              const float **value_rows) {
    for (int64_t t = 0; t < KEY_CHUNK; ++t) {
        const int64_t offset = offsets[t < lo ? lo : (t > hi ? hi : t)] + head_offset;
        key_rows[t] = key_cache + offset;
        value_rows[t] = value_cache + offset;
    }
}

/* A row's running softmax: the max score, the sum of exponentials and the unnormalised output (acc[d]),
 * the last two relative to the max. A sink starts it as one more score whose exponential is 1. */
typedef struct {
    float max, denom;
} RowSoftmax;

static inline RowSoftmax row_softmax_start(const float *sink) {
    return sink ? (RowSoftmax){*sink, 1.0f} : (RowSoftmax){-INFINITY, 0.0f};
}

/* Fold the visible keys [lo, hi] of a chunk (scores from chunk_scores; values through value_rows) into
 * the row's softmax and output. */
static inline __attribute__((always_inline)) void fold_chunk(RowSoftmax *st, float *restrict acc, float *scores,
                                                             int64_t lo, int64_t hi,
                                                             const float *const *value_rows, float softcap,
                                                             const int64_t d) {
    if (softcap > 0.0f)
        for (int64_t t = lo; t <= hi; ++t) scores[t] = softcap * tanhf(scores[t] / softcap);
    /* The max is exact in any order: as a vector, with the slots outside [lo, hi] at -inf. */
    float visible[KEY_CHUNK];
#pragma omp simd
    for (int64_t t = 0; t < KEY_CHUNK; ++t) visible[t] = (t >= lo && t <= hi) ? scores[t] : -INFINITY;
    float top[8];
#pragma omp simd
    for (int t = 0; t < 8; ++t) top[t] = visible[t] > visible[t + 8] ? visible[t] : visible[t + 8];
    for (int t = 0; t < 4; ++t) top[t] = top[t] > top[t + 4] ? top[t] : top[t + 4];
    float chunk_max = top[0] > top[1] ? top[0] : top[1];
    const float other = top[2] > top[3] ? top[2] : top[3];
    chunk_max = chunk_max > other ? chunk_max : other;
    if (chunk_max > st->max) {
        const float correction = exp_poly(st->max - chunk_max);
        st->denom *= correction;
        for (int64_t i = 0; i < d; ++i) acc[i] *= correction;
        st->max = chunk_max;
    }
    float e[KEY_CHUNK];
    const float max = st->max;
#pragma omp simd
    for (int64_t t = 0; t < KEY_CHUNK; ++t) e[t] = (t >= lo && t <= hi) ? exp_poly(scores[t] - max) : 0.0f;
    /* Slots t and t + 8, then the lane tree of reduce_partials. */
    float pair[8];
    for (int t = 0; t < 8; ++t) pair[t] = e[t] + e[t + 8];
    st->denom += ((pair[0] + pair[4]) + (pair[2] + pair[6])) + ((pair[1] + pair[5]) + (pair[3] + pair[7]));
    /* Each output element: one fused multiply-add per value, in position order. The output is held in
     * registers 32 floats at a time while the chunk's values stream past it. */
    int64_t i0 = 0;
    for (; i0 + 32 <= d; i0 += 32) {      /* four vectors, which AVX2's 16 registers hold beside the rest */
        v8f tile[4];
        for (int j = 0; j < 4; ++j) tile[j] = load8(acc + i0 + 8 * j);
        for (int64_t t = lo; t <= hi; ++t) {
            const float w = e[t];
            for (int j = 0; j < 4; ++j) tile[j] += w * load8(value_rows[t] + i0 + 8 * j);
        }
        memcpy(acc + i0, tile, sizeof tile);
    }
    for (; i0 + 8 <= d; i0 += 8) {
        v8f tile = load8(acc + i0);
        for (int64_t t = lo; t <= hi; ++t) tile += e[t] * load8(value_rows[t] + i0);
        memcpy(acc + i0, &tile, sizeof tile);
    }
    for (; i0 < d; ++i0)                   /* a head_dim that is not a multiple of 8 */
        for (int64_t t = lo; t <= hi; ++t) acc[i0] += e[t] * value_rows[t][i0];
}

/* out[d] = acc / denom. */
static inline void row_output(const RowSoftmax *st, const float *acc, float *out, int64_t d) {
    const float inverse = 1.0f / st->denom;
    for (int64_t i = 0; i < d; ++i) out[i] = acc[i] * inverse;
}

/* q * scale, the query a row's scores are computed from. */
static inline void scaled_query(const float *q, float scale, float *out, int64_t d) {
    for (int64_t i = 0; i < d; ++i) out[i] = q[i] * scale;
}

#endif
