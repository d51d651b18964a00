/* Math that vectorises: loops that call these compile to SIMD code without libm calls. */
#ifndef GORGON_VECTOR_MATH_H
#define GORGON_VECTOR_MATH_H

#include <stdint.h>
#include <string.h>

/* exp(x) by range reduction to r in [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes' expf
 * coefficients, about 1 ulp), written without branches or calls so loops around it vectorise. */
static inline float exp_poly(float x) {
    const int underflow = x < -87.0f;         /* exp(-inf) (a masked logit) must be exactly 0 */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;   /* ln2 split in two for precision */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;                  /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return underflow ? 0.0f : p * scale;
}

/* Eight floats as one generic vector (one AVX2 register, half an AVX-512 one, two NEON ones), its shuffle
 * (lanes 0-7 from a, 8-15 from b) and an unaligned load. */
typedef float v8f __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t v8i __attribute__((vector_size(8 * sizeof(int32_t))));

#if defined(__clang__)
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, (v8i){i0, i1, i2, i3, i4, i5, i6, i7})
#endif

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The first n (< 8 allowed) floats at p, the lanes past them 0. */
static inline v8f load_upto8(const float *p, int64_t n) {
    if (n >= 8) return load8(p);
    v8f v = {0};
    memcpy(&v, p, sizeof(float) * n);
    return v;
}

/* Sums in one order on every CPU class with fused multiply-add (AVX2, AVX-512, NEON): four 8-lane partials
 * over consecutive runs of 8 (x[32k + 8j + l] into partial j, lane l), added j by j, then the lanes by the
 * fixed tree ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) that the attention's dot products use
 * (attention_row.h). A reduction left to the compiler adds in the machine's vector width, so AVX2 and
 * AVX-512 differ in the last bit; with 8-bit activations a quantized model turns such a bit into a whole
 * rounding step (SmolLM2-135M at Q8_0: logprobs 0.3 nats apart between the two builds), and a sampled
 * token's cumulative mass moves with it. */
static inline float lane_tree(v8f v) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

/* A fixed-order sum built up piece by piece: each piece but the last a multiple of 32 terms long, so every
 * term lands in the partial and lane canonical_sum gives it (a caller can sum tiles while they are in L1). */
typedef struct {
    v8f partial[4];
} FixedSum;

static inline void fixed_sum_add(FixedSum *sum, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 32)
        for (int j = 0; j < 4 && i + 8 * j < n; ++j) sum->partial[j] += load_upto8(x + i + 8 * j, n - i - 8 * j);
}

static inline float fixed_sum_total(const FixedSum *sum) {
    return lane_tree((sum->partial[0] + sum->partial[1]) + (sum->partial[2] + sum->partial[3]));
}

static inline float canonical_sum(const float *x, int64_t n) {
    FixedSum sum = {{{0}, {0}, {0}, {0}}};
    fixed_sum_add(&sum, x, n);
    return fixed_sum_total(&sum);
}

static inline float canonical_sum_of_squares(const float *x, int64_t n) {
    v8f partial[4] = {{0}, {0}, {0}, {0}};
    for (int64_t i = 0; i < n; i += 32)
        for (int j = 0; j < 4 && i + 8 * j < n; ++j) {
            const v8f v = load_upto8(x + i + 8 * j, n - i - 8 * j);
            partial[j] += v * v;
        }
    return lane_tree((partial[0] + partial[1]) + (partial[2] + partial[3]));
}

#endif
