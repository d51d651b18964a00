"""The contract between the engine and a proposer of draft tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from decoding.sequence import Sequence


@dataclass
class Proposal:
    """Draft tokens for one sequence, to follow its last token.

    `probs` [len(token_ids), vocab] is the distribution each token was drawn from, which lossless
    verification of a sampled request needs (a sibling drawn after others: its parent's q without them,
    renormalised; siblings come in drawing order); None means the proposer is deterministic (the
    distribution is one-hot on the proposed token), as for prompt lookup or a greedy draft.
    """

    token_ids: list[int]
    probs: torch.Tensor | None = None
    # A tree instead of a chain (Medusa): parents[i] is the index of token i's parent among the draft
    # tokens, or -1 when it follows the sequence's last token. Parents come before children.
    parents: tuple[int, ...] | None = None

    def parent_rows(self) -> list[int]:
        """Row of each draft token's parent among the verified rows (row 0 is the last known token)."""
        if self.parents is None:
            return list(range(len(self.token_ids)))
        return [parent + 1 for parent in self.parents]

    def depth(self, index: int) -> int:
        return len(self.path(index))

    def trimmed(self, max_tokens: int, max_depth: int) -> Proposal:
        """At most `max_tokens` draft tokens none deeper than `max_depth`, still a valid tree or chain."""
        keep = [i for i in range(len(self.token_ids)) if self.depth(i) <= max_depth][:max_tokens]
        if len(keep) == len(self.token_ids):
            return self
        # Siblings come in drawing order: what a prefix keeps of a node's draws are its first ones, as the
        # rule for drawn trees needs.
        probs = None if self.probs is None else self.probs[keep]
        if self.parents is None:
            return Proposal(self.token_ids[: len(keep)], probs)
        new_index = {old: new for new, old in enumerate(keep)}
        return Proposal([self.token_ids[i] for i in keep], probs,
                        tuple(-1 if self.parents[i] < 0 else new_index[self.parents[i]] for i in keep))

    def path(self, index: int) -> list[int]:
        """The draft tokens from the root down to draft token `index`, inclusive."""
        if self.parents is None:
            return self.token_ids[: index + 1]
        tokens = []
        while index >= 0:
            tokens.append(self.token_ids[index])
            index = self.parents[index]
        return tokens[::-1]


@dataclass(frozen=True)
class AcceptanceRule:
    """How the verifier keeps the draft tokens of sampled requests, configured once for the engine
    (greedy requests always keep the path of the target's argmax).

    Exact (the default): each verified position draws its token exactly as plain decoding would (the
    same pipeline, the uniform of the request's seed and that position) and the path of matching draft
    tokens is kept, over chains and trees: the plain sampled output token for token where the verified
    rows' logits equal the decode step's bit for bit;
    a draft drawn with the same uniform (draft models, Medusa's chains do) matches whenever the two
    distributions put that uniform on the same token. Lossless: speculative sampling (the rejection rule)
    over a chain or tree drawn with its distributions (draft models, EAGLE), or EAGLE's rule over a tree
    of deterministic candidates (Medusa); the same distribution, other tokens. Typical (Medusa's
    lossy rule, `typical` = (epsilon, delta)): a node whose probability under the target is typical
    enough, over trees too."""

    typical: tuple[float, float] | None = None
    exact: bool = True

    NAMES = ("exact", "lossless", "typical")

    @classmethod
    def named(cls, name: str, typical: tuple[float, float]) -> AcceptanceRule:
        if name not in cls.NAMES:
            raise ValueError(f"the acceptance rule must be one of {', '.join(map(repr, cls.NAMES))}, got {name!r}")
        return cls(typical if name == "typical" else None, exact=name == "exact")

    @property
    def lossless(self) -> bool:
        """The rejection rule (decoding/speculative/rejection.py): for a chain or tree drawn with its
        distributions, or for a tree of candidates fixed before the target's draws."""
        return self.typical is None and not self.exact


class Proposer(Protocol):
    # The most draft tokens one proposal may hold (tree nodes for Medusa): the slots a sequence reserves.
    max_tokens_per_step: int

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Proposal]:
        """Up to max_tokens[i] draft tokens for each sequence (possibly none)."""

    def on_verified(self, seq: Sequence, num_accepted: int) -> None:
        """The target kept `num_accepted` draft tokens (a path from the root) of the last proposal."""

    def release(self, seq: Sequence) -> None:
        """Forget everything held for `seq` (it finished, was aborted or preempted)."""

    # Proposers that read the target's final hidden states (Medusa, EAGLE) set this; the engine then hands
    # them, every step, the hidden states that produced each sequence's new tokens through `observe`, those
    # of plain steps chained in one call (decoding/multi_step.py) included.
    wants_hidden_states: bool

    def observe(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """hidden [n, hidden_size]: the target's final hidden states at the positions before seq's n newest
        tokens, in order (the last one produced its last token)."""


@dataclass
class SpecCounters:
    """Monotonic speculation counters (vLLM's spec_decode metric names)."""

    num_drafts: int = 0                    # proposals with at least one token that were verified
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_drafted:
            self.accepted_per_position += [0] * (num_drafted - len(self.accepted_per_position))
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens gained per verification: the accepted drafts plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
