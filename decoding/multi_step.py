"""Several decode steps in one native call.

A batch-1 decode step of a small model spends a sixth to a quarter of its time in Python: scheduling,
packing the step's rows, the sampling metadata and the update (SmolLM2-135M at Q8_0: about 1 ms of a
5-7 ms step; the embedded model: 0.6 of 2). When every sequence of a step decodes without anything that
Python decides per token (a grammar, penalties, top-N logprobs, truncation of a sampled distribution),
the model's native chain (`DecoderForCausalLM.greedy_chain`, models/kernels/decoder.c) runs up to
`decode_steps` steps in one call: each step the stack over one token per sequence, the output head, and
the argmax or the native sampler's draw (`sample_rows`' rule, with the uniform of the position drawn
for: a function of the seed and the position alone), with the sequence's stop tokens banned while it is
below min_tokens. Every token attends as a decode row, as in the per-step path, and each row's result is
independent of the others, so tokens and logprobs are the per-step path's bit for bit. The update phase
then appends them one step at a time, so stop strings, EOS, max_tokens and the model's context end a
sequence exactly where the per-step path would; what the call computed past that end is dropped with the
sequence's blocks.

Eligible: a step that does not speculate (an engine without speculation, or a step a speculating engine's
governor keeps plain: a proposer that reads hidden states gets every step's through `observe`, and a draft
model or prompt lookup reads the new tokens); every scheduled entry is one decoding token past the prompt
(no prompt chunk, draft, tree or lookahead) of a request without penalties, prompt logprobs, a grammar,
beam search or top-N alternatives (`logprobs` None or 0), and, unless it is greedy without logprobs,
without top-k / top-p / min-p and without raw logprobs or kept supports while min_tokens bans its stop
tokens (the rows the per-step path draws natively). A step is capped by the fewest tokens any of its
sequences may still generate, and by the free blocks (it never preempts to run ahead). Streams then
receive their tokens a few at a time, as with vLLM's multi-step scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.kv_cache_manager import KVCacheManager
from decoding.sampler import draws_natively, whole_vocabulary_logprob
from decoding.sequence import Sequence, TokenLogprob
from decoding.step_plan import ScheduledSeq, SchedulerOutput
from models import kernels


@dataclass
class ChainedSteps:
    """What one call gave, [steps][entries] in the scheduled entries' order: each step's tokens, their logprobs
    (None where not asked for), and when asked every step's final hidden states [steps, entries, hidden]."""

    tokens: list[list[int]]
    logprobs: list[list[TokenLogprob | None]]
    hidden: torch.Tensor | None = None


class MultiStepDecode:
    def __init__(self, model, kv: KVCacheManager, max_steps: int, eos_token_ids: frozenset[int], max_model_len: int):
        self.model = model
        self.kv = kv
        self.max_steps = max_steps
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.available = max_steps > 1 and bool(getattr(model, "greedy_chain_available", lambda: False)())
        self.num_calls = 0            # steps that ran as one native call, and the decode steps they held
        self.num_chained_steps = 0

    def steps_for(self, sched: SchedulerOutput) -> int:
        """How many decode steps this step's entries can take in one call; 1: run it the usual way."""
        if not self.available or not sched.scheduled or sched.chunk_logits_for:
            return 1
        steps = self.max_steps
        for item in sched.scheduled:
            if not self._eligible(item):
                return 1
            seq = item.seq
            steps = min(steps, seq.request.params.max_tokens - seq.num_output_tokens,
                        self.max_model_len - len(seq.token_ids))
            if steps < 2:
                return 1
        seqs = [item.seq for item in sched.scheduled]
        # The scheduler reserved each sequence's next slot; running ahead needs steps - 1 more, and never
        # preempts anyone for them.
        while steps > 1 and sum(self.kv.blocks_needed(seq, steps) for seq in seqs) > self.kv.num_free_blocks:
            steps //= 2
        return steps

    @staticmethod
    def _eligible(item: ScheduledSeq) -> bool:
        seq, params = item.seq, item.seq.request.params
        if not (item.num_new_tokens == 1 and item.reaches_end and item.tree is None and not item.draft_token_ids
                and not item.num_lookahead and item.start >= seq.request.prompt_len and seq.grammar is None
                and seq.request.beam is None and not params.has_penalties and params.logprobs in (None, 0)):
            return False
        # A greedy row without logprobs is the argmax whatever truncates it; others as the per-step sampler
        # draws them natively, with min_tokens' bans in place.
        return (params.is_greedy and params.logprobs is None) or draws_natively(
            params, limited=seq.num_output_tokens < params.min_tokens)

    def run(self, sched: SchedulerOutput, steps: int, want_hidden: bool = False) -> ChainedSteps:
        """Reserve every sequence's slots for `steps` tokens (steps_for checked they fit) and run the chain,
        after the step's copies-on-write."""
        seqs = [item.seq for item in sched.scheduled]
        # Past the block the scheduler made each sequence's own, its blocks are new: nothing to copy.
        copies = [copy for seq in seqs for copy in self.kv.reserve(seq, steps)]
        assert not copies, copies
        stop_tokens = [seq.request.banned_before_min_tokens(self.eos_token_ids, self.model.vocab_size) for seq in seqs]
        banned_steps = [max(0, seq.request.params.min_tokens - seq.num_output_tokens) for seq in seqs]
        argmax = all(seq.request.params.is_greedy and seq.request.params.logprobs is None for seq in seqs)
        draws = None if argmax else chain_draws(seqs, steps)
        hidden = torch.empty(steps, len(seqs), self.model.spec.hidden_size) if want_hidden else None
        chosen = self.model.greedy_chain([[seq.token_ids[-1]] for seq in seqs], [seq.num_computed for seq in seqs],
                                         [seq.block_table for seq in seqs], self.kv.cache, stop_tokens, banned_steps,
                                         steps, draws, hidden)
        self.num_calls += 1
        self.num_chained_steps += steps
        return ChainedSteps(chosen.tolist(), self._logprobs(seqs, draws, steps), hidden)

    @staticmethod
    def _logprobs(seqs: list[Sequence], draws: kernels.ChainDraws | None, steps: int) -> list[list[TokenLogprob | None]]:
        params = [seq.request.params for seq in seqs]
        if draws is None or all(p.logprobs is None for p in params):
            return [[None] * len(seqs)] * steps
        chosen = torch.where(draws.want_raw.bool(), draws.raw_logprobs, draws.logprobs).tolist()
        return [[None if p.logprobs is None else whole_vocabulary_logprob(lp, p) for p, lp in zip(params, row)]
                for row in chosen]


def chain_draws(seqs: list[Sequence], steps: int) -> kernels.ChainDraws:
    """How a native chain draws the next `steps` tokens of each sequence instead of taking the argmax: per
    row its temperature, whether greedy and whether it wants raw logprobs, and per step and row the uniform
    of that position (a function of the seed and the position alone: what single steps draw with)."""
    params = [seq.request.params for seq in seqs]
    uniforms = [[0.0 if p.is_greedy else seq.uniform(step) for seq, p in zip(seqs, params)] for step in range(steps)]
    return kernels.ChainDraws(
        temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
        greedy=torch.tensor([p.is_greedy for p in params], dtype=torch.uint8),
        want_raw=torch.tensor([p.logprobs_mode == "raw" for p in params], dtype=torch.uint8),
        uniforms=torch.tensor(uniforms, dtype=torch.float32),
        logprobs=torch.empty(steps, len(seqs)), raw_logprobs=torch.empty(steps, len(seqs)))
