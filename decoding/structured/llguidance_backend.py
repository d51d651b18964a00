"""The llguidance backend: a constraint becomes an llguidance grammar (JSON schema, regex or a choice of
strings), checked against the tokenizer when it is compiled; each sequence walks it with its own
`LLMatcher`, which computes the allowed tokens lazily, step by step.

Compiling takes milliseconds and needs no worker process: llguidance bounds its own work with parser
limits (lexer fuel, Earley items per step, grammar size), so a pathological constraint fails with an
error instead of running on. Keywords JSON Schema does not define are ignored, as the specification says
(so are formats llguidance does not know, a oneOf of disjoint branches is an anyOf, and a pattern that
opens with lookaheads is an allOf of patterns, which llguidance intersects: schema_rewrites);
a keyword llguidance cannot enforce is refused, naming it and where it sits, unless the request asked for
best effort (then llguidance's lenient mode drops it and the finished output reports `schema_valid`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from decoding.structured.constraint import Constraint, GrammarError, unenforceable
from decoding.structured.schema_rewrites import prepared, with_lookaheads_split

# The string formats llguidance enforces (others are annotations: see schema_rewrites).
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"})
# llguidance's message for a keyword it does not enforce: 'Unimplemented keys: ["uniqueItems"]'.
UNIMPLEMENTED = "Unimplemented keys: "


@dataclass(frozen=True)
class LLGuidanceGrammar:
    """A compiled constraint: the grammar spec, and a matcher at its start that every sequence's matcher
    is copied from (building one parses the grammar again: 40 ms for a large tool schema, against
    0.03 ms for a copy)."""

    spec: str
    start: object = field(compare=False, repr=False)      # llguidance.LLMatcher, never advanced


class LLGuidanceGrammars:
    def __init__(self, tokenizer, eos_token_ids: frozenset[int], vocab_size: int):
        import llguidance
        import llguidance.hf

        self._llguidance = llguidance
        # The model's vocabulary size, so masks have the width of the logits; every EOS id ends a match.
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))
        self._limits = llguidance.LLParserLimits()

    def compile(self, constraint: Constraint) -> LLGuidanceGrammar:
        llguidance = self._llguidance
        if constraint.regex is not None:
            spec = llguidance.grammar_from("regex", constraint.checked_regex())
        elif constraint.choice is not None:
            spec = llguidance.grammar_from("regex", constraint.choice_regex())
        else:
            schema = json.loads(constraint.json_schema)
            if isinstance(schema, dict):
                schema = prepared(with_lookaheads_split(schema), FORMATS)
                # JSON as json.dumps writes it (", " and ": ", no other whitespace): a model is never
                # free to spend its tokens on blank space; a schema's own x-guidance options win.
                options = {"whitespace_flexible": False, **({"lenient": True} if constraint.best_effort else {})}
                schema = {**schema, "x-guidance": {**options, **schema.get("x-guidance", {})}}
            spec = llguidance.grammar_from("json_schema", json.dumps(schema))
        # Building the matcher checks the grammar against the tokenizer (one parse, not a validation and
        # then a build).
        start = llguidance.LLMatcher(self.tokenizer, spec, limits=self._limits)
        if start.is_error():
            raise GrammarError(self._explain(constraint, start.get_error().splitlines()))
        return LLGuidanceGrammar(spec, start)

    def matcher(self, grammar: LLGuidanceGrammar):
        return grammar.start.deep_copy()

    @staticmethod
    def _explain(constraint: Constraint, messages: list[str]) -> str:
        message = "; ".join(messages) or "rejected by the grammar compiler"
        if constraint.json_schema is None:
            return f"the constraint cannot be compiled: {message}"
        for line in messages:
            if line.startswith(UNIMPLEMENTED):
                keyword = json.loads(line[len(UNIMPLEMENTED):])[0]
                where = keyword_path(json.loads(constraint.json_schema), keyword) or "#"
                return str(unenforceable(f"{where}: {keyword}"))
        return f"json_schema cannot be compiled: {message}"


def keyword_path(schema, keyword: str, path: str = "#") -> str | None:
    """The JSON pointer of the first schema object that uses `keyword`, depth first."""
    if isinstance(schema, dict):
        if keyword in schema:
            return path
        items = schema.items()
    elif isinstance(schema, list):
        items = enumerate(schema)
    else:
        return None
    for key, value in items:
        if (found := keyword_path(value, keyword, f"{path}/{key}")) is not None:
            return found
    return None
