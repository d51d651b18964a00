"""Which JSON schemas outlines-core turns into a grammar that means what the schema means.

outlines-core's schema parser skips what it does not understand instead of failing: `minimum` on a
number, `uniqueItems`, `not`, `if`/`then`/`else`, `patternProperties` and more are silently dropped,
`allOf` concatenates its branches, `oneOf` acts as `anyOf`, a `pattern` next to `maxLength` is lost,
and so are keywords beside `anyOf`, `enum` or `$ref`. A request with such a schema would get output that
does not validate. `unsupported_construct` names the first such construct, so the server can refuse the
request with a 400 that says what to change (or, when the caller opts into best effort, validate
afterwards). The rules below follow outlines-core's parser keyword by keyword.
"""

from __future__ import annotations

ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "default", "examples",
                         "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "$vocabulary"})
# Every keyword JSON Schema defines (2020-12, and the drafts before it). Anything else in a schema object
# (`self`, draft-04's `id`, `x-*` vendor extensions, a tool's own metadata) is ignored, as the
# specification says of unknown keywords.
JSON_SCHEMA_KEYWORDS = ANNOTATIONS | frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "maxContains", "minContains",
    "maxProperties", "minProperties", "required", "dependentRequired", "properties", "patternProperties",
    "additionalProperties", "propertyNames", "items", "prefixItems", "contains", "unevaluatedItems",
    "unevaluatedProperties", "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas", "$ref",
    "$dynamicRef", "$anchor", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "format", "contentEncoding",
    "contentMediaType", "contentSchema", "dependencies", "additionalItems"})
STRING_FORMATS = frozenset({"date", "date-time", "time", "uri", "email", "uuid"})
JSON_TYPES = {"string": str, "boolean": bool, "null": type(None)}


def unsupported_construct(schema, root=None, path: str = "#", refs: tuple[str, ...] = ()) -> str | None:
    """None when every construct of `schema` is supported, else "<path>: <what>" for the first one."""
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return f"{path}: a boolean schema (true/false)"
    keys = (set(schema) & JSON_SCHEMA_KEYWORDS) - ANNOTATIONS
    for keyword in ("allOf", "oneOf", "not", "if", "then", "else", "dependentSchemas", "dependentRequired",
                    "patternProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
                    "contains", "minContains", "maxContains", "uniqueItems", "minimum", "maximum",
                    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "$dynamicRef", "$anchor",
                    "$dynamicAnchor", "$recursiveRef", "contentEncoding", "contentMediaType"):
        if keyword in keys:
            return f"{path}: {keyword}"
    if not keys:
        # {} (any JSON value) is an alternation that outlines-core splices in ungrouped: fine alone,
        # wrong inside an object or array.
        return None if path == "#" else f"{path}: an unconstrained value ({{}}) inside another schema"
    if "$ref" in keys:
        return _ref(schema, keys, root, path, refs)
    if "anyOf" in keys:
        if keys - {"anyOf"}:
            return f"{path}: {sorted(keys - {'anyOf'})[0]} beside anyOf"
        return _each(schema["anyOf"], root, f"{path}/anyOf", refs)
    if "enum" in keys or "const" in keys:
        return _literals(schema, keys, path)
    if "properties" in keys:
        return _object_with_properties(schema, keys, root, path, refs)
    if "prefixItems" in keys:
        return _tuple(schema, keys, root, path, refs)
    kind = schema.get("type")
    if kind is None:
        return f"{path}: {sorted(keys)[0]} without a type"
    if isinstance(kind, list):
        if keys - {"type"}:
            return f"{path}: {sorted(keys - {'type'})[0]} beside a list of types"
        return None if all(k in ("string", "number", "integer", "boolean", "null") for k in kind) else \
            f"{path}: a list of types with array or object"
    return _typed(schema, kind, keys, root, path, refs)


def _each(schemas, root, path, refs) -> str | None:
    return first_problem(schemas, path, lambda branch, where: unsupported_construct(branch, root, where, refs))


def first_problem(schemas, path: str, check) -> str | None:
    """The first problem `check(branch, its path)` finds among a non-empty list of schemas."""
    if not isinstance(schemas, list) or not schemas:
        return f"{path}: must be a non-empty list"
    for i, branch in enumerate(schemas):
        if (problem := check(branch, f"{path}/{i}")) is not None:
            return problem
    return None


