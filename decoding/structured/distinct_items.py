"""`uniqueItems: true`, enforced beside any backend: no backend's grammar can say "an item unlike the
earlier ones" (llguidance, outlines-core and xgrammar all refuse the keyword), so the schema goes to the
backend without it, and each sequence's cursor narrows the backend's allowed tokens further.

Two rules, applied only while the output is inside an array kept distinct that already has an item:

1. A token that would finish an item equal to an earlier one (as JSON compares values: 1 and 1.0 are
   equal, true and 1 are not, key order is ignored) is not allowed. Found by scanning each allowed
   token that could finish an item (one with a quote, comma or closing bracket where it matters).
2. A token that keeps the item spelled exactly like an earlier one, so far, is allowed only if some
   way on stays clear of rule 1 (an enum item whose values are all used, a `{"Key": .., "Value": ..}`
   whose last free field is already written as before). Checked by walking the backend's grammar along
   the earlier items' spellings, within a budget of grammar states per step. A token that leaves every
   earlier spelling is taken to stay clear: the backends write one spelling per value (fixed property
   order and whitespace), so a different spelling is a different value. The exceptions are escapes
   (`"\\u0061"` is `"a"`) and number forms (`1.0` is `1`), which rule 1 still catches when they finish
   an item; the walk does not follow them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

from decoding.structured.cursors import GrammarCursor
from decoding.structured.json_position import VALUE, JsonPosition, SchemaPlaces, canonical
from decoding.structured.schema_rewrites import map_subschemas, subschemas
from decoding.structured.vocabulary import token_bytes

# Grammar states rule 2 may visit per step, and how many tokens ahead: the walk follows earlier items'
# spellings only, so it is short unless many earlier items share a long spelling.
LOOKAHEAD_STATES = 256
LOOKAHEAD_TOKENS = 48


def has_unique_items(schema) -> bool:
    return any(node.get("uniqueItems") is True for _, node in subschemas(schema))


def without_unique_items(schema):
    """The schema a backend is given: `uniqueItems: true` is this module's to enforce."""
    return map_subschemas(schema, lambda node: {key: value for key, value in node.items()
                                                if not (key == "uniqueItems" and value is True)})


def unmeetable(schema: dict) -> str | None:
    """Where an array kept distinct needs more items than its items have values (an enum of two and
    `minItems: 3`), "<path>: <why>": no output could finish, so the schema is refused rather than
    written into a corner."""
    places = SchemaPlaces(schema)
    for path, node in subschemas(schema):
        needed = node.get("minItems")
        if node.get("uniqueItems") is True and isinstance(needed, int) and isinstance(node.get("items"), dict) \
                and "prefixItems" not in node:
            values = _most_values(node["items"], places)
            if values is not None and needed > values:
                return f"{path}: minItems {needed} with uniqueItems, but the items have {values} values"
    return None


def _most_values(schema, places: SchemaPlaces, depth: int = 0) -> int | None:
    """At most how many values `schema` admits, where it bounds them (enum, const, boolean and null
    types, references and combinations of those); None where it does not."""
    if schema is False:
        return 0
    if not isinstance(schema, dict) or depth > 16:
        return None
    bounds = []
    if "const" in schema:
        bounds.append(1)
    if isinstance(schema.get("enum"), list):
        bounds.append(len({canonical(value) for value in schema["enum"]}))
    types = schema.get("type")
    types = types if isinstance(types, list) else [types] if types else []
    if types and all(name in ("boolean", "null") for name in types):
        bounds.append(sum(2 if name == "boolean" else 1 for name in set(types)))
    if isinstance(schema.get("$ref"), str):
        bounds.append(_most_values(places.resolve(schema["$ref"]), places, depth + 1))
    for key in ("anyOf", "oneOf"):               # a value of one branch or another: at most their sum
        if isinstance(schema.get(key), list):
            counts = [_most_values(branch, places, depth + 1) for branch in schema[key]]
            bounds.append(None if None in counts else sum(counts))
    if isinstance(schema.get("allOf"), list):    # a value of every branch: at most the fewest
        bounds += [_most_values(branch, places, depth + 1) for branch in schema["allOf"]]
    return min((bound for bound in bounds if bound is not None), default=None)


