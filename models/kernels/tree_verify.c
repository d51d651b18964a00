/* The target's verification of one speculating round's tree, inside a native chain of rounds
 * (medusa_chain.c, eagle_chain.c): what the engine's verified step does for a greedy or exactly sampled
 * sequence (decoding/speculative/), without a return to Python.
 *
 * 1. The stack runs over the tree's rows as decode rows: row 0 the newest token (position P, not in the
 *    cache yet), row j > 0 a candidate one past its parent row's position, its key and value stored at
 *    sequence index P + j, each row seeing the cache before P and its ancestors (decoder.c,
 *    paged_decode_attention's extra positions), as the per-step path verifies a TokenTree.
 * 2. The output head and each row's token: its argmax (the first index of the maximum), or for a sampled
 *    request the draw sample_rows makes with the uniform of the position the row chooses for (exact
 *    acceptance: what plain sampling draws there), with the stop tokens at -inf while that token would
 *    come before min_tokens.
 * 3. The kept path is the deepest whose every node is its parent's token; its last node's token is the
 *    bonus one. The kept nodes' keys and values move to the positions they now occupy.
 *
 * Every row's logits are those of the per-step path (the same kernels over the same rows), so the tokens
 * are plain decoding's bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "decoder.h"

/* The k best columns of row (first index first among equals), best first; k at most 64. */
void top_columns(const float *row, int64_t n, int64_t k, int64_t *best) {
    float value[64];
    int64_t count = 0;
    for (int64_t j = 0; j < n; ++j) {
        if (count == k && !(row[j] > value[k - 1])) continue;
        int64_t at = count < k ? count++ : k - 1;
        while (at > 0 && row[j] > value[at - 1]) {
            value[at] = value[at - 1], best[at] = best[at - 1];
            --at;
        }
        value[at] = row[j], best[at] = j;
    }
}

static inline int64_t slot_of(const SpeculatingRun *run, int64_t block_size, int64_t position) {
    return run->block_table[position / block_size] * block_size + position % block_size;
}

void tree_verification_layout(TreeVerification *t, Arena *arena, const DecoderShape *s, int64_t capacity,
                              int64_t max_depth, int64_t vocab, const SpeculatingRun *run) {
    const int64_t rows = capacity, longs = sizeof(int64_t) * rows, floats = sizeof(float) * rows;
    t->capacity = rows, t->width = max_depth + 1;
    t->slots = arena_take(arena, longs);
    t->context = arena_take(arena, longs);
    t->counts = arena_take(arena, longs);
    t->depth = arena_take(arena, longs);
    t->chosen = arena_take(arena, longs);
    t->extra = arena_take(arena, longs * t->width);
    t->tables = arena_take(arena, longs * run->max_blocks);
    t->x = arena_take(arena, floats * s->hidden);
    t->h = arena_take(arena, floats * s->hidden);
    t->logits = arena_take(arena, floats * vocab);
    t->cos = arena_take(arena, floats * s->head_dim);
    t->sin = arena_take(arena, floats * s->head_dim);
    t->logprob = arena_take(arena, floats);
    t->raw_logprob = arena_take(arena, floats);
    t->stack = arena_take(arena, sizeof(float) * decoder_scratch_floats(s, rows));
    if (arena->base != NULL)   /* every row reads the sequence's one block table */
        for (int64_t j = 0; j < rows; ++j)
            memcpy(t->tables + j * run->max_blocks, run->block_table, sizeof(int64_t) * run->max_blocks);
}

/* Verify rows [rows] (tokens; parents: -1 for row 0, an earlier row for the others) whose newest token sits
 * at `position` after `emitted` tokens of the call; write the kept path's tokens and the bonus token (and
 * their logprobs) to out from `emitted` on, move the kept nodes' keys and values into place. -> the number
 * kept; path[0..kept) their rows (the bonus token's row is the last of them, or row 0). */
