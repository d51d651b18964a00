/* A whole Llama-family decoder stack for a step whose every token attends as a decode row.
 *
 * In a decode step each kernel of a layer runs for tens of microseconds, and calling them one by one
 * from Python costs about as much again per call in argument checks, allocations and dispatch: some
 * seventy calls a step for an 8-layer model, a third of a batch-1 step. Here the same kernels run in
 * one call, in the same order, on the same buffers, so the results are those of the per-layer path
 * bit for bit.
 *
 * Per layer: x += o_proj(attention(rope(qk_norm(qkv(norm(x)))))); x += down(silu(gate) * up(norm(x))). At the
 * last layer only the `keep` rows go on past attention (the others only had to write their keys and
 * values). The result is the final norm of the kept rows (with final_norm NULL, the kept rows themselves).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "decoder.h"
#include "threads.h"

void rms_norm(const float *x, int64_t x_row_stride, const float *weight, float eps, float *out, int64_t rows,
              int64_t dim);
void rotary_write_kv(float *qkv, int64_t row_stride, const float *cos, const float *signed_sin, const int64_t *slots,
                     float *key_cache, float *value_cache, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                     int64_t head_dim);
void rms_norm_heads(float *x, int64_t row_stride, const float *weight, float eps, int64_t rows, int64_t heads,
                    int64_t dim);
void silu_mul(const float *gate_up, float *out, int64_t rows, int64_t dim);
void paged_decode_attention(const float *query, int64_t query_row_stride, const float *key_cache,
                            const float *value_cache, const int64_t *block_tables, int64_t max_blocks,
                            const int64_t *context_lens, const int64_t *extra_positions, int64_t max_extra,
                            const int64_t *extra_counts, float *out, int64_t batch, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t window, float scale,
                            float softcap, const float *sinks);

/* Floats of scratch decoder_forward needs for `tokens` rows. */
int64_t decoder_scratch_floats(const DecoderShape *s, int64_t tokens) {
    const int64_t q_width = s->num_heads * s->head_dim;
    const int64_t qkv_width = q_width + 2 * s->num_kv_heads * s->head_dim;
    return tokens * (s->hidden + qkv_width + q_width + 3 * s->intermediate + s->hidden + q_width);
}

/* x [tokens, hidden] (updated in place), cos/sin [tokens, head_dim]; keep [num_keep] rows of the last
 * layer's output, or num_keep -1 for all (0 for none: a step of prompt rows that only write their keys
 * and values); out [num_keep or tokens, hidden]. */