@dataclass(frozen=True)
class DistinctItemsGrammar:
    """A backend's grammar of the schema without `uniqueItems`, and where the schema asks for it."""

    inner: object
    places: SchemaPlaces = field(compare=False, repr=False)


class TokenSpellings:
    """Each token's bytes, looked up both ways, and the tokens with a quote. Built once per vocabulary."""

    def __init__(self, tokenizer, vocab_size: int):
        spelled = token_bytes(tokenizer)
        self.bytes = [spelled.get(i, b"") for i in range(vocab_size)]
        self.by_bytes: dict[bytes, list[int]] = {}
        for token, text in spelled.items():
            if text:
                self.by_bytes.setdefault(text, []).append(token)
        self.longest = max((len(text) for text in self.by_bytes), default=1)
        self._following: dict[tuple[int, bytes], tuple[tuple[bytes, ...], frozenset[int]]] = {}
        # As allowed-token words (bit i of word i // 32), to intersect with a mask word by word.
        self.with_quote = _words_of([i for i, text in enumerate(self.bytes) if b'"' in text], vocab_size)
        # Outside a string an item ends at a quote, a bracket, or (a number) at a comma or blank space.
        self.with_quote_or_delimiter = _words_of(
            [i for i, text in enumerate(self.bytes) if any(c in text for c in b'",]} \t\n\r')], vocab_size)


    def following(self, spelled: tuple[bytes, ...], item: bytes) -> frozenset[int]:
        """The tokens that spell on from `item` along one of `spelled` (sorted), remembered for the last
        few arrays (a step asks the same of every token it looks ahead from)."""
        key = (id(spelled), item)
        if key not in self._following or self._following[key][0] is not spelled:
            start = bisect.bisect_left(spelled, item)
            found = set()
            for earlier in spelled[start:]:
                if not earlier.startswith(item):
                    break
                rest = earlier[len(item):]
                for end in range(1, min(len(rest), self.longest) + 1):
                    found.update(self.by_bytes.get(rest[:end], ()))
            if len(self._following) >= 4096:
                self._following.clear()
            self._following[key] = (spelled, frozenset(found))
        return self._following[key][1]


