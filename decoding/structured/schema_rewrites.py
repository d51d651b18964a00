"""Rewrites of a JSON schema into one that accepts exactly the same instances (as the specification
defines them) but that a grammar backend understands better. Applied before a backend sees a schema.

- `without_unknown_formats`: a `format` the backend does not know is dropped. In JSON Schema 2020-12
  `format` is an annotation unless a validator opts into asserting it, and unknown formats are never
  asserted; so dropping it changes nothing that is valid (the schema's known formats stay enforced).
- `without_vacuous_keywords`: a keyword written with the value it has when absent (`uniqueItems: false`,
  `minItems: 0`, `minLength: 0`, `required: []`, ...) is dropped: it asserts nothing. CloudFormation's
  resource schemas write `uniqueItems: false` on hundreds of arrays.
- `with_lookaheads_split` (for backends that intersect the patterns of an `allOf`): a pattern that opens
  with lookaheads, `^(?=A)(?!B)R` (CloudFormation writes `^(?!aws:)` on hundreds of tag keys), is
  the patterns `^(?:A)`, "does not start with B" and `^R`, all of which must match. A negative
  lookahead splits only where B is a literal (or `\\s*$`: "not blank"), whose complement a regex can
  spell.
- `with_alternations_grouped` (for outlines-core, which puts a pattern between the string's quotes as
  written, so `^a|b$` would become `"a|b"`, admitting `"a` and `b"`): a pattern whose top level is an
  alternation is the group of its branches, each matched in full. That admits a subset of what the
  pattern admits (a branch that was open at one end is now anchored there), never more.
- `with_disjoint_one_of`: `oneOf` asks for exactly one branch to match. Where the branches provably admit
  no common value (different types, different literals), that is `anyOf`; where every branch is only a
  set of types, the instances are exactly the types one branch alone admits (a `type` list). Other
  `oneOf`s stay, for the backend to refuse.
"""

from __future__ import annotations

from collections.abc import Callable

# A subschema's places in a schema object, by how they hold it.
ONE_SCHEMA = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "propertyNames",
              "contains", "not", "if", "then", "else", "additionalItems")
SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# What a branch may hold besides what decides its values, and still be compared by type or literal.
ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default", "deprecated", "readOnly",
                         "writeOnly"})
# Every JSON value is of exactly one of these kinds ("number" is integer | fraction).
KINDS = ("string", "integer", "fraction", "boolean", "null", "array", "object")


def map_subschemas(schema, rewrite: Callable[[dict], dict]):
    """`rewrite` applied to every schema object of `schema`, innermost first."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ONE_SCHEMA:
        if key in out:
            out[key] = map_subschemas(out[key], rewrite)
    for key in SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [map_subschemas(sub, rewrite) for sub in out[key]]
    for key in SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: map_subschemas(sub, rewrite) for name, sub in out[key].items()}
    return rewrite(out)


def subschemas(schema, path: str = "#"):
    """(JSON pointer, schema object) of every schema object in `schema`, outermost first."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in ONE_SCHEMA:
        if key in schema:
            yield from subschemas(schema[key], f"{path}/{key}")
    for key in SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for index, sub in enumerate(schema[key]):
                yield from subschemas(sub, f"{path}/{key}/{index}")
    for key in SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield from subschemas(sub, f"{path}/{key}/{name}")


# Keywords and the value each has when absent (JSON Schema 2020-12, validation vocabulary).
VACUOUS = {"uniqueItems": False, "minItems": 0, "minLength": 0, "minProperties": 0, "minContains": 1,
           "required": []}


def prepared(schema, known_formats: frozenset[str]):
    """Every rewrite: what a backend that enforces `known_formats` is given."""
    return with_disjoint_one_of(without_vacuous_keywords(without_unknown_formats(schema, known_formats)))


def without_vacuous_keywords(schema):
    def drop(node: dict) -> dict:
        vacuous = [key for key, value in VACUOUS.items() if key in node and _same(node[key], value)]
        return {key: value for key, value in node.items() if key not in vacuous} if vacuous else node
    return map_subschemas(schema, drop)



