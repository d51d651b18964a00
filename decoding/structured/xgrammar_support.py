"""Which JSON schemas xgrammar (0.2.x) turns into a grammar whose every output validates.

xgrammar converts what it understands and drops the rest without a word: `not`, `if`/`then`/`else`,
the `dependent*` keywords, `uniqueItems`, `contains` and `additionalItems` are skipped; keywords beside
`$ref` or `anyOf` are lost; `allOf` with two or more branches and type-specific keywords without a
`type` become "any value"; `oneOf` acts as `anyOf`; a `required` name that `properties` does not list is
not required; `multipleOf` is kept only on integers in a small range. And its length-counted strings
(`minLength`/`maxLength`) admit raw control characters, which is not JSON: `with_counted_strings` turns
those into a `pattern` of plain characters before the schema reaches xgrammar. `unsupported_construct`
names the first construct left, so a strict request is refused with what to change (best effort:
validated afterwards). Unknown `format` values stay what the specification makes them, annotations. The rules
follow xgrammar's converter keyword by keyword; `tests/test_structured.py` checks them against the
JSON-Schema-Test-Suite's invalid instances.
"""

from __future__ import annotations

import re

from decoding.structured.schema_rewrites import map_subschemas
from decoding.structured.schema_support import (ANNOTATIONS, JSON_SCHEMA_KEYWORDS, _matches_type, first_problem,
                                                 literals_problem, ref_target)

# content* are annotations in 2020-12 (not assertions), like title or description.
IGNORED = ANNOTATIONS | {"contentEncoding", "contentMediaType", "contentSchema"}
NEVER_ENFORCED = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                  "contains", "minContains", "maxContains", "additionalItems", "$dynamicRef", "$anchor",
                  "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "oneOf")
STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "minItems", "maxItems", "uniqueItems", "unevaluatedItems"})
OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties", "patternProperties", "propertyNames",
                             "minProperties", "maxProperties", "unevaluatedProperties"})
TYPES = ("string", "number", "integer", "boolean", "null", "array", "object")
# xgrammar counts multipleOf on integers only within a range this wide, for divisors this large.
MULTIPLE_OF_RANGE, MULTIPLE_OF_MAX = 10_000, 1024


def unsupported_construct(schema, root=None, path: str = "#", refs: tuple[str, ...] = ()) -> str | None:
    """None when xgrammar enforces every construct of `schema`, else "<path>: <what>" for the first one."""
    root = schema if root is None else root
    if schema is True:
        return None
    if not isinstance(schema, dict):
        return f"{path}: a boolean schema (false)"
    keys = (set(schema) & JSON_SCHEMA_KEYWORDS) - IGNORED
    if "$id" in schema and path != "#":
        return f"{path}: $id inside a schema (a new base for its $refs)"
    for keyword in NEVER_ENFORCED:
        if keyword in keys:
            return f"{path}: {keyword}"
    if schema.get("uniqueItems") is True:
        return f"{path}: uniqueItems"
    keys.discard("uniqueItems")
    for combinator in ("$ref", "anyOf", "allOf"):
        if combinator in keys:
            return _combined(schema, keys, combinator, root, path, refs)
    if "enum" in keys or "const" in keys:
        return _literals(schema, keys, path)
    kind = schema.get("type")
    if kind is None:
        kind = _implied_type(keys)
        if kind is None:
            return None if not keys else f"{path}: {sorted(keys)[0]} without a type"
    for each in kind if isinstance(kind, list) else [kind]:
        if each not in TYPES:
            return f"{path}: type {each!r}"
        if (problem := _typed(schema, each, root, path, refs)) is not None:
            return problem
    return None


def _combined(schema, keys, combinator: str, root, path, refs) -> str | None:
    """A $ref, anyOf or allOf: xgrammar drops whatever stands beside it, and keeps one allOf branch only."""
    if keys - {combinator}:
        return f"{path}: {sorted(keys - {combinator})[0]} beside {combinator}"
    if combinator == "$ref":
        return _ref(schema["$ref"], root, path, refs)
    if combinator == "anyOf":
        return _each(schema["anyOf"], root, f"{path}/anyOf", refs)
    branches = schema["allOf"]
    if not isinstance(branches, list) or len(branches) != 1:
        return f"{path}: allOf with more than one branch"
    return unsupported_construct(branches[0], root, f"{path}/allOf/0", refs)


def _implied_type(keys: set[str]) -> str | None:
    """xgrammar reads an untyped schema with properties or items as an object or an array; any other
    untyped keyword it drops (None)."""
    if keys and keys <= OBJECT_KEYWORDS and keys & {"properties", "additionalProperties"}:
        return "object"
    if keys and keys <= ARRAY_KEYWORDS and "items" in keys:
        return "array"
    return None


def _each(schemas, root, path, refs) -> str | None:
    return first_problem(schemas, path, lambda branch, where: unsupported_construct(branch, root, where, refs))


