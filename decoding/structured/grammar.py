"""Grammars over the token vocabulary: a constraint (a JSON schema, a regex or a list of choices) compiled
once per backend, and a cursor per sequence that walks it.

Three backends (constraint.BACKENDS): llguidance (llguidance_backend.py), which compiles in
milliseconds under its own parser limits and computes masks lazily; outlines-core, which turns the
constraint into a regex and the regex into a token index ahead of time; and xgrammar
(xgrammar_backend.py), which precomputes the masks of a grammar's context-independent tokens. The last
two compile in worker processes under a CPU-time and memory budget (compile_workers.py). Each enabled
backend starts on its first constraint. Compiled grammars are cached per constraint with a bounded size,
and so are refusals; a slow compile holds up no other. `uniqueItems`, which no backend enforces, is
enforced beside each of them (distinct_items.py). The engine sees only `GrammarCompiler` and
`GrammarCursor`: allowed-token bits, advance, roll back, complete.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import replace


from decoding.structured.compile_workers import CompileWorkers, WorkerSetup
from decoding.structured.constraint import BACKENDS, Constraint, GrammarError
from decoding.structured.cursors import (GrammarCursor, LLGuidanceCursor, OutlinesCoreCursor, XGrammarCursor,
                                         unpack_bits)
from decoding.structured.distinct_items import (DistinctItemsCursor, DistinctItemsGrammar, TokenSpellings,
                                                has_unique_items, unmeetable, without_unique_items)
from decoding.structured.json_position import SchemaPlaces
from decoding.structured.llguidance_backend import LLGuidanceGrammar, LLGuidanceGrammars
from decoding.structured.vocabulary import outlines_vocabulary
from decoding.structured.xgrammar_backend import XGrammarGrammar, XGrammarGrammars

__all__ = ["GrammarCompiler", "GrammarCursor", "GrammarError", "schema_text", "schema_valid", "unpack_bits"]


class GrammarCompiler:
    """Owned by the engine: each enabled backend's compiler, and the cache of grammars and refusals."""

    def __init__(self, tokenizer, eos_token_ids: frozenset[int], vocab_size: int, cache_size: int = 256,
                 cpu_budget_s: float = 5.0, memory_gb: float = 4.0, max_workers: int = 2,
                 backends: tuple[str, ...] = BACKENDS):
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.backends = backends
        self._tokenizer = tokenizer
        self._budget = (cpu_budget_s, memory_gb, max_workers)
        self._compilers: dict[str, object] = {}      # backend -> its compiler, built on first use
        self._compilers_lock = threading.Lock()
        self._cache: OrderedDict[Constraint, object] = OrderedDict()   # a grammar, or the GrammarError
        self._cache_size = cache_size
        self._compiling: dict[Constraint, Future] = {}
        self._lock = threading.Lock()         # guards the two dicts only, never a compile
        self._spellings: TokenSpellings | None = None       # built on the first uniqueItems schema

    def compile(self, constraint: Constraint):
        """The compiled grammar of `constraint` (from the cache when it was compiled before); a
        GrammarError saying what to fix. Safe from any thread; concurrent requests for the same
        constraint share one compile."""
        if constraint.backend not in self.backends:
            raise GrammarError(f"the {constraint.backend!r} structured-output backend is not enabled on this "
                               f"server (enabled: {', '.join(self.backends)})")
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
                outcome = self._compiled(constraint)
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

    def _compiled(self, constraint: Constraint):
        """The backend's grammar; for a schema with `uniqueItems`, of the schema without it, wrapped with
        where the schema asks for it (distinct_items.py enforces it beside the backend)."""
        compiler = self._compiler(constraint.backend)
        if constraint.json_schema is None or '"uniqueItems"' not in constraint.json_schema:
            return compiler.compile(constraint)
        schema = json.loads(constraint.json_schema)
        if not has_unique_items(schema):
            return compiler.compile(constraint)
        if (problem := unmeetable(schema)) is not None:
            raise GrammarError(f"json_schema cannot be met: {problem}")
        inner = compiler.compile(replace(constraint, json_schema=json.dumps(without_unique_items(schema))))
        return DistinctItemsGrammar(inner, SchemaPlaces(schema))

    @staticmethod
    def _result(outcome):
        if isinstance(outcome, GrammarError):
            raise GrammarError(str(outcome))
        return outcome

    def _compiler(self, backend: str):
        """The backend's compiler: an object with `compile(constraint)` (and `close()`)."""
        with self._compilers_lock:
            if backend not in self._compilers:
                cpu_budget_s, memory_gb, max_workers = self._budget
                eos = self.eos_token_ids
                if backend == "llguidance":
                    compiler = LLGuidanceGrammars(self._tokenizer, eos, self.vocab_size)
                elif backend == "xgrammar":
                    compiler = XGrammarGrammars(self._tokenizer, eos, self.vocab_size, cpu_budget_s, memory_gb,
                                                max_workers)
                else:
                    compiler = CompileWorkers(WorkerSetup("outlines-core", outlines_vocabulary(self._tokenizer, min(eos))),
                                              cpu_budget_s, memory_gb, max_workers)
                self._compilers[backend] = compiler
            return self._compilers[backend]

    def cursor(self, grammar) -> GrammarCursor:
        if isinstance(grammar, DistinctItemsGrammar):
            if self._spellings is None:
                self._spellings = TokenSpellings(self._tokenizer, self.vocab_size)
            return DistinctItemsCursor(self.cursor(grammar.inner), grammar.places, self._spellings)
        if isinstance(grammar, LLGuidanceGrammar):
            return LLGuidanceCursor(self._compiler("llguidance").matcher(grammar), self.vocab_size, self.eos_token_ids)
        if isinstance(grammar, XGrammarGrammar):
            compiler = self._compiler("xgrammar")
            return XGrammarCursor(compiler.matcher(grammar), self.vocab_size, self.eos_token_ids, compiler.utf8)
        return OutlinesCoreCursor(grammar, self.vocab_size, self.eos_token_ids)

    def close(self) -> None:
        with self._compilers_lock:
            for compiler in self._compilers.values():
                if hasattr(compiler, "close"):
                    compiler.close()


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
