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

/* Lane partials of keys REDUCE_ORDER[first .. first + 3] of group g for two query rows. */
static inline __attribute__((always_inline)) void pair_partials(const float *q0, const float *q1,
                                                                const float *const *key_rows, int g, int first,
                                                                v8f *partials0, v8f *partials1, const int64_t d) {
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    const float *k0 = key_rows[g + REDUCE_ORDER[first]], *k1 = key_rows[g + REDUCE_ORDER[first + 1]];
    const float *k2 = key_rows[g + REDUCE_ORDER[first + 2]], *k3 = key_rows[g + REDUCE_ORDER[first + 3]];
    for (int64_t i = 0; i < d; i += 8) {
        const v8f q0i = load_upto8(q0 + i, d - i), q1i = load_upto8(q1 + i, d - i);
        v8f k = load_upto8(k0 + i, d - i);
        a0 += q0i * k, b0 += q1i * k;
        k = load_upto8(k1 + i, d - i);
        a1 += q0i * k, b1 += q1i * k;
        k = load_upto8(k2 + i, d - i);
        a2 += q0i * k, b2 += q1i * k;
        k = load_upto8(k3 + i, d - i);
        a3 += q0i * k, b3 += q1i * k;
    }
    partials0[first] = a0, partials0[first + 1] = a1, partials0[first + 2] = a2, partials0[first + 3] = a3;
    partials1[first] = b0, partials1[first + 1] = b1, partials1[first + 2] = b2, partials1[first + 3] = b3;
}

/* chunk_scores for two query rows at once (the prefill kernel's pairs of rows): each row's lane partials
 * are the same chains as chunk_scores', in the same order, so its scores are the same bits; only the key
 * loads are shared. */
static inline __attribute__((always_inline)) void chunk_scores_pair(const float *q0, const float *q1,
                                                                    const float *const *key_rows, float *scores0,
                                                                    float *scores1, const int64_t d) {
    for (int g = 0; g < KEY_CHUNK; g += 8) {
        /* Four keys' chains for both rows at a time: eight chains, two queries and a key fit AVX2's
         * sixteen registers (all sixteen chains at once spill there, and measured no faster with AVX-512's). */
        v8f partials0[8], partials1[8];
        pair_partials(q0, q1, key_rows, g, 0, partials0, partials1, d);
        pair_partials(q0, q1, key_rows, g, 4, partials0, partials1, d);
        const v8f sums0 = reduce_partials(partials0), sums1 = reduce_partials(partials1);
        memcpy(scores0 + g, &sums0, sizeof sums0);
        memcpy(scores1 + g, &sums1, sizeof sums1);
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

/* The exponentials e[t] of a chunk's visible scores [lo, hi] (0 elsewhere), relative to the row's running
 * max, which rises to the chunk's (rescaling the sum and the output acc[d] only when it rises); the sum of
 * exponentials takes the chunk's by a fixed tree. The values are added next (add_values). */
static inline __attribute__((always_inline)) void chunk_weights(RowSoftmax *st, float *restrict acc, float *scores,
                                                                int64_t lo, int64_t hi, float softcap, float *e,
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
    const float max = st->max;
#pragma omp simd
    for (int64_t t = 0; t < KEY_CHUNK; ++t) e[t] = (t >= lo && t <= hi) ? exp_poly(scores[t] - max) : 0.0f;
    /* Slots t and t + 8, then the lane tree of reduce_partials. */
    float pair[8];
    for (int t = 0; t < 8; ++t) pair[t] = e[t] + e[t + 8];
    st->denom += ((pair[0] + pair[4]) + (pair[2] + pair[6])) + ((pair[1] + pair[5]) + (pair[3] + pair[7]));
}

/* fold_chunk's values for two rows over the same chunk, head_dim a multiple of 32 (the caller folds others
 * row by row): each row's values added in its own position order, 32 output floats at a time as
 * fold_chunk does, the loads of the positions both rows see shared. */
static inline __attribute__((always_inline)) void add_values_pair(float *restrict acc0, const float *e0, int64_t lo0,
                                                                  int64_t hi0, float *restrict acc1, const float *e1,
                                                                  int64_t lo1, int64_t hi1,
                                                                  const float *const *value_rows, const int64_t d) {
    /* The positions both see, [lo, hi]; the others come before or after them in each row's order. */
    int64_t lo = lo0 > lo1 ? lo0 : lo1, hi = hi0 < hi1 ? hi0 : hi1;
    if (lo > hi) lo = hi0 > hi1 ? hi0 + 1 : hi1 + 1, hi = lo - 1;     /* none: each row all "before" */
    for (int64_t i0 = 0; i0 < d; i0 += 32) {
        v8f tile0[4], tile1[4];
        for (int j = 0; j < 4; ++j) tile0[j] = load8(acc0 + i0 + 8 * j), tile1[j] = load8(acc1 + i0 + 8 * j);
        for (int64_t t = lo0; t < lo && t <= hi0; ++t)    /* before the shared positions: one row sees them */
            for (int j = 0; j < 4; ++j) tile0[j] += e0[t] * load8(value_rows[t] + i0 + 8 * j);
        for (int64_t t = lo1; t < lo && t <= hi1; ++t)
            for (int j = 0; j < 4; ++j) tile1[j] += e1[t] * load8(value_rows[t] + i0 + 8 * j);
        for (int64_t t = lo; t <= hi; ++t) {
            const float w0 = e0[t], w1 = e1[t];
            for (int j = 0; j < 4; ++j) {
                const v8f v = load8(value_rows[t] + i0 + 8 * j);
                tile0[j] += w0 * v;
                tile1[j] += w1 * v;
            }
        }
        for (int64_t t = hi + 1 > lo0 ? hi + 1 : lo0; t <= hi0; ++t)    /* after them */
            for (int j = 0; j < 4; ++j) tile0[j] += e0[t] * load8(value_rows[t] + i0 + 8 * j);
        for (int64_t t = hi + 1 > lo1 ? hi + 1 : lo1; t <= hi1; ++t)
            for (int j = 0; j < 4; ++j) tile1[j] += e1[t] * load8(value_rows[t] + i0 + 8 * j);
        memcpy(acc0 + i0, tile0, sizeof tile0);
        memcpy(acc1 + i0, tile1, sizeof tile1);
    }
}

/* Fold the visible keys [lo, hi] of a chunk (scores from chunk_scores; values through value_rows) into
 * the row's softmax and output. */
static inline __attribute__((always_inline)) void fold_chunk(RowSoftmax *st, float *restrict acc, float *scores,
                                                             int64_t lo, int64_t hi,
                                                             const float *const *value_rows, float softcap,
                                                             const int64_t d) {
    float e[KEY_CHUNK];
    chunk_weights(st, acc, scores, lo, hi, softcap, e, d);
    int64_t i0 = 0;
    for (; i0 + 32 <= d; i0 += 32) {
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
    for (; i0 < d; ++i0)
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
