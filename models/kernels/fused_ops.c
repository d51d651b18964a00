/* The small per-token operations of a decoder layer, fused for the CPU.
 *
 * In a batched decode step each of these touches a few kilobytes, so as separate torch ops their cost
 * is dispatch, not arithmetic: RMSNorm alone is six ops, rotary embedding four, the cache write two.
 * Here each is one call that reads its input once. The arithmetic is the same as the torch path's, op
 * for op, so results agree to float32 rounding (summation order in the norm, the exponential in SiLU).
 *
 * Rows are split over threads only when there are enough of them to pay for waking the team.
 *
 * The file is compiled without -ftrapping-math (nothing here reads floating-point exceptions): with it,
 * GCC leaves a loop with a float comparison scalar on AVX2 (AVX-512 masks it anyway), exp_poly's clamps
 * in SiLU-and-multiply among them, which took 3x longer there on a 512-token prompt.
 */
#pragma GCC optimize("no-trapping-math")
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "threads.h"
#include "vector_math.h"

#define PARALLEL_MIN_ELEMENTS (1 << 12)

/* One vector: out[i] = (in[i] * rsqrt(mean(in^2) + eps)) * weight[i], HF's Llama RMSNorm in float32; `in`
 * may be `out` (every element is read before it is written). */
static inline void rms_norm_vector(const float *in, const float *weight, float eps, float *out, int64_t dim) {
    const float squares = canonical_sum_of_squares(in, dim);   /* the same bits on every class */
    const float inv = 1.0f / sqrtf(squares / (float)dim + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) out[i] = (in[i] * inv) * weight[i];
}

/* out[r] = rms_norm(x[r]) for each of `rows` rows, x's rows x_row_stride floats apart. */
void rms_norm(const float *x, int64_t x_row_stride, const float *weight, float eps, float *out,
              int64_t rows, int64_t dim) {
#pragma omp parallel for num_threads(kernel_threads()) if (rows * dim >= PARALLEL_MIN_ELEMENTS) schedule(static)
    for (int64_t r = 0; r < rows; ++r) rms_norm_vector(x + r * x_row_stride, weight, eps, out + r * dim, dim);
}

/* In place, per head: each of the `heads` vectors of `dim` floats in row r (at x + r * row_stride) gets
 * rms_norm with the same weight [dim] (Qwen3's q_norm and k_norm). */
void rms_norm_heads(float *x, int64_t row_stride, const float *weight, float eps, int64_t rows, int64_t heads,
                    int64_t dim) {
#pragma omp parallel for num_threads(kernel_threads()) if (rows * heads * dim >= PARALLEL_MIN_ELEMENTS) schedule(static)
    for (int64_t rh = 0; rh < rows * heads; ++rh) {
        float *v = x + (rh / heads) * row_stride + (rh % heads) * dim;
        rms_norm_vector(v, weight, eps, v, dim);
    }
}

/* Rotate one head in place: x * cos + rotate_half(x) * sin, with sin's first half negated by the
 * caller (so rotate_half becomes a plain swap of halves). */
static inline void rotate(float *restrict x, const float *restrict cos, const float *restrict signed_sin,
                          int64_t head_dim) {
    const int64_t half = head_dim / 2;
    float lo[half];
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
        lo[i] = x[i];
        x[i] = x[i] * cos[i] + x[i + half] * signed_sin[i];
    }
#pragma omp simd
    for (int64_t i = half; i < head_dim; ++i) x[i] = x[i] * cos[i] + lo[i - half] * signed_sin[i];
}

/* The fused q/k/v projection of each new token, in place: rotate the query and key heads, then write
 * the key and value heads to their cache slots.
 *   qkv          [rows, num_heads + 2 * num_kv_heads, head_dim], rows `row_stride` floats apart
 *   cos, sin     [rows, head_dim]
 *   slots        [rows] flat slot ids (block * block_size + offset) into
 *   key_cache, value_cache  [num_slots, num_kv_heads, head_dim] */
