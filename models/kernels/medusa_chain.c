/* Medusa's speculating steps for one greedy sequence, several in one native call.
 *
 * A speculating step of a small model spends as much time in Python as in its kernels: proposing
 * (the heads), packing the tree's rows, verifying and compacting the cache (the embedded model: about
 * 1.1 ms of a 2.9 ms step, the stack over the tree 1.4 ms). For a greedy sequence nothing of that needs
 * Python per step, so each round here does in C what the engine's step does (decoding/speculative/):
 *
 * 1. The heads read the final hidden state of the newest computed token: ResBlocks x + silu(W x + b),
 *    then the vocabulary projection, and each node of the candidate tree takes its head's token of its
 *    rank (decoding/speculative/medusa.py's tree: node i follows parents[i], its depth one past its parent's).
 * 2. The stack runs over the tree's rows as decode rows: row 0 the newest token (position P, not yet in
 *    the cache), node i at position P + depth, its key and value stored at sequence index P + 1 + i, each
 *    row seeing the cache before P and its ancestors (decoder.c, paged_decode_attention's extra positions).
 * 3. The output head and each row's token: its argmax (the first index of the maximum), or for a sampled
 *    request the draw sample_rows makes with the uniform of the position the row chooses for (exact
 *    acceptance: what plain sampling draws there), with the stop tokens at -inf while that token would
 *    come before min_tokens; the kept path is the deepest whose every node is its parent's token, and its
 *    last node's token is the bonus one.
 * 4. The kept nodes' keys and values move to the positions they now occupy.
 *
 * Near the request's end the tree is trimmed as the per-step path trims it (Proposal.trimmed): no node
 * deeper than the tokens that may still follow the bonus one, the others renumbered in order; with none
 * left, the call ends (a plain step follows).
 *
 * Every row's logits are those of the per-step path (the same kernels over the same rows), so the tokens
 * are plain greedy's bit for bit; only the heads' proposals may differ from the Python heads' in the last
 * bit (silu here, torch's there), which changes what is accepted, never what is emitted.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "decoder.h"

/* The heads, as models/medusa_native.py lays them out for the CPU products. */
typedef struct {
    const LinearWeights *first;        /* layer 0 of every used head, one product: [hidden] -> [used * hidden] */
    const float *first_bias;           /* [used * hidden] */
    const LinearWeights *later;        /* [(layers - 1) * used]: layer l of head k at (l - 1) * used + k */
    const float *const *later_bias;    /* likewise, NULL entries for none */
    const LinearWeights *projections;  /* one shared by every head, or one per head */
    const int64_t *vocab_map;          /* [draft_vocab]: a projection row's token id, NULL where they are equal */
    int64_t used, layers, num_projections, draft_vocab;
} MedusaNativeHeads;

/* The candidate tree: node i follows parents[i] (-1: the newest token) and is the ranks[i]-th best token
 * of the head of its depth (depth 1: head 0). Parents come before their children; max_depth is the
 * deepest node's depth. */
typedef struct {
    const int64_t *parents, *ranks;
    int64_t nodes, top_k, max_depth;
} MedusaTree;

/* One sequence: its newest token, not in the cache yet, at `position`; its block table (slots reserved
 * for max_tokens + nodes tokens past position); the final hidden state the newest token came from; the
 * rotary tables [positions, head_dim]; its stop tokens, -inf while fewer than banned_tokens have been
 * emitted; the deepest node a round may verify after emitting e tokens, depth_room - e; uniforms
 * [max_tokens + max_depth] (NULL: take the argmax), the uniform of the i-th token from here, drawn as
 * sample_rows does at `temperature` (greedy: the argmax, with its logprobs). Rounds start while fewer than
 * max_tokens are emitted, max_rounds at most. */
typedef struct {
    int64_t token, position;
    const int64_t *block_table;
    int64_t max_blocks;
    const float *hidden;
    const float *cos, *sin;
    const int64_t *banned;
    int64_t num_banned, banned_tokens;
    int64_t max_tokens, max_rounds, depth_room;
    const float *uniforms;
    float temperature;
    uint8_t greedy, want_raw;
} MedusaRun;

/* What a call did: tokens [max_tokens + max_depth] emitted in order (with uniforms, their logprobs under
 * the sampled distribution and under temperature 1, likewise), per round [max_rounds] the nodes verified
 * and the draft tokens kept, the final hidden state of the newest computed token (the next proposal's
 * input). */
typedef struct {
    int64_t *tokens, *verified, *accepted;
    float *logprobs, *raw_logprobs;
    float *hidden;
    int64_t emitted, rounds;
} MedusaOutcome;

void sample_one_row(const float *x, int64_t vocab, float temperature, float uniform, uint8_t greedy, uint8_t want_raw,
                    int64_t *token, float *logprob, float *raw_logprob);

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

