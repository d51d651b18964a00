"""Checks that the running environment is exactly the lock: every installed distribution is pinned there,
at the installed version. CI runs it after installing, so a new transitive dependency (or a release
that slipped past a pin) fails the build instead of changing the tested set unseen.

    python constraints/check.py [constraints/ci.txt]

Exit status 0 when the environment matches, 1 with one line per difference otherwise.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

DEFAULT_LOCK = Path(__file__).with_name("ci.txt")
# Installed by the virtual environment itself or by this project's own install, not by a resolver.
NOT_LOCKED = frozenset({"pip", "gorgon"})
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)")


@dataclass(frozen=True)
class LockDifference:
    name: str
    installed: str
    locked: str | None  # None: not in the lock at all

    def __str__(self) -> str:
        if self.locked is None:
            return f"{self.name} {self.installed} is installed but not in the lock"
        return f"{self.name} {self.installed} is installed but the lock pins {self.locked}"


def read_lock(path: Path) -> dict[str, str]:
    """The lock's pins by canonical name. A line that is neither a pin, a comment nor blank is an error."""
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = _PIN.match(text)
        if match is None:
            raise ValueError(f"{path}:{number}: not an exact pin (name==version): {line.strip()!r}")
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def installed_distributions() -> dict[str, str]:
    return {canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def differences(installed: dict[str, str], pins: dict[str, str]) -> list[LockDifference]:
    """Installed distributions the lock does not pin, or pins at another version (local labels count:
    torch 2.13.0+cpu is not torch 2.13.0)."""
    found = []
    for name, version in sorted(installed.items()):
        if name in NOT_LOCKED:
            continue
        locked = pins.get(name)
        if locked is None or Version(locked) != Version(version):
            found.append(LockDifference(name, version, locked))
    return found


def main(argv: list[str]) -> int:
    lock = Path(argv[0]) if argv else DEFAULT_LOCK
    found = differences(installed_distributions(), read_lock(lock))
    for difference in found:
        print(f"lock check: {difference}", file=sys.stderr)
    if found:
        print(f"lock check: the environment differs from {lock}; refresh it with constraints/refresh",
              file=sys.stderr)
        return 1
    print(f"lock check: every installed distribution is pinned in {lock} at its installed version")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
