"""A step's plan: which tokens of which sequences the model computes (`ScheduledSeq`, a chain or a
`TokenTree` of speculative candidates), the block copies to make first, and who was preempted
(`SchedulerOutput`). The scheduler writes it, speculation extends its entries with drafts, the runner
executes it and the update phase applies its results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from decoding.sequence import Request, Sequence


class CachedTokens(Protocol):
    """What the runner and the KV-cache manager read of whoever owns a scheduled entry's tokens: a
    `Sequence`, or a draft model's state for one (its own block table in its own cache)."""

    seq_id: int
    token_ids: list[int]
    block_table: list[int]
    num_computed: int


@dataclass(frozen=True)
class TokenTree:
    """The new tokens of a step as a tree (speculative candidates) instead of a chain.

    `parents[i]` is the index of new token i's parent among the new tokens, or -1 when it follows the
    cached context directly. Parents come before children. Token i sits at position start + depth(i) and
    sees only its ancestors and the cache; its key/value is stored at sequence index start + i until the
    accepted path is compacted.

    A tree grown a level at a time (EAGLE's draft) computes only its newest nodes: the first `computed`
    are already in the cache, and the step's tokens are nodes computed.. (the scheduled entry's start is
    then node `computed`'s index, start - computed the tree's).
    """

    parents: tuple[int, ...]
    computed: int = 0

    def depths(self) -> list[int]:
        depths: list[int] = []
        for parent in self.parents:
            depths.append(0 if parent < 0 else depths[parent] + 1)
        return depths

    def ancestry(self) -> list[list[int]]:
        """Per token, its ancestors root first, then itself."""
        chains: list[list[int]] = []
        for i, parent in enumerate(self.parents):
            chains.append((chains[parent] if parent >= 0 else []) + [i])
        return chains

    def visibility(self) -> list[list[bool]]:
        """[n, n]: row i is True at i and at each of its ancestors."""
        n = len(self.parents)
        rows = [[False] * n for _ in range(n)]
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                rows[i] = list(rows[parent])
            rows[i][i] = True
        return rows


@dataclass(frozen=True)
class ScheduledSeq:
    """Tokens [start, start + num_new_tokens) of `seq` are computed this step."""

    seq: Sequence
    start: int
    num_new_tokens: int
    # The chunk ends at the sequence's last known token, so its logits choose the next token.
    reaches_end: bool
    tree: TokenTree | None = None
    # Speculative decoding: the last len(draft_token_ids) new tokens are proposals that follow the
    # sequence's known tokens; the target scores all of them for verification.
    draft_token_ids: tuple[int, ...] = ()
    # Slots reserved past this step's tokens for the draft tokens a proposer may add.
    num_lookahead: int = 0

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int, num_lookahead: int = 0) -> ScheduledSeq:
        end = seq.num_computed + num_new_tokens
        return cls(seq, seq.num_computed, num_new_tokens, end == len(seq.token_ids), num_lookahead=num_lookahead)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # What the runner returns beyond the logits of each sequence's last row, as the step's phases ask:
    # the logits of these sequences' whole chunks (prompt logprobs, verification), and the final hidden
    # states of every returned row (a proposer that reads them, such as Medusa's heads).
    chunk_logits_for: set[int] = field(default_factory=set)
    wants_hidden: bool = False

    def wanting_prompt_logprobs(self) -> set[int]:
        """The sequences whose chunk this step holds prompt positions that score a next prompt token."""
        return {item.seq.seq_id for item in self.scheduled
                if item.seq.request.params.prompt_logprobs is not None and item.start < item.seq.prompt_len - 1}

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)
