/* y = x @ W for weights kept in quantized blocks (GGUF's Q8_0, Q4_0, Q4_1, Q4_K, Q6_K; int8 at load).
 *
 * A batch-1 decode step reads every weight once, so its speed is the bytes per weight: 8.5 bits at Q8_0
 * and 5 at Q4_1 against 32 in float32. The weights therefore stay in their blocks and the product reads
 * them directly, with integer dot products as llama.cpp does: each row of x is quantized to signed 8 bits
 * per block of 32 inputs (scale = max |x| / 127, round to nearest even), and each block's product is an
 * exact integer sum (AVX-512 VNNI `vpdpbusd`, AVX2 `vpmaddubsw`, plain C elsewhere), scaled into a float
 * running sum per output in block order. Decoding the weights to float instead costs about three vector
 * ops per eight weights on AVX2, which held batch-1 decode of SmolLM2-135M below the memory bandwidth.
 *
 * Layout (packed by models/quantization.py): per panel of 16 output columns, per block of `block` inputs:
 *   scales [16] (float16 or float32), then for QUANT_U4 mins [16] of the same type, then the values:
 *   QUANT_I8: block/4 quads, each [16 columns][4 consecutive inputs] int8 (64 bytes)
 *   QUANT_U4: block/8 octets, each [16 columns][4 bytes]: the low nibble of byte (c, j) is input j of the
 *             octet, the high nibble input 4 + j (64 bytes)
 * so a 64-byte load holds four inputs of all 16 columns, and one dot instruction adds them into the 16
 * columns' lanes (AVX2 takes the 8-column halves in turn).
 *
 * Every output element is the same sequence of operations whatever the row count, the tile or the CPU
 * class: per block, sum = the exact integer dot; acc = fma((float)sum, scale * x_scale, acc); for U4 then
 * acc = fma(min, x_scale * (float)sum(x_block), acc); finally + bias, + residual. A row's result does not
 * depend on the other rows of the product (batch invariance).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "linear.h"
#include "threads.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define QPANEL 16
#define XBLOCK 32   /* inputs per scale of the quantized x; weight blocks are 16 or 32 */

/* ---- per-class vector primitives: QV columns per vector, QMAX_ROWS rows per tile ---- */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QV 16
#define QMAX_ROWS 8
typedef __m512i ivec;
typedef __m512 fvec;
static inline ivec izero(void) { return _mm512_setzero_si512(); }
static inline ivec iload(const uint8_t *p) { return _mm512_loadu_si512((const void *)p); }
static inline ivec iset1(int32_t v) { return _mm512_set1_epi32(v); }
static inline fvec fzero(void) { return _mm512_setzero_ps(); }
static inline fvec fset1(float v) { return _mm512_set1_ps(v); }
static inline fvec fmul(fvec a, fvec b) { return _mm512_mul_ps(a, b); }
static inline fvec ffma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline fvec fcvt(ivec a) { return _mm512_cvtepi32_ps(a); }
static inline void fstore(float *p, fvec v) { _mm512_storeu_ps(p, v); }
static inline fvec load_scales(const uint8_t *p, int64_t bytes) {
    return bytes == 2 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_ps((const float *)p);
}
/* vpdpbusd multiplies unsigned by signed bytes: the weights go in offset by 128 (w ^ 0x80 = w + 128), and
 * the 128 * sum(x) that adds is taken off: the block's integer sum starts at -128 * sum(x) (I8_OFFSET). */
