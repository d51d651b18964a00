"""The lock (constraints/ci.txt) and its check (constraints/check.py): the check is the real script run on
this environment, with locks written from the environment itself, so it is exercised whatever is installed
here; CI also runs it on the real lock before the tests."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints" / "ci.txt"
CHECK = ROOT / "constraints" / "check.py"

sys.path.insert(0, str(CHECK.parent))
import check  # noqa: E402


def _run_check(lock: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(lock)], capture_output=True, text=True, timeout=60)


def _write_lock(path: Path, pins: dict[str, str]) -> Path:
    path.write_text("# a lock of this environment\n" + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    return path


def _environment_pins() -> dict[str, str]:
    return {n: v for n, v in check.installed_distributions().items() if n not in check.NOT_LOCKED}


def test_check_passes_on_a_lock_of_exactly_this_environment(tmp_path):
    result = _run_check(_write_lock(tmp_path / "lock.txt", _environment_pins()))
    assert result.returncode == 0, result.stderr


def test_check_fails_on_a_lock_with_one_package_removed(tmp_path):
    pins = _environment_pins()
    removed = "packaging" if "packaging" in pins else sorted(pins)[0]
    del pins[removed]
    result = _run_check(_write_lock(tmp_path / "lock.txt", pins))
    assert result.returncode == 1
    assert f"{removed} " in result.stderr and "not in the lock" in result.stderr


def test_check_fails_on_a_lock_that_pins_another_version(tmp_path):
    pins = _environment_pins()
    pins["packaging"] = "0.1"
    result = _run_check(_write_lock(tmp_path / "lock.txt", pins))
    assert result.returncode == 1
    assert "the lock pins 0.1" in result.stderr


def test_a_local_version_label_is_a_difference():
    found = check.differences({"torch": "2.13.0+cpu"}, {"torch": "2.13.0"})
    assert [str(d) for d in found] == ["torch 2.13.0+cpu is installed but the lock pins 2.13.0"]
    assert check.differences({"torch": "2.13.0+cpu"}, {"torch": "2.13.0+cpu"}) == []


def test_a_line_that_is_not_an_exact_pin_is_refused(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy>=2.0\n")
    with pytest.raises(ValueError, match="not an exact pin"):
        check.read_lock(lock)


def _declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared.extend(extra)
    return [Requirement(text) for text in declared]


def test_the_lock_pins_every_declared_requirement_within_its_range():
    pins = check.read_lock(LOCK)
    for requirement in _declared_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is declared in pyproject.toml but not pinned in {LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject.toml's {requirement}; "
            "run constraints/refresh")


def test_the_test_extra_excludes_the_hypothesis_that_breaks_hypothesis_jsonschema():
    # hypothesis-jsonschema 0.23.1 fails on every hypothesis from 6.170.10 on; a user installing .[test]
    # without the lock must still get a working pair.
    hypothesis = next(r for r in _declared_requirements() if r.name == "hypothesis")
    assert not hypothesis.specifier.contains("6.170.10")
    assert hypothesis.specifier.contains(check.read_lock(LOCK)["hypothesis"])