def _ref(target, root, path, refs) -> str | None:
    if not isinstance(target, str) or not target.startswith("#"):
        return f"{path}: external $ref {target!r}"
    if target != "#" and not target.startswith("#/"):
        return f"{path}: $ref to an anchor {target!r}"
    if target in refs:
        return None                              # being checked further up: xgrammar recurses
    node = ref_target(root, target)
    if node is None:
        return f"{path}: $ref {target!r} points nowhere"
    return unsupported_construct(node, root, target, refs + (target,))


def _literals(schema, keys, path) -> str | None:
    if (problem := literals_problem(schema, keys, path)) is not None:
        return problem
    values = schema["enum"] if "enum" in keys else [schema.get("const")]
    # xgrammar emits the literals whatever the type says.
    if "type" in keys and not all(_matches_type(value, schema["type"]) or (
            isinstance(value, dict) and _type_allows(schema["type"], "object")) or (
            isinstance(value, list) and _type_allows(schema["type"], "array")) for value in values):
        return f"{path}: an enum/const value outside its type"
    return None


def _type_allows(kind, name: str) -> bool:
    return name in (kind if isinstance(kind, list) else [kind])


def _typed(schema, kind: str, root, path, refs) -> str | None:
    """The keywords of `kind`'s family (the others do not apply to a value of that type)."""
    if kind == "string":
        present = [keyword for keyword in ("pattern", "format", "minLength", "maxLength") if keyword in schema]
        if len(present) > 1 and present != ["minLength", "maxLength"]:
            return f"{path}: {present[0]} beside {present[1]}"    # xgrammar keeps only one of them
        return None
    if kind in ("number", "integer") and "multipleOf" in schema:
        return _multiple_of(schema, kind, path)
    if kind == "array":
        for keyword in ("items", "unevaluatedItems"):
            if (problem := _optional(schema, keyword, root, path, refs)) is not None:
                return problem
        if "prefixItems" in schema:
            return _each(schema["prefixItems"], root, f"{path}/prefixItems", refs)
        return None
    if kind == "object":
        return _object(schema, root, path, refs)
    return None


def _multiple_of(schema, kind: str, path: str) -> str | None:
    step = schema["multipleOf"]
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    counted = (kind == "integer" and isinstance(step, int) and 0 < step <= MULTIPLE_OF_MAX
               and ((low is None and high is None) or (low is not None and high is not None
                                                      and high - low <= MULTIPLE_OF_RANGE)))
    return None if counted else f"{path}: multipleOf"


def _object(schema, root, path, refs) -> str | None:
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        return f"{path}: properties must be an object"
    missing = [name for name in schema.get("required", []) if name not in properties]
    if missing:
        return f"{path}: required {missing[0]!r} is not among the properties"
    patterns = schema.get("patternProperties", {})
    for name, sub in properties.items():
        if any(ch in name for ch in '"\\') or any(ord(ch) < 0x20 for ch in name):
            return f"{path}: property name {name!r} needs JSON escaping"
        for pattern in patterns:
            try:
                overlaps = re.search(pattern, name) is not None
            except re.error:
                overlaps = True
            if overlaps:                         # must satisfy both; xgrammar applies only one
                return f"{path}: property {name!r} also matched by patternProperties {pattern!r}"
        if (problem := unsupported_construct(sub, root, f"{path}/properties/{name}", refs)) is not None:
            return problem
    for pattern, sub in patterns.items():
        if (problem := unsupported_construct(sub, root, f"{path}/patternProperties/{pattern}", refs)) is not None:
            return problem
    for keyword in ("additionalProperties", "unevaluatedProperties", "propertyNames"):
        if (problem := _optional(schema, keyword, root, path, refs)) is not None:
            return problem
    return None


def _optional(schema, keyword: str, root, path, refs) -> str | None:
    """The subschema under `keyword`, where `false` means none (no more items, no other properties)."""
    value = schema.get(keyword, True)
    return None if isinstance(value, bool) else unsupported_construct(value, root, f"{path}/{keyword}", refs)


# One character of a JSON string written plainly: anything but the quote, the backslash and control
# characters (which JSON requires escaped).
PLAIN_CHARACTER = '[^"\\\\\\x00-\\x1f]'
# The formats xgrammar enforces; it treats any other as a plain string, as the specification allows.
FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
                     "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})


def with_counted_strings(schema):
    """`schema` with each string's minLength/maxLength (when it has no pattern or format) written as the
    pattern of that many plain characters: the same lengths, counted in code points as JSON Schema
    counts them, through xgrammar's regex path, which writes only well-formed JSON."""
    def count(node: dict) -> dict:
        kinds = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
        if "string" in kinds and ("minLength" in node or "maxLength" in node) and not {"pattern", "format"} & set(node):
            node = dict(node)
            low, high = node.pop("minLength", 0), node.pop("maxLength", "")
            node["pattern"] = f"^{PLAIN_CHARACTER}{{{low},{high}}}$"
        return node
    return map_subschemas(schema, count)
