"""What a constrained request asks for, as the regex its output must match in full.

Torch-free on purpose: the compile workers (compile_workers.py) import it, and a worker should start in a
fraction of a second and hold little memory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from decoding.params import SamplingParams
from decoding.structured.schema_support import unsupported_construct


class GrammarError(ValueError):
    """A constraint that cannot be compiled, with what to fix."""


@dataclass(frozen=True)
class Constraint:
    """The constraint fields of a request: the cache key of its compiled grammar, and what a compile
    worker receives."""

    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    best_effort: bool = False

    @classmethod
    def of(cls, params: SamplingParams) -> Constraint | None:
        if not params.is_constrained:
            return None
        choice = None if params.choice is None else tuple(params.choice)
        # best_effort changes only whether unenforceable schemas are refused, so it is part of the key
        # only for schemas.
        return cls(params.json_schema, params.regex, choice,
                   params.structured_best_effort and params.json_schema is not None)


def constraint_regex(constraint: Constraint) -> str:
    """The regex the output must match in full; GrammarError saying what to fix when there is none."""
    if constraint.regex is not None:
        try:
            re.compile(constraint.regex)
        except re.error as err:
            raise GrammarError(f"regex does not compile: {err}") from err
        return constraint.regex
    if constraint.choice is not None:
        return "(" + "|".join(re.escape(choice) for choice in constraint.choice) + ")"
    from outlines_core.json_schema import build_regex_from_schema
    problem = unsupported_construct(json.loads(constraint.json_schema))
    if problem is not None and not constraint.best_effort:
        raise GrammarError(f"json_schema uses a construct that constrained decoding cannot enforce ({problem}); "
                           "remove or rewrite it, or opt into structured_best_effort")
    try:
        return build_regex_from_schema(constraint.json_schema)
    except (ValueError, TypeError, RuntimeError) as err:
        raise GrammarError(f"json_schema cannot be compiled: {err}") from err
