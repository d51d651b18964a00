/* y = x @ W (+ bias) (+ residual) for the CPU, over weights packed into column panels.
 *
 * A decode step multiplies a few rows by every weight matrix of the model, so each matrix streams from
 * DRAM once per step while the arithmetic on it is short: the weights must arrive as fast as memory
 * allows and the multiply must not wait for them. A prompt chunk multiplies hundreds of rows by the same
 * matrices, and there the arithmetic rate is what counts. One kernel serves both:
 *
 * - The weights are packed once into panels of 16 columns, each panel K x 16 contiguous floats, so a
 *   tile reads its weights as one sequential stream. While a thread multiplies its current panels, it
 *   prefetches the next panels into L2 (not L1, which the current panels and x need: measured 5-10%
 *   faster from 4 to 32 rows), spread evenly over every tile of the current panels, so memory keeps
 *   streaming while they compute and the next tile starts on weights in cache. (Prefetching from the
 *   first tile only left memory idle during the others: the products of a 0.5B model's decode step
 *   at 12-32 rows took 16-33% longer on AVX2.)
 * - A tile keeps ROWS x TILE_PANELS panels of accumulators in vector registers, fed by one broadcast of
 *   x and one load per panel vector per k. Its size is set by the register file of the target, not by
 *   the machine that compiled it: AVX-512 has 32 registers of 16 floats (12 rows x 2 panels = 24
 *   accumulators), AVX2 16 registers of 8 floats (6 rows x 1 panel = 12 accumulators, the classic 6x16
 *   kernel), NEON 32 of 4 (6 x 1 = 24). Generic vectors wider than the target's registers are lowered
 *   through memory by GCC (measured 100x slower on AVX2), so the vector type is the target's own width.
 * - A product of at most MAX_TILE_ROWS rows is a single tile per panel group. Larger products run
 *   BLOCK_ROWS-row tiles over blocks of rows whose x fits in L2, so x is read from L2 once per panel
 *   group rather than from memory.
 *
 * Every output element is the same chain of fused multiply-adds over k = 0..K-1 from zero, then + bias,
 * then + residual, whatever the tile, the row count or the target: a row's result does not depend on the
 * other rows of the product (batch invariance) nor on the CPU class.
 *
 *   w_t     [K, N] row-major (in x out), packed by pack_panels into [ceil(N / 16)][K][16], zero padded
 *   x       [M, K], rows `ldx` floats apart
 *   bias    [N] or NULL, residual [M, N] contiguous or NULL (it may be y itself)
 *   y       [M, N] contiguous
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "threads.h"

#define PANEL 16

#if defined(__AVX512F__)
#define VEC 16
#define TILE_PANELS 2
#define MAX_TILE_ROWS 12
#define BLOCK_ROWS 8
#elif defined(__AVX__)
#define VEC 8
#define TILE_PANELS 1
#define MAX_TILE_ROWS 6
#define BLOCK_ROWS 6
#elif defined(__aarch64__)
#define VEC 4
#define TILE_PANELS 1
#define MAX_TILE_ROWS 6
#define BLOCK_ROWS 6
#else /* SSE: 16 registers of 4 floats */
#define VEC 4
#define TILE_PANELS 1
#define MAX_TILE_ROWS 3
#define BLOCK_ROWS 3
#endif

#define PANEL_VECS (PANEL / VEC)
#define TILE_VECS (TILE_PANELS * PANEL_VECS)
#define TILE_COLS (TILE_PANELS * PANEL)

typedef float vec __attribute__((vector_size(VEC * sizeof(float))));

