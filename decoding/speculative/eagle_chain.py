"""EAGLE's speculating rounds for one greedy sequence in one native call (decoding/speculative/chain.py):
each round the draft catches up on the tokens its cache lacks with their true features, grows the tree a
level at a time as EagleProposer grows a greedy one (EAGLE-2's expansion and selection), and the target
verifies it (models/kernels/eagle_chain.c).

The draft's cache stays the proposer's (its KV-cache manager, the sequence's EagleState): the call
reserves room for the rows it writes (the pending rows, a catch-up per round and the tree's rows), and
leaves the state as a single step would, holding the rows it computed and the features of the newest
tokens, which the next round or step catches up on.

A sampled request under exact acceptance whose rows the native kernels draw (`sampler.draws_natively`)
chains too: each level's one draft row draws with the uniform of its position as EagleProposer draws it
(the draft vocabulary is sorted by id, so the draw over its columns is the draw over the whole vocabulary),
its siblings the draft distribution's next best, and the target's rows draw as plain sampling draws: plain
sampling's tokens and logprobs.
"""

from __future__ import annotations

import torch

from models import kernels
from decoding.sequence import Sequence
from decoding.speculative.chain import SpeculatingChain
from decoding.speculative.eagle import EagleProposer


class EagleChainDecode(SpeculatingChain):
    def __init__(self, *args):
        super().__init__(*args)
        proposer = self.speculation.proposer if self.speculation else None
        self.proposer: EagleProposer | None = proposer if isinstance(proposer, EagleProposer) else None
        self._draft: kernels.EagleChainDraft | None = None
        if self.proposer is None or not self._can_chain():
            return
        tree = self.proposer.tree
        self.nodes = tree.nodes
        self.depth = min(tree.depth, self.proposer.max_tokens_per_step)    # as EagleProposer caps it
        self._width = tree.width
        draft = self.proposer.draft
        self._draft = draft.chain_draft(self.proposer.runner.cache, tree, self.depth)
        self.available = self._draft is not None

    def _ready(self, seq: Sequence, tokens: int) -> bool:
        state = self.proposer.state_of(seq)
        if state is None or not state.features:
            return False
        rows = len(state.features) + tokens + (self.depth - 1) * self._width
        kv = self.proposer.kv
        return kv.blocks_needed(state, rows) <= kv.num_free_blocks

    def _call(self, seq: Sequence, sequence: kernels.SpeculatingSequence) -> kernels.EagleChained:
        proposer = self.proposer
        state = proposer.state_of(seq)
        pending = len(state.features)
        copies = proposer.kv.reserve(state, pending + sequence.max_tokens + (self.depth - 1) * self._width)
        assert not copies, copies         # the draft's blocks are the sequence's own
        draft_positions = state.num_computed + pending + sequence.max_tokens + self.depth + 1
        cos, sin = proposer.draft.rotary.tables(draft_positions, torch.float32)
        cache = kernels.EagleDraftCache(torch.tensor(state.block_table, dtype=torch.int64), state.num_computed, cos, sin,
                                        torch.tensor(seq.token_ids[state.start + state.num_computed:], dtype=torch.int64),
                                        torch.stack(state.features))
        return self.model.eagle_chain(self._draft, sequence, self.kv.cache, cache)

    def after(self, seq: Sequence, chained: kernels.EagleChained) -> None:
        """The draft's cache holds the rows the call computed; it lacks the newest tokens, whose features
        the call returned."""
        state = self.proposer.state_of(seq)
        self.proposer.kv.roll_back(state, chained.draft_computed)
        state.features = list(chained.pending_features.unbind(0))