def ref_target(root, target: str):
    """The schema a local `$ref` ("#" or "#/a/b", JSON-pointer escapes undone) points at; None when it
    points nowhere."""
    node = root
    for part in filter(None, target[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _ref(schema, keys, root, path, refs) -> str | None:
    if keys - {"$ref"}:
        return f"{path}: {sorted(keys - {'$ref'})[0]} beside $ref"
    target = schema["$ref"]
    if not isinstance(target, str) or not target.startswith("#"):
        return f"{path}: external $ref {target!r}"
    if target in refs:
        return f"{path}: recursive $ref {target!r}"
    node = ref_target(root, target)
    if node is None:
        return f"{path}: $ref {target!r} points nowhere"
    return unsupported_construct(node, root, target, refs + (target,))


def literals_problem(schema, keys, path) -> str | None:
    """What no backend takes in an enum/const: an empty enum, or other keywords than `type` beside it."""
    values = schema["enum"] if "enum" in keys else [schema.get("const")]
    if not isinstance(values, list) or not values:
        return f"{path}: enum must be a non-empty list"
    if keys - {"enum", "const", "type"} or ("enum" in keys and "const" in keys):
        return f"{path}: {sorted(keys - {'type'})[-1]} beside enum/const"
    return None


def _literals(schema, keys, path) -> str | None:
    if (problem := literals_problem(schema, keys, path)) is not None:
        return problem
    for value in schema["enum"] if "enum" in keys else [schema.get("const")]:
        if isinstance(value, (dict, list)):
            return f"{path}: an object or array in enum/const"
        if "type" in keys and not _matches_type(value, schema["type"]):
            return f"{path}: enum/const value {value!r} outside its type"
    return None


def _matches_type(value, kind) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    for k in kinds:
        if k in JSON_TYPES and isinstance(value, JSON_TYPES[k]):
            return True
        if k == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if k == "integer" and isinstance(value, int) and not isinstance(value, bool):
            return True
    return False


def _object_with_properties(schema, keys, root, path, refs) -> str | None:
    allowed = {"properties", "required", "additionalProperties", "type"}
    if keys - allowed:
        return f"{path}: {sorted(keys - allowed)[0]} beside properties"
    if schema.get("type", "object") != "object":
        return f"{path}: properties on type {schema['type']!r}"
    properties = schema["properties"]
    if not isinstance(properties, dict):
        return f"{path}: properties must be an object"
    missing = [name for name in schema.get("required", []) if name not in properties]
    if missing:
        return f"{path}: required {missing[0]!r} is not among the properties"
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, bool):
        # Never generated (only listed properties are), but must be a schema we understand.
        if (problem := unsupported_construct(extra, root, f"{path}/additionalProperties", refs)) is not None:
            return problem
    for name, sub in properties.items():
        if any(ch in name for ch in '"\\') or any(ord(ch) < 0x20 for ch in name):
            return f"{path}: property name {name!r} needs JSON escaping"
        if (problem := unsupported_construct(sub, root, f"{path}/properties/{name}", refs)) is not None:
            return problem
    return None


def _tuple(schema, keys, root, path, refs) -> str | None:
    allowed = {"prefixItems", "items", "type", "minItems", "maxItems"}
    if keys - allowed:
        return f"{path}: {sorted(keys - allowed)[0]} beside prefixItems"
    length = len(schema["prefixItems"]) if isinstance(schema["prefixItems"], list) else 0
    if schema.get("minItems", 0) > length or schema.get("maxItems", length) < length:
        return f"{path}: minItems/maxItems that a {length}-item tuple cannot meet"
    return _each(schema["prefixItems"], root, f"{path}/prefixItems", refs)


def _typed(schema, kind, keys, root, path, refs) -> str | None:
    rest = keys - {"type"}
    if kind == "string":
        groups = [bool(rest & {"minLength", "maxLength"}), "pattern" in rest, "format" in rest]
        if rest - {"minLength", "maxLength", "pattern", "format"}:
            return f"{path}: {sorted(rest - {'minLength', 'maxLength', 'pattern', 'format'})[0]} on a string"
        if sum(groups) > 1:
            return f"{path}: more than one of minLength/maxLength, pattern and format on one string"
        if "format" in rest and schema["format"] not in STRING_FORMATS:
            return f"{path}: format {schema['format']!r}"
        return None
    if kind in ("number", "integer", "boolean", "null"):
        return f"{path}: {sorted(rest)[0]} on a {kind}" if rest else None
    if kind == "array":
        if rest - {"items", "minItems", "maxItems"}:
            return f"{path}: {sorted(rest - {'items', 'minItems', 'maxItems'})[0]} on an array"
        if "items" in rest:
            return unsupported_construct(schema["items"], root, f"{path}/items", refs)
        return None
    if kind == "object":
        if rest - {"additionalProperties", "minProperties", "maxProperties"}:
            return f"{path}: {sorted(rest - {'additionalProperties', 'minProperties', 'maxProperties'})[0]} on an object"
        extra = schema.get("additionalProperties", True)
        if extra is False:
            return f"{path}: additionalProperties false without properties"
        if extra is not True:
            return unsupported_construct(extra, root, f"{path}/additionalProperties", refs)
        return None
    return f"{path}: type {kind!r}"
