/* Draw one token per row from softmax(logits / temperature), for the CPU.
 *
 * The common sampling request (temperature only, the chosen token's logprob at most) needs three
 * passes over each row: the max, the exponentials and their sum, and a walk to the token whose
 * cumulative mass first exceeds u * sum. As torch ops the same work materialises log_softmax, exp and
 * cumsum over the whole [rows, vocab] matrix. Same rule as the torch path (inverse CDF with the row's
 * own uniform, right-closed, so a token of zero probability is never drawn); the sums differ from
 * torch's only in float32 summation order.
 *
 *   logits       [rows, vocab] float32, after penalties and bans (-inf = banned)
 *   temperature  [rows], > 0; greedy rows take the argmax and report logprobs at temperature 1
 *   uniforms     [rows] in [0, 1)
 *   want_raw     [rows]: also report the logprob at temperature 1 (logprobs_mode = raw)
 *   tokens, logprobs, raw_logprobs  [rows] out
 *
 * sample_rows_masked does the same for rows a grammar constrains, reading the grammar's packed
 * allowed-token bits (32 tokens per int32 word) as it goes: a refused token counts as -inf, without a
 * masked copy of the logits being written first. A row left with nothing finite is reported dead
 * (token -1) for the caller to resolve.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "threads.h"
#include "vector_math.h"

#define WALK_CHUNK 128

static _Thread_local float *scratch = NULL;
static _Thread_local int64_t scratch_len = 0;

static float *row_buffer(int64_t n) {
    if (n > scratch_len) {
        free(scratch);
        scratch = malloc(sizeof(float) * n);
        scratch_len = scratch ? n : 0;
    }
    return scratch;
}

#define SUM_TILE 256   /* terms per piece of a fixed-order sum (a multiple of 32), summed while in L1 */

/* e[i] = exp((x[i] - max) * inverse_temperature), 0 where allowed[i] is 0 (allowed NULL: everywhere
 * allowed), written to e, or only summed when e is NULL; returns their sum in the fixed order of
 * vector_math.h, each tile of SUM_TILE added right after its exponentials. */
static float exponentials(const float *restrict x, int64_t n, float max, float inverse_temperature,
                          const float *restrict allowed, float *restrict e) {
    FixedSum sum = {{{0}, {0}, {0}, {0}}};
    float tile[SUM_TILE];
    for (int64_t start = 0; start < n; start += SUM_TILE) {
        const int64_t count = n - start < SUM_TILE ? n - start : SUM_TILE;
        float *out = e ? e + start : tile;
        const float *row = x + start;
        if (allowed == NULL) {
#pragma omp simd
            for (int64_t i = 0; i < count; ++i) out[i] = exp_poly((row[i] - max) * inverse_temperature);
        } else {
#pragma omp simd
            for (int64_t i = 0; i < count; ++i)   /* a refused token's logit may be anything: select, then exp */
                out[i] = exp_poly(allowed[start + i] != 0.0f ? (row[i] - max) * inverse_temperature : -INFINITY);
        }
        fixed_sum_add(&sum, out, count);
    }
    return fixed_sum_total(&sum);
}

/* log(sum(exp(x - max))) over a row. One instance (not inlined): every raw logprob the engine reports
 * comes from this summation order, x[token] - max - log_sum_exp, whichever path computed it. */
static __attribute__((noinline)) float log_sum_exp(const float *restrict x, int64_t n, float max) {
    return logf(exponentials(x, n, max, 1.0f, NULL, NULL));
}

/* A token's logprob under softmax(x / temperature): (x - max) / temperature - log(sum), with one rounding
 * after the multiply-add whether or not the compiler would have fused it, so that the draws below and
 * log_softmax_rows give the same bits. At temperature 1 it is the raw formula's x - max - lse. */
static inline float scaled_logprob(float x, float max, float inverse_temperature, float log_sum) {
    return fmaf(x - max, inverse_temperature, -log_sum);
}

/* The first token whose cumulative mass exceeds target (the inverse CDF, right-closed, so a token of
 * zero mass is never chosen): whole chunks are skipped by their (vectorised) sums, then the chunk that
 * crosses the target is walked. */