/* The k best columns of row (first index first among equals), best first. */
static void top_columns(const float *row, int64_t n, int64_t k, int64_t *best) {
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

/* Each head's top_k tokens after hidden: top [max_depth][top_k]. work: (2 * used + 1) * hidden + used *
 * draft_vocab floats. */
static void propose(const MedusaNativeHeads *h, const MedusaTree *tree, const float *hidden, int64_t size,
                    float *work, int64_t *top) {
    const int64_t used = h->used;
    float *states = work, *layer = states + used * size, *logits = layer + used * size;
    linear_product(hidden, 1, size, size, h->first, used * size, h->first_bias, NULL, layer);
    for (int64_t k = 0; k < used; ++k)
        for (int64_t i = 0; i < size; ++i) states[k * size + i] = hidden[i] + silu(layer[k * size + i]);
    for (int64_t l = 1; l < h->layers; ++l)
        for (int64_t k = 0; k < used; ++k) {
            const int64_t at = (l - 1) * used + k;
            linear_product(states + k * size, 1, size, size, &h->later[at], size, h->later_bias[at], NULL, layer);
            for (int64_t i = 0; i < size; ++i) states[k * size + i] += silu(layer[i]);
        }
    if (h->num_projections == 1)
        linear_product(states, used, size, size, &h->projections[0], h->draft_vocab, NULL, NULL, logits);
    else
        for (int64_t k = 0; k < used; ++k)
            linear_product(states + k * size, 1, size, size, &h->projections[k], h->draft_vocab, NULL, NULL,
                           logits + k * h->draft_vocab);
    for (int64_t k = 0; k < tree->max_depth; ++k) {
        int64_t *best = top + k * tree->top_k;
        top_columns(logits + k * h->draft_vocab, h->draft_vocab, tree->top_k, best);
        if (h->vocab_map != NULL)
            for (int64_t j = 0; j < tree->top_k; ++j) best[j] = h->vocab_map[best[j]];
    }
}

static inline int64_t slot_of(const MedusaRun *run, int64_t block_size, int64_t position) {
    return run->block_table[position / block_size] * block_size + position % block_size;
}

/* The int64 scratch of a call (first in the buffer, 8-byte aligned like it): per row its token, slot,
 * context, count of extra positions, extra positions, block table copy, argmax and kept path; the heads'
 * top tokens. */
static int64_t scratch_longs(const MedusaTree *tree, int64_t max_blocks) {
    const int64_t rows = tree->nodes + 1;
    return rows * (6 + tree->max_depth + 1 + max_blocks) + tree->max_depth * tree->top_k;
}

/* Floats of scratch decoder_medusa_chain needs. */
int64_t decoder_medusa_chain_scratch_floats(const DecoderShape *s, const MedusaNativeHeads *h, const MedusaTree *tree,
                                            int64_t vocab, int64_t max_blocks) {
    const int64_t rows = tree->nodes + 1;
    return 2 * scratch_longs(tree, max_blocks) + 2 * rows * s->hidden + rows * vocab + 2 * rows * s->head_dim + 2 * rows +
           (2 * h->used + 1) * s->hidden + h->used * h->draft_vocab + decoder_scratch_floats(s, rows);
}

void decoder_medusa_chain(const DecoderShape *s, const DecoderLayer *layers, int64_t num_layers, const float *embed,
                          const float *final_norm, const LinearWeights *lm_head, int64_t vocab,
                          const MedusaNativeHeads *heads, const MedusaTree *tree, const MedusaRun *run,
                          float *scratch, MedusaOutcome *out) {
    const int64_t size = s->hidden, d = s->head_dim, rows = tree->nodes + 1, width = tree->max_depth + 1;
    const int64_t kv_width = s->num_kv_heads * d;
    int64_t *tokens = (int64_t *)scratch, *slots = tokens + rows, *context = slots + rows, *counts = context + rows;
    int64_t *extra = counts + rows, *tables = extra + rows * width, *top = tables + rows * run->max_blocks;
    int64_t *argmax = top + tree->max_depth * tree->top_k, *path = argmax + rows;
    float *x = (float *)(tokens + scratch_longs(tree, run->max_blocks)), *h = x + rows * size;
    float *logits = h + rows * size, *cos = logits + rows * vocab, *sin = cos + rows * d, *work = sin + rows * d;
    float *row_logprob = work + (2 * heads->used + 1) * size + heads->used * heads->draft_vocab;
    float *row_raw = row_logprob + rows, *stack = row_raw + rows;
    /* Each node's depth, for the trimming below. */
    int64_t node_depth[tree->nodes > 0 ? tree->nodes : 1], row_node[rows], parent_row[rows], depth[rows];
    int64_t chain[rows][width], row_of_node[tree->nodes > 0 ? tree->nodes : 1];
    for (int64_t i = 0; i < tree->nodes; ++i)
        node_depth[i] = tree->parents[i] < 0 ? 1 : node_depth[tree->parents[i]] + 1;
    for (int64_t j = 0; j < rows; ++j) memcpy(tables + j * run->max_blocks, run->block_table, sizeof(int64_t) * run->max_blocks);
    const DecodeRows tree_rows = {slots, tables, context, extra, counts, run->max_blocks, width};
    int64_t root = run->token, position = run->position, emitted = 0, round = 0, built_limit = 0, active = 0;
    memcpy(out->hidden, run->hidden, sizeof(float) * size);
    while (round < run->max_rounds && emitted < run->max_tokens) {
        const int64_t room = run->depth_room - emitted, limit = room < tree->max_depth ? room : tree->max_depth;
        if (limit <= 0) break;
        if (limit != built_limit) {
            /* The rows of the nodes no deeper than limit, in order (row 0 the newest token): their parents'
             * rows, depths and ancestries (themselves last). */
            active = 1, depth[0] = 0, chain[0][0] = 0, row_node[0] = -1, parent_row[0] = -1;
            for (int64_t i = 0; i < tree->nodes; ++i) {
                row_of_node[i] = -1;
                if (node_depth[i] > limit) continue;
                const int64_t r = active++, parent = tree->parents[i] < 0 ? 0 : row_of_node[tree->parents[i]];
                row_of_node[i] = r, row_node[r] = i, parent_row[r] = parent, depth[r] = depth[parent] + 1;
                memcpy(chain[r], chain[parent], sizeof(int64_t) * (depth[parent] + 1));
                chain[r][depth[r]] = r;
            }
            for (int64_t j = 0; j < active; ++j) counts[j] = depth[j] + 1;
            built_limit = limit;
        }
        propose(heads, tree, out->hidden, size, work, top);
        tokens[0] = root;
        for (int64_t j = 1; j < active; ++j) {
            const int64_t i = row_node[j];
            tokens[j] = top[(node_depth[i] - 1) * tree->top_k + tree->ranks[i]];
        }
        for (int64_t j = 0; j < active; ++j) {
            memcpy(x + j * size, embed + tokens[j] * size, sizeof(float) * size);
            memcpy(cos + j * d, run->cos + (position + depth[j]) * d, sizeof(float) * d);
            memcpy(sin + j * d, run->sin + (position + depth[j]) * d, sizeof(float) * d);
            slots[j] = slot_of(run, s->block_size, position + j);
            context[j] = position;
            for (int64_t a = 0; a <= depth[j]; ++a) extra[j * width + a] = position + chain[j][a];
        }
        decoder_forward(s, layers, num_layers, &tree_rows, cos, sin, x, active, NULL, -1, final_norm, stack, h);
        linear_product(h, active, size, size, lm_head, vocab, NULL, NULL, logits);
        for (int64_t j = 0; j < active; ++j) {
            float *row = logits + j * vocab;
            if (emitted + depth[j] < run->banned_tokens)
                for (int64_t b = 0; b < run->num_banned; ++b) row[run->banned[b]] = -INFINITY;
            if (run->uniforms != NULL)
                sample_one_row(row, vocab, run->temperature, run->uniforms[emitted + depth[j]], run->greedy,
                               run->want_raw, &argmax[j], &row_logprob[j], &row_raw[j]);
            else
                argmax[j] = first_argmax(row, vocab);
        }
        /* The deepest path of matches: siblings hold distinct tokens, so at most one child matches. */
        int64_t kept = 0, current = 0;
        for (int64_t j = 1; j < active; ++j)
            if (parent_row[j] == current && tokens[j] == argmax[current]) path[kept++] = j, current = j;
        for (int64_t k = 0; k < kept; ++k) out->tokens[emitted + k] = tokens[path[k]];
        out->tokens[emitted + kept] = argmax[current];
        if (run->uniforms != NULL)   /* each token's logprobs are those of the row that chose it */
            for (int64_t k = 0; k <= kept; ++k) {
                const int64_t chooser = k == 0 ? 0 : path[k - 1];
                out->logprobs[emitted + k] = row_logprob[chooser];
                out->raw_logprobs[emitted + k] = row_raw[chooser];
            }
        /* Node path[k] (stored at index position + path[k]) now sits at position + 1 + k. Sources lie at or
         * past their destinations (a node's index is at least its depth), and later ones past earlier
         * destinations, so moving in order overwrites nothing still to move. */
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
        memcpy(out->hidden, h + current * size, sizeof(float) * size);
        out->verified[round] = active - 1;
        out->accepted[round++] = kept;
        root = argmax[current];
        position += kept + 1;
        emitted += kept + 1;
    }
    out->emitted = emitted, out->rounds = round;
}
