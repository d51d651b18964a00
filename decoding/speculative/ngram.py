"""Prompt lookup (n-gram) drafting: no model, just the sequence's own history.

When the last n tokens occurred before, the tokens that followed that occurrence are proposed. It wins
where output copies input: code edits, extraction, summaries that quote, retrieval-grounded answers.
"""

from __future__ import annotations

from decoding.sequence import Sequence
from decoding.speculative.proposer import Proposal


class NgramProposer:
    wants_hidden_states = False

    def __init__(self, num_tokens: int, max_ngram: int = 4, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min n-gram <= max n-gram, got {min_ngram} and {max_ngram}")
        self.max_tokens_per_step = num_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Proposal]:
        return [Proposal(self.lookup(seq.token_ids, k)) for seq, k in zip(seqs, max_tokens)]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """The continuation of the most recent earlier occurrence of the longest matching suffix."""
        if k <= 0:
            return []
        length = len(tokens)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            suffix = tokens[length - n :]
            first = suffix[0]
            # Scan backwards so the most recent occurrence wins; the suffix itself is excluded.
            for start in range(length - n - 1, -1, -1):
                if tokens[start] == first and tokens[start : start + n] == suffix:
                    return tokens[start + n : start + n + k]
        return []

    def on_verified(self, seq: Sequence, num_accepted: int) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass

    def observe(self, seq: Sequence, hidden) -> None:
        pass