void rotary_write_kv(float *qkv, int64_t row_stride, const float *cos, const float *signed_sin,
                     const int64_t *slots, float *key_cache, float *value_cache, int64_t rows,
                     int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
    const int64_t kv_width = num_kv_heads * head_dim;
#pragma omp parallel for num_threads(kernel_threads()) if (rows * row_stride >= PARALLEL_MIN_ELEMENTS) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        float *row = qkv + r * row_stride;
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h)
            rotate(row + h * head_dim, cos + r * head_dim, signed_sin + r * head_dim, head_dim);
        const float *key = row + num_heads * head_dim;
        memcpy(key_cache + slots[r] * kv_width, key, sizeof(float) * kv_width);
        memcpy(value_cache + slots[r] * kv_width, key + kv_width, sizeof(float) * kv_width);
    }
}

/* out[r] = silu(gate[r]) * up[r], where each input row is [gate | up] of width 2 * dim. */
void silu_mul(const float *gate_up, float *out, int64_t rows, int64_t dim) {
#pragma omp parallel for num_threads(kernel_threads()) if (rows * dim >= PARALLEL_MIN_ELEMENTS) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict gate = gate_up + r * 2 * dim;
        const float *restrict up = gate + dim;
        float *restrict o = out + r * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] = gate[i] / (1.0f + exp_poly(-gate[i])) * up[i];
    }
}

/* 1 when every one of the n floats is finite (exponent bits not all set), else 0: one pass over the bits,
 * no temporary, for validating pushed weights at memory speed. */
int all_finite(const float *x, int64_t n) {
    const uint32_t *bits = (const uint32_t *)x;
    int64_t bad = 0;
#pragma omp parallel for num_threads(kernel_threads()) if (n >= (1 << 20)) reduction(+ : bad) schedule(static)
    for (int64_t i = 0; i < n; ++i) bad += (bits[i] & 0x7f800000u) == 0x7f800000u;
    return bad == 0;
}

/* dst[k * dst_stride + n] = src[n * src_stride + k] for n < rows, k < cols: a checkpoint's [out, in] matrix
 * written into a native [in, out] one (a weight update). Blocks of 8 x 8 are transposed in registers
 * (three stages of shuffles that keep to 128-bit lanes but the last), so loads and stores move 8 floats
 * at a time; the blocks are spread over the threads, the ragged edges copied one by one. */
static inline void transpose8(const float *src, int64_t src_stride, float *dst, int64_t dst_stride) {
    v8f r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) memcpy(&r[i], src + i * src_stride, sizeof r[i]);
    for (int i = 0; i < 8; i += 2) {      /* pairs of rows interleaved within 128-bit lanes */
        t[i] = SHUFFLE8(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = SHUFFLE8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)        /* four rows of two columns per lane */
        for (int j = 0; j < 2; ++j) {
            u[i + 2 * j] = SHUFFLE8(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[i + 2 * j + 1] = SHUFFLE8(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int j = 0; j < 4; ++j) {         /* column j from the low lanes, column j + 4 from the high ones */
        const v8f low = SHUFFLE8(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        const v8f high = SHUFFLE8(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
        memcpy(dst + j * dst_stride, &low, sizeof low);
        memcpy(dst + (j + 4) * dst_stride, &high, sizeof high);
    }
}

void copy_transposed(const float *src, int64_t rows, int64_t cols, int64_t src_stride, float *dst,
                     int64_t dst_stride) {
    const int64_t full_rows = rows - rows % 8, full_cols = cols - cols % 8;
#pragma omp parallel for num_threads(kernel_threads()) if (rows * cols >= (1 << 16)) schedule(static)
    for (int64_t n = 0; n < full_rows; n += 8)
        for (int64_t k = 0; k < full_cols; k += 8)
            transpose8(src + n * src_stride + k, src_stride, dst + k * dst_stride + n, dst_stride);
    for (int64_t n = 0; n < rows; ++n)          /* the columns past the last block of 8 */
        for (int64_t k = full_cols; k < cols; ++k) dst[k * dst_stride + n] = src[n * src_stride + k];
    for (int64_t n = full_rows; n < rows; ++n)  /* the rows past the last block of 8 */
        for (int64_t k = 0; k < full_cols; ++k) dst[k * dst_stride + n] = src[n * src_stride + k];
}
