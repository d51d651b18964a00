"""What a constrained request asks for, and the backend that enforces it.

Torch-free on purpose: the compile workers (compile_workers.py) import it, and a worker should start in a
fraction of a second and hold little memory.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass

from decoding.params import SamplingParams
from decoding.structured.schema_rewrites import prepared, with_alternations_grouped
from decoding.structured.schema_support import STRING_FORMATS, unsupported_construct


# The grammar engines a server may enable, each through its own module: llguidance (the default; a
# lazy Earley parser over the schema, compiled in milliseconds, bounded by its own parser limits),
# outlines-core (a regex built from the schema, compiled ahead into a token index) and xgrammar (a
# grammar whose context-independent token masks are computed ahead).
BACKENDS = ("llguidance", "outlines-core", "xgrammar")
# A backend whose library is an optional extra, and the extra that installs it.
EXTRAS = {"xgrammar": "xgrammar"}


def installed_backends() -> tuple[str, ...]:
    """The backends whose library is installed, in BACKENDS order (the default set of an engine)."""
    return tuple(name for name in BACKENDS if name not in EXTRAS or importlib.util.find_spec(name.replace("-", "_")))


class GrammarError(ValueError):
    """A constraint that cannot be compiled, with what to fix."""


def unenforceable(problem: str) -> GrammarError:
    """The refusal of a strict schema with a construct its backend cannot enforce ("<path>: <what>")."""
    return GrammarError(f"json_schema uses a construct that constrained decoding cannot enforce ({problem}); "
                        "remove or rewrite it, or opt into structured_best_effort")


@dataclass(frozen=True)
class Constraint:
    """The constraint fields of a request: the cache key of its compiled grammar, and what a compile
    worker receives."""

    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    best_effort: bool = False
    backend: str = BACKENDS[0]

    @classmethod
    def of(cls, params: SamplingParams, backend: str = BACKENDS[0]) -> Constraint | None:
        if not params.is_constrained:
            return None
        choice = None if params.choice is None else tuple(params.choice)
        # best_effort changes only whether unenforceable schemas are refused, so it is part of the key
        # only for schemas.
        return cls(params.json_schema, params.regex, choice,
                   params.structured_best_effort and params.json_schema is not None, backend)

    def choice_regex(self) -> str:
        return "(" + "|".join(re.escape(choice) for choice in self.choice) + ")"

    def checked_regex(self) -> str:
        try:
            re.compile(self.regex)
        except re.error as err:
            raise GrammarError(f"regex does not compile: {err}") from err
        return self.regex


def constraint_regex(constraint: Constraint) -> str:
    """For outlines-core: the regex the output must match in full; GrammarError saying what to fix when
    there is none."""
    if constraint.regex is not None:
        return constraint.checked_regex()
    if constraint.choice is not None:
        return constraint.choice_regex()
    from outlines_core.json_schema import build_regex_from_schema
    schema = json.loads(constraint.json_schema)
    if isinstance(schema, dict):
        schema = with_alternations_grouped(prepared(schema, STRING_FORMATS))
    problem = unsupported_construct(schema)
    if problem is not None and not constraint.best_effort:
        raise unenforceable(problem)
    try:
        # Property order is kept (outlines-core emits properties in the order the text lists them).
        return build_regex_from_schema(json.dumps(schema))
    except (ValueError, TypeError, RuntimeError) as err:
        raise GrammarError(f"json_schema cannot be compiled: {err}") from err