#define I8_OFFSET 128
typedef ivec i8prep;
static inline i8prep prep_i8(ivec w) { return _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80)); }
static inline ivec dot_i8(ivec acc, i8prep w, int32_t x4) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4)); }
static inline ivec lo_nibbles(ivec v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
static inline ivec hi_nibbles(ivec v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
static inline ivec dot_u4(ivec acc, ivec w, int32_t x4) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4)); }

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QV 8
#define QMAX_ROWS 4
typedef __m256i ivec;
typedef __m256 fvec;
static inline ivec izero(void) { return _mm256_setzero_si256(); }
static inline ivec iload(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline fvec fzero(void) { return _mm256_setzero_ps(); }
static inline fvec fset1(float v) { return _mm256_set1_ps(v); }
static inline fvec fmul(fvec a, fvec b) { return _mm256_mul_ps(a, b); }
static inline fvec ffma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline fvec fcvt(ivec a) { return _mm256_cvtepi32_ps(a); }
static inline void fstore(float *p, fvec v) { _mm256_storeu_ps(p, v); }
static inline fvec load_scales(const uint8_t *p, int64_t bytes) {
    return bytes == 2 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)) : _mm256_loadu_ps((const float *)p);
}
/* vpmaddubsw multiplies unsigned by signed bytes and adds pairs into saturating int16: |w| times x with
 * w's sign keeps every pair within 2 * 128 * 127 (llama.cpp's trick), so nothing saturates. */
#define I8_OFFSET 0
typedef struct { ivec magnitude, sign; } i8prep;
static inline i8prep prep_i8(ivec w) { return (i8prep){_mm256_sign_epi8(w, w), w}; }
static inline ivec madd_pairs(ivec unsigned_bytes, ivec signed_bytes) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned_bytes, signed_bytes), _mm256_set1_epi16(1));
}
/* The empty asm keeps each sum one register added to in turn: left free, GCC reassociates a block's
 * unrolled adds into a tree and spills every product to the stack first. */
static inline ivec dot_i8(ivec acc, i8prep w, int32_t x4) {
    ivec sum = _mm256_add_epi32(acc, madd_pairs(w.magnitude, _mm256_sign_epi8(_mm256_set1_epi32(x4), w.sign)));
    __asm__("" : "+x"(sum));
    return sum;
}
/* One row against many weight vectors (batch-1 decode) turns the trick around: the row's |x| is the
 * unsigned operand and each weight takes x's sign, so the quad's magnitudes are made once for every
 * weight vector they meet, and each vector costs four ops (sign, maddubs, madd, add) instead of five.
 * The products are the same integers (|x| * sign(x) w = x w; pairs within 2 * 127 * 128), so the same
 * bits; the 120 products of a SmolLM2 Q8_0 decode step took 12-21% less time from memory. */
