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
from decoding.multi_step import chain_draws
from decoding.sampler import draws_natively
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

    def _draws_for(self, seq: Sequence) -> bool:
        params = seq.request.params
        return (params.is_greedy and params.logprobs is None) or (
            self.speculation.acceptance.exact and self.speculation.acceptance.typical is None
            and draws_natively(params, limited=seq.num_output_tokens < params.min_tokens))

    def _ready(self, seq: Sequence, tokens: int) -> bool:
        return self.proposer.hidden_of(seq) is not None

    def _call(self, seq: Sequence, tokens: int, stop_tokens: list[int], banned: int) -> kernels.MedusaChained:
        proposer, params = self.proposer, seq.request.params
        heads = proposer.native_heads.chain_heads(list(proposer.parents), [path[-1] for path in proposer.choices],
                                                  proposer.depth, proposer.heads.draft_vocab)
        draws = None if params.is_greedy and params.logprobs is None else chain_draws([seq], tokens + proposer.depth)
        return self.model.medusa_chain(heads, seq.token_ids[-1], seq.num_computed, seq.block_table,
                                       proposer.hidden_of(seq), self.kv.cache, stop_tokens, banned, tokens,
                                       self.max_rounds, self.speculation.max_depth(seq), draws)

    def after(self, seq: Sequence, chained: kernels.MedusaChained) -> None:
        self.proposer.observe(seq, chained.hidden.unsqueeze(0))
