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

#endif