typedef struct { ivec magnitudes, signs; } XQuad;
static inline XQuad x_quad_broadcast(int32_t x4) {
    const ivec signs = _mm256_set1_epi32(x4);
    return (XQuad){_mm256_abs_epi8(signs), signs};
}
static inline ivec dot_i8_signed_by_x(ivec acc, ivec w, XQuad x) {
    return _mm256_add_epi32(acc, madd_pairs(x.magnitudes, _mm256_sign_epi8(w, x.signs)));
}
static inline ivec lo_nibbles(ivec v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
static inline ivec hi_nibbles(ivec v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
static inline ivec dot_u4(ivec acc, ivec w, int32_t x4) { return _mm256_add_epi32(acc, madd_pairs(w, _mm256_set1_epi32(x4))); }

#else /* plain C (NEON and others): the same integers and the same float operations, lane by lane */
#define QV 4
#define QMAX_ROWS 4
typedef struct { int32_t v[QV]; } ivec;
typedef struct { float v[QV]; } fvec;
typedef struct { int8_t b[QV * 4]; } i8prep;
static inline ivec izero(void) { return (ivec){{0}}; }
static inline ivec iload(const uint8_t *p) {
    ivec r;
    memcpy(&r, p, sizeof r);
    return r;
}
static inline fvec fzero(void) { return (fvec){{0}}; }
static inline fvec fset1(float s) {
    fvec r;
    for (int i = 0; i < QV; ++i) r.v[i] = s;
    return r;
}
static inline fvec fmul(fvec a, fvec b) {
    for (int i = 0; i < QV; ++i) a.v[i] *= b.v[i];
    return a;
}
static inline fvec ffma(fvec a, fvec b, fvec c) {
    for (int i = 0; i < QV; ++i) c.v[i] = fmaf(a.v[i], b.v[i], c.v[i]);
    return c;
}
static inline fvec fcvt(ivec a) {
    fvec r;
    for (int i = 0; i < QV; ++i) r.v[i] = (float)a.v[i];
    return r;
}
static inline void fstore(float *p, fvec v) { memcpy(p, &v, sizeof v); }
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    float magnitude;
    if (exponent == 0) magnitude = ldexpf((float)mantissa, -24);
    else if (exponent == 31) magnitude = mantissa ? NAN : INFINITY;
    else magnitude = ldexpf((float)(mantissa | 0x400), (int)exponent - 25);
    uint32_t bits;
    memcpy(&bits, &magnitude, sizeof bits);
    bits |= sign;
    memcpy(&magnitude, &bits, sizeof bits);
    return magnitude;
}
static inline fvec load_scales(const uint8_t *p, int64_t bytes) {
    fvec r;
    for (int i = 0; i < QV; ++i) {
        if (bytes == 2) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            r.v[i] = half_to_float(h);
        } else {
            memcpy(&r.v[i], p + 4 * i, 4);
        }
    }
    return r;
}
#define I8_OFFSET 0
static inline i8prep prep_i8(ivec w) {
    i8prep r;
    memcpy(&r, &w, sizeof r);
    return r;
}
static inline ivec dot_bytes(ivec acc, const uint8_t *w, int is_signed, int32_t x4) {
    int8_t x[4];
    memcpy(x, &x4, 4);
    for (int c = 0; c < QV; ++c)
        for (int j = 0; j < 4; ++j)
            acc.v[c] += (is_signed ? (int32_t)(int8_t)w[4 * c + j] : (int32_t)w[4 * c + j]) * x[j];
    return acc;
}
static inline ivec dot_i8(ivec acc, i8prep w, int32_t x4) { return dot_bytes(acc, (const uint8_t *)w.b, 1, x4); }
static inline ivec lo_nibbles(ivec v) {
    uint8_t *b = (uint8_t *)v.v;
    for (int i = 0; i < QV * 4; ++i) b[i] &= 0x0F;
    return v;
}
static inline ivec hi_nibbles(ivec v) {
    uint8_t *b = (uint8_t *)v.v;
    for (int i = 0; i < QV * 4; ++i) b[i] >>= 4;
    return v;
}
static inline ivec dot_u4(ivec acc, ivec w, int32_t x4) { return dot_bytes(acc, (const uint8_t *)w.v, 0, x4); }
#endif

#define HALVES (QPANEL / QV)

/* x quantized per row (values int8 per input, a scale per 32 inputs, the values' sums per 16 inputs, and
 * -I8_OFFSET times the sums per 16 and per 32 inputs: derivable from the sums, but a tile that derived them
 * per row and block measured 4-6% slower at 8-64 rows), stored by groups of QMAX_ROWS rows, the rows a tile
 * takes (the last group may hold fewer: `n` below): within a group every array runs input by input with
 * the group's rows side by side (values [Kp / 4][n][4 bytes], scales [Kp / 32][n], ...). A tile then
 * reaches all its rows' x through one pointer per array and constant offsets: with a pointer per row,
 * eight rows kept more addresses than there are registers, and AVX-512's 8-row tile spent more
 * instructions moving them in and out of vector registers than on its dot products. */
typedef struct {
    const int8_t *values;
    const float *scales;
    const int32_t *sums16, *offsets16, *offsets32;
    int64_t Kp, M;
} QuantRows;

/* The rows of the group from row m on (m a group's first row). */
static inline int64_t group_rows(const QuantRows *x, int64_t m) {
    return x->M - m < QMAX_ROWS ? x->M - m : QMAX_ROWS;
}

/* Inputs [k, k + 4) of row m + r (k a multiple of 4), for the group from row m of n rows. The indices
 * here and below shift rather than divide: a signed division by a power of two costs a sign fix-up. */
static inline int32_t x_quad(const QuantRows *x, int64_t m, int64_t n, int64_t r, int64_t k) {
    int32_t v;
    memcpy(&v, x->values + m * x->Kp + k * n + 4 * r, 4);
    return v;
}