def without_unknown_formats(schema, known: frozenset[str]):
    def drop(node: dict) -> dict:
        if isinstance(node.get("format"), str) and node["format"] not in known:
            return {key: value for key, value in node.items() if key != "format"}
        return node
    return map_subschemas(schema, drop)


def with_disjoint_one_of(schema):
    return map_subschemas(schema, _one_of)


def _one_of(node: dict) -> dict:
    branches = node.get("oneOf")
    if not isinstance(branches, list) or not branches:
        return node
    rest = {key: value for key, value in node.items() if key != "oneOf"}
    kinds = [_type_kinds(branch) for branch in branches]
    outer = _kinds_of(rest["type"]) if "type" in rest else frozenset(KINDS)
    if all(k is not None for k in kinds) and outer is not None:
        # Types only: exactly the kinds one branch alone admits (and the schema's own type, if any).
        alone = [kind for kind in KINDS if sum(kind in k for k in kinds) == 1 and kind in outer]
        types = _type_names(alone)
        if types:
            return {**rest, "type": types}
    values = [_admitted(branch) for branch in branches]
    if all(v is not None for v in values) and all(
            _disjoint(values[i], values[j]) for i in range(len(values)) for j in range(i)):
        if "anyOf" in rest:
            return node
        return {**rest, "anyOf": branches}
    return node


def _type_kinds(branch) -> frozenset[str] | None:
    """The kinds a branch that is only a `type` (and annotations) admits; None for any other branch."""
    if not isinstance(branch, dict) or "type" not in branch or set(branch) - ANNOTATIONS - {"type"}:
        return None
    return _kinds_of(branch["type"])


def _kinds_of(type_value) -> frozenset[str] | None:
    names = type_value if isinstance(type_value, list) else [type_value]
    kinds = set()
    for name in names:
        if name == "number":
            kinds |= {"integer", "fraction"}
        elif name in KINDS and name != "fraction":
            kinds.add(name)
        else:
            return None
    return frozenset(kinds)


def _type_names(kinds: list[str]) -> list[str] | None:
    """The `type` list for exactly these kinds; None when there is none (fractions without integers)."""
    if "fraction" in kinds and "integer" not in kinds:
        return None
    names = [kind for kind in kinds if kind not in ("integer", "fraction")]
    if "fraction" in kinds:
        names.append("number")
    elif "integer" in kinds:
        names.append("integer")
    return names


def _admitted(branch):
    """What a branch can admit, over-approximated: ("kinds", kinds) from its `type`, or ("literals",
    values) from its enum/const; None when neither says."""
    if not isinstance(branch, dict):
        return None
    if "const" in branch or "enum" in branch:
        literals = [branch["const"]] if "const" in branch else branch["enum"]
        return ("literals", literals) if isinstance(literals, list) else None
    if "type" in branch:
        kinds = _kinds_of(branch["type"])
        return None if kinds is None else ("kinds", kinds)
    return None


