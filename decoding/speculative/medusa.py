"""Medusa proposals: the heads read the target's final hidden state and propose a tree of candidates.

`choices` lists the tree's paths as top-k ranks per head, Medusa's `medusa_choices`: (0,) is head 0's
top token, (0, 1) head 1's second-best token after it, and so on. All paths are verified in one target
forward (ancestor-only mask, positions at each node's depth); greedy requests keep the deepest path
matching the target's argmax (token-identical to plain greedy), sampled requests keep the path of the
target's own draws (exact), a path by typical acceptance (lossy, Medusa's rule) or, in `lossless` mode, a
path by EAGLE's rule for trees of fixed candidates, which keeps the target's distribution exactly
(decoding/speculative/rejection.py).
"""

from __future__ import annotations

import torch

from decoding.sequence import Sequence
from decoding.speculative.proposer import Proposal
from models.medusa import MedusaHeads
from models.medusa_native import NativeMedusaHeads, native_heads_available

# The first 5 nodes grown by `python -m training.medusa_tree` for the embedded model and heads (64
# held-out prompts that the benchmarks do not use), in growth order: the heads' three best guesses for the
# next token and the best path two and three deep. Five, because trees of 3 to 8 nodes measured against
# plain decoding in turn (benchmarks/medusa.py's prompts) peaked at 4 and 5 on a 2-core CPU: each
# further node costs the target more per verification than the heads' weak deeper guesses return.
DEFAULT_CHOICES: tuple[tuple[int, ...], ...] = ((0,), (1,), (0, 0), (2,), (0, 0, 0))


def tree_parents(choices: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """Index of each path's parent path (-1 for depth 1); every path's prefix must be listed before it."""
    index = {path: i for i, path in enumerate(choices)}
    parents = []
    for path in choices:
        if len(path) > 1 and path[:-1] not in index:
            raise ValueError(f"medusa choice {list(path)} has no parent {list(path[:-1])} in the tree")
        if len(path) > 1 and index[path[:-1]] > index[path]:
            raise ValueError(f"medusa choice {list(path[:-1])} must come before its child {list(path)}")
        parents.append(index[path[:-1]] if len(path) > 1 else -1)
    return tuple(parents)


class MedusaProposer:
    wants_hidden_states = True

    def __init__(self, heads: MedusaHeads, choices=None, weights: str = "q8_0"):
        self.choices = tuple(tuple(int(i) for i in path) for path in (choices or heads.choices or DEFAULT_CHOICES))
        if not self.choices or any(len(path) == 0 for path in self.choices):
            raise ValueError("medusa choices must be non-empty paths")
        depth = max(len(path) for path in self.choices)
        if depth > heads.num_heads:
            raise ValueError(f"the medusa tree is {depth} deep but there are only {heads.num_heads} heads")
        self.parents = tree_parents(self.choices)
        self.top_k = max(max(path) for path in self.choices) + 1
        self.heads = heads
        # Only the heads the tree reaches run, on the native products in `weights` where those run.
        self.depth = depth
        self._native = NativeMedusaHeads(heads, depth, weights) if native_heads_available(heads) else None
        self.max_tokens_per_step = max(len(self.choices), heads.num_heads)
        self._hidden: dict[int, torch.Tensor] = {}

    @property
    def native_heads(self) -> NativeMedusaHeads | None:
        """The heads on the native products, where those run (the native Medusa chain reads them)."""
        return self._native

    def hidden_of(self, seq: Sequence) -> torch.Tensor | None:
        """The final hidden state the sequence's newest token came from, once observed."""
        return self._hidden.get(seq.seq_id)

    def observe(self, seq: Sequence, hidden: torch.Tensor) -> None:
        self._hidden[seq.seq_id] = hidden[-1]           # the heads read the newest token's state only

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Proposal]:
        known = [i for i, seq in enumerate(seqs) if seq.seq_id in self._hidden]
        proposals = [Proposal([]) for _ in seqs]
        if not known:
            return proposals
        hidden = torch.stack([self._hidden[seqs[i].seq_id] for i in known])
        if self._native is not None:
            logits = self._native(hidden.float())                                           # [depth, N, V]
        else:
            logits = self.heads(hidden.to(self.heads.heads[0][-1].weight.dtype))[: self.depth].float()
        top = self.heads.token_ids(logits.topk(self.top_k, dim=-1).indices).tolist()        # [depth][N][top_k]
        for n, i in enumerate(known):
            tokens = [top[len(path) - 1][n][path[-1]] for path in self.choices]
            proposals[i] = Proposal(tokens, parents=self.parents)
        return proposals

    def on_verified(self, seq: Sequence, num_accepted: int) -> None:
        pass            # the engine hands over the new hidden state through observe()

    def release(self, seq: Sequence) -> None:
        self._hidden.pop(seq.seq_id, None)
