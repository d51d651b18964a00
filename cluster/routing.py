"""Which replica takes a request: the one whose prefix cache most likely holds its prompt, unless the
replicas' loads are out of balance (the policy of SGLang's router, "cache-aware" routing).

Each replica keeps the keys of the prompts it was sent: a prompt is cut into chunks of CHUNK_CHARS
characters and each chunk is keyed by a digest of itself and every chunk before it (a hash chain, as the
engine keys its KV blocks), so two prompts share their first k keys exactly when they share their first
k chunks. The router cannot see a replica's cache, so the keys stand in for it: bounded per replica,
least recently used first out, as the cache itself evicts.

- Out of balance (the busiest replica has more than `balance_abs` requests over the idlest, and more than
  `balance_rel` times as many): the least-loaded replica, whatever it holds.
- Otherwise the replica holding the longest run of the prompt's leading keys, if that run covers at least
  `cache_threshold` of the prompt; else the least-loaded one (ties: the one holding fewest keys, which has
  the most room).
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
    balance_abs: int = 8
    balance_rel: float = 1.5
    max_keys_per_replica: int = 200_000


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
        least = min(range(self.num_replicas), key=lambda r: (loads[r], len(self._held[r]), r))
        replica = least
        if not self._out_of_balance(loads) and keys:
            matched = [self._matched(r, keys) for r in range(self.num_replicas)]
            best = max(range(self.num_replicas), key=lambda r: (loads[r] < DOWN_LOAD, matched[r], -loads[r], -r))
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

    def _out_of_balance(self, loads: list[int]) -> bool:
        up = [load for load in loads if load < DOWN_LOAD] or loads
        busiest, idlest = max(up), min(up)
        return busiest - idlest > self.policy.balance_abs and busiest > self.policy.balance_rel * idlest

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
