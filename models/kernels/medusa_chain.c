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
 * 2. The target verifies the tree's rows (tree_verify.c): row 0 the newest token, node i in the row after
 *    its place among the nodes a round verifies; the kept path and the bonus token are emitted, the kept
 *    nodes' keys and values moved into place.
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

/* The sequence (decoder.h), and the final hidden state its newest token came from (the heads' input). */
typedef struct {
    SpeculatingRun run;
    const float *hidden;
} MedusaRun;

/* What a call did (decoder.h), and the final hidden state of the newest computed token (the next proposal's
 * input). */
typedef struct {
    SpeculatingOutcome rounds;
    float *hidden;
} MedusaOutcome;

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

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

/* The call's scratch: the verification's (tree_verify.c), the heads' work and top tokens. */
typedef struct {
    TreeVerification verification;
    float *work;
    int64_t *top;
} MedusaScratch;

static void medusa_layout(MedusaScratch *m, Arena *arena, const DecoderShape *s, const MedusaNativeHeads *h,
                          const MedusaTree *tree, int64_t vocab, const SpeculatingRun *run) {
    tree_verification_layout(&m->verification, arena, s, tree->nodes + 1, tree->max_depth, vocab, run);
    m->work = arena_take(arena, sizeof(float) * ((2 * h->used + 1) * s->hidden + h->used * h->draft_vocab));
    m->top = arena_take(arena, sizeof(int64_t) * tree->max_depth * tree->top_k);
}

/* Floats of scratch decoder_medusa_chain needs. */
int64_t decoder_medusa_chain_scratch_floats(const DecoderShape *s, const MedusaNativeHeads *h, const MedusaTree *tree,
                                            int64_t vocab, const MedusaRun *run) {
    Arena arena = {NULL, 0};
    MedusaScratch m;
    medusa_layout(&m, &arena, s, h, tree, vocab, &run->run);
    return arena_floats(&arena);
}

void decoder_medusa_chain(const DecoderShape *s, const DecoderLayer *layers, int64_t num_layers, const float *embed,
                          const float *final_norm, const LinearWeights *lm_head, int64_t vocab,
                          const MedusaNativeHeads *heads, const MedusaTree *tree, const MedusaRun *medusa,
                          float *scratch, MedusaOutcome *medusa_out) {
    const SpeculatingRun *run = &medusa->run;
    SpeculatingOutcome *out = &medusa_out->rounds;
    const int64_t size = s->hidden, rows = tree->nodes + 1;
    Arena arena = {(char *)scratch, 0};
    MedusaScratch m;
    medusa_layout(&m, &arena, s, heads, tree, vocab, run);
    /* Each node's depth, for the trimming below; the rows of the nodes a round verifies, their parents. */
    int64_t node_depth[tree->nodes > 0 ? tree->nodes : 1], row_node[rows], parent_row[rows], tokens[rows], path[rows];
    int64_t row_of_node[tree->nodes > 0 ? tree->nodes : 1];
    for (int64_t i = 0; i < tree->nodes; ++i)
        node_depth[i] = tree->parents[i] < 0 ? 1 : node_depth[tree->parents[i]] + 1;
    int64_t root = run->token, position = run->position, emitted = 0, round = 0, built_limit = 0, active = 0;
    memcpy(medusa_out->hidden, medusa->hidden, sizeof(float) * size);
    while (round < run->max_rounds && emitted < run->max_tokens) {
        const int64_t room = run->depth_room - emitted, limit = room < tree->max_depth ? room : tree->max_depth;
        if (limit <= 0) break;
        if (limit != built_limit) {
            /* The rows of the nodes no deeper than limit, in order (row 0 the newest token). */
            active = 1, row_node[0] = -1, parent_row[0] = -1;
            for (int64_t i = 0; i < tree->nodes; ++i) {
                row_of_node[i] = -1;
                if (node_depth[i] > limit) continue;
                const int64_t r = active++;
                row_of_node[i] = r, row_node[r] = i;
                parent_row[r] = tree->parents[i] < 0 ? 0 : row_of_node[tree->parents[i]];
            }
            built_limit = limit;
        }
        propose(heads, tree, medusa_out->hidden, size, m.work, m.top);
        tokens[0] = root;
        for (int64_t j = 1; j < active; ++j) {
            const int64_t i = row_node[j];
            tokens[j] = m.top[(node_depth[i] - 1) * tree->top_k + tree->ranks[i]];
        }
        const int64_t kept = verify_tree(s, layers, num_layers, embed, final_norm, lm_head, vocab, run, &m.verification,
                                         position, emitted, tokens, parent_row, active, path, out);
        const int64_t current = kept > 0 ? path[kept - 1] : 0;
        memcpy(medusa_out->hidden, m.verification.h + current * size, sizeof(float) * size);
        out->verified[round] = active - 1;
        out->accepted[round++] = kept;
        root = out->tokens[emitted + kept];
        position += kept + 1;
        emitted += kept + 1;
    }
    out->emitted = emitted, out->rounds = round;
}
