/* EAGLE's speculating steps for one sequence, several in one native call.
 *
 * A speculating step with an EAGLE draft runs the draft's layer once per tree level, each time packed,
 * scored and ranked in Python (decoding/speculative/eagle.py), and then the target's verification; over
 * Q8_0 weights, where a target step takes about 5 ms, that Python costs as much as the tree wins. Here each
 * round does in C what the engine's step does for a greedy sequence, or a sampled one under exact
 * acceptance:
 *
 * 1. Catch-up: the tokens the draft's cache lacks (after a round: the kept path and the bonus token) run
 *    through the draft with their true features, the target's final hidden state before each: row q reads
 *    fc([embed(x_q); f_{q-1}]) and the draft's one layer attends over its own paged cache (decoder.c, no
 *    final norm: the layer's output estimates the target's feature). The last row's output g scores the
 *    first level.
 * 2. Growth (EAGLE-2): a scored row's logits over the draft vocabulary (the output head's rows of it) give
 *    its top_k tokens as candidates, each scoring its parent's score plus its log-probability; the `width`
 *    best candidates of a level that could still be kept (fewer than `nodes` candidates score at least as
 *    high) get a draft row each, which reads the candidate's token and its parent row's output and attends
 *    over the cache and its own ancestors (stored past the cache, at the tree's indices), one draft call per
 *    level. A sampled request's level has one scored row, whose first candidate is the token its rule draws
 *    from the draft's distribution with the uniform of that position (the target's rows draw with the same
 *    uniforms: tree_verify.c), and that candidate is the one expanded. The `nodes` best candidates, no
 *    child without its parent, are the round's tree, ordered by depth then by when they were found; near
 *    the request's end the deeper ones are trimmed as Proposal.trimmed trims them.
 * 3. The target verifies the tree (tree_verify.c): the kept path and the bonus token are emitted, and the
 *    target's final hidden states of the rows before each of them are the features the next catch-up reads.
 *    The draft's tree rows are forgotten (the next catch-up overwrites them).
 *
 * This is EagleProposer's tree, candidate for candidate (its ranking, drawing, expansion and selection
 * rules, the same kernels for the draft's products and layer); the tokens are plain decoding's bit for bit
 * whatever the draft proposes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "decoder.h"

/* The draft as models/eagle.py's EagleDraft holds it, and its tree (EagleTree; depth capped as the proposer
 * caps it, nodes the most a round keeps). */
typedef struct {
    DecoderShape shape;                /* the target's sizes, the block size of the draft's own cache */
    const DecoderLayer *layer;         /* its one layer, over its own cache */
    const LinearWeights *fc;           /* [2 * hidden] -> [hidden] */
    const float *fc_bias;              /* [hidden] */
    const LinearWeights *projection;   /* [hidden] -> [vocab]: the output head's rows of the draft vocabulary */
    const int64_t *token_ids;          /* [vocab]: each row's token id */
    int64_t vocab, nodes, depth, top_k, width;
} EagleNativeDraft;

/* The sequence (decoder.h) and the draft's cache of it: its block table, the rows it holds (row i is the
 * sequence's token start + i, at draft position i), the rotary tables the draft reads, and the tokens it
 * lacks (the sequence's newest ones, run->token last) with the target's feature before each. */
typedef struct {
    SpeculatingRun run;
    const int64_t *draft_table;
    int64_t draft_max_blocks, draft_computed;
    const float *draft_cos, *draft_sin;
    const int64_t *pending_tokens;
    const float *pending_features;     /* [num_pending, hidden] */
    int64_t num_pending;
} EagleRun;

/* What a call did (decoder.h), and what the draft's cache lacks after it: the features [num_pending,
 * hidden] before the last num_pending emitted tokens; the rows it holds. */
typedef struct {
    SpeculatingOutcome rounds;
    float *features;
    int64_t num_pending, draft_computed;
} EagleOutcome;

typedef struct {
    int64_t token, depth, parent, row;   /* row: its draft row among the round's tree rows, -1 for none */
    double score;                        /* cumulative draft log-probability */
} Candidate;

/* The call's scratch: the target's verification, the draft's rows (catch-up or one level of the tree), the
 * outputs of every tree row, the candidates and the round's tree. */
