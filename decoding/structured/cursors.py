"""A sequence's position in a compiled grammar: the allowed-token bits at each step, advance, roll back,
complete. The base class holds what every backend shares (EOS, packed masks, masks along a draft); each
backend's cursor supplies four steps over its own matcher.
"""

from __future__ import annotations

import copy

import torch

from decoding.structured.constraint import GrammarError
from decoding.structured.utf8_guard import ACCEPT, REJECT, Utf8Table

MAX_DRAFT_TOKENS = 64


class GrammarCursor:
    """One sequence's position in a compiled grammar. A backend supplies the four steps at the bottom;
    the rest (EOS, packed masks, masks along a draft) is the same for every backend."""

    # Set where a check beside the backend (distinct items) had to let the output break the schema;
    # the completion then reports schema_valid false.
    repeated_an_item = False

    def __init__(self, vocab_size: int, eos_token_ids: frozenset[int]):
        self._vocab_size = vocab_size
        self._eos = sorted(i for i in eos_token_ids if i < vocab_size)
        self._words = (vocab_size + 31) // 32          # int32 words of an allowed-token bitmask
        # Where a model has several EOS ids, any of them ends the output where one may: their words and
        # bits, for allowed_bits (built once: it runs every step).
        self._eos_words = torch.tensor([i // 32 for i in self._eos])
        self._eos_flags = torch.tensor([1 << (i % 32) for i in self._eos], dtype=torch.int64).to(torch.int32)

    def allowed(self) -> torch.Tensor:
        """bool [vocab]: the tokens that keep the output inside the grammar (EOS only where it may end)."""
        return unpack_bits(GrammarCursor.allowed_bits([self]), self._vocab_size)[0]

    @staticmethod
    def allowed_bits(cursors: list[GrammarCursor]) -> torch.Tensor:
        """allowed() of each cursor as packed bits, int32 [len(cursors), ceil(vocab / 32)] (token i is bit
        i % 32 of word i // 32), written for all of them at once; the sampler applies them unpacked."""
        first = cursors[0]
        bits = torch.zeros(len(cursors), first._words, dtype=torch.int32)
        # One row at a time on this thread: llguidance's own thread pool (LLExecutor) measured 4-5x
        # slower here, its idle threads spinning against the model's OpenMP threads on 2 cores. Rows
        # are addressed by pointer (a tensor view per row costs as much as an llguidance mask).
        base, row_bytes = bits.data_ptr(), first._words * 4
        for row, cursor in enumerate(cursors):
            cursor._write_mask(bits, row, base + row * row_bytes, row_bytes)
        first.spread_eos(bits)
        return bits

    @property
    def num_words(self) -> int:
        """int32 words of one row of packed allowed-token bits."""
        return self._words

    def spread_eos(self, bits: torch.Tensor) -> None:
        """Where a model has several EOS ids, a row that allows one allows them all."""
        if len(self._eos) > 1:
            words, flags = self._eos_words, self._eos_flags
            any_eos = ((bits[:, words] & flags) != 0).any(dim=1, keepdim=True)
            bits[:, words] |= torch.where(any_eos, flags, torch.zeros_like(flags))

    def write_bits_along(self, bits: torch.Tensor, row: int, path: list[int], every_row: bool) -> int:
        """Write the allowed-token bits after each prefix of `path` (every_row) or after all of it into
        rows of `bits` from `row`; return the next free row. From the first token of `path` the grammar
        refuses, the rows allow everything (see step_masks). The cursor ends where it started."""
        scratch = None if every_row else torch.zeros(1, self._words, dtype=torch.int32)
        advanced, valid = 0, True
        for index in range(len(path) + 1):
            last = index == len(path)
            target, target_row = (bits, row) if every_row or last else (scratch, 0)
            if valid:
                self._write_mask(target, target_row, target.data_ptr() + target_row * self._words * 4, self._words * 4)
            else:
                target[target_row] = -1
            if every_row or last:
                row += 1
            if last:
                break
            token = path[index]
            valid = valid and token not in self._eos and (int(target[target_row, token // 32]) >> (token % 32)) & 1 == 1
            if valid:
                self._consume(token)
                advanced += 1
        if advanced:
            self._rollback(advanced)
        return row

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts `token` next (a resumed output's tokens are checked with it)."""
        bits = torch.zeros(1, self._words, dtype=torch.int32)
        self._write_mask(bits, 0, bits.data_ptr(), self._words * 4)
        return (int(bits[0, token // 32]) >> (token % 32)) & 1 == 1

    def advance(self, token: int) -> None:
        if token in self._eos:
            return
        self._consume(token)

    def _copy_with(self, **state) -> GrammarCursor:
        """This cursor with its backend state replaced (the EOS tables are shared, not rebuilt)."""
        child = copy.copy(self)
        child.__dict__.update(state)
        return child

    # ---- what a backend supplies -------------------------------------------------------------
    def fork(self) -> GrammarCursor:
        """An independent cursor at the same position (a beam that two children continue)."""
        raise NotImplementedError

    def _write_mask(self, bits: torch.Tensor, row: int, address: int, num_bytes: int) -> None:
        """The allowed tokens as bits into row `row` of `bits`: the int32 words at `address` (num_bytes
        of them)."""
        raise NotImplementedError

    def _consume(self, token: int) -> None:
        raise NotImplementedError

    def _rollback(self, num_tokens: int) -> None:
        raise NotImplementedError

    @property
    def is_complete(self) -> bool:
        """The output so far is a full match (ending here would be valid)."""
        raise NotImplementedError


class OutlinesCoreCursor(GrammarCursor):
    def __init__(self, index, vocab_size: int, eos_token_ids: frozenset[int]):
        from outlines_core import Guide
        super().__init__(vocab_size, eos_token_ids)
        self._index = index
        # Speculative decoding walks drafts forward and back: room for the longest draft.
        self._guide = Guide(index, max_rollback=MAX_DRAFT_TOKENS)
        self._consumed: list[int] = []

    def fork(self) -> OutlinesCoreCursor:
        # A Guide copies only through a serialization of its whole index (0.9 ms for a small schema);
        # walking a fresh one along the tokens costs microseconds each.
        from outlines_core import Guide
        guide = Guide(self._index, max_rollback=MAX_DRAFT_TOKENS)
        for token in self._consumed:
            guide.advance(token, return_tokens=False)
        return self._copy_with(_guide=guide, _consumed=list(self._consumed))

    def _write_mask(self, bits: torch.Tensor, row: int, address: int, num_bytes: int) -> None:
        self._guide.write_mask_into(address, num_bytes // 4, 4)

    def _consume(self, token: int) -> None:
        self._guide.advance(token, return_tokens=False)
        self._consumed.append(token)

    def _rollback(self, num_tokens: int) -> None:
        self._guide.rollback_state(num_tokens)
        del self._consumed[len(self._consumed) - num_tokens :]

    @property
    def is_complete(self) -> bool:
        return self._guide.is_finished()


class LLGuidanceCursor(GrammarCursor):
    def __init__(self, matcher, vocab_size: int, eos_token_ids: frozenset[int]):
        super().__init__(vocab_size, eos_token_ids)
        self._matcher = matcher

    def fork(self) -> LLGuidanceCursor:
        return self._copy_with(_matcher=self._matcher.deep_copy())

    def _write_mask(self, bits: torch.Tensor, row: int, address: int, num_bytes: int) -> None:
        self._matcher.unsafe_compute_mask_ptr(address, num_bytes)

    def _consume(self, token: int) -> None:
        self._matcher.consume_token(token)

    def _rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    @property
    def is_complete(self) -> bool:
        return self._matcher.is_accepting()


class XGrammarCursor(GrammarCursor):
    def __init__(self, matcher, vocab_size: int, eos_token_ids: frozenset[int], utf8: Utf8Table):
        super().__init__(vocab_size, eos_token_ids)
        self._matcher = matcher
        self._utf8 = utf8
        self._utf8_states = [ACCEPT]          # the UTF-8 decoder's state before and after each token consumed

    def fork(self) -> XGrammarCursor:
        return self._copy_with(_matcher=self._matcher.fork(), _utf8_states=list(self._utf8_states))

    def _write_mask(self, bits: torch.Tensor, row: int, address: int, num_bytes: int) -> None:
        self._matcher.fill_next_token_bitmask(bits, row)
        bits[row] &= self._utf8.bits[self._utf8_states[-1]]

    def _consume(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise GrammarError(f"token {token} is outside the grammar")
        state = int(self._utf8.after[self._utf8_states[-1], token])
        self._utf8_states.append(ACCEPT if state == REJECT else state)

    def _rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)
        del self._utf8_states[len(self._utf8_states) - num_tokens:]

    @property
    def is_complete(self) -> bool:
        return self._matcher.is_completed()


def unpack_bits(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [R, words] allowed-token bits -> bool [R, vocab_size]."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits.unsqueeze(2) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]