static inline float x_scale_at(const QuantRows *x, int64_t m, int64_t n, int64_t r, int64_t k0) {
    return x->scales[m * (x->Kp >> 5) + (k0 >> 5) * n + r];
}

/* Per block of `block` (16 or 32) inputs from k0: the values' sum, and -I8_OFFSET times it. */
static inline int32_t x_block_sum(const QuantRows *x, int64_t m, int64_t n, int64_t r, int64_t k0, int64_t block) {
    const int32_t *s = x->sums16 + m * (x->Kp >> 4) + (k0 >> 4) * n + r;
    return block == 32 ? s[0] + s[n] : s[0];
}

static inline int32_t x_block_offset(const QuantRows *x, int64_t m, int64_t n, int64_t r, int64_t k0, int64_t block) {
    return block == 32 ? x->offsets32[m * (x->Kp >> 5) + (k0 >> 5) * n + r]
                       : x->offsets16[m * (x->Kp >> 4) + (k0 >> 4) * n + r];
}

static inline int64_t block_bytes(const QuantSegment *s) {
    const int64_t scale_sets = s->kind == QUANT_U4 ? 2 : 1;
    return QPANEL * s->scale_bytes * scale_sets + (s->kind == QUANT_U4 ? QPANEL * s->block / 2 : QPANEL * s->block);
}

/* Rows [m, m + R) against columns [QV * half, QV * half + QV) of one panel, over every block; the float
 * sums land in out [R][QV]. kind, the block size B and R are constants where it is inlined (a block's
 * loop then unrolls: measured 10-25% faster at 512 rows on AVX2). */
static inline __attribute__((always_inline)) void quant_tile(const QuantRows *x, const QuantSegment *s,
                                                             const uint8_t *panel, int64_t half, int64_t m,
                                                             const int R, const int kind, const int B, float *out) {
    fvec acc[QMAX_ROWS];
    for (int r = 0; r < R; ++r) acc[r] = fzero();
    const int64_t bytes = block_bytes(s), blocks = x->Kp / B, sb = s->scale_bytes;
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t *block = panel + b * bytes;
        const int64_t k0 = b * B;
        const fvec scale = load_scales(block + half * QV * sb, sb);
        ivec sum[QMAX_ROWS];
        if (kind == QUANT_I8) {
            for (int r = 0; r < R; ++r) {
#if I8_OFFSET
                sum[r] = iset1(x_block_offset(x, m, R, r, k0, B));
#else
                sum[r] = izero();
#endif
            }
            const uint8_t *values = block + QPANEL * sb + half * QV * 4;
#pragma GCC unroll 8
            for (int q = 0; q < B / 4; ++q) {
                const i8prep w = prep_i8(iload(values + q * 64));
                for (int r = 0; r < R; ++r) sum[r] = dot_i8(sum[r], w, x_quad(x, m, R, r, k0 + 4 * q));
            }
            for (int r = 0; r < R; ++r)
                acc[r] = ffma(fcvt(sum[r]), fmul(scale, fset1(x_scale_at(x, m, R, r, k0))), acc[r]);
        } else {
            for (int r = 0; r < R; ++r) sum[r] = izero();
            const fvec mins = load_scales(block + QPANEL * sb + half * QV * sb, sb);
            const uint8_t *values = block + 2 * QPANEL * sb + half * QV * 4;
            for (int o = 0; o < B / 8; ++o) {
                const ivec packed = iload(values + o * 64);
                const ivec low = lo_nibbles(packed), high = hi_nibbles(packed);
                for (int r = 0; r < R; ++r)
                    sum[r] = dot_u4(dot_u4(sum[r], low, x_quad(x, m, R, r, k0 + 8 * o)), high,
                                    x_quad(x, m, R, r, k0 + 8 * o + 4));
            }
            for (int r = 0; r < R; ++r) {
                const float x_scale = x_scale_at(x, m, R, r, k0);
                const float x_sum = (float)x_block_sum(x, m, R, r, k0, B);
                acc[r] = ffma(fcvt(sum[r]), fmul(scale, fset1(x_scale)), acc[r]);
                acc[r] = ffma(mins, fset1(x_scale * x_sum), acc[r]);
            }
        }
    }
    for (int r = 0; r < R; ++r) fstore(out + r * QV, acc[r]);
}

