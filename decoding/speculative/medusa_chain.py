"""Medusa's speculating rounds for one sequence in one native call (decoding/speculative/chain.py): each
round the heads read the final hidden state of the newest computed token and fill the candidate tree,
which the target verifies (models/kernels/medusa_chain.c).

A greedy request takes the argmax of every row; a sampled one under exact acceptance (the default) draws
each verified row as the plain chain does (`sample_rows`' rule with the uniform of the position the row
chooses for, `sampler.draws_natively`) and keeps the path of the target's own draws: plain sampling's
tokens and logprobs. The first round reads the hidden state the newest token came from.
"""

from __future__ import annotations

from models import kernels
from decoding.sequence import Sequence
from decoding.speculative.chain import SpeculatingChain
from decoding.speculative.medusa import MedusaProposer


class MedusaChainDecode(SpeculatingChain):
    def __init__(self, *args):
        super().__init__(*args)
        proposer = self.speculation.proposer if self.speculation else None
        self.proposer = proposer if isinstance(proposer, MedusaProposer) and proposer.native_heads is not None else None
        self.available = self.proposer is not None and self._can_chain()
        if self.available:
            self.nodes, self.depth = len(self.proposer.choices), self.proposer.depth

    def _ready(self, seq: Sequence, tokens: int) -> bool:
        return self.proposer.hidden_of(seq) is not None

    def _call(self, seq: Sequence, sequence: kernels.SpeculatingSequence) -> kernels.MedusaChained:
        proposer = self.proposer
        heads = proposer.native_heads.chain_heads(list(proposer.parents), [path[-1] for path in proposer.choices],
                                                  proposer.depth, proposer.heads.draft_vocab)
        return self.model.medusa_chain(heads, sequence, proposer.hidden_of(seq), self.kv.cache)

    def after(self, seq: Sequence, chained: kernels.MedusaChained) -> None:
        self.proposer.observe(seq, chained.hidden.unsqueeze(0))
