"""Several greedy decode steps in one native call.

A batch-1 decode step of a small model spends a sixth to a quarter of its time in Python: scheduling,
packing the step's rows, the sampling metadata and the update (SmolLM2-135M at Q8_0: about 1 ms of a
5-7 ms step; the embedded model: 0.6 of 2). When every sequence of a step is a plain greedy decode, the
next tokens depend on nothing Python decides between steps, so the model's native greedy chain
(`DecoderForCausalLM.greedy_chain`, models/kernels/decoder.c) runs up to `decode_steps` of them in one
call: each step the stack over one token per sequence, the output head and the argmax, with the
sequence's stop tokens banned while it is below min_tokens. Every token attends as a decode row, as in
the per-step path, and each row's result is independent of the others, so the tokens are the per-step
path's bit for bit. The update phase then appends them one step at a time, so stop strings, EOS,
max_tokens and the model's context end a sequence exactly where the per-step path would; what the call
computed past that end is dropped with the sequence's blocks.

Eligible: the engine does not speculate; every scheduled entry is one decoding token past the prompt
(no prompt chunk, draft, tree or lookahead) of a request that samples greedily, without penalties,
logprobs, prompt logprobs, a grammar or beam search. A step is capped by the fewest tokens any of its
sequences may still generate, and by the free blocks (it never preempts to run ahead). Streams then
receive their tokens a few at a time, as with vLLM's multi-step scheduling.
"""

from __future__ import annotations

from decoding.kv_cache_manager import KVCacheManager
from decoding.step_plan import ScheduledSeq, SchedulerOutput


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
        return (item.num_new_tokens == 1 and item.reaches_end and item.tree is None and not item.draft_token_ids
                and not item.num_lookahead and item.start >= seq.request.prompt_len and seq.grammar is None
                and seq.request.beam is None and params.is_greedy and params.logprobs is None
                and not params.has_penalties)

    def run(self, sched: SchedulerOutput, steps: int) -> list[list[int]]:
        """Reserve every sequence's slots for `steps` tokens (steps_for checked they fit) and run the chain,
        after the step's copies-on-write: tokens [steps][entries], in the entries' order."""
        seqs = [item.seq for item in sched.scheduled]
        for seq in seqs:
            # Past the block the scheduler made the sequence's own, its blocks are new: nothing to copy.
            assert not self.kv.reserve(seq, steps)
        stop_tokens = [seq.request.banned_before_min_tokens(self.eos_token_ids, self.model.vocab_size) for seq in seqs]
        banned_steps = [max(0, seq.request.params.min_tokens - seq.num_output_tokens) for seq in seqs]
        chosen = self.model.greedy_chain([[seq.token_ids[-1]] for seq in seqs], [seq.num_computed for seq in seqs],
                                         [seq.block_table for seq in seqs], self.kv.cache, stop_tokens, banned_steps,
                                         steps)
        self.num_calls += 1
        self.num_chained_steps += steps
        return chosen.tolist()
