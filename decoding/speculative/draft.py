"""A small draft model proposes tokens from its own paged KV cache.

The draft keeps, per sequence, a block table in its own cache and how many of the sequence's tokens it
has computed. Each proposal first catches up on the tokens the target accepted since the last one (the
whole prompt the first time), then runs k - 1 single-token steps; all sequences that speculate advance
together, one batched draft forward per drafted position. When every row drafts greedily without
penalties (the common case), the catch-up and all k steps run in one native call instead (`greedy_chain`,
models/kernels/decoder.c), with the same tokens; after a new prompt, whose catch-up is computed as a
prompt, the k - 1 steps after it do. After verification the draft rolls back
to the accepted prefix, exactly like the target.

Draft tokens are drawn the way the request samples: the same penalties, temperature and truncation
applied to the draft's logits (argmax for greedy requests), so q is as close to the target's p as the
draft allows and acceptance stays high; `Proposal.probs` carries q for lossless verification.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from decoding.block_manager import BlockManager, NoFreeBlocksError
from decoding.kv_cache_manager import KVCacheManager
from decoding.runner import SHORT_CHAIN, ModelRunner
from decoding.logits_processing import process_logits
from decoding.sampler import Sampler
from decoding.sampling_metadata import SamplingMetadata
from decoding.step_plan import ScheduledSeq, SchedulerOutput
from decoding.sequence import Sequence
from decoding.speculative.proposer import Proposal
from models.attention import PagedKVCache
from models.loader import LoadedModel


@dataclass
class DraftState:
    """What the draft's cache holds for one target sequence: a `step_plan.CachedTokens`, as the runner
    and the KV-cache manager read it."""

    seq_id: int
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    token_ids: list[int] = field(default_factory=list)   # the tokens of the current proposal round


class DraftModelProposer:
    wants_hidden_states = False

    def __init__(self, loaded: LoadedModel, num_tokens: int, num_blocks: int, block_size: int, sampler: Sampler,
                 eos_token_ids: frozenset[int]):
        model = loaded.model
        self.max_tokens_per_step = num_tokens
        self.model = model
        self.max_model_len = loaded.max_model_len
        cache = PagedKVCache(model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim,
                             model.dtype, loaded.device)
        self.kv = KVCacheManager(BlockManager(num_blocks, block_size), cache, loaded.device)
        self.runner = ModelRunner(model, cache, loaded.device)
        self.device = loaded.device
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self._states: dict[int, DraftState] = {}

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Proposal]:
        drafted: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        limits = [min(k, self.max_model_len - len(seq.token_ids)) for seq, k in zip(seqs, max_tokens)]
        for step in range(max(limits, default=0)):
            if self._greedy_chain(seqs, drafted, limits):
                break
            rows, items = [], []
            for i, seq in enumerate(seqs):
                if len(drafted[i]) >= limits[i]:
                    continue
                item = self._schedule(seq, drafted[i])
                if item is None:            # the draft cache is full: this sequence stops drafting
                    limits[i] = len(drafted[i])
                    continue
                rows.append(i)
                items.append(item)
            if not items:
                break
            logits = self.runner.execute(SchedulerOutput(scheduled=items))
            for item in items:
                item.seq.num_computed += item.num_new_tokens
            row_of = {seq_id: r for r, seq_id in enumerate(logits.last_seq_ids)}
            order = [row_of[item.seq.seq_id] for item in items]
            tokens, dists = self._draw([seqs[i] for i in rows], [drafted[i] for i in rows], logits.last[order])
            for i, token, dist in zip(rows, tokens, dists):
                drafted[i].append(token)
                if dist is not None:
                    probs[i].append(dist)
        return [Proposal(d, torch.stack(p) if p else None) for d, p in zip(drafted, probs)]

    def _greedy_chain(self, seqs: list[Sequence], drafted: list[list[int]], limits: list[int]) -> bool:
        """Draft the rest in one native call (models/kernels/decoder.c) when every row drafts greedily,
        without penalties, the same number of further tokens, and lacks no more tokens in the draft's cache
        than the runner computes as decode rows (SHORT_CHAIN: the steady state, a verification's bonus
        token and perhaps its last accepted draft; a new prompt's catch-up takes the per-step path, which
        computes it as a prompt): the tokens the per-step loop would draw, without a return to Python per
        token. False (nothing done) otherwise."""
        active = [i for i in range(len(seqs)) if len(drafted[i]) < limits[i]]
        if not active:
            return True
        steps = limits[active[0]] - len(drafted[active[0]])
        chain = getattr(self.model, "greedy_chain", None)
        if chain is None or any(limits[i] - len(drafted[i]) != steps or not seqs[i].request.params.is_greedy
                                or seqs[i].request.params.has_penalties for i in active):
            return False
        states = [self._states.get(seqs[i].seq_id) for i in active]
        if any(state is None for state in states):
            return False
        tokens = [seqs[i].token_ids + drafted[i] for i in active]
        feed = [ids[state.num_computed:] for ids, state in zip(tokens, states)]
        if max(map(len, feed)) > SHORT_CHAIN:
            return False
        try:
            for state, lacking in zip(states, feed):
                self.kv.reserve(state, len(lacking) + steps - 1)
        except NoFreeBlocksError:
            return False        # the per-step loop drafts what fits
        # Stop tokens stay banned while the request is below min_tokens, counting the tokens drafted before.
        banned_steps = [max(0, seqs[i].request.params.min_tokens - seqs[i].num_output_tokens - len(drafted[i]))
                        for i in active]
        chosen = chain(feed, [state.num_computed for state in states], [state.block_table for state in states],
                       self.kv.cache, [self._stop_tokens(seqs[i]) for i in active], banned_steps, steps)
        if chosen is None:
            return False
        for i, state, ids, row_tokens in zip(active, states, tokens, chosen.t().tolist()):
            drafted[i] += row_tokens
            state.num_computed = len(ids) + steps - 1       # the last draft is not computed
            state.token_ids = seqs[i].token_ids + drafted[i]
        return True

    def _schedule(self, seq: Sequence, drafted: list[int]) -> ScheduledSeq | None:
        state = self._states.get(seq.seq_id)
        if state is None:
            state = self._states[seq.seq_id] = DraftState(seq.seq_id)
        state.token_ids = seq.token_ids + drafted
        count = len(state.token_ids) - state.num_computed
        try:
            copies = self.kv.reserve(state, count)
        except NoFreeBlocksError:
            return None
        assert not copies, "draft blocks are never shared"
        return ScheduledSeq(state, state.num_computed, count, reaches_end=True)

    def _draw(self, seqs: list[Sequence], drafted: list[list[int]], logits: torch.Tensor):
        """One draft token per row, drawn as the request samples; its distribution for sampled rows."""
        if all(seq.request.params.is_greedy and not seq.request.params.has_penalties for seq in seqs):
            # The common case, without the whole pipeline: argmax, with stop tokens banned below min_tokens.
            logits = logits.clone()
            for row, (seq, d) in enumerate(zip(seqs, drafted)):
                if self._stop_tokens_banned(seq, len(d)):
                    logits[row, self._stop_tokens(seq)] = float("-inf")
            return logits.argmax(dim=-1).tolist(), [None] * len(seqs)
        batch = SamplingMetadata.from_sequences(seqs, logits.shape[-1], self.eos_token_ids, self.device, drafted=drafted)
        processed = process_logits(logits.float(), batch, distribution=not batch.all_greedy)
        tokens = processed.penalised.argmax(dim=-1)
        if batch.all_greedy:
            return tokens.tolist(), [None] * len(seqs)
        dists = processed.logprobs.exp()
        sampled = self.sampler.sample(dists, batch)
        tokens = torch.where(batch.greedy, tokens, sampled).tolist()
        return tokens, [None if seq.request.params.is_greedy else dists[r].cpu() for r, seq in enumerate(seqs)]

    def _stop_tokens(self, seq: Sequence) -> list[int]:
        return sorted(t for t in seq.request.params.stop_token_set(self.eos_token_ids) if t < self.model.vocab_size)

    @staticmethod
    def _stop_tokens_banned(seq: Sequence, num_drafted: int) -> bool:
        """A greedy draft's stop tokens are banned while the request is below min_tokens, as the sampler bans
        them, counting the tokens drafted before this one."""
        return seq.num_output_tokens + num_drafted < seq.request.params.min_tokens

    def on_verified(self, seq: Sequence, num_accepted: int) -> None:
        """Keep the draft cache up to the accepted prefix: the catch-up of the next round starts there."""
        state = self._states.get(seq.seq_id)
        if state is None:
            return
        base = len(seq.token_ids) - num_accepted - 1        # the sequence's length before this round
        self.kv.roll_back(state, min(state.num_computed, base + num_accepted))

    def release(self, seq: Sequence) -> None:
        state = self._states.pop(seq.seq_id, None)
        if state is not None:
            self.kv.free(state)

    def forget_states(self) -> None:
        """After new draft weights: every sequence's draft cache is recomputed when it next proposes."""
        for state in self._states.values():
            self.kv.free(state)
        self._states.clear()

    def observe(self, seq: Sequence, hidden) -> None:
        pass
