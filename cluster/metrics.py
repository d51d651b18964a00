"""The front's /metrics: every live replica's samples labelled with its index, then the front's own
figures (each replica's requests in flight and whether it is up, and how the router decided)."""

from __future__ import annotations

import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?(\s.*)$")


def labelled(text: str, replica: int, seen_meta: set[str]) -> list[str]:
    """A replica's exposition with replica="<index>" on every sample; HELP and TYPE lines once."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            if line not in seen_meta:
                seen_meta.add(line)
                lines.append(line)
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, rest = match.groups()
        inner = labels[1:-1] + "," if labels and labels != "{}" else ""
        lines.append(f'{name}{{{inner}replica="{replica}"}}{rest}')
    return lines


def front_lines(in_flight: list[int], up: list[bool], times_down: list[int], routed: int,
                routed_by_prefix: int) -> list[str]:
    lines = ["# HELP gorgon:replica_in_flight Requests the front has in flight on each replica",
             "# TYPE gorgon:replica_in_flight gauge"]
    lines += [f'gorgon:replica_in_flight{{replica="{i}"}} {n}' for i, n in enumerate(in_flight)]
    lines += ["# HELP gorgon:replica_up Whether the replica serves (0 while its engine restarts and is re-synced)",
              "# TYPE gorgon:replica_up gauge"]
    lines += [f'gorgon:replica_up{{replica="{i}"}} {int(u)}' for i, u in enumerate(up)]
    lines += ["# HELP gorgon:replica_down_total Times the front took the replica out (its engine died or restarted, "
              "or a call to it failed)", "# TYPE gorgon:replica_down_total counter"]
    lines += [f'gorgon:replica_down_total{{replica="{i}"}} {n}' for i, n in enumerate(times_down)]
    lines += ["# HELP gorgon:routed_requests_total Requests the front routed by prompt",
              "# TYPE gorgon:routed_requests_total counter", f"gorgon:routed_requests_total {routed}",
              "# HELP gorgon:routed_by_prefix_total Of those, the ones a cached prefix decided",
              "# TYPE gorgon:routed_by_prefix_total counter", f"gorgon:routed_by_prefix_total {routed_by_prefix}"]
    return lines