#define DEFINE_QUANT_TILE(R)                                                                                    \
    static void quant_tile_i8_##R(const QuantRows *x, const QuantSegment *s, const uint8_t *panel, int64_t half, \
                                  int64_t m, float *out) {                                                     \
        quant_tile(x, s, panel, half, m, R, QUANT_I8, 32, out);                                                \
    }                                                                                                          \
    static void quant_tile_i8_16_##R(const QuantRows *x, const QuantSegment *s, const uint8_t *panel,          \
                                     int64_t half, int64_t m, float *out) {                                    \
        quant_tile(x, s, panel, half, m, R, QUANT_I8, 16, out);                                                \
    }                                                                                                          \
    static void quant_tile_u4_##R(const QuantRows *x, const QuantSegment *s, const uint8_t *panel, int64_t half, \
                                  int64_t m, float *out) {                                                     \
        quant_tile(x, s, panel, half, m, R, QUANT_U4, 32, out);                                                \
    }
DEFINE_QUANT_TILE(1)
DEFINE_QUANT_TILE(2)
DEFINE_QUANT_TILE(3)
DEFINE_QUANT_TILE(4)
#if QMAX_ROWS > 4
DEFINE_QUANT_TILE(5)
DEFINE_QUANT_TILE(6)
DEFINE_QUANT_TILE(7)
DEFINE_QUANT_TILE(8)
#define QUANT_TILES(name) {NULL, name##1, name##2, name##3, name##4, name##5, name##6, name##7, name##8}
#else
#define QUANT_TILES(name) {NULL, name##1, name##2, name##3, name##4}
#endif

#if HALVES == 2
/* One row against both column halves of a panel in one pass, I8 blocks (AVX2's batch-1 decode, where
 * the product is bound by its arithmetic as much as by the memory): the row's four inputs are broadcast,
 * with their magnitudes, once for the two halves' dot products (dot_i8_signed_by_x) and the block loop
 * runs once. Each half's integer sums and float operations are quant_tile's, in its order, so its bits
 * are. The 16 sums land in out [16]. */
static inline __attribute__((always_inline)) void quant_row_both_halves(const QuantRows *x, const QuantSegment *s,
                                                                        const uint8_t *panel, int64_t m, const int B,
                                                                        float *out) {
    fvec acc[2] = {fzero(), fzero()};
    const int64_t bytes = block_bytes(s), blocks = x->Kp / B, sb = s->scale_bytes;
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t *block = panel + b * bytes, *values = block + QPANEL * sb;
        const int64_t k0 = b * B;
        ivec sum[2] = {izero(), izero()};
        for (int q = 0; q < B / 4; ++q) {
            const XQuad x4 = x_quad_broadcast(x_quad(x, m, 1, 0, k0 + 4 * q));
            for (int half = 0; half < 2; ++half)
                sum[half] = dot_i8_signed_by_x(sum[half], iload(values + q * 64 + half * QV * 4), x4);
        }
        const float x_scale = x_scale_at(x, m, 1, 0, k0);
        for (int half = 0; half < 2; ++half)
            acc[half] = ffma(fcvt(sum[half]), fmul(load_scales(block + half * QV * sb, sb), fset1(x_scale)), acc[half]);
    }
    fstore(out, acc[0]);
    fstore(out + QV, acc[1]);
}

static void quant_row_i8_both(const QuantRows *x, const QuantSegment *s, const uint8_t *panel, int64_t m, float *out) {
    quant_row_both_halves(x, s, panel, m, 32, out);
}

static void quant_row_i8_16_both(const QuantRows *x, const QuantSegment *s, const uint8_t *panel, int64_t m,
                                 float *out) {
    quant_row_both_halves(x, s, panel, m, 16, out);
}
#endif

