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
    verification of a sampled request needs; None means the proposer is deterministic (the distribution
    is one-hot on the proposed token), as for prompt lookup or a greedy draft.
    """

    token_ids: list[int]
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Proposal]:
        """Up to max_tokens[i] draft tokens for each sequence (possibly none)."""

    def on_verified(self, seq: Sequence, num_accepted: int) -> None:
        """The target kept the first `num_accepted` draft tokens of the last proposal for `seq`."""

    def release(self, seq: Sequence) -> None:
        """Forget everything held for `seq` (it finished, was aborted or preempted)."""


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
