"""Medusa's speculating steps for one greedy sequence, several in one native call.

A speculating step of a small model spends about as long in Python as in its kernels: the heads'
proposal, packing the tree's rows, verification, the cache's compaction and the update (the embedded
model: about 1.1 ms of a 2.9 ms step, against 1.4 ms for the stack over the tree's rows). When a step's
only entry is a greedy decode that Medusa may speculate for, nothing of that needs Python per step, so
the model's native Medusa chain (`DecoderForCausalLM.medusa_chain`, models/kernels/medusa_chain.c) runs up
to `decode_steps` rounds of propose -> verify the tree -> keep the path -> compact in one call, as the
plain chain (decoding/multi_step.py) runs plain steps. The rows are verified as the per-step path verifies
them (the same kernels over the same decode rows), so the tokens are plain greedy's bit for bit; stop
strings, EOS and max_tokens then end the sequence exactly where single steps would (the update appends the
tokens one by one), and what the call computed past that end is dropped with the sequence's blocks.

A sampled request under exact acceptance (the default) draws each verified row as the plain chain does
(`sample_rows`' rule with the uniform of the position the row chooses for), and keeps the path of the
target's own draws: plain sampling's tokens and logprobs.

Eligible: the governor lets the step speculate (the scheduler reserved its lookahead), the step holds one
entry, one decoding token past the prompt, of a request without penalties, a grammar, beam search or
top-N alternatives, greedy without logprobs or drawn natively (`sampler.draws_natively`, as the plain
chain asks) under exact acceptance, and the proposer holds the hidden state the newest token came from. The call is
capped by the tokens the request may still generate, the model's context and the free blocks (it never
preempts to run ahead).
"""

from __future__ import annotations

from models import kernels
from decoding.kv_cache_manager import KVCacheManager
from decoding.multi_step import chain_draws
from decoding.sampler import draws_natively, whole_vocabulary_logprob
from decoding.sequence import Sequence, TokenLogprob
from decoding.speculative.decoder import SpeculativeDecoding
from decoding.speculative.medusa import MedusaProposer
from decoding.step_plan import ScheduledSeq, SchedulerOutput


class MedusaChainDecode:
    def __init__(self, model, kv: KVCacheManager, speculation: SpeculativeDecoding | None, max_rounds: int,
                 eos_token_ids: frozenset[int], max_model_len: int):
        self.model = model
        self.kv = kv
        self.speculation = speculation
        self.max_rounds = max_rounds
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.num_calls = 0            # calls run, and the speculating rounds they held
        self.num_rounds = 0
        proposer = speculation.proposer if speculation else None
        self.proposer = proposer if isinstance(proposer, MedusaProposer) and proposer.native_heads is not None else None
        self.available = (self.proposer is not None and max_rounds > 1
                          and bool(getattr(model, "greedy_chain_available", lambda: False)()))
        if self.available:
            self._nodes = len(self.proposer.choices)

    def tokens_for(self, sched: SchedulerOutput) -> int:
        """How many tokens this step's one entry may emit in one call; 0: run the step the usual way."""
        if not self.available or len(sched.scheduled) != 1 or sched.chunk_logits_for:
            return 0
        item = sched.scheduled[0]
        if not self._eligible(item):
            return 0
        seq, params = item.seq, item.seq.request.params
        # Rounds start while fewer than `tokens` are emitted; each emits one to depth + 1 tokens (no more
        # than may still come: the chain trims the tree as single steps do), and its rows reach `nodes` past
        # its first position.
        tokens = min(params.max_tokens - seq.num_output_tokens, self.max_model_len - len(seq.token_ids),
                     self.max_rounds * (self.proposer.depth + 1))
        if self.speculation.max_depth(seq) < 1:
            return 0
        if self.kv.blocks_needed(seq, tokens + self._nodes) > self.kv.num_free_blocks:
            return 0
        return tokens

    def _eligible(self, item: ScheduledSeq) -> bool:
        seq, params = item.seq, item.seq.request.params
        if not (item.num_lookahead > 0 and item.num_new_tokens == 1 and item.reaches_end and item.tree is None
                and not item.draft_token_ids and item.start >= seq.request.prompt_len
                and seq.num_computed == len(seq.token_ids) - 1 and seq.grammar is None and seq.request.beam is None
                and not params.has_penalties and params.logprobs in (None, 0)
                and self.proposer.hidden_of(seq) is not None):
            return False
        return (params.is_greedy and params.logprobs is None) or (
            self.speculation.acceptance.exact and self.speculation.acceptance.typical is None
            and draws_natively(params, limited=seq.num_output_tokens < params.min_tokens))

    def run(self, sched: SchedulerOutput, tokens: int) -> kernels.MedusaChained:
        """Reserve the slots (tokens_for checked they fit) and run the chain; the sequence's cache then holds
        every emitted token but the last, as after a verified step."""
        seq = sched.scheduled[0].seq
        copies = self.kv.reserve(seq, tokens + self._nodes)
        assert not copies, copies   # past the block the scheduler made the sequence's own, its blocks are new
        proposer, params = self.proposer, seq.request.params
        heads = proposer.native_heads.chain_heads(list(proposer.parents), [path[-1] for path in proposer.choices],
                                                  proposer.depth, proposer.heads.draft_vocab)
        banned = max(0, params.min_tokens - seq.num_output_tokens)
        stop_tokens = seq.request.banned_before_min_tokens(self.eos_token_ids, self.model.vocab_size)
        draws = None if params.is_greedy and params.logprobs is None else chain_draws([seq], tokens + proposer.depth)
        chained = self.model.medusa_chain(heads, seq.token_ids[-1], seq.num_computed, seq.block_table,
                                          proposer.hidden_of(seq), self.kv.cache, stop_tokens, banned, tokens,
                                          self.max_rounds, self.speculation.max_depth(seq), draws)
        for verified, accepted in zip(chained.verified, chained.accepted):
            self.speculation.counters.record(verified, accepted)
        self.num_calls += 1
        self.num_rounds += len(chained.accepted)
        return chained

    @staticmethod
    def token_logprobs(seq: Sequence, chained: kernels.MedusaChained) -> list[TokenLogprob | None]:
        """The emitted tokens' logprobs where the request asked (as the plain chain reports them)."""
        params = seq.request.params
        if params.logprobs is None or chained.logprobs is None:
            return [None] * len(chained.tokens)
        chosen = chained.raw_logprobs if params.logprobs_mode == "raw" else chained.logprobs
        return [whole_vocabulary_logprob(logprob, params) for logprob in chosen]
