"""Grammars over the token vocabulary, through outlines-core: a regex (from a JSON schema, a regex or a
list of choices) compiled once into an index of allowed tokens per automaton state, and a cursor per
sequence that walks it.

Compiled indexes are cached per constraint (the tokenizer is fixed per engine) with a bounded size, and
so are refusals. Compiles run in worker processes under a CPU-time and memory budget
(compile_workers.py), so a pathological schema ends in a clear error instead of an engine that never
answers or grows without bound, and a slow compile holds up no other.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future

import torch

from decoding.structured.compile_workers import CompileWorkers
from decoding.structured.constraint import Constraint, GrammarError
from decoding.structured.vocabulary import outlines_vocabulary

__all__ = ["GrammarCompiler", "GrammarCursor", "GrammarError", "schema_text", "schema_valid", "unpack_bits"]


class GrammarCompiler:
    """Owned by the engine: the compile workers, and the cache of indexes and refusals."""

    def __init__(self, tokenizer, eos_token_ids: frozenset[int], vocab_size: int, cache_size: int = 256,
                 cpu_budget_s: float = 5.0, memory_gb: float = 4.0, max_workers: int = 2):
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self._workers = CompileWorkers(outlines_vocabulary(tokenizer, min(eos_token_ids)), cpu_budget_s, memory_gb,
                                       max_workers)
        self._cache: OrderedDict[Constraint, object] = OrderedDict()   # an Index, or the GrammarError
        self._cache_size = cache_size
        self._compiling: dict[Constraint, Future] = {}
        self._lock = threading.Lock()         # guards the two dicts only, never a compile

    def compile(self, constraint: Constraint):
        """The outlines-core Index of `constraint` (from the cache when it was compiled before); a
        GrammarError saying what to fix. Safe from any thread; concurrent requests for the same
        constraint share one compile."""
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                return self._result(self._cache[constraint])
            future = self._compiling.get(constraint)
            owner = future is None
            if owner:
                future = self._compiling[constraint] = Future()
        if owner:
            try:
                outcome = self._workers.compile(constraint)
            except GrammarError as err:
                outcome = err
            except BaseException as err:      # not the constraint's fault: not cached
                with self._lock:
                    del self._compiling[constraint]
                future.set_exception(err)
                raise
            with self._lock:
                del self._compiling[constraint]
                self._cache[constraint] = outcome
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            future.set_result(outcome)
        return self._result(future.result())

    @staticmethod
    def _result(outcome):
        if isinstance(outcome, GrammarError):
            raise GrammarError(str(outcome))
        return outcome

    def cursor(self, index) -> GrammarCursor:
        return GrammarCursor(index, self.vocab_size, self.eos_token_ids)

    def close(self) -> None:
        self._workers.close()


MAX_DRAFT_TOKENS = 64


class GrammarCursor:
    """One sequence's position in a compiled grammar."""

    def __init__(self, index, vocab_size: int, eos_token_ids: frozenset[int]):
        from outlines_core import Guide
        # Speculative decoding walks drafts forward and back: room for the longest draft.
        self._guide = Guide(index, max_rollback=MAX_DRAFT_TOKENS)
        self._vocab_size = vocab_size
        self._eos = sorted(i for i in eos_token_ids if i < vocab_size)
        self._words = (vocab_size + 31) // 32          # int32 words of an allowed-token bitmask

    def allowed(self) -> torch.Tensor:
        """bool [vocab]: the tokens that keep the output inside the grammar (EOS only where it may end)."""
        return unpack_bits(GrammarCursor.allowed_bits([self]), self._vocab_size)[0]

    @staticmethod
    def allowed_bits(cursors: list[GrammarCursor]) -> torch.Tensor:
        """allowed() of each cursor as packed bits, int32 [len(cursors), ceil(vocab / 32)] (token i is bit
        i % 32 of word i // 32), written for all of them at once; the sampler applies them unpacked."""
        first = cursors[0]
        bits = torch.zeros(len(cursors), first._words, dtype=torch.int32)
        for row, cursor in enumerate(cursors):
            cursor._guide.write_mask_into(bits[row].data_ptr(), bits.shape[1], 4)
        if first._eos:                      # any EOS id ends the output where the primary one may
            words = torch.tensor([i // 32 for i in first._eos])
            flags = torch.tensor([1 << (i % 32) for i in first._eos], dtype=torch.int64).to(torch.int32)
            any_eos = ((bits[:, words] & flags) != 0).any(dim=1)
            for word, flag in zip(words.tolist(), flags.tolist()):
                bits[any_eos, word] |= flag
        return bits

    def masks_along(self, draft: list[int]) -> list[torch.Tensor]:
        """The allowed-token mask at each verified position of a draft chain: row j is the mask after
        draft[:j]. From the first draft token the grammar refuses, later rows allow everything: the
        verifier rejects that token (its probability under the masked target is 0), so they are never
        read. The cursor ends where it started."""
        masks = [self.allowed()]
        advanced, valid = 0, True
        for token in draft:
            valid = valid and bool(masks[-1][token]) and token not in self._eos
            if valid:
                self._guide.advance(token, return_tokens=False)
                advanced += 1
                masks.append(self.allowed())
            else:
                masks.append(torch.ones(self._vocab_size, dtype=torch.bool))
        if advanced:
            self._guide.rollback_state(advanced)
        return masks

    def masks_for(self, proposal) -> list[torch.Tensor]:
        """The mask at each verified row of a draft chain or tree (row 0: the sequence's last token;
        row i + 1: after the path to draft token i)."""
        if proposal.parents is None:
            return self.masks_along(proposal.token_ids)
        return [self.allowed()] + [self.masks_along(proposal.path(i))[-1] for i in range(len(proposal.token_ids))]

    def advance(self, token: int) -> None:
        if token in self._eos:
            return
        self._guide.advance(token, return_tokens=False)

    @property
    def is_complete(self) -> bool:
        """The output so far is a full match (ending here would be valid)."""
        return self._guide.is_finished()


def unpack_bits(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [R, words] allowed-token bits -> bool [R, vocab_size]."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits.unsqueeze(2) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]


def schema_text(schema: str | dict) -> str:
    """A JSON schema as text, its property order kept (outlines-core emits properties in that order)."""
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except ValueError as err:
            raise GrammarError(f"json_schema is not valid JSON: {err}") from err
        return schema
    return json.dumps(schema)


def schema_valid(schema_text: str, output: str) -> bool:
    """Whether `output` parses as JSON and validates against the schema (best-effort requests)."""
    import jsonschema
    try:
        jsonschema.validate(json.loads(output), json.loads(schema_text))
    except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
        return False
    return True