typedef void (*QuantTile)(const QuantRows *, const QuantSegment *, const uint8_t *, int64_t, int64_t, float *);
/* By row count: I8 in blocks of 32 (Q8_0, int8) and 16 (Q6_K), U4 in blocks of 32 (Q4_0, Q4_1, Q4_K). */
static const QuantTile I8_TILES[] = QUANT_TILES(quant_tile_i8_);
static const QuantTile I8_16_TILES[] = QUANT_TILES(quant_tile_i8_16_);
static const QuantTile U4_TILES[] = QUANT_TILES(quant_tile_u4_);

static const QuantTile *tiles_for(const QuantSegment *s) {
    if (s->kind == QUANT_U4) return U4_TILES;
    return s->block == 16 ? I8_16_TILES : I8_TILES;
}

/* Quantize rows [m0, m1) of x, inputs [k_begin, k_end) (multiples of XBLOCK), into `rows` (its layout
 * above): per block of 32 inputs (zero past K) scale = max |x| / 127, values = round(x * 127 / max |x|). */
static void quantize_rows(const float *x, int64_t K, int64_t ldx, int64_t m0, int64_t m1, int64_t k_begin,
                          int64_t k_end, const QuantRows *rows) {
    const int64_t Kp = rows->Kp;
    for (int64_t m = m0; m < m1; ++m) {
        const float *row = x + m * ldx;
        const int64_t first_row = m - m % QMAX_ROWS, n = group_rows(rows, first_row), r = m - first_row;
        int8_t *values = (int8_t *)rows->values + first_row * Kp;
        float *scales = (float *)rows->scales + first_row * (Kp / XBLOCK);
        int32_t *sums16 = (int32_t *)rows->sums16 + first_row * (Kp / 16);
#if I8_OFFSET
        int32_t *offsets16 = (int32_t *)rows->offsets16 + first_row * (Kp / 16);
        int32_t *offsets32 = (int32_t *)rows->offsets32 + first_row * (Kp / 32);
#endif
        for (int64_t k0 = k_begin; k0 < k_end; k0 += XBLOCK) {
            float block[XBLOCK], amax = 0.0f;
            for (int64_t j = 0; j < XBLOCK; ++j) block[j] = k0 + j < K ? row[k0 + j] : 0.0f;
            /* A select, not fmaxf, which stays a library call per element without -ffast-math: this
             * loop vectorises, and the products of a batch-1 step took about 6% less time (the max is
             * the same in any order). */
#pragma omp simd reduction(max : amax)
            for (int64_t j = 0; j < XBLOCK; ++j) {
                const float magnitude = fabsf(block[j]);
                amax = magnitude > amax ? magnitude : amax;
            }
            const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
            /* A group of one row is the row's values in order: written in place. */
            int8_t spread[XBLOCK], *out = n == 1 ? values + k0 : spread;
            int32_t first = 0, second = 0;
#pragma omp simd
            for (int64_t j = 0; j < XBLOCK; ++j) out[j] = (int8_t)__builtin_rintf(block[j] * inverse);
            for (int64_t j = 0; j < XBLOCK; ++j) {
                if (j < 16) first += out[j];
                else second += out[j];
            }
            if (n > 1)
                for (int64_t q = 0; q < XBLOCK / 4; ++q) memcpy(values + ((k0 / 4 + q) * n + r) * 4, out + 4 * q, 4);
            scales[k0 / XBLOCK * n + r] = amax / 127.0f;
            sums16[k0 / 16 * n + r] = first;
            sums16[(k0 / 16 + 1) * n + r] = second;
#if I8_OFFSET
            offsets16[k0 / 16 * n + r] = -I8_OFFSET * first;
            offsets16[(k0 / 16 + 1) * n + r] = -I8_OFFSET * second;
            offsets32[k0 / 32 * n + r] = -I8_OFFSET * (first + second);
#endif
        }
    }
}

/* The quantized x of a product: one buffer per calling thread, grown as needed. */
static _Thread_local uint8_t *rows_buffer;
static _Thread_local int64_t rows_capacity;

static uint8_t *rows_memory(int64_t bytes) {
    if (bytes > rows_capacity) {
        free(rows_buffer);
        rows_buffer = malloc((size_t)bytes);
        rows_capacity = rows_buffer ? bytes : 0;
    }
    return rows_buffer;
}

