"""The xgrammar backend: a constraint becomes an xgrammar grammar whose context-independent token masks
are computed ahead, in a compile worker under the CPU-time and memory budget (compile_workers.py); it
comes back serialized, and each sequence walks it with its own `GrammarMatcher`.

xgrammar converts a schema as vLLM asks it to (strict mode: no properties or items beyond those the
schema lists; JSON as json.dumps writes it, ", " and ": " and no other whitespace), and it skips some
keywords without a word: `xgrammar_support.unsupported_construct` names them, so strict requests are
refused with what to change and best-effort ones are validated after the fact. Counted strings go
through a pattern (`xgrammar_support.with_counted_strings`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from decoding.structured.compile_workers import CompileWorkers, WorkerSetup
from decoding.structured.constraint import Constraint, GrammarError, unenforceable
from decoding.structured.schema_rewrites import prepared
from decoding.structured.utf8_guard import Utf8Table
from decoding.structured.xgrammar_support import FORMATS, unsupported_construct, with_counted_strings


@dataclass(frozen=True)
class XGrammarGrammar:
    """A compiled constraint: the grammar every matcher of the constraint starts from."""

    compiled: object          # xgrammar.CompiledGrammar


class XGrammarGrammars:
    def __init__(self, tokenizer, eos_token_ids: frozenset[int], vocab_size: int, cpu_budget_s: float,
                 memory_gb: float, max_workers: int):
        import xgrammar

        self._xgrammar = xgrammar
        # The model's vocabulary size, so masks have the width of the logits; every EOS id ends a match.
        self.tokenizer_info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                                      stop_token_ids=sorted(eos_token_ids))
        self._workers = CompileWorkers(WorkerSetup("xgrammar", self.tokenizer_info.serialize_json()),
                                       cpu_budget_s, memory_gb, max_workers)
        # xgrammar's string rules let ill-formed UTF-8 through; its cursors mask it (utf8_guard).
        self.utf8 = Utf8Table(tokenizer, vocab_size)

    def compile(self, constraint: Constraint) -> XGrammarGrammar:
        serialized = self._workers.compile(constraint)
        return XGrammarGrammar(self._xgrammar.CompiledGrammar.deserialize_json(serialized, self.tokenizer_info))

    def matcher(self, grammar: XGrammarGrammar):
        # Rollback (speculative decoding walks drafts forward and back) is unbounded in xgrammar 0.2.
        return self._xgrammar.GrammarMatcher(grammar.compiled)

    def close(self) -> None:
        self._workers.close()


def worker_compiler(tokenizer_info_json: str) -> Callable[[Constraint], str]:
    """The compile a worker process runs: a constraint in, its compiled grammar serialized as JSON out."""
    import xgrammar

    info = xgrammar.TokenizerInfo.deserialize_json(tokenizer_info_json)
    # One thread: the worker's CPU budget is per process, and the engine's threads need the cores.
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile_constraint(constraint: Constraint) -> str:
        if constraint.regex is not None:
            compiled = _checked(compiler.compile_regex, constraint.checked_regex(), "regex")
        elif constraint.choice is not None:
            compiled = _checked(compiler.compile_regex, constraint.choice_regex(), "choice")
        else:
            schema = prepared(json.loads(constraint.json_schema), FORMATS)
            problem = unsupported_construct(schema)
            if problem is not None and not constraint.best_effort:
                raise unenforceable(problem)
            compiled = _checked(lambda text: compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True),
                                json.dumps(with_counted_strings(schema)), "json_schema")
        return compiled.serialize_json()

    return compile_constraint


def _checked(compile_text: Callable[[str], object], text: str, field: str):
    try:
        return compile_text(text)
    except (RuntimeError, ValueError, TypeError) as err:      # xgrammar's conversion errors
        raise GrammarError(f"{field} cannot be compiled by xgrammar: {err}") from err