typedef struct {
    TreeVerification verification;
    int64_t *slots, *context, *counts, *extra, *tables;
    float *input, *x, *cos, *sin, *root_output, *tree_output, *logits, *logprobs, *inverse_temperature, *stack;
    int64_t *best, *order, *kept_of, *tokens, *parents, *path, *banned_columns;
    Candidate *candidates;
    int64_t rows, tree_rows, max_candidates, num_banned;
} EagleScratch;

static void eagle_layout(EagleScratch *e, Arena *arena, const DecoderShape *target, const EagleNativeDraft *draft,
                         int64_t vocab, const EagleRun *run) {
    const DecoderShape *s = &draft->shape;
    const int64_t hidden = s->hidden, d = s->head_dim, depth = draft->depth;
    const int64_t rows = run->num_pending > depth + 1 ? (run->num_pending > draft->width ? run->num_pending : draft->width)
                                                      : (depth + 1 > draft->width ? depth + 1 : draft->width);
    e->rows = rows;
    e->tree_rows = (depth - 1) * draft->width + 1;
    e->max_candidates = draft->top_k * e->tree_rows;
    tree_verification_layout(&e->verification, arena, target, draft->nodes + 1, depth, vocab, &run->run);
    e->slots = arena_take(arena, sizeof(int64_t) * rows);
    e->context = arena_take(arena, sizeof(int64_t) * rows);
    e->counts = arena_take(arena, sizeof(int64_t) * rows);
    e->extra = arena_take(arena, sizeof(int64_t) * rows * depth);
    e->tables = arena_take(arena, sizeof(int64_t) * rows * run->draft_max_blocks);
    e->input = arena_take(arena, sizeof(float) * rows * 2 * hidden);
    e->x = arena_take(arena, sizeof(float) * rows * hidden);
    e->cos = arena_take(arena, sizeof(float) * rows * d);
    e->sin = arena_take(arena, sizeof(float) * rows * d);
    e->root_output = arena_take(arena, sizeof(float) * hidden);
    e->tree_output = arena_take(arena, sizeof(float) * e->tree_rows * hidden);
    e->logits = arena_take(arena, sizeof(float) * draft->width * draft->vocab);
    e->logprobs = arena_take(arena, sizeof(float) * draft->width * draft->vocab);
    e->inverse_temperature = arena_take(arena, sizeof(float) * draft->width);
    e->stack = arena_take(arena, sizeof(float) * decoder_scratch_floats(s, rows));
    e->best = arena_take(arena, sizeof(int64_t) * draft->top_k);
    e->order = arena_take(arena, sizeof(int64_t) * e->max_candidates);
    e->kept_of = arena_take(arena, sizeof(int64_t) * e->max_candidates);
    e->tokens = arena_take(arena, sizeof(int64_t) * (draft->nodes + 1));
    e->parents = arena_take(arena, sizeof(int64_t) * (draft->nodes + 1));
    e->path = arena_take(arena, sizeof(int64_t) * (draft->nodes + 1));
    e->candidates = arena_take(arena, sizeof(Candidate) * e->max_candidates);
    e->banned_columns = arena_take(arena, sizeof(int64_t) * (run->run.num_banned + 1));
    if (arena->base == NULL) return;
    for (int64_t j = 0; j < rows; ++j)
        memcpy(e->tables + j * run->draft_max_blocks, run->draft_table, sizeof(int64_t) * run->draft_max_blocks);
    /* The stop tokens' columns among the draft vocabulary (sorted by id), where it holds them. */
    e->num_banned = 0;
    for (int64_t b = 0; b < run->run.num_banned; ++b) {
        int64_t low = 0, high = draft->vocab;
        while (low < high) {
            const int64_t middle = (low + high) / 2;
            if (draft->token_ids[middle] < run->run.banned[b]) low = middle + 1; else high = middle;
        }
        if (low < draft->vocab && draft->token_ids[low] == run->run.banned[b]) e->banned_columns[e->num_banned++] = low;
    }
}