def _literal_kind(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "fraction"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _disjoint(a, b) -> bool:
    (kind_a, value_a), (kind_b, value_b) = a, b
    if kind_a == kind_b == "kinds":
        return not value_a & value_b
    if kind_a == kind_b == "literals":
        return not any(_same(x, y) for x in value_a for y in value_b)
    literals, kinds = (value_a, value_b) if kind_a == "literals" else (value_b, value_a)
    return not any(_literal_kind(value) in kinds for value in literals)


def _same(x, y) -> bool:
    """JSON equality: 1 and 1.0 are the same number, true and 1 are not."""
    if isinstance(x, bool) or isinstance(y, bool):
        return isinstance(x, bool) and isinstance(y, bool) and x == y
    return x == y


def with_lookaheads_split(schema):
    def split(node: dict) -> dict:
        if not isinstance(node.get("pattern"), str) or (parts := split_lookaheads(node["pattern"])) is None:
            return node
        rest = {key: value for key, value in node.items() if key != "pattern"}
        return {**rest, "allOf": [*node.get("allOf", []), *({"pattern": part} for part in parts)]}
    return map_subschemas(schema, split)


REGEX_SPECIAL = frozenset("\\^$.|?*+()[]{}")
ANYTHING = r"[\s\S]*"


def split_lookaheads(pattern: str) -> list[str] | None:
    """`^(?=A)(?!B)R` as patterns that must all match; None where the pattern opens with no lookahead
    this can split, or has one elsewhere."""
    if not pattern.startswith("^(?=") and not pattern.startswith("^(?!"):
        return None
    parts, rest = [], pattern[1:]
    while rest.startswith("(?=") or rest.startswith("(?!"):
        end = _group_end(rest)
        if end is None:
            return None
        inner = rest[3 : end - 1]
        part = f"^(?:{inner})" if rest[2] == "=" else _not_starting_with(inner)
        if part is None:
            return None
        parts.append(part)
        rest = rest[end:]
    parts.append("^" + rest)
    return None if any(_has_lookaround(part) for part in parts) else parts


def _group_end(text: str) -> int | None:
    """The index just past the group that opens text[0], escapes and character classes skipped."""
    for index, char, depth in _outside_classes(text):
        if char == ")" and depth == 1:
            return index + 1
    return None


def _outside_classes(pattern: str):
    """(index, character, group depth before it) of each character of `pattern` outside escapes and
    character classes."""
    depth, index, in_class = 0, 0, False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if pattern[index + 1 : index + 2] == "]":
                index += 1
        else:
            yield index, char, depth
            depth += (char == "(") - (char == ")")
        index += 1


def _has_lookaround(pattern: str) -> bool:
    return any(marker in pattern.replace("\\\\", "") for marker in ("(?=", "(?!", "(?<=", "(?<!"))


def _not_starting_with(inner: str) -> str | None:
    """A pattern for "does not start with what `inner` matches", where that can be spelled."""
    if inner in (r"\s*$", r"\s*\z"):
        return r"\S"                                  # not blank: some byte that is not blank space
    while inner.endswith(".*"):
        inner = inner[:-2]                           # (?!L.*) is (?!L)
    literal = _literal(inner)
    if not literal:
        return None
    # Shorter than the literal and a prefix of it, or leaving it at some character.
    branches = [_escaped(literal[:k]) for k in range(len(literal))]
    branches += [f"{_escaped(literal[:k])}[^{_escaped(literal[k])}]{ANYTHING}" for k in range(len(literal))]
    return "^(?:" + "|".join(branches) + ")$"


def _literal(pattern: str) -> str | None:
    """The string a regex of plain and escaped punctuation characters matches; None for any other."""
    out, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            following = pattern[index + 1 : index + 2]
            if not following or following.isalnum():
                return None                          # \d, \w, \u....: a class, not a character
            out.append(following)
            index += 2
        elif char in REGEX_SPECIAL:
            return None
        else:
            out.append(char)
            index += 1
    return "".join(out)


def _escaped(text: str) -> str:
    return "".join("\\" + char if char in REGEX_SPECIAL or char == "-" else char for char in text)


def with_alternations_grouped(schema):
    def group(node: dict) -> dict:
        pattern = node.get("pattern")
        if not isinstance(pattern, str) or len(branches := _top_level_branches(pattern)) < 2:
            return node
        inner = "|".join(_unanchored(branch) for branch in branches)
        return {**node, "pattern": f"^(?:{inner})$"}
    return map_subschemas(schema, group)


def _unanchored(branch: str) -> str:
    branch = branch.removeprefix("^")
    return branch[:-1] if branch.endswith("$") and not _escaped_at(branch, len(branch) - 1) else branch


def _escaped_at(text: str, index: int) -> bool:
    """Whether the character at `index` is escaped (preceded by an odd run of backslashes)."""
    run = len(text[:index]) - len(text[:index].rstrip("\\"))
    return run % 2 == 1


def _top_level_branches(pattern: str) -> list[str]:
    """The pattern split at each `|` outside groups and character classes."""
    cuts = [index for index, char, depth in _outside_classes(pattern) if char == "|" and depth == 0]
    return [pattern[start + 1 : end] for start, end in zip([-1, *cuts], [*cuts, len(pattern)])]
