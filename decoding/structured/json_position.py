"""Where a JSON output is, byte by byte: which containers are open, which schemas apply to each, and the
items of the arrays whose schema asks for `uniqueItems`. The grammar backends enforce everything else;
this tracks only what `distinct_items.py` needs to keep those arrays' items distinct.

The output is valid JSON so far (the grammar sees to that), so the scan only follows strings, keys,
containers and the ends of scalars. The schemas that apply at a place are over-approximated: every
branch of an `anyOf`/`oneOf`, both of `then`/`else`. An array is kept distinct where any of them says
`uniqueItems: true`, which never lets through an output that one of them would refuse.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass

# A place's schemas are capped: a schema whose references fan out further is tracked through the first.
MAX_SCHEMAS_PER_PLACE = 64
WHITESPACE = frozenset(b" \t\n\r")
QUOTE, BACKSLASH = ord('"'), ord("\\")


class SchemaPlaces:
    """The schema objects that apply to a value, found from its parent's: a tuple of dicts (shared,
    never changed). `$ref`s are resolved within the document."""

    def __init__(self, root: dict):
        self._root = root
        self.root = self.expanded([root])

    def guarded(self, places: tuple) -> bool:
        return any(schema.get("uniqueItems") is True for schema in places)

    def property_of(self, places: tuple, key: str) -> tuple:
        found = []
        for schema in places:
            properties = schema.get("properties")
            matched = isinstance(properties, dict) and key in properties
            if matched:
                found.append(properties[key])
            patterns = schema.get("patternProperties")
            for pattern, sub in (patterns.items() if isinstance(patterns, dict) else ()):
                if _matches(pattern, key):
                    found.append(sub)
                    matched = True
            if not matched:
                found += [schema[name] for name in ("additionalProperties", "unevaluatedProperties") if name in schema]
        return self.expanded(found)

    def item_of(self, places: tuple, index: int) -> tuple:
        found = []
        for schema in places:
            prefix = schema.get("prefixItems")
            items = schema.get("items")
            if isinstance(prefix, list) and index < len(prefix):
                found.append(prefix[index])
            elif isinstance(items, list):             # draft 4 tuples
                found.append(items[index] if index < len(items) else schema.get("additionalItems"))
            else:
                found += [sub for sub in (items, schema.get("unevaluatedItems")) if sub is not None]
        return self.expanded(found)

    def expanded(self, schemas: list) -> tuple:
        """The schemas and everything they bring in at the same place (references, combinators)."""
        out, seen, pending = [], set(), list(schemas)
        while pending and len(out) < MAX_SCHEMAS_PER_PLACE:
            schema = pending.pop()
            if not isinstance(schema, dict) or id(schema) in seen:
                continue
            seen.add(id(schema))
            out.append(schema)
            if isinstance(schema.get("$ref"), str):
                pending.append(self.resolve(schema["$ref"]))
            for key in ("allOf", "anyOf", "oneOf"):
                if isinstance(schema.get(key), list):
                    pending += schema[key]
            pending += [schema[key] for key in ("then", "else") if key in schema]
        return tuple(out)

    def resolve(self, ref: str):
        if not ref.startswith("#"):
            return None
        node = self._root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError, TypeError):
                return None
        return node


def _matches(pattern: str, key: str) -> bool:
    try:
        return re.search(pattern, key) is not None
    except re.error:
        return True           # a pattern Python cannot read may match: assume it does (never too loose)


def canonical(value) -> str:
    """One spelling per JSON value, as uniqueItems compares them: 1 and 1.0 are equal, true and 1 are
    not, object keys in any order."""
    return json.dumps(_normalized(value), sort_keys=True, ensure_ascii=False)


def _canonical_item(spelled: bytes) -> str:
    """canonical() of an item as written. The grammar makes it JSON; should a backend let through
    something that is not, the spelling stands for the value (this runs inside a step, and must not
    raise)."""
    try:
        return canonical(json.loads(spelled.decode("utf-8", "replace")))
    except ValueError:
        return "\0" + spelled.decode("utf-8", "replace")


def _normalized(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_normalized(item) for item in value]
    if isinstance(value, dict):
        return {key: _normalized(item) for key, item in value.items()}
    return value


# What an open container expects next.
VALUE, KEY, AFTER = "value", "key", "after"


@dataclass
class Frame:
    """An open container. For an array kept distinct: its finished items (canonical and as spelled, blank
    space outside strings left out) and the bytes of the item being written (None between items)."""

    is_array: bool
    places: tuple
    distinct: bool = False
    awaiting: str = VALUE
    index: int = 0                                   # arrays: the item being written
    key: str | None = None                           # objects: the property being written
    # Replaced, never changed in place, so copies of a position share them.
    seen: frozenset[str] = frozenset()
    spelled: tuple[bytes, ...] = ()                 # sorted, for the prefix lookups
    item: bytearray | None = None

    def copy(self) -> Frame:
        return Frame(self.is_array, self.places, self.distinct, self.awaiting, self.index, self.key,
                     self.seen, self.spelled, None if self.item is None else bytearray(self.item))

    def spelled_from(self, prefix: bytes) -> list[bytes]:
        """The earlier items spelled so as to start with `prefix`."""
        start = bisect.bisect_left(self.spelled, prefix)
        end = start
        while end < len(self.spelled) and self.spelled[end].startswith(prefix):
            end += 1
        return list(self.spelled[start:end])


class JsonPosition:
    """The scan of one output. `feed` returns False when the bytes finish an item that repeats an earlier
    one of an array kept distinct (the position is then not to be used further)."""

    def __init__(self, places: SchemaPlaces):
        self.places = places
        self.frames: list[Frame] = []
        self.in_string = self.escaped = self.in_key = self.in_scalar = False
        self.key_bytes = bytearray()
        self.trailing_blank = 0

    def copy(self) -> JsonPosition:
        out = JsonPosition.__new__(JsonPosition)
        out.places = self.places
        out.frames = [frame.copy() for frame in self.frames]
        out.in_string, out.escaped, out.in_key, out.in_scalar = (self.in_string, self.escaped, self.in_key,
                                                                 self.in_scalar)
        out.key_bytes = bytearray(self.key_bytes)
        out.trailing_blank = self.trailing_blank
        return out

    # ---- what the cursor asks ------------------------------------------------------------------
    def distinct_frames(self) -> list[Frame]:
        """The open arrays kept distinct that already hold an item, innermost first."""
        return [frame for frame in reversed(self.frames) if frame.distinct and frame.seen]

    def tracks_an_earlier_item(self) -> bool:
        """The item being written (or about to start) is, so far, spelled like an earlier item of its
        array: it may be forced into repeating one."""
        for frame in self.distinct_frames():
            item = frame.item if frame.item is not None else (b"" if frame.awaiting == VALUE else None)
            if item is not None and frame.spelled_from(bytes(item)):
                return True
        return False

    def key(self) -> tuple:
        """What tells positions of one output apart, blank space aside: the containers open, what each
        expects, the items of arrays kept distinct so far, the state inside a string or number, and the
        blank space since the last other byte (a grammar may ask for exactly one space there)."""
        frames = tuple((frame.awaiting, len(frame.spelled), None if frame.item is None else bytes(frame.item))
                       for frame in self.frames)
        return (frames, self.in_string, self.in_key, self.escaped, self.in_scalar, bytes(self.key_bytes),
                self.trailing_blank)

    # ---- the scan ---------------------------------------------------------------------------------
    def feed(self, data: bytes) -> bool:
        for byte in data:
            if not self._byte(byte):
                return False
        return True

    def _byte(self, byte: int) -> bool:
        if self.in_scalar and (byte in b",]}" or byte in WHITESPACE):
            self.in_scalar = False              # the delimiter ends the number (and is no part of it)
            if not self._value_done():
                return False
        top = self.frames[-1] if self.frames else None
        if (top is not None and top.distinct and top.awaiting == VALUE and not self.in_string
                and not self.in_scalar and byte not in WHITESPACE and byte != ord("]")):
            top.item = bytearray()              # this byte starts an item
        blank = byte in WHITESPACE and not self.in_string
        self.trailing_blank = self.trailing_blank + 1 if blank else 0
        if not blank:
            # Items are kept without the blank space between tokens, so two spellings of one value
            # that differ only there compare equal (backends with free whitespace write either).
            for frame in self.frames:
                if frame.item is not None:
                    frame.item.append(byte)
        if self.in_string:
            return self._string_byte(byte)
        if self.in_scalar or byte in WHITESPACE:
            return True
        return self._structural_byte(byte, top)

    def _structural_byte(self, byte: int, top: Frame | None) -> bool:
        """A byte outside strings and numbers: punctuation, or the first byte of a value. Output that is
        not JSON (a backend's bug) must not raise here: punctuation outside any container is passed over."""
        if byte in b":," and top is None:
            return True
        if byte == ord(":"):
            top.awaiting = VALUE
        elif byte == ord(","):
            top.awaiting = VALUE if top.is_array else KEY
            top.index += top.is_array
        elif byte in b"}]":
            if not self.frames:
                return True
            self.frames.pop()
            return self._value_done()
        elif byte == QUOTE:
            self.in_string = True
            self.in_key = top is not None and not top.is_array and top.awaiting == KEY
            self.key_bytes = bytearray(b'"')
        elif byte in b"{[":
            places = (self.places.root if top is None else
                      self.places.item_of(top.places, top.index) if top.is_array else
                      self.places.property_of(top.places, top.key or ""))
            is_array = byte == ord("[")
            self.frames.append(Frame(is_array, places, is_array and self.places.guarded(places),
                                     VALUE if is_array else KEY))
        else:
            self.in_scalar = True
        return True

    def _string_byte(self, byte: int) -> bool:
        if self.in_key:
            self.key_bytes.append(byte)
        if self.escaped:
            self.escaped = False
        elif byte == BACKSLASH:
            self.escaped = True
        elif byte == QUOTE:
            self.in_string = False
            if not self.in_key:
                return self._value_done()
            self.in_key = False
            if not self.frames:
                return True
            try:
                self.frames[-1].key = json.loads(self.key_bytes.decode("utf-8", "replace"))
            except ValueError:                   # never raise on the step's path: keep the spelling
                self.frames[-1].key = self.key_bytes.decode("utf-8", "replace")
        return True

    def _value_done(self) -> bool:
        """A value ended that sits directly in the innermost open container (or is the whole output)."""
        if not self.frames:
            return True
        top = self.frames[-1]
        top.awaiting = AFTER
        if not (top.distinct and top.item is not None):
            return True
        spelled, top.item = bytes(top.item), None
        value = _canonical_item(spelled)
        if value in top.seen:
            return False
        top.seen = top.seen | {value}
        index = bisect.bisect_left(top.spelled, spelled)
        top.spelled = top.spelled[:index] + (spelled,) + top.spelled[index:]
        return True