def _words_of(tokens: list[int], vocab_size: int) -> np.ndarray:
    words = np.zeros((vocab_size + 31) // 32, dtype=np.uint32)
    for token in tokens:
        words[token >> 5] |= np.uint32(1 << (token & 31))
    return words


def _tokens_in(words: np.ndarray) -> np.ndarray:
    """The token ids whose bits are set."""
    nonzero = np.flatnonzero(words)
    bits = np.unpackbits(words[nonzero].view(np.uint8), bitorder="little").reshape(len(nonzero), 32)
    rows, columns = np.nonzero(bits)
    return nonzero[rows] * 32 + columns


def _allowed(words: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    return tokens[((words[tokens >> 5] >> (tokens & 31).astype(np.uint32)) & 1).astype(bool)]


def _disallow(words: np.ndarray, token: int) -> None:
    words[token >> 5] &= np.uint32(~(1 << (token & 31)) & 0xFFFFFFFF)


class DistinctItemsCursor(GrammarCursor):
    """A backend's cursor, its masks narrowed by the module's two rules."""

    def __init__(self, inner: GrammarCursor, places: SchemaPlaces, spellings: TokenSpellings):
        super().__init__(inner._vocab_size, frozenset(inner._eos))
        self._inner = inner
        self._spellings = spellings
        self._position = JsonPosition(places)
        # The position before each consumed token, and whether an item had repeated by then: rule 2's
        # trial walks and a draft's masks consume and roll back, and a repeat on a walk is none.
        self._history: list[tuple[JsonPosition, bool]] = []
        self.repeated_an_item = False

    def fork(self) -> DistinctItemsCursor:
        return self._copy_with(_inner=self._inner.fork(), _position=self._position.copy(),
                               _history=list(self._history))

    def _write_mask(self, bits: torch.Tensor, row: int, address: int, num_bytes: int) -> None:
        self._inner._write_mask(bits, row, address, num_bytes)
        if self._position.distinct_frames():
            words = bits[row].numpy().view(np.uint32)
            backend_words = words.copy()
            if not self._narrow(words, Lookahead(), every_token=True):
                # No way on avoids a repeat: reached only past the lookahead's budget (a schema that
                # cannot be met is refused when compiled). The backend's tokens stay allowed rather than
                # none, so the step goes on; `repeated_an_item` then tells.
                words[:] = backend_words

    def _consume(self, token: int) -> None:
        position, repeated_before = self._position.copy(), self.repeated_an_item
        if not position.feed(self._spellings.bytes[token]):
            self.repeated_an_item = True
        self._inner._consume(token)
        self._history.append((self._position, repeated_before))
        self._position = position

    def _rollback(self, num_tokens: int) -> None:
        self._inner._rollback(num_tokens)
        self._position, self.repeated_an_item = self._history[-num_tokens]
        del self._history[-num_tokens:]

    @property
    def is_complete(self) -> bool:
        return self._inner.is_complete

    # ---- the two rules ---------------------------------------------------------------------------
    def _narrow(self, words: np.ndarray, lookahead: Lookahead, every_token: bool) -> bool:
        """Disallow, in the allowed-token words of the current position, the tokens rule 1 or rule 2
        refuses; whether any token is left. With every_token False the caller needs only the answer, so
        the walk stops at the first token that leaves every earlier spelling."""
        position, spellings = self._position, self._spellings
        scanned = _tokens_in(words & self._worth_scanning(position))
        candidates = np.array(sorted(self._following_spellings(position)), dtype=np.int64)
        following = set(_allowed(words, candidates).tolist()) if len(candidates) else set()
        if not every_token and _count(words) > len(following) + len(scanned):
            return True        # a token that neither follows an earlier spelling nor can finish an item
        finishing = []
        for token in scanned.tolist():
            after = position.copy()
            if not after.feed(spellings.bytes[token]):
                finishing.append(token)
            elif after.tracks_an_earlier_item():
                following.add(token)
        for token in finishing:
            _disallow(words, token)
        if not every_token and _count(words) > len(following):
            return True                        # a token leaves every earlier spelling
        for token in sorted(following):
            if not lookahead.clear_after(self, token):
                _disallow(words, token)
        return _count(words) > 0

    def _worth_scanning(self, position: JsonPosition) -> np.ndarray:
        """The tokens to scan for both rules: those that could finish an item or hold blank space (which
        spellings leave out), as the scan must see them. In a string, those with a quote (a token must
        end the string before it can do either); outside strings, those with a quote, a comma, a
        closing bracket or blank space. Any other token that follows an earlier spelling does so byte
        for byte (_following_spellings)."""
        return self._spellings.with_quote if position.in_string else self._spellings.with_quote_or_delimiter

    def _following_spellings(self, position: JsonPosition) -> set[int]:
        """The tokens that continue an item along an earlier item's spelling byte for byte."""
        found = set()
        for frame in position.distinct_frames():
            item = bytes(frame.item) if frame.item is not None else (b"" if frame.awaiting == VALUE else None)
            if item is not None:
                found |= self._spellings.following(frame.spelled, item)
        return found


class Lookahead:
    """Rule 2's walk for one step: what it found at each position it reached (positions that differ
    only in blank space are one), within LOOKAHEAD_STATES."""

    def __init__(self):
        self.clear: dict[tuple, bool] = {}
        self.depth = 0

    def clear_after(self, cursor: DistinctItemsCursor, token: int) -> bool:
        """Whether some way on from `token` stays clear of repeating an item. Past the budget, yes."""
        if len(self.clear) >= LOOKAHEAD_STATES or self.depth >= LOOKAHEAD_TOKENS:
            return True
        cursor._consume(token)
        try:
            where = cursor._position.key()
            if where in self.clear:
                return self.clear[where]
            self.clear[where] = False           # coming back here (blank space) is no way out
            scratch = torch.zeros(1, cursor._words, dtype=torch.int32)
            cursor._inner._write_mask(scratch, 0, scratch.data_ptr(), cursor._words * 4)
            words = scratch[0].numpy().view(np.uint32)
            self.depth += 1
            try:
                found = cursor._inner.is_complete or (
                    cursor._narrow(words, self, every_token=False) if cursor._position.distinct_frames()
                    else _count(words) > 0)
            finally:
                self.depth -= 1
            self.clear[where] = found
            return found
        finally:
            cursor._rollback(1)


def _count(words: np.ndarray) -> int:
    return int(np.bitwise_count(words).sum())
