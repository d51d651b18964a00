"""The packages' import layering (docs/architecture.md): each imports only the packages above it, so
`models/` is a leaf, the client talks to the server without the engine, and training sits on top."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each package and the project packages it may import (at module level or inside functions).
ALLOWED = {
    "models": set(),
    "wire": set(),
    "decoding": {"models", "wire"},
    "training": {"models", "decoding"},
    "server": {"models", "wire", "decoding", "training", "cluster"},  # `gorgon train`, `gorgon serve --replicas`
    "client": {"wire"},
    "cluster": {"models", "wire", "decoding"},        # a replica runs `gorgon serve` as its own process
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_packages_below_it(package):
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = imported_packages(path) - ALLOWED[package] - {package}
        if wrong:
            offenders[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not offenders, offenders