static int64_t walk_to(const float *restrict e, int64_t vocab, float target) {
    float mass = 0.0f;
    for (int64_t start = 0; start < vocab; start += WALK_CHUNK) {
        const int64_t end = start + WALK_CHUNK < vocab ? start + WALK_CHUNK : vocab;
        const float chunk = canonical_sum(e + start, end - start);
        if (mass + chunk <= target) {
            mass += chunk;
            continue;
        }
        for (int64_t i = start; i < end; ++i) {
            mass += e[i];
            if (mass > target) return i;
        }
    }
    int64_t last = vocab - 1;   /* target rounded above the walked total: the last token with any mass */
    while (last > 0 && e[last] == 0.0f) --last;
    return last;
}

static float row_max(const float *restrict x, int64_t n) {
    float max = -INFINITY;
#pragma omp simd reduction(max : max)
    for (int64_t i = 0; i < n; ++i) max = x[i] > max ? x[i] : max;
    return max;
}

/* The first index of the maximum, as torch.argmax picks: the greedy rows here and the decoder's greedy chains. */
static int64_t first_maximum(const float *restrict x, int64_t vocab, float max) {
    int64_t argmax = 0;
    while (argmax < vocab - 1 && x[argmax] != max) ++argmax;
    return argmax;
}

int64_t first_argmax(const float *x, int64_t vocab) { return first_maximum(x, vocab, row_max(x, vocab)); }

static void sample_row(const float *restrict x, int64_t vocab, float temperature, float uniform, uint8_t greedy,
                       uint8_t want_raw, int64_t *token, float *logprob, float *raw_logprob) {
    const float max = row_max(x, vocab);
    if (greedy) {
        *token = first_maximum(x, vocab, max);
        *logprob = *raw_logprob = -log_sum_exp(x, vocab, max);
        return;
    }
    float *e = row_buffer(vocab);
    const float inverse_temperature = 1.0f / temperature;
    const float sum = exponentials(x, vocab, max, inverse_temperature, NULL, e);
    const int64_t chosen = walk_to(e, vocab, uniform * sum);
    *token = chosen;
    *logprob = scaled_logprob(x[chosen], max, inverse_temperature, logf(sum));
    *raw_logprob = want_raw ? x[chosen] - max - log_sum_exp(x, vocab, max) : 0.0f;
}

/* One row's draw, as sample_rows makes it: for the decoder's chains (decoder.c), which draw each step's
 * tokens without a return to Python. */
void sample_one_row(const float *x, int64_t vocab, float temperature, float uniform, uint8_t greedy, uint8_t want_raw,
                    int64_t *token, float *logprob, float *raw_logprob) {
    sample_row(x, vocab, temperature, uniform, greedy, want_raw, token, logprob, raw_logprob);
}

/* The allowed tokens of a row as 0 / 1 floats, from its bits: the vector loops below multiply by them. */
static void expand_bits(const uint32_t *restrict word, int64_t vocab, float *restrict allowed) {
    for (int64_t w = 0; w * 32 < vocab; ++w) {
        const uint32_t m = word[w];
        const int64_t base = w * 32, n = vocab - base < 32 ? vocab - base : 32;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) allowed[base + j] = (float)((m >> j) & 1u);
    }
}

static void sample_row_masked(const float *restrict x, const uint32_t *restrict word, int64_t vocab,
                              float temperature, float uniform, uint8_t greedy, int64_t *token, float *logprob,
                              uint8_t *dead) {
    float *allowed = row_buffer(2 * vocab), *e = allowed + vocab;
    expand_bits(word, vocab, allowed);
    float max = -INFINITY;
#pragma omp simd reduction(max : max)
    for (int64_t i = 0; i < vocab; ++i) {
        const float v = allowed[i] != 0.0f ? x[i] : -INFINITY;
        max = v > max ? v : max;
    }
    *dead = max == -INFINITY;
    if (*dead) {
        *token = -1;
        *logprob = -INFINITY;
        return;
    }
    const float inverse_temperature = greedy ? 1.0f : 1.0f / temperature;
    const float sum = exponentials(x, vocab, max, inverse_temperature, allowed, e);
    int64_t chosen = -1;
    if (greedy) {
        chosen = 0;   /* the first allowed maximum, as torch.argmax over the masked row picks */
        while (chosen < vocab - 1 && !(allowed[chosen] != 0.0f && x[chosen] == max)) ++chosen;
    } else {
        chosen = walk_to(e, vocab, uniform * sum);
    }
    *token = chosen;
    *logprob = scaled_logprob(x[chosen], max, inverse_temperature, logf(sum));
}