/* Store one tile's columns [col, col + cols) of rows [m, m + R): + bias, + residual. */
static void finish_tile(const float *lanes, int64_t R, int64_t m, int64_t col, int64_t cols, int64_t N,
                        const float *bias, const float *residual, float *y) {
    for (int64_t r = 0; r < R; ++r) {
        float *out = y + (m + r) * N + col;
        const float *res = residual ? residual + (m + r) * N + col : NULL;
        for (int64_t j = 0; j < cols; ++j)
            out[j] = lanes[r * QV + j] + (bias ? bias[col + j] : 0.0f) + (res ? res[j] : 0.0f);
    }
}

/* Rows per block of the product: the block's quantized x stays in L2 while the panels pass. */
#define QUANT_ROW_BLOCK 64
/* Tiles start at the first row of x's groups (quantize_rows) and take the group's rows. */
_Static_assert(QUANT_ROW_BLOCK % QMAX_ROWS == 0, "a row block is whole groups of rows");

/* The panel units of a product: every panel of every segment, in order, each thread taking a contiguous
 * range; unit u's segment and panel come from the segments' first units. */
typedef struct {
    int64_t first_unit[QUANT_MAX_SEGMENTS + 1], first_col[QUANT_MAX_SEGMENTS], panel_bytes[QUANT_MAX_SEGMENTS];
} Units;

static Units units_of(const LinearWeights *w, int64_t Kp) {
    Units u = {{0}, {0}, {0}};
    for (int64_t s = 0, col = 0; s < w->segments; ++s) {
        const QuantSegment *seg = &w->segment[s];
        u.first_col[s] = col;
        u.panel_bytes[s] = Kp / seg->block * block_bytes(seg);
        u.first_unit[s + 1] = u.first_unit[s] + (seg->columns + QPANEL - 1) / QPANEL;
        col += seg->columns;
    }
    return u;
}

/* Rows [m0, m1) against units [u0, u1): each unit's column halves, QMAX_ROWS rows at a time. */
static void multiply_units(const LinearWeights *w, const Units *u, const QuantRows *rows, int64_t u0, int64_t u1,
                           int64_t m0, int64_t m1, int64_t N, const float *bias, const float *residual, float *y) {
    float lanes[QMAX_ROWS * QV];
    int64_t s = 0;
    for (int64_t unit = u0; unit < u1; ++unit) {
        while (unit >= u->first_unit[s + 1]) ++s;
        const QuantSegment *seg = &w->segment[s];
        const int64_t p = unit - u->first_unit[s], col0 = u->first_col[s] + p * QPANEL;
        const int64_t valid = seg->columns - p * QPANEL < QPANEL ? seg->columns - p * QPANEL : QPANEL;
        const uint8_t *panel = seg->data + p * u->panel_bytes[s];
        const QuantTile *tiles = tiles_for(seg);
#if HALVES == 2
        if (seg->kind == QUANT_I8 && m1 - m0 == 1) {
            (seg->block == 16 ? quant_row_i8_16_both : quant_row_i8_both)(rows, seg, panel, m0, lanes);
            for (int64_t half = 0; half < HALVES && half * QV < valid; ++half)
                finish_tile(lanes + half * QV, 1, m0, col0 + half * QV, valid - half * QV < QV ? valid - half * QV : QV,
                            N, bias, residual, y);
            continue;
        }
#endif
        for (int64_t half = 0; half < HALVES && half * QV < valid; ++half) {
            const int64_t cols = valid - half * QV < QV ? valid - half * QV : QV;
            for (int64_t m = m0; m < m1; m += QMAX_ROWS) {
                const int64_t R = m1 - m < QMAX_ROWS ? m1 - m : QMAX_ROWS;
                tiles[R](rows, seg, panel, half, m, lanes);
                finish_tile(lanes, R, m, col0 + half * QV, cols, N, bias, residual, y);
            }
        }
    }
}