static inline vec load_vec(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store_vec(float *p, vec v) { memcpy(p, &v, sizeof v); }

void pack_panels(const float *w_t, int64_t K, int64_t N, float *packed) {
    const int64_t panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(kernel_threads()) if (K * N >= (1 << 16)) schedule(static)
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

/* Add bias and residual to one row of a tile and store its valid columns. */
static inline void finish_row(const Product *p, int64_t row, int64_t col, int64_t cols, const vec *acc) {
    float *y = p->y + row * p->N + col;
    const float *res = p->residual ? p->residual + row * p->N + col : NULL;
    const float *bias = p->bias ? p->bias + col : NULL;
    if (cols == TILE_COLS) {
        for (int v = 0; v < TILE_VECS; ++v) {
            vec out = acc[v];
            if (bias) out += load_vec(bias + v * VEC);
            if (res) out += load_vec(res + v * VEC);
            store_vec(y + v * VEC, out);
        }
        return;
    }
    float lanes[TILE_COLS];
    for (int v = 0; v < TILE_VECS; ++v) store_vec(lanes + v * VEC, acc[v]);
    for (int64_t j = 0; j < cols; ++j) y[j] = lanes[j] + (bias ? bias[j] : 0.0f) + (res ? res[j] : 0.0f);
}

/* What a tile multiplies: a group of TILE_PANELS panels (contiguous in the packing; a group with fewer
 * valid columns reads its first panel again, panel_floats = 0), over k in [k0, k1). A product split
 * along k keeps each tile's running sums in `partial` ([rows of the block][partial_ld], the tile's rows
 * from `partial_row`) between the k blocks: stored and reloaded as floats, so the chain of each element
 * is the one an unsplit product computes. `prefetch`, when set, is the next group, requested a little
 * per k so that it arrives while this tile computes. */
typedef struct {
    const float *w;
    int64_t panel_floats, col, cols, k0, k1;
    float *partial;
    int64_t partial_ld;
    const char *prefetch;
    int64_t prefetch_bytes;
} Job;

#define DEFINE_TILE(ROWS)                                                                                      \
    static void tile_##ROWS(const Product *p, int64_t m, int64_t partial_row, const Job *job) {                \
        vec acc[ROWS][TILE_VECS];                                                                              \
        float *partial = job->partial ? job->partial + partial_row * job->partial_ld + job->col : NULL;       \
        for (int r = 0; r < ROWS; ++r)                                                                         \
            for (int v = 0; v < TILE_VECS; ++v)                                                                \
                acc[r][v] = job->k0 > 0 ? load_vec(partial + r * job->partial_ld + v * VEC) : (vec){0};        \
        const float *x = p->x + m * p->ldx;                                                                    \
        const float *restrict w = job->w;                                                                      \
        const char *prefetch = job->prefetch;                                                                  \
        /* the prefetch spread evenly over this tile's k: `per_k` lines every `every` k, counted down */   \
        const int64_t lines = (job->prefetch_bytes + 63) / 64, span = job->k1 - job->k0;                       \
        const int64_t per_k = lines > span ? (lines + span - 1) / span : 1;                                    \
        const int64_t every = lines >= span ? 1 : (lines > 0 ? span / lines : span + 1);                       \
        int64_t countdown = every, issued = 0;                                                                 \
        for (int64_t k = job->k0; k < job->k1; ++k) {                                                          \
            vec b[TILE_VECS];                                                                                  \
            for (int t = 0; t < TILE_PANELS; ++t)                                                              \
                for (int v = 0; v < PANEL_VECS; ++v)                                                           \
                    b[t * PANEL_VECS + v] = load_vec(w + t * job->panel_floats + k * PANEL + v * VEC);         \
            if (--countdown == 0) {                                                                            \
                countdown = every;                                                                             \
                for (int64_t j = 0; j < per_k && issued < lines; ++j, ++issued)                                \
                    __builtin_prefetch(prefetch + 64 * issued, 0, 2);                                          \
            }                                                                                                  \
            for (int r = 0; r < ROWS; ++r) {                                                                   \
                const float a = x[r * p->ldx + k];                                                             \
                for (int v = 0; v < TILE_VECS; ++v) acc[r][v] += a * b[v];                                     \
            }                                                                                                  \
        }                                                                                                      \
        if (job->k1 < p->K) {                                                                                  \
            for (int r = 0; r < ROWS; ++r)                                                                     \
                for (int v = 0; v < TILE_VECS; ++v) store_vec(partial + r * job->partial_ld + v * VEC, acc[r][v]); \
            return;                                                                                            \
        }                                                                                                      \
        for (int r = 0; r < ROWS; ++r) finish_row(p, m + r, job->col, job->cols, acc[r]);                      \
    }

DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
#if MAX_TILE_ROWS > 3
DEFINE_TILE(4)
DEFINE_TILE(5)
DEFINE_TILE(6)
#endif
#if MAX_TILE_ROWS > 6
DEFINE_TILE(7)
DEFINE_TILE(8)
DEFINE_TILE(9)
DEFINE_TILE(10)
DEFINE_TILE(11)
DEFINE_TILE(12)
#endif

typedef void (*Tile)(const Product *, int64_t, int64_t, const Job *);
static const Tile BY_HEIGHT[] = {NULL, tile_1, tile_2, tile_3,
#if MAX_TILE_ROWS > 3
                                 tile_4, tile_5, tile_6,
#endif
#if MAX_TILE_ROWS > 6
                                 tile_7, tile_8, tile_9, tile_10, tile_11, tile_12,
#endif
};

/* Group g over the whole of k, prefetching the next group. */
static inline Job group_job(const float *packed, int64_t g, int64_t K, int64_t N) {
    const int64_t panels = (N + PANEL - 1) / PANEL, panel_floats = K * PANEL;
    const int64_t first = g * TILE_PANELS;
    const int64_t after = first + TILE_PANELS < panels ? first + TILE_PANELS : panels;
    const int64_t next_panels = panels - after < TILE_PANELS ? panels - after : TILE_PANELS;
    const int64_t col = first * PANEL;
    Job job = {packed + first * panel_floats, after - first > 1 ? panel_floats : 0, col,
               N - col < TILE_COLS ? N - col : TILE_COLS, 0, K, NULL, 0,
               (const char *)(packed + after * panel_floats), next_panels * panel_floats * (int64_t)sizeof(float)};
    return job;
}

/* Rows [m0, m1) of a product of many rows against one job: BLOCK_ROWS-row tiles, then one tile of the
 * remaining height. The tiles share the prefetch of the next group, so that memory streams through all
 * of them (when the first tile alone prefetched, a 12-row decode batch on AVX2 left memory idle during
 * the second tile). */
static void rows_by_blocks(const Product *p, Job job, int64_t m0, int64_t m1) {
    const int64_t tiles = (m1 - m0 + BLOCK_ROWS - 1) / BLOCK_ROWS, total = job.prefetch_bytes;
    const char *next = job.prefetch;
    int64_t m = m0;
    for (int64_t t = 0; t < tiles; ++t, m += BLOCK_ROWS) {
        const int64_t from = total * t / tiles, to = total * (t + 1) / tiles;
        job.prefetch = next + from;
        job.prefetch_bytes = to - from;
        BY_HEIGHT[m1 - m < BLOCK_ROWS ? m1 - m : BLOCK_ROWS](p, m, m - m0, &job);
    }
}

/* Products of many rows are blocked so that each block's x (rows x k) stays in L2 while the panels pass:
 * about 512 KiB of it. Over K_BLOCK_FROM inputs, when a block over the whole of k would not hold every
 * row, the k dimension is split too, in blocks of at most K_BLOCK (a prompt chunk through a down
 * projection of 4,864 inputs would otherwise get two dozen rows per block, and the weights would stream
 * from memory once per two dozen rows). */
#define X_BLOCK_FLOATS (1 << 17)
#define K_BLOCK_FROM 1024
#define K_BLOCK 512

/* The running sums of a product split along k: one buffer per calling thread, grown as needed. */
static _Thread_local float *partial_buffer;
static _Thread_local int64_t partial_capacity;

static float *partial_sums(int64_t floats) {
    if (floats > partial_capacity) {
        free(partial_buffer);
        partial_buffer = malloc((size_t)floats * sizeof(float));
        partial_capacity = partial_buffer ? floats : 0;
    }
    return partial_buffer;
}

static int64_t rows_per_block(int64_t M, int64_t k_step) {
    int64_t block = X_BLOCK_FLOATS / (k_step > 0 ? k_step : 1);
    block = block < BLOCK_ROWS ? BLOCK_ROWS : block - block % BLOCK_ROWS;
    return block < M ? block : M;
}

void gemm_panels(const float *x, int64_t M, int64_t K, int64_t ldx, const float *packed, int64_t N,
                 const float *bias, const float *residual, float *y) {
    if (M <= 0) return;
    const Product p = {x, ldx, K, N, bias, residual, y};
    const int64_t panels = (N + PANEL - 1) / PANEL;
    const int64_t groups = (panels + TILE_PANELS - 1) / TILE_PANELS;
    if (M <= MAX_TILE_ROWS) {
#pragma omp parallel for num_threads(kernel_threads()) if (M * K * N >= (1 << 15)) schedule(static)
        for (int64_t g = 0; g < groups; ++g) {
            const Job job = group_job(packed, g, K, N);
            BY_HEIGHT[M](&p, 0, 0, &job);
        }
        return;
    }
    /* A decode batch fits one block over all of k: it keeps whole-k tiles, which prefetch the next group. */
    int64_t k_blocks = K > K_BLOCK_FROM && rows_per_block(M, K) < M ? (K + K_BLOCK - 1) / K_BLOCK : 1;
    const int64_t partial_ld = groups * TILE_COLS;
    float *partial = k_blocks > 1 ? partial_sums(rows_per_block(M, (K + k_blocks - 1) / k_blocks) * partial_ld) : NULL;
    if (partial == NULL) k_blocks = 1;   /* no memory for running sums: whole-k tiles, slower but exact */
    const int64_t k_step = (K + k_blocks - 1) / k_blocks, block = rows_per_block(M, k_step);
    /* Each thread owns a contiguous range of groups and walks it once per block of rows (and of k). */
#pragma omp parallel num_threads(kernel_threads()) if (M * K * N >= (1 << 15))
    {
        const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t g0 = groups * thread / threads, g1 = groups * (thread + 1) / threads;
        for (int64_t m0 = 0; m0 < M; m0 += block) {
            const int64_t m1 = m0 + block < M ? m0 + block : M;
            for (int64_t k0 = 0; k0 < K; k0 += k_step) {
                for (int64_t g = g0; g < g1; ++g) {
                    Job job = group_job(packed, g, K, N);
                    job.k0 = k0;
                    job.k1 = k0 + k_step < K ? k0 + k_step : K;
                    job.partial = partial;
                    job.partial_ld = partial_ld;
                    if (k_blocks > 1) job.prefetch_bytes = 0;
                    rows_by_blocks(&p, job, m0, m1);
                }
            }
        }
    }
}
