"""Which replica takes a request: the one whose prefix cache most likely holds its prompt, among the
replicas that are not much busier than the idlest (cache-aware routing, as SGLang's router does it, with
the balance decided per replica rather than all or nothing).

Each replica keeps the keys of the prompts it was sent: a prompt is cut into chunks of CHUNK_CHARS
characters and each chunk is keyed by a digest of itself and every chunk before it (a hash chain, as the
engine keys its KV blocks), so two prompts share their first k keys exactly when they share their first
k chunks. The router cannot see a replica's cache, so the keys stand in for it: bounded per replica,
least recently used first out, as the cache itself evicts.

- Candidates: the replicas with at most `balance_abs` requests in flight over the idlest one, or at most
  `balance_rel` times as many (whichever allows more). A busier replica gets nothing, whatever it holds.
- Among them, the one holding the longest run of the prompt's leading keys, if that run covers at least
  `cache_threshold` of the prompt; else the least-loaded one (ties: the one holding fewest keys, which has
  the most room).

Why per replica: prompts that share a long system prompt all match the first replica that saw it; with
SGLang's all-or-nothing balance (its thresholds are sized for GPU batches of hundreds) every conversation
went to that replica while the other idled (benchmarks/cluster.py measured a 1.0 / 0.0 split). Here the
second replica gets a conversation as soon as the first is two requests ahead, prefills the system prompt
once, and from then on both hold it and each conversation returns to the replica with its history.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

CHUNK_CHARS = 64


def prefix_keys(text: str) -> list[bytes]:
    """The chained keys of the prompt's full chunks (a partial last chunk is never shared)."""
    keys, before = [], b""
    for start in range(0, len(text) - CHUNK_CHARS + 1, CHUNK_CHARS):
        before = hashlib.blake2b(before + text[start : start + CHUNK_CHARS].encode(), digest_size=12).digest()
        keys.append(before)
    return keys


# The load the front reports for a replica that is down, so that no policy routes to it.
DOWN_LOAD = 10**9


@dataclass(frozen=True)
class RoutingPolicy:
    cache_threshold: float = 0.5
    balance_abs: int = 2
    balance_rel: float = 1.25
    max_keys_per_replica: int = 200_000

    def __post_init__(self):
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"the cache threshold must be between 0 and 1, got {self.cache_threshold}")
        if self.balance_abs < 0 or self.balance_rel < 1.0:
            raise ValueError(f"the balance thresholds must be at least 0 (absolute) and 1 (relative), got "
                             f"{self.balance_abs} and {self.balance_rel}")


class PrefixRouter:
    def __init__(self, num_replicas: int, policy: RoutingPolicy = RoutingPolicy()):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        self.policy = policy
        self._held: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in range(num_replicas)]
        self.routed_by_prefix = 0                  # decisions the cache made (the rest went by load)
        self.routed = 0

    @property
    def num_replicas(self) -> int:
        return len(self._held)

    def choose(self, text: str, loads: list[int]) -> int:
        """The replica for a prompt, given each replica's requests in flight; remembers the choice."""
        if len(loads) != self.num_replicas:
            raise ValueError(f"expected {self.num_replicas} loads, got {len(loads)}")
        keys = prefix_keys(text)
        candidates = self._not_busy(loads)
        replica = min(candidates, key=lambda r: (loads[r], len(self._held[r]), r))
        if keys:
            matched = {r: self._matched(r, keys) for r in candidates}
            best = max(candidates, key=lambda r: (matched[r], -loads[r], -r))
            if matched[best] >= self.policy.cache_threshold * len(keys):
                replica = best
                self.routed_by_prefix += 1
        self.routed += 1
        self._remember(replica, keys)
        return replica

    def spread(self, texts: list[str], loads: list[int]) -> list[int]:
        """A replica for each prompt of one call (a rollout's groups stay whole: one prompt, one replica),
        each choice counting the prompts already placed as load."""
        loads = list(loads)
        chosen = []
        for text in texts:
            replica = self.choose(text, loads)
            loads[replica] += 1
            chosen.append(replica)
        return chosen

    def forget(self, replica: int) -> None:
        """A replica restarted, or its cache was reset: it holds nothing."""
        self._held[replica].clear()

    def forget_all(self) -> None:
        """The weights changed: no cache holds anything still valid."""
        for held in self._held:
            held.clear()

    def _not_busy(self, loads: list[int]) -> list[int]:
        up = [r for r in range(self.num_replicas) if loads[r] < DOWN_LOAD] or list(range(self.num_replicas))
        idlest = min(loads[r] for r in up)
        room = max(idlest + self.policy.balance_abs, idlest * self.policy.balance_rel)
        return [r for r in up if loads[r] <= room]

    def _matched(self, replica: int, keys: list[bytes]) -> int:
        held, count = self._held[replica], 0
        for key in keys:
            if key not in held:
                break
            count += 1
        return count

    def _remember(self, replica: int, keys: list[bytes]) -> None:
        held = self._held[replica]
        for key in keys:
            held[key] = None
            held.move_to_end(key)
        while len(held) > self.policy.max_keys_per_replica:
            held.popitem(last=False)


class RoundRobinRouter(PrefixRouter):
    """Each request to the next replica that is up, whatever its prompt: the baseline prefix routing is
    measured against (benchmarks/cluster.py), and a choice for workloads that share no prefixes."""

    def __init__(self, num_replicas: int):
        super().__init__(num_replicas)
        self._next = 0

    def choose(self, text: str, loads: list[int]) -> int:
        if len(loads) != self.num_replicas:
            raise ValueError(f"expected {self.num_replicas} loads, got {len(loads)}")
        up = [r for r in range(self.num_replicas) if loads[r] < DOWN_LOAD] or list(range(self.num_replicas))
        replica = up[self._next % len(up)]
        self._next += 1
        self.routed += 1
        return replica