/* The arrays of M rows' quantized x in one buffer of M * quant_row_bytes(Kp) bytes. */
static int64_t quant_row_bytes(int64_t Kp) { return Kp + (Kp / XBLOCK) * 4 + 2 * (Kp / 16) * 4 + (Kp / 32) * 4; }

static QuantRows rows_in(uint8_t *memory, int64_t M, int64_t Kp) {
    const int8_t *values = (const int8_t *)memory;
    const float *scales = (const float *)(memory + M * Kp);
    const int32_t *sums16 = (const int32_t *)(scales + M * (Kp / XBLOCK));
    const int32_t *offsets16 = sums16 + M * (Kp / 16), *offsets32 = offsets16 + M * (Kp / 16);
    return (QuantRows){values, scales, sums16, offsets16, offsets32, Kp, M};
}

static void quant_product(const LinearWeights *w, const float *x, int64_t M, int64_t K, int64_t ldx, int64_t N,
                          const float *bias, const float *residual, float *y) {
    const int64_t Kp = (K + XBLOCK - 1) / XBLOCK * XBLOCK;
    const int64_t row_bytes = quant_row_bytes(Kp);
    const Units u = units_of(w, Kp);
    const int64_t total = u.first_unit[w->segments];
    const int threads = M * K * N >= (1 << 15) ? kernel_threads() : 1;
    /* One row: each thread quantizes it itself (a few microseconds less than one thread quantizing while
     * the others wait at a barrier, in each of a decode step's products). More: the threads share the work,
     * by whole groups of rows (a group's rows lie interleaved, so threads splitting one would write the same
     * cache lines) or, for one group, by ranges of the inputs (k-major within a group). */
    const int own_rows = M == 1;
    uint8_t *shared = own_rows ? NULL : rows_memory(M * row_bytes + 64);
    if (!own_rows && shared == NULL) abort();   /* no memory for a few KB per row: nothing sensible to do */
#pragma omp parallel num_threads(threads)
    {
        const int64_t count = omp_get_num_threads(), me = omp_get_thread_num();
        QuantRows rows;
        if (own_rows) {
            uint8_t *mine = rows_memory(M * row_bytes + 64);
            if (mine == NULL) abort();
            rows = rows_in(mine, M, Kp);
            quantize_rows(x, K, ldx, 0, M, 0, Kp, &rows);
        } else {
            rows = rows_in(shared, M, Kp);
            if (M <= QMAX_ROWS) {
                const int64_t blocks = Kp / XBLOCK;
                quantize_rows(x, K, ldx, 0, M, blocks * me / count * XBLOCK, blocks * (me + 1) / count * XBLOCK, &rows);
            } else {
                const int64_t groups = (M + QMAX_ROWS - 1) / QMAX_ROWS;
                const int64_t first = groups * me / count * QMAX_ROWS, last = groups * (me + 1) / count * QMAX_ROWS;
                quantize_rows(x, K, ldx, first < M ? first : M, last < M ? last : M, 0, Kp, &rows);
            }
#pragma omp barrier
        }
        const int64_t u0 = total * me / count, u1 = total * (me + 1) / count;
        for (int64_t m0 = 0; m0 < M; m0 += QUANT_ROW_BLOCK) {
            const int64_t m1 = m0 + QUANT_ROW_BLOCK < M ? m0 + QUANT_ROW_BLOCK : M;
            multiply_units(w, &u, &rows, u0, u1, m0, m1, N, bias, residual, y);
        }
    }
}

void gemm_panels(const float *x, int64_t M, int64_t K, int64_t ldx, const float *packed, int64_t N,
                 const float *bias, const float *residual, float *y);

void linear_product(const float *x, int64_t M, int64_t K, int64_t ldx, const LinearWeights *w, int64_t N,
                    const float *bias, const float *residual, float *y) {
    if (M <= 0) return;
    if (w->panels != NULL) {
        gemm_panels(x, M, K, ldx, w->panels, N, bias, residual, y);
        return;
    }
    if (w->segment[0].kind == QUANT_BF16) {
        bf16_product(w, x, M, K, ldx, N, bias, residual, y);
        return;
    }
    quant_product(w, x, M, K, ldx, N, bias, residual, y);
}