/* Floats of scratch decoder_eagle_chain needs. */
int64_t decoder_eagle_chain_scratch_floats(const DecoderShape *s, const EagleNativeDraft *draft, int64_t vocab,
                                           const EagleRun *run) {
    Arena arena = {NULL, 0};
    EagleScratch e;
    eagle_layout(&e, &arena, s, draft, vocab, run);
    return arena_floats(&arena);
}

static inline int64_t draft_slot(const EagleRun *run, int64_t block_size, int64_t index) {
    return run->draft_table[index / block_size] * block_size + index % block_size;
}

/* The draft over `count` rows: row j reads tokens[j]'s embedding and features[j], sits at positions[j] and
 * index first + j of the draft's cache, sees the cache's first `context` rows (catch-up: its own row and
 * those before it) and, for a tree row, the indices in extra. out: every row's output, or the last one's. */
static void draft_rows(const EagleNativeDraft *draft, const EagleRun *run, EagleScratch *e, const float *embed,
                       const int64_t *tokens, const float *const *features, int64_t count, int64_t first,
                       const int64_t *positions, int last_only, float *out) {
    const DecoderShape *s = &draft->shape;
    const int64_t hidden = s->hidden, d = s->head_dim;
    for (int64_t j = 0; j < count; ++j) {
        memcpy(e->input + j * 2 * hidden, embed + tokens[j] * hidden, sizeof(float) * hidden);
        memcpy(e->input + j * 2 * hidden + hidden, features[j], sizeof(float) * hidden);
        memcpy(e->cos + j * d, run->draft_cos + positions[j] * d, sizeof(float) * d);
        memcpy(e->sin + j * d, run->draft_sin + positions[j] * d, sizeof(float) * d);
        e->slots[j] = draft_slot(run, s->block_size, first + j);
    }
    linear_product(e->input, count, 2 * hidden, 2 * hidden, draft->fc, hidden, draft->fc_bias, NULL, e->x);
    const DecodeRows rows = {e->slots, e->tables, e->context, e->extra, e->counts, run->draft_max_blocks, draft->depth};
    const int64_t last = count - 1;
    decoder_forward(s, draft->layer, 1, &rows, e->cos, e->sin, e->x, count, last_only ? &last : NULL, last_only ? 1 : -1,
                    NULL, e->stack, out);
}

/* Whether the request draws (its rows sampled with the uniforms, not greedy). */
static inline int draws(const SpeculatingRun *run) { return run->uniforms != NULL && !run->greedy; }

/* Score `count` draft outputs at `depth` (the tokens at the call's output index emitted + depth - 1): each
 * one's top_k tokens become candidates under parents[j], scored by their log-probability under the draft. A
 * sampled request's one row instead first takes the token its rule draws from the draft's distribution with
 * that position's uniform (exact acceptance couples it with the target's draw there: EagleProposer._choose),
 * with the stop tokens banned below min_tokens, then the distribution's next best; *drawn: its candidate. */
static int64_t score_rows(const EagleNativeDraft *draft, const SpeculatingRun *run, EagleScratch *e,
                          const float *outputs, int64_t count, const int64_t *parents, int64_t depth, int64_t emitted,
                          int64_t num_candidates, int64_t *drawn) {
    const int64_t vocab = draft->vocab;
    const int sampled = draws(run);
    const float scale = sampled ? 1.0f / run->temperature : 1.0f;
    linear_product(outputs, count, draft->shape.hidden, draft->shape.hidden, draft->projection, vocab, NULL, NULL,
                   e->logits);
    for (int64_t j = 0; j < count; ++j) {
        if (sampled && emitted + depth - 1 < run->banned_tokens)
            for (int64_t b = 0; b < e->num_banned; ++b) e->logits[j * vocab + e->banned_columns[b]] = -INFINITY;
        e->inverse_temperature[j] = scale;
    }
    /* Each candidate's log-probability as the sampler reports a drawn token's (sampling.c). */
    log_softmax_rows(e->logits, count, vocab, e->inverse_temperature, e->logprobs);
    for (int64_t j = 0; j < count; ++j) {
        const float *row = e->logits + j * vocab, *logprobs = e->logprobs + j * vocab;
        top_columns(row, vocab, draft->top_k, e->best);
        const double base = parents[j] < 0 ? 0.0 : e->candidates[parents[j]].score;
        int64_t column = -1, taken = 0;
        if (sampled) {
            float logprob, raw_logprob;
            sample_one_row(row, vocab, run->temperature, run->uniforms[emitted + depth - 1], 0, 0, &column, &logprob,
                           &raw_logprob);
            *drawn = num_candidates;
        }
        for (int64_t k = -1; k < draft->top_k && taken < draft->top_k; ++k) {
            if (k < 0 ? column < 0 : e->best[k] == column) continue;
            const int64_t at = k < 0 ? column : e->best[k];
            Candidate *c = &e->candidates[num_candidates++];
            c->token = draft->token_ids[at], c->depth = depth, c->parent = parents[j], c->row = -1;
            c->score = base + (double)logprobs[at];
            ++taken;
        }
    }
    return num_candidates;
}

