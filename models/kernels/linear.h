/* The weights of one linear layer as the native kernels read them: either float32 panels (gemm.c) or
 * segments of columns kept in quantized blocks (quant_gemm.c). A fused projection whose parts came in
 * different block formats (a GGUF's q and k at Q4_K, its v at Q6_K) is one segment per format run. */
#ifndef GORGON_LINEAR_H
#define GORGON_LINEAR_H

#include <stdint.h>

#define QUANT_I8 0   /* signed 8-bit values times a per-block scale (Q8_0, Q6_K, int8) */
#define QUANT_U4 1   /* unsigned 4-bit values times a per-block scale plus a per-block min (Q4_0, Q4_1, Q4_K) */
#define QUANT_BF16 2 /* bfloat16 values, no scales (bf16_gemm.c; every segment of a matrix, or none) */
#define QUANT_MAX_SEGMENTS 4

typedef struct {
    const uint8_t *data;   /* [panels of 16 columns][blocks along k][block bytes], see quant_gemm.c */
    int64_t kind;          /* QUANT_I8 or QUANT_U4 */
    int64_t block;         /* inputs per block: 16 or 32 */
    int64_t scale_bytes;   /* 2: float16 scales (and mins), 4: float32 */
    int64_t columns;       /* output columns of this segment */
} QuantSegment;

typedef struct {
    const float *panels;   /* float32 panels (pack_panels), or NULL when the segments hold the weights */
    int64_t segments;
    QuantSegment segment[QUANT_MAX_SEGMENTS];
} LinearWeights;

/* 1 where bf16_product runs (the kernels were built for AVX512_BF16), else 0. */
int bf16_products_supported(void);
void bf16_product(const LinearWeights *w, const float *x, int64_t M, int64_t K, int64_t ldx, int64_t N,
                  const float *bias, const float *residual, float *y);

/* y [M, N] = x [M, K] (rows ldx apart) @ w (+ bias [N]) (+ residual [M, N], which may be y itself). */
void linear_product(const float *x, int64_t M, int64_t K, int64_t ldx, const LinearWeights *w, int64_t N,
                    const float *bias, const float *residual, float *y);

#endif
