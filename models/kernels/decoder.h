/* What the one-call decoder stack (decoder.c) reads, for the calls built on it (medusa_chain.c). */
#ifndef GORGON_DECODER_H
#define GORGON_DECODER_H

#include <stdint.h>

#include "linear.h"

/* The weights of one layer: norms as vectors, projections as linear_product reads them; a NULL bias is none, and
 * so are NULL q_norm and k_norm (per-head norms of the queries and keys before RoPE, as in Qwen3). */
typedef struct {
    const float *input_norm, *post_norm, *q_norm, *k_norm;
    const LinearWeights *qkv, *o_proj, *gate_up, *down;
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias;
    float *key_cache, *value_cache;   /* [num_blocks * block_size, num_kv_heads, head_dim] */
    int64_t window;                   /* sliding window, 0 for none */
} DecoderLayer;

typedef struct {
    int64_t hidden, intermediate, num_heads, num_kv_heads, head_dim, block_size;
    float eps, scale;
} DecoderShape;

/* Where each token writes its key and value, and what it attends to (see paged_decode_attention). */
typedef struct {
    const int64_t *slots, *block_tables, *context_lens, *extra_positions, *extra_counts;
    int64_t max_blocks, max_extra;
} DecodeRows;

int64_t decoder_scratch_floats(const DecoderShape *s, int64_t tokens);
void decoder_forward(const DecoderShape *s, const DecoderLayer *layers, int64_t num_layers, const DecodeRows *rows,
                     const float *cos, const float *sin, float *x, int64_t tokens, const int64_t *keep,
                     int64_t num_keep, const float *final_norm, float *scratch, float *out);

/* The first index of the row's maximum (sampling.c), as torch.argmax and the sampler's greedy rows pick it. */
int64_t first_argmax(const float *x, int64_t vocab);

#endif
