"""Speculating rounds for one sequence, several in one native call.

A speculating step of a small model spends about as long in Python as in its kernels: the proposal, packing
the tree's rows, verification, the cache's compaction and the update (Medusa on the embedded model: about
1.1 ms of a 2.9 ms step; EAGLE over SmolLM2's Q8_0 weights runs its draft once per tree level besides).
When a step's only entry is a decode that the proposer may speculate for, nothing of that needs Python per
round, so the model's native chain runs up to `decode_steps` rounds of propose -> verify the tree -> keep
the path -> compact in one call, as the plain chain (decoding/multi_step.py) runs plain steps. The rows are
verified as the per-step path verifies them (the same kernels over the same decode rows,
models/kernels/tree_verify.c), so the tokens are plain decoding's bit for bit; stop strings, EOS and
max_tokens then end the sequence exactly where single steps would (the update appends the tokens one by
one), and what the call computed past that end is dropped with the sequence's blocks.

Each proposer's chain (medusa_chain.py, eagle_chain.py) says whether it holds what the first round proposes
from and how it calls the model; this class owns what they share (which requests a chain draws for, the
token cap, the sequence's side of the call, the counters).

Eligible: the governor lets the step speculate (the scheduler reserved its lookahead), the step holds one
entry, one decoding token past the prompt, of a request without penalties, a grammar, beam search or
top-N alternatives, that the proposer's chain draws for, and the proposer holds what its first round reads.
The call is capped by the tokens the request may still generate, the model's context and the free blocks
(it never preempts to run ahead).
"""

from __future__ import annotations

from models import kernels
from decoding.kv_cache_manager import KVCacheManager
from decoding.multi_step import chain_draws
from decoding.sampler import draws_natively, whole_vocabulary_logprob
from decoding.sequence import Sequence, TokenLogprob
from decoding.speculative.decoder import SpeculativeDecoding
from decoding.step_plan import ScheduledSeq, SchedulerOutput


class SpeculatingChain:
    """The shared part; a proposer's chain sets `available`, `nodes` (the verified rows past the newest token)
    and `depth` (the deepest node), and implements `_ready` and `_call`."""

    nodes = depth = 0

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
        self.available = False

    def _can_chain(self) -> bool:
        return self.max_rounds > 1 and bool(getattr(self.model, "greedy_chain_available", lambda: False)())

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
                     self.max_rounds * (self.depth + 1))
        if self.speculation.max_depth(seq) < 1:
            return 0
        if self.kv.blocks_needed(seq, tokens + self.nodes) > self.kv.num_free_blocks:
            return 0
        return tokens if self._ready(seq, tokens) else 0

    def _eligible(self, item: ScheduledSeq) -> bool:
        seq, params = item.seq, item.seq.request.params
        return (item.num_lookahead > 0 and item.num_new_tokens == 1 and item.reaches_end and item.tree is None
                and not item.draft_token_ids and item.start >= seq.request.prompt_len
                and seq.num_computed == len(seq.token_ids) - 1 and seq.grammar is None and seq.request.beam is None
                and not params.has_penalties and params.logprobs in (None, 0) and self._draws_for(seq))

    def _draws_for(self, seq: Sequence) -> bool:
        """Whether the chain makes this request's choices as its single steps would: greedy without
        logprobs, or drawn as the native kernels draw (`sampler.draws_natively`) under exact acceptance."""
        params = seq.request.params
        return (params.is_greedy and params.logprobs is None) or (
            self.speculation.acceptance.exact and self.speculation.acceptance.typical is None
            and draws_natively(params, limited=seq.num_output_tokens < params.min_tokens))

    def _ready(self, seq: Sequence, tokens: int) -> bool:
        """Whether the proposer holds what the first round reads, and room for what the call writes."""
        raise NotImplementedError

    def _call(self, seq: Sequence, sequence: kernels.SpeculatingSequence) -> kernels.ChainedRounds:
        """Run the model's chain for `seq` (its target side: `sequence`)."""
        raise NotImplementedError

    def run(self, sched: SchedulerOutput, tokens: int) -> kernels.ChainedRounds:
        """Reserve the slots (tokens_for checked they fit) and run the chain; the sequence's cache then holds
        every emitted token but the last, as after a verified step."""
        seq = sched.scheduled[0].seq
        copies = self.kv.reserve(seq, tokens + self.nodes)
        assert not copies, copies   # past the block the scheduler made the sequence's own, its blocks are new
        params = seq.request.params
        draws = None if params.is_greedy and params.logprobs is None else chain_draws([seq], tokens + self.depth)
        sequence = self.model.speculating_sequence(
            seq.token_ids[-1], seq.num_computed, seq.block_table,
            seq.request.banned_before_min_tokens(self.eos_token_ids, self.model.vocab_size),
            max(0, params.min_tokens - seq.num_output_tokens), tokens, self.max_rounds, self.speculation.max_depth(seq),
            self.depth, draws)
        chained = self._call(seq, sequence)
        for verified, accepted in zip(chained.verified, chained.accepted):
            self.speculation.counters.record(verified, accepted)
        self.num_calls += 1
        self.num_rounds += len(chained.accepted)
        return chained

    def after(self, seq: Sequence, chained: kernels.ChainedRounds) -> None:
        """Hand the proposer what the call leaves it (before the tokens are appended)."""

    @staticmethod
    def token_logprobs(seq: Sequence, chained: kernels.ChainedRounds) -> list[TokenLogprob | None]:
        """The emitted tokens' logprobs where the request asked (as the plain chain reports them)."""
        params = seq.request.params
        if params.logprobs is None or chained.logprobs is None:
            return [None] * len(chained.tokens)
        chosen = chained.raw_logprobs if params.logprobs_mode == "raw" else chained.logprobs
        return [whole_vocabulary_logprob(logprob, params) for logprob in chosen]


def speculating_chain(model, kv: KVCacheManager, speculation: SpeculativeDecoding | None, max_rounds: int,
                      eos_token_ids: frozenset[int], max_model_len: int) -> SpeculatingChain:
    """The chain of the engine's proposer (one that is never available for proposers without one)."""
    from decoding.speculative.eagle import EagleProposer
    from decoding.speculative.eagle_chain import EagleChainDecode
    from decoding.speculative.medusa import MedusaProposer
    from decoding.speculative.medusa_chain import MedusaChainDecode

    proposer = speculation.proposer if speculation else None
    kind = {MedusaProposer: MedusaChainDecode, EagleProposer: EagleChainDecode}.get(type(proposer), SpeculatingChain)
    return kind(model, kv, speculation, max_rounds, eos_token_ids, max_model_len)