int64_t verify_tree(const DecoderShape *s, const DecoderLayer *layers, int64_t num_layers, const float *embed,
                    const float *final_norm, const LinearWeights *lm_head, int64_t vocab, const SpeculatingRun *run,
                    TreeVerification *t, int64_t position, int64_t emitted, const int64_t *tokens,
                    const int64_t *parents, int64_t rows, int64_t *path, SpeculatingOutcome *out) {
    const int64_t size = s->hidden, d = s->head_dim, width = t->width, kv_width = s->num_kv_heads * d;
    for (int64_t j = 0; j < rows; ++j) {
        t->depth[j] = parents[j] < 0 ? 0 : t->depth[parents[j]] + 1;
        t->counts[j] = t->depth[j] + 1;
        for (int64_t r = j, a = t->depth[j]; r >= 0; r = parents[r], --a)   /* ancestors root first, itself last */
            t->extra[j * width + a] = position + r;
        memcpy(t->x + j * size, embed + tokens[j] * size, sizeof(float) * size);
        memcpy(t->cos + j * d, run->cos + (position + t->depth[j]) * d, sizeof(float) * d);
        memcpy(t->sin + j * d, run->sin + (position + t->depth[j]) * d, sizeof(float) * d);
        t->slots[j] = slot_of(run, s->block_size, position + j);
        t->context[j] = position;
    }
    const DecodeRows tree_rows = {t->slots, t->tables, t->context, t->extra, t->counts, run->max_blocks, width};
    decoder_forward(s, layers, num_layers, &tree_rows, t->cos, t->sin, t->x, rows, NULL, -1, final_norm, t->stack, t->h);
    linear_product(t->h, rows, size, size, lm_head, vocab, NULL, NULL, t->logits);
    for (int64_t j = 0; j < rows; ++j) {
        float *row = t->logits + j * vocab;
        if (emitted + t->depth[j] < run->banned_tokens)
            for (int64_t b = 0; b < run->num_banned; ++b) row[run->banned[b]] = -INFINITY;
        if (run->uniforms != NULL)
            sample_one_row(row, vocab, run->temperature, run->uniforms[emitted + t->depth[j]], run->greedy,
                           run->want_raw, &t->chosen[j], &t->logprob[j], &t->raw_logprob[j]);
        else
            t->chosen[j] = first_argmax(row, vocab);
    }
    /* The deepest path of matches: siblings hold distinct tokens, so at most one child matches, and a
     * child comes after its parent. */
    int64_t kept = 0, current = 0;
    for (int64_t j = 1; j < rows; ++j)
        if (parents[j] == current && tokens[j] == t->chosen[current]) path[kept++] = j, current = j;
    for (int64_t k = 0; k < kept; ++k) out->tokens[emitted + k] = tokens[path[k]];
    out->tokens[emitted + kept] = t->chosen[current];
    if (run->uniforms != NULL)   /* each token's logprobs are those of the row that chose it */
        for (int64_t k = 0; k <= kept; ++k) {
            const int64_t chooser = k == 0 ? 0 : path[k - 1];
            out->logprobs[emitted + k] = t->logprob[chooser];
            out->raw_logprobs[emitted + k] = t->raw_logprob[chooser];
        }
    /* Row path[k] (stored at index position + path[k]) now sits at position + 1 + k. Sources lie at or past
     * their destinations (a row's index is at least its depth), and later ones past earlier destinations,
     * so moving in order overwrites nothing still to move. */
    for (int64_t k = 0; k < kept; ++k) {
        if (path[k] == k + 1) continue;
        const int64_t from = slot_of(run, s->block_size, position + path[k]);
        const int64_t to = slot_of(run, s->block_size, position + k + 1);
        for (int64_t l = 0; l < num_layers; ++l) {
            memcpy(layers[l].key_cache + to * kv_width, layers[l].key_cache + from * kv_width, sizeof(float) * kv_width);
            memcpy(layers[l].value_cache + to * kv_width, layers[l].value_cache + from * kv_width,
                   sizeof(float) * kv_width);
        }
    }
    return kept;
}
