/* y = x @ W (+ bias) (+ residual) for the CPU, over weights packed into column panels.
 *
 * A decode step multiplies a few rows by every weight matrix of the model, so each matrix streams from
 * DRAM once per step while the arithmetic on it is short. Two things matter: the weights must arrive
 * as fast as memory allows, and the multiply must not wait for them. The weights are packed once into
 * panels of 16 columns, each panel K x 16 contiguous floats, so a tile reads its weights as one
 * sequential stream; while a thread multiplies its current pair of panels against the first rows, it
 * prefetches the next pair into L2 (not L1, which the current panels and x need: measured 5-10% faster
 * from 4 to 32 rows), so the next tile starts on weights already in cache. Tiles hold up to 8 rows
 * x 32 columns in 16 vector accumulators, fed by one broadcast of x and two panel loads per k; the rows
 * past the last multiple of 8 go in one shorter tile, and a product of at most 12 rows is a single tile.
 *
 *   w_t     [K, N] row-major (in x out), packed by pack_panels into [ceil(N / 16)][K][16], zero padded
 *   x       [M, K], rows `ldx` floats apart
 *   bias    [N] or NULL, residual [M, N] contiguous or NULL
 *   y       [M, N] contiguous
 *
 * Vectors are GCC/Clang vector extensions: the same source compiles to AVX-512, AVX2 or NEON.
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define PANEL 16

typedef float v16f __attribute__((vector_size(PANEL * sizeof(float))));

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, v16f v) { memcpy(p, &v, sizeof v); }

void pack_panels(const float *w_t, int64_t K, int64_t N, float *packed) {
    const int64_t panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for if (K * N >= (1 << 16)) schedule(static)
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t k = 0; k < K; ++k) {
            float *out = packed + (p * K + k) * PANEL;
            for (int64_t j = 0; j < PANEL; ++j) {
                const int64_t n = p * PANEL + j;
                out[j] = n < N ? w_t[k * N + n] : 0.0f;
            }
        }
}

typedef struct {
    const float *x;
    int64_t ldx, K, N;
    const float *bias, *residual;
    float *y;
} Product;

/* Rows [m, m + ROWS) x the panels at w0 and w1 (w1 == w0 when there is only one), columns starting at
 * col. `prefetch`, when set, is the next pair of panels: requested a little per k so that it arrives
 * while this tile computes. */
#define DEFINE_TILE(ROWS)                                                                                      \
    static void tile_##ROWS(const Product *p, int64_t m, const float *restrict w0, const float *restrict w1,   \
                            int64_t col, int64_t cols, const char *prefetch, int64_t prefetch_bytes) {         \
        v16f acc0[ROWS], acc1[ROWS];                                                                           \
        for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = (v16f){0};                                          \
        const float *x = p->x + m * p->ldx;                                                                    \
        int64_t fetched = 0;                                                                                   \
        for (int64_t k = 0; k < p->K; ++k) {                                                                   \
            const v16f b0 = load16(w0 + k * PANEL), b1 = load16(w1 + k * PANEL);                               \
            if (fetched < prefetch_bytes) {                                                                    \
                __builtin_prefetch(prefetch + fetched, 0, 2);                                                  \
                __builtin_prefetch(prefetch + fetched + 64, 0, 2);                                             \
                fetched += 128;                                                                                \
            }                                                                                                  \
            for (int r = 0; r < ROWS; ++r) {                                                                   \
                const float a = x[r * p->ldx + k];                                                             \
                acc0[r] += a * b0;                                                                             \
                acc1[r] += a * b1;                                                                             \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < ROWS; ++r) finish_row(p, m + r, col, cols, acc0[r], acc1[r]);                      \
    }

/* Add bias and residual to one row of a tile and store its valid columns. */
static inline void finish_row(const Product *p, int64_t row, int64_t col, int64_t cols, v16f a0, v16f a1) {
    float *y = p->y + row * p->N + col;
    const float *res = p->residual ? p->residual + row * p->N + col : NULL;
    const float *bias = p->bias ? p->bias + col : NULL;
    if (cols == 2 * PANEL) {
        if (bias) {
            a0 += load16(bias);
            a1 += load16(bias + PANEL);
        }
        if (res) {
            a0 += load16(res);
            a1 += load16(res + PANEL);
        }
        store16(y, a0);
        store16(y + PANEL, a1);
        return;
    }
    float lanes[2 * PANEL];
    store16(lanes, a0);
    store16(lanes + PANEL, a1);
    for (int64_t j = 0; j < cols; ++j) y[j] = lanes[j] + (bias ? bias[j] : 0.0f) + (res ? res[j] : 0.0f);
}

DEFINE_TILE(12)
DEFINE_TILE(11)
DEFINE_TILE(10)
DEFINE_TILE(9)
DEFINE_TILE(8)
DEFINE_TILE(7)
DEFINE_TILE(6)
DEFINE_TILE(5)
DEFINE_TILE(4)
DEFINE_TILE(3)
DEFINE_TILE(2)
DEFINE_TILE(1)

typedef void (*Tile)(const Product *, int64_t, const float *restrict, const float *restrict, int64_t, int64_t,
                     const char *, int64_t);
/* Up to 12 rows (24 accumulators, within AVX-512's 32 registers) go in one tile of their own height, so
 * each panel is read once: the nodes of a Medusa tree (11 rows) compute while the next panels stream in,
 * instead of a second pass over panels already evicted from L1 (measured 8-10% faster at 9-12 rows).
 * Larger batches run 8-row tiles, and the rows past the last multiple of 8 one tile of their own height. */
static const Tile BY_HEIGHT[13] = {NULL,   tile_1, tile_2, tile_3,  tile_4,  tile_5, tile_6,
                                   tile_7, tile_8, tile_9, tile_10, tile_11, tile_12};
#define MAX_SINGLE_TILE 12

void gemm_panels(const float *x, int64_t M, int64_t K, int64_t ldx, const float *packed, int64_t N,
                 const float *bias, const float *residual, float *y) {
    if (M <= 0) return;
    const Product p = {x, ldx, K, N, bias, residual, y};
    const int64_t panels = (N + PANEL - 1) / PANEL;
    const int64_t pairs = (panels + 1) / 2;
    const int64_t pair_floats = 2 * K * PANEL;
#pragma omp parallel for if (M * K * N >= (1 << 15)) schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
        const float *w0 = packed + pair * pair_floats;
        const float *w1 = 2 * pair + 1 < panels ? w0 + K * PANEL : w0;
        const int64_t col = 2 * pair * PANEL;
        const int64_t cols = N - col < 2 * PANEL ? N - col : 2 * PANEL;
        const char *next = (const char *)(w0 + pair_floats);
        const int64_t next_bytes = pair + 1 < pairs ? (int64_t)((N - col - cols + PANEL - 1) / PANEL >= 2 ? 2 : 1) * K * PANEL * (int64_t)sizeof(float) : 0;
        if (M <= MAX_SINGLE_TILE) {
            BY_HEIGHT[M](&p, 0, w0, w1, col, cols, next, next_bytes);
            continue;
        }
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) tile_8(&p, m, w0, w1, col, cols, m == 0 ? next : NULL, m == 0 ? next_bytes : 0);
        if (m < M) BY_HEIGHT[M - m](&p, m, w0, w1, col, cols, m == 0 ? next : NULL, m == 0 ? next_bytes : 0);
    }
}