/* Whether candidate a ranks before b: higher score, then shallower, then found first. */
static inline int ranks_before(const Candidate *candidates, int64_t a, int64_t b) {
    if (candidates[a].score != candidates[b].score) return candidates[a].score > candidates[b].score;
    if (candidates[a].depth != candidates[b].depth) return candidates[a].depth < candidates[b].depth;
    return a < b;
}

/* Candidates [from, to) in rank order into order[]. */
static void rank(const Candidate *candidates, int64_t from, int64_t to, int64_t *order) {
    for (int64_t i = from; i < to; ++i) {
        int64_t at = i - from;
        while (at > 0 && ranks_before(candidates, i, order[at - 1])) order[at] = order[at - 1], --at;
        order[at] = i;
    }
}

/* Grow one round's tree from the draft output `root` (the catch-up's last row, at cache row `base` - 1)
 * after `emitted` tokens of the call; -> the number of candidates. */
static int64_t grow(const EagleNativeDraft *draft, const EagleRun *run, EagleScratch *e, const float *embed,
                    int64_t base, int64_t emitted) {
    int64_t frontier[draft->width > 0 ? draft->width : 1], positions[draft->width > 0 ? draft->width : 1];
    int64_t tokens[draft->width > 0 ? draft->width : 1];
    const float *features[draft->width > 0 ? draft->width : 1];
    int64_t count = 0, rows = 0, level_start = 0, frontier_size = 1;
    const float *frontier_outputs = e->root_output;
    frontier[0] = -1;
    for (int64_t depth = 1; depth <= draft->depth; ++depth) {
        level_start = count;
        int64_t drawn = -1;
        count = score_rows(draft, &run->run, e, frontier_outputs, frontier_size, frontier, depth, emitted, count, &drawn);
        if (depth == draft->depth) break;
        /* The level's `width` best (a sampled request: its draw) that could still be kept: fewer than `nodes`
         * candidates score as high. */
        int64_t expand = 0, choices = draws(&run->run) ? 1 : (count - level_start < draft->width ? count - level_start
                                                                                                 : draft->width);
        if (draws(&run->run))
            e->order[0] = drawn;
        else
            rank(e->candidates, level_start, count, e->order);
        for (int64_t i = 0; i < choices; ++i) {
            const int64_t c = e->order[i];
            int64_t as_high = 0;
            for (int64_t o = 0; o < count; ++o) as_high += e->candidates[o].score >= e->candidates[c].score;
            if (as_high < draft->nodes) frontier[expand++] = c;
        }
        if (expand == 0) break;
        for (int64_t j = 0; j < expand; ++j) {
            Candidate *c = &e->candidates[frontier[j]];
            c->row = rows + j;
            tokens[j] = c->token;
            features[j] = c->parent < 0 ? e->root_output : e->tree_output + e->candidates[c->parent].row * draft->shape.hidden;
            positions[j] = base + depth - 1;
            e->context[j] = base;
            e->counts[j] = depth;   /* its ancestors among the tree rows, and itself */
            int64_t a = depth - 1;
            for (int64_t at = frontier[j]; at >= 0; at = e->candidates[at].parent, --a)
                e->extra[j * draft->depth + a] = base + e->candidates[at].row;
        }
        float *outputs = e->tree_output + rows * draft->shape.hidden;
        draft_rows(draft, run, e, embed, tokens, features, expand, base + rows, positions, 0, outputs);
        rows += expand;
        frontier_size = expand;
        frontier_outputs = outputs;
    }
    return count;
}