void sample_rows_masked(const float *logits, int64_t rows, int64_t vocab, const float *temperature,
                        const float *uniforms, const uint8_t *greedy, const int32_t *bits, int64_t words,
                        int64_t *tokens, float *logprobs, uint8_t *dead) {
#pragma omp parallel for num_threads(kernel_threads()) if (rows >= 4) schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        sample_row_masked(logits + r * vocab, (const uint32_t *)(bits + r * words), vocab, temperature[r],
                          uniforms[r], greedy[r], tokens + r, logprobs + r, dead + r);
}

void sample_rows(const float *logits, int64_t rows, int64_t vocab, const float *temperature, const float *uniforms,
                 const uint8_t *greedy, const uint8_t *want_raw, int64_t *tokens, float *logprobs,
                 float *raw_logprobs) {
#pragma omp parallel for num_threads(kernel_threads()) if (rows >= 4) schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        sample_row(logits + r * vocab, vocab, temperature[r], uniforms[r], greedy[r], want_raw[r], tokens + r,
                   logprobs + r, raw_logprobs + r);
}

/* Constrained rows, in place: logits[rows[r]][i] = -inf wherever bit i of the row's allowed-token
 * bitmask (32 tokens per int32 word, as the grammar writes it) is clear. dead[r] is set when nothing
 * finite is left in the row (the grammar only allows what min_tokens bans). */
void mask_rows_by_bits(float *logits, int64_t vocab, const int64_t *rows, int64_t num_rows, const int32_t *bits,
                       int64_t words, uint8_t *dead) {
    /* A grammar allows few tokens: most words are 0 (32 tokens to -inf at once), few are mixed. */
#pragma omp parallel for num_threads(kernel_threads()) if (num_rows * vocab >= (1 << 16)) schedule(static)
    for (int64_t r = 0; r < num_rows; ++r) {
        float *row = logits + rows[r] * vocab;
        const uint32_t *word = (const uint32_t *)(bits + r * words);
        int alive = 0;
        for (int64_t w = 0; w * 32 < vocab; ++w) {
            const uint32_t m = word[w];
            const int64_t base = w * 32, n = vocab - base < 32 ? vocab - base : 32;
            if (m == 0) {
                for (int64_t j = 0; j < n; ++j) row[base + j] = -INFINITY;
                continue;
            }
            for (int64_t j = 0; j < n; ++j) {
                if ((m >> j) & 1u)
                    alive |= row[base + j] != -INFINITY;
                else
                    row[base + j] = -INFINITY;
            }
        }
        dead[r] = !alive;
    }
}

/* out [rows, vocab]: every token's logprob under softmax(logits / temperature), per row at 1 /
 * inverse_temperature[r], as the draws above report the chosen token's (max, fixed-order sum of
 * exponentials, scaled_logprob), so a row scored here (speculative verification, top-N alternatives)
 * reports the bits a natively drawn row would; at temperature 1, every raw logprob the engine reports
 * (x - max - log_sum_exp). -inf logits (bans, refused tokens) stay -inf. */
void log_softmax_rows(const float *logits, int64_t rows, int64_t vocab, const float *inverse_temperature, float *out) {
#pragma omp parallel for num_threads(kernel_threads()) if (rows >= 4) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *x = logits + r * vocab;
        float *y = out + r * vocab;
        const float max = row_max(x, vocab), inverse = inverse_temperature[r];
        const float log_sum = logf(exponentials(x, vocab, max, inverse, NULL, NULL));
#pragma omp simd
        for (int64_t i = 0; i < vocab; ++i) y[i] = scaled_logprob(x[i], max, inverse, log_sum);
    }
}
