/* y = x @ W for weights kept in bfloat16 (`--quantization bf16`), on CPUs with AVX512_BF16.
 *
 * A float32 checkpoint's batch-1 decode streams 4 bytes per weight; in bfloat16 it streams 2, and
 * AVX512_BF16's `vdpbf16ps` multiplies two bfloat16 pairs into each float32 lane. Each row of x is rounded
 * to bfloat16 (nearest even) once per product. Layout (models/quantization.py): per panel of 16 output
 * columns, per pair of inputs, [16 columns][2 inputs] bfloat16 (64 bytes), inputs padded to a multiple of
 * 32 with zeros. Each output element is one chain of `vdpbf16ps` over the pairs in order, then + bias,
 * + residual, whatever the row count: a row's result does not depend on the other rows. Elsewhere the
 * loader refuses the scheme (bf16_products_supported).
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "linear.h"
#include "threads.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define PANEL_COLUMNS 16
#define BF16_ROWS 8
#define PAD 32

int bf16_products_supported(void) { return 1; }

static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x7FFFFFu)) return (uint16_t)((bits >> 16) | 0x40);   /* NaN */
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* One tile: rows [m, m + R) against one panel; lanes [R][16]. */
static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *xb, int64_t Kp, const uint8_t *panel,
                                                            int64_t m, const int R, float *lanes) {
    __m512 acc[BF16_ROWS];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t pair = 0; pair < Kp / 2; ++pair) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512((const void *)(panel + pair * 64));
        for (int r = 0; r < R; ++r) {
            int32_t two;
            memcpy(&two, xb + (m + r) * Kp + 2 * pair, sizeof two);
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(two), w);
        }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(lanes + r * PANEL_COLUMNS, acc[r]);
}

#define DEFINE_BF16_TILE(R)                                                                                    \
    static void bf16_tile_##R(const uint16_t *xb, int64_t Kp, const uint8_t *panel, int64_t m, float *lanes) { \
        bf16_tile(xb, Kp, panel, m, R, lanes);                                                                 \
    }
DEFINE_BF16_TILE(1)
DEFINE_BF16_TILE(2)
DEFINE_BF16_TILE(3)
DEFINE_BF16_TILE(4)
DEFINE_BF16_TILE(5)
DEFINE_BF16_TILE(6)
DEFINE_BF16_TILE(7)
DEFINE_BF16_TILE(8)
typedef void (*Bf16Tile)(const uint16_t *, int64_t, const uint8_t *, int64_t, float *);
static const Bf16Tile BF16_TILES[] = {NULL, bf16_tile_1, bf16_tile_2, bf16_tile_3, bf16_tile_4,
                                      bf16_tile_5, bf16_tile_6, bf16_tile_7, bf16_tile_8};

static _Thread_local uint16_t *rows_buffer;
static _Thread_local int64_t rows_capacity;

void bf16_product(const LinearWeights *w, const float *x, int64_t M, int64_t K, int64_t ldx, int64_t N,
                  const float *bias, const float *residual, float *y) {
    const int64_t Kp = (K + PAD - 1) / PAD * PAD;
    if (M * Kp > rows_capacity) {
        free(rows_buffer);
        rows_buffer = malloc(sizeof(uint16_t) * (size_t)(M * Kp));
        rows_capacity = rows_buffer ? M * Kp : 0;
        if (rows_buffer == NULL) abort();   /* no memory for two bytes per input: nothing sensible to do */
    }
    uint16_t *xb = rows_buffer;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < Kp; ++k) xb[m * Kp + k] = k < K ? to_bf16(x[m * ldx + k]) : 0;
    /* the panels of every segment, in order (a fused projection is several segments side by side) */
    int64_t first_panel[QUANT_MAX_SEGMENTS + 1] = {0}, first_col[QUANT_MAX_SEGMENTS] = {0};
    for (int64_t s = 0, col = 0; s < w->segments; col += w->segment[s].columns, ++s) {
        first_panel[s + 1] = first_panel[s] + (w->segment[s].columns + PANEL_COLUMNS - 1) / PANEL_COLUMNS;
        first_col[s] = col;
    }
    const int64_t panels = first_panel[w->segments];
#pragma omp parallel for num_threads(kernel_threads()) if (M * K * N >= (1 << 15)) schedule(static)
    for (int64_t unit = 0; unit < panels; ++unit) {
        int64_t s = 0;
        while (unit >= first_panel[s + 1]) ++s;
        const int64_t p = unit - first_panel[s], col = first_col[s] + p * PANEL_COLUMNS;
        const int64_t left = w->segment[s].columns - p * PANEL_COLUMNS, cols = left < PANEL_COLUMNS ? left : PANEL_COLUMNS;
        const uint8_t *panel = w->segment[s].data + p * Kp * 32;
        float lanes[BF16_ROWS * PANEL_COLUMNS];
        for (int64_t m = 0; m < M; m += BF16_ROWS) {
            const int64_t R = M - m < BF16_ROWS ? M - m : BF16_ROWS;
            BF16_TILES[R](xb, Kp, panel, m, lanes);
            for (int64_t r = 0; r < R; ++r) {
                float *out = y + (m + r) * N + col;
                const float *res = residual ? residual + (m + r) * N + col : NULL;
                for (int64_t j = 0; j < cols; ++j)
                    out[j] = lanes[r * PANEL_COLUMNS + j] + (bias ? bias[col + j] : 0.0f) + (res ? res[j] : 0.0f);
            }
        }
    }
}

#else

int bf16_products_supported(void) { return 0; }

void bf16_product(const LinearWeights *w, const float *x, int64_t M, int64_t K, int64_t ldx, int64_t N,
                  const float *bias, const float *residual, float *y) {
    (void)w, (void)x, (void)M, (void)K, (void)ldx, (void)N, (void)bias, (void)residual, (void)y;
    abort();   /* unreachable: the loader refuses bf16 weights where bf16_products_supported() is 0 */
}

#endif