/* The round's tree from `count` candidates: the `nodes` best with their parents kept, none deeper than
 * `limit`, ordered by depth then by index, as EagleProposer._proposal and Proposal.trimmed choose it; rows
 * for verify_tree (row 0 the newest token). -> the rows. */
static int64_t select_tree(const EagleNativeDraft *draft, EagleScratch *e, int64_t count, int64_t root,
                           int64_t limit) {
    Candidate *candidates = e->candidates;
    rank(candidates, 0, count, e->order);
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i) e->kept_of[i] = -1;
    for (int64_t i = 0; i < count && kept < draft->nodes; ++i) {
        const int64_t c = e->order[i];
        if (candidates[c].parent < 0 || e->kept_of[candidates[c].parent] >= 0) e->kept_of[c] = kept++;
    }
    int64_t rows = 1;
    e->tokens[0] = root, e->parents[0] = -1;
    for (int64_t depth = 1; depth <= limit && depth <= draft->depth; ++depth)
        for (int64_t c = 0; c < count; ++c) {
            if (e->kept_of[c] < 0 || candidates[c].depth != depth) continue;
            e->kept_of[c] = -2 - rows;   /* now: its row, encoded */
            e->tokens[rows] = candidates[c].token;
            e->parents[rows++] = candidates[c].parent < 0 ? 0 : -2 - e->kept_of[candidates[c].parent];
        }
    return rows;
}

void decoder_eagle_chain(const DecoderShape *s, const DecoderLayer *layers, int64_t num_layers, const float *embed,
                         const float *final_norm, const LinearWeights *lm_head, int64_t vocab,
                         const EagleNativeDraft *draft, const EagleRun *eagle, float *scratch, EagleOutcome *eagle_out) {
    const SpeculatingRun *run = &eagle->run;
    SpeculatingOutcome *out = &eagle_out->rounds;
    const int64_t hidden = s->hidden;
    Arena arena = {(char *)scratch, 0};
    EagleScratch e;
    eagle_layout(&e, &arena, s, draft, vocab, eagle);
    const float *features[e.rows];
    int64_t positions[e.rows];
    int64_t position = run->position, emitted = 0, round = 0, computed = eagle->draft_computed, kept = 0;
    const int64_t *pending = eagle->pending_tokens;
    int64_t num_pending = eagle->num_pending;
    for (int64_t j = 0; j < num_pending; ++j) features[j] = eagle->pending_features + j * hidden;
    eagle_out->num_pending = -1;
    while (round < run->max_rounds && emitted < run->max_tokens) {
        const int64_t limit = run->depth_room - emitted;
        if (limit <= 0) break;
        /* Catch-up: each pending row attends over the cache and itself. */
        for (int64_t j = 0; j < num_pending; ++j) {
            positions[j] = computed + j;
            e.context[j] = computed + j + 1;
            e.counts[j] = 0;
        }
        draft_rows(draft, eagle, &e, embed, pending, features, num_pending, computed, positions, 1, e.root_output);
        computed += num_pending;
        const int64_t count = grow(draft, eagle, &e, embed, computed, emitted);
        const int64_t rows = select_tree(draft, &e, count, pending[num_pending - 1], limit);
        kept = verify_tree(s, layers, num_layers, embed, final_norm, lm_head, vocab, run, &e.verification, position,
                           emitted, e.tokens, e.parents, rows, e.path, out);
        /* The features before the kept tokens and the bonus token: the rows that chose them. */
        for (int64_t k = 0; k <= kept; ++k) {
            const int64_t chooser = k == 0 ? 0 : e.path[k - 1];
            memcpy(eagle_out->features + k * hidden, e.verification.h + chooser * hidden, sizeof(float) * hidden);
            features[k] = eagle_out->features + k * hidden;
        }
        pending = out->tokens + emitted;
        num_pending = kept + 1;
        out->verified[round] = rows - 1;
        out->accepted[round++] = kept;
        position += kept + 1;
        emitted += kept + 1;
    }
    if (round > 0) eagle_out->num_pending = num_pending;
    out->emitted = emitted, out->rounds = round;
    eagle_out->draft_computed = computed;
}
