/* What the one-call decoder stack (decoder.c) reads, and what the speculating chains built on it share
 * (tree_verify.c, medusa_chain.c, eagle_chain.c). */
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
void sample_one_row(const float *x, int64_t vocab, float temperature, float uniform, uint8_t greedy, uint8_t want_raw,
                    int64_t *token, float *logprob, float *raw_logprob);
/* out [rows, vocab]: every token's logprob under softmax(logits * inverse_temperature[r]) (sampling.c). */
void log_softmax_rows(const float *logits, int64_t rows, int64_t vocab, const float *inverse_temperature, float *out);

/* The k best columns of row (first index first among equals), best first; k at most 64 (tree_verify.c). */
void top_columns(const float *row, int64_t n, int64_t k, int64_t *best);

/* A call's scratch, carved from one buffer in 64-byte-aligned pieces; with `base` NULL it only counts the bytes,
 * so one layout function both sizes the buffer and carves it. */
typedef struct {
    char *base;
    int64_t used;
} Arena;

static inline void *arena_take(Arena *arena, int64_t bytes) {
    const int64_t start = (arena->used + 63) & ~(int64_t)63;
    arena->used = start + bytes;
    return arena->base == NULL ? NULL : arena->base + start;
}

/* Floats of a buffer the arena's bytes fit in (torch's allocations are 64-byte aligned). */
static inline int64_t arena_floats(const Arena *arena) { return (arena->used + 63) / 4 + 16; }

/* One sequence whose speculating rounds run in one call: its newest token, not in the cache yet, at
 * `position`; its block table (slots reserved for max_tokens plus the tree's rows past position); the
 * rotary tables [positions, head_dim]; its stop tokens, -inf while fewer than banned_tokens have been
 * emitted; the deepest node a round may verify after emitting e tokens, depth_room - e (none left: the call
 * ends); uniforms (NULL: take the argmax), the uniform of the i-th token from here, drawn as sample_rows does
 * at `temperature` (greedy: the argmax, with its logprobs). Rounds start while fewer than max_tokens are
 * emitted, max_rounds at most. */
typedef struct {
    int64_t token, position;
    const int64_t *block_table;
    int64_t max_blocks;
    const float *cos, *sin;
    const int64_t *banned;
    int64_t num_banned, banned_tokens;
    int64_t max_tokens, max_rounds, depth_room;
    const float *uniforms;
    float temperature;
    uint8_t greedy, want_raw;
} SpeculatingRun;

/* What the rounds emitted: tokens in order (with uniforms, their logprobs under the sampled distribution and
 * under temperature 1, likewise), and per round the nodes verified and the draft tokens kept. */
typedef struct {
    int64_t *tokens, *verified, *accepted;
    float *logprobs, *raw_logprobs;
    int64_t emitted, rounds;
} SpeculatingOutcome;

/* The target's verification of one round's tree (tree_verify.c), its buffers sized for `capacity` rows
 * (the newest token and the nodes) and paths up to max_depth long; after verify_tree, h holds each row's
 * final hidden state. */
typedef struct {
    int64_t capacity, width;          /* rows; max_depth + 1 */
    int64_t *slots, *context, *counts, *extra, *tables, *depth, *chosen;
    float *x, *h, *logits, *cos, *sin, *logprob, *raw_logprob, *stack;
} TreeVerification;

void tree_verification_layout(TreeVerification *t, Arena *arena, const DecoderShape *s, int64_t capacity,
                              int64_t max_depth, int64_t vocab, const SpeculatingRun *run);
int64_t verify_tree(const DecoderShape *s, const DecoderLayer *layers, int64_t num_layers, const float *embed,
                    const float *final_norm, const LinearWeights *lm_head, int64_t vocab, const SpeculatingRun *run,
                    TreeVerification *t, int64_t position, int64_t emitted, const int64_t *tokens,
                    const int64_t *parents, int64_t rows, int64_t *path, SpeculatingOutcome *out);

#endif