void decoder_forward(const DecoderShape *s, const DecoderLayer *layers, int64_t num_layers, const DecodeRows *rows,
                     const float *cos, const float *sin, float *x, int64_t tokens, const int64_t *keep,
                     int64_t num_keep, const float *final_norm, float *scratch, float *out) {
    const int64_t hidden = s->hidden, inter = s->intermediate, d = s->head_dim;
    const int64_t q_width = s->num_heads * d, qkv_width = q_width + 2 * s->num_kv_heads * d;
    float *normed = scratch;
    float *qkv = normed + tokens * hidden;
    float *attn = qkv + tokens * qkv_width;
    float *gate_up = attn + tokens * q_width;
    float *mlp = gate_up + tokens * 2 * inter;
    float *kept_x = mlp + tokens * inter;
    float *kept_attn = kept_x + tokens * hidden;
    for (int64_t i = 0; i < num_layers; ++i) {
        const DecoderLayer *l = &layers[i];
        rms_norm(x, hidden, l->input_norm, s->eps, normed, tokens, hidden);
        linear_product(normed, tokens, hidden, hidden, l->qkv, qkv_width, l->qkv_bias, NULL, qkv);
        if (l->q_norm != NULL) {
            rms_norm_heads(qkv, qkv_width, l->q_norm, s->eps, tokens, s->num_heads, d);
            rms_norm_heads(qkv + q_width, qkv_width, l->k_norm, s->eps, tokens, s->num_kv_heads, d);
        }
        rotary_write_kv(qkv, qkv_width, cos, sin, rows->slots, l->key_cache, l->value_cache, tokens, s->num_heads,
                        s->num_kv_heads, d);
        paged_decode_attention(qkv, qkv_width, l->key_cache, l->value_cache, rows->block_tables, rows->max_blocks,
                               rows->context_lens, rows->extra_positions, rows->max_extra, rows->extra_counts, attn,
                               tokens, s->num_heads, s->num_kv_heads, d, s->block_size, l->window, s->scale, 0.0f,
                               NULL);
        float *h = x, *a = attn;
        int64_t m = tokens;
        if (num_keep >= 0 && i == num_layers - 1) {
            for (int64_t r = 0; r < num_keep; ++r) {
                memcpy(kept_x + r * hidden, x + keep[r] * hidden, sizeof(float) * hidden);
                memcpy(kept_attn + r * q_width, attn + keep[r] * q_width, sizeof(float) * q_width);
            }
            h = kept_x, a = kept_attn, m = num_keep;
        }
        linear_product(a, m, q_width, q_width, l->o_proj, hidden, l->o_bias, h, h);   /* h += attn @ Wo */
        rms_norm(h, hidden, l->post_norm, s->eps, normed, m, hidden);
        linear_product(normed, m, hidden, hidden, l->gate_up, 2 * inter, l->gate_up_bias, NULL, gate_up);
        silu_mul(gate_up, mlp, m, inter);
        linear_product(mlp, m, inter, inter, l->down, hidden, l->down_bias, h, h);     /* h += mlp @ Wd */
        if (i == num_layers - 1) {
            if (final_norm != NULL)
                rms_norm(h, hidden, final_norm, s->eps, out, m, hidden);
            else   /* (an EAGLE draft's layer: its output is the residual stream itself) */
                memcpy(out, h, sizeof(float) * m * hidden);
        }
    }
}

void sample_one_row(const float *x, int64_t vocab, float temperature, float uniform, uint8_t greedy, uint8_t want_raw,
                    int64_t *token, float *logprob, float *raw_logprob);

/* How a chain draws each step's tokens when it does not take the argmax: per row its temperature, whether it
 * is greedy and whether it wants the raw logprob, and per step and row the uniform of the position drawn for;
 * out: the chosen tokens' logprobs under the sampled distribution and under temperature 1 (sample_rows'). */
typedef struct {
    const float *temperature;             /* [rows] */
    const uint8_t *greedy, *want_raw;     /* [rows] */
    const float *uniforms;                /* [steps, rows] */
    float *logprobs, *raw_logprobs;       /* [steps, rows] */
} ChainSampling;

/* The first step of a greedy chain: the tokens each row's draft cache lacks (its newest token at least: after
 * a verification, the bonus token and perhaps the last accepted draft), each a decode row of its own with its
 * slot, block table and context length; last[r] is row r's final one, whose logits draft its first token. */
typedef struct {
    const int64_t *tokens, *last;     /* [count], [rows] */
    DecodeRows rows;                  /* slots, block tables, context lens: [count] rows */
    const float *cos, *sin;           /* [count, head_dim] */
    int64_t count;
} ChainFeed;

/* A chain of `steps` tokens per row in one call, without a return to Python per token: a draft model's
 * greedy drafts (the catch-up the draft's cache lacks and every drafted token after it) and the engine's
 * chained decode steps (decoding/multi_step.py: one token fed per row). Step 0 runs the stack over the feed and
 * keeps each row's last token; each later step embeds every row's newest drafted token and runs the stack
 * over one token per row at the row's next position. Every step projects through the output head (packed,
 * as compute_logits does) and takes the argmax, the first index of the maximum as torch's argmax does,
 * after setting the row's banned tokens to -inf in its first banned_steps[row] steps (a request's stop
 * tokens below its min_tokens); with `sampling` (not NULL) each row draws instead as sample_rows does, from the
 * banned logits. Every token attends as a decode row, as the per-step path's short chains do, so the logits are
 * those of the per-step path bit for bit, and so are the tokens and logprobs. step_hidden (not NULL) [steps,
 * rows, hidden] receives every step's final hidden states (what Medusa's heads and an EAGLE draft read).
 *   feed          step 0's tokens and rows (above)
 *   rows_meta     slots [steps - 1, rows], block tables [rows, max_blocks], context_lens [rows] at step 1
 *   cos, sin      [steps - 1, rows, head_dim]
 *   banned        [rows, max_banned], -1 padded; banned_steps [rows]
 *   out           [steps, rows] the drafted tokens */
void decoder_greedy_chain(const DecoderShape *s, const DecoderLayer *layers, int64_t num_layers, const ChainFeed *feed,
                          const DecodeRows *rows_meta, const float *cos, const float *sin, const float *embed,
                          const float *final_norm, const LinearWeights *lm_head, int64_t vocab, int64_t rows, int64_t steps,
                          const int64_t *banned, int64_t max_banned, const int64_t *banned_steps,
                          const ChainSampling *sampling, float *step_hidden, float *scratch, int64_t *out) {
    const int64_t hidden = s->hidden, d = s->head_dim;
    const int64_t width = feed->count > rows ? feed->count : rows;
    int64_t *context = (int64_t *)scratch;           /* first: 8-byte aligned like the buffer */
    float *x = (float *)(context + rows);
    float *h = x + width * hidden;
    float *logits = h + rows * hidden;
    float *stack_scratch = logits + rows * vocab;
    for (int64_t r = 0; r < rows; ++r) context[r] = rows_meta->context_lens[r];
    for (int64_t step = 0; step < steps; ++step) {
        if (step == 0) {
            for (int64_t t = 0; t < feed->count; ++t)
                memcpy(x + t * hidden, embed + feed->tokens[t] * hidden, sizeof(float) * hidden);
            decoder_forward(s, layers, num_layers, &feed->rows, feed->cos, feed->sin, x, feed->count, feed->last, rows,
                            final_norm, stack_scratch, h);
        } else {
            const int64_t *current = out + (step - 1) * rows;
            for (int64_t r = 0; r < rows; ++r)
                memcpy(x + r * hidden, embed + current[r] * hidden, sizeof(float) * hidden);
            const DecodeRows step_rows = {rows_meta->slots + (step - 1) * rows, rows_meta->block_tables, context, NULL,
                                          NULL, rows_meta->max_blocks, 0};
            decoder_forward(s, layers, num_layers, &step_rows, cos + (step - 1) * rows * d,
                            sin + (step - 1) * rows * d, x, rows, NULL, -1, final_norm, stack_scratch, h);
            for (int64_t r = 0; r < rows; ++r) context[r] += 1;
        }
        if (step_hidden != NULL) memcpy(step_hidden + step * rows * hidden, h, sizeof(float) * rows * hidden);
        linear_product(h, rows, hidden, hidden, lm_head, vocab, NULL, NULL, logits);
        int64_t *chosen = out + step * rows;
        /* A draw passes over its row two or three times (sample_rows spreads rows over the threads likewise). */
#pragma omp parallel for num_threads(kernel_threads()) if (sampling != NULL && rows >= 4) schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            float *row = logits + r * vocab;
            if (step < banned_steps[r])
                for (int64_t b = 0; b < max_banned && banned[r * max_banned + b] >= 0; ++b)
                    row[banned[r * max_banned + b]] = -INFINITY;
            if (sampling != NULL) {
                const int64_t at = step * rows + r;
                sample_one_row(row, vocab, sampling->temperature[r], sampling->uniforms[at], sampling->greedy[r],
                               sampling->want_raw[r], chosen + r, sampling->logprobs + at, sampling->raw_logprobs + at);
                continue;
            }
            chosen[r] = first_argmax(row, vocab);
        }
    }
}

/* Floats of scratch decoder_greedy_chain needs. */
int64_t decoder_greedy_chain_scratch_floats(const DecoderShape *s, int64_t rows, int64_t feed, int64_t vocab) {
    const int64_t width = feed > rows ? feed : rows;
    return (width + rows) * s->hidden + rows * vocab + rows * (int64_t)(sizeof(int64_t) / sizeof(float)) +
           decoder_scratch_floats(s, width);
}
