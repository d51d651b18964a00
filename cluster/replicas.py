"""The replicas as the front sees them: each one's actor, address, engine process and requests in flight,
and whether it is up.

A replica is down from the moment a request to it fails at the transport level, or the monitor sees its
engine process gone or replaced (`ReplicaProcess` restarts engines on its own, so a quick restart is
noticed by its new process id, not by an error). A down replica gets no requests. It is readmitted once
its new engine answers and `resync` has brought it to what the cluster serves (weights, pause state), so
no request ever reaches a replica that serves other weights than the rest.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Awaitable, Callable

import httpx

from cluster.routing import DOWN_LOAD

MONITOR_INTERVAL_S = 1.0
ACTOR_CALL_TIMEOUT_S = 10.0
# The time constant of each replica's recent load (see Replicas.loads): several turns of a conversation
# (about a second each on the embedded model here), so that one batch finishing does not look like idleness.
LOAD_SMOOTHING_S = 5.0


class ReplicaDown(Exception):
    def __init__(self, index: int):
        super().__init__(f"replica {index} is down")
        self.index = index


class Replicas:
    def __init__(self, actors: list, endpoints: list[tuple[str, int]]):
        self.actors = actors
        self.urls: list[str | None] = [url for url, _ in endpoints]
        self.pids: list[int | None] = [pid for _, pid in endpoints]
        self.in_flight = [0] * len(actors)
        self._recent = [0.0] * len(actors)       # in_flight averaged over about LOAD_SMOOTHING_S
        self._settled_at = [time.monotonic()] * len(actors)
        self.times_down = [0] * len(actors)       # how often each was marked down (a restart, a lost call)
        # No cap on connections: every request in flight holds one (a stream for its whole length), and
        # httpx's default of 100 would queue the rest in the front, unseen by routing and failover.
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.resync: Callable[[int, str], Awaitable[bool]] | None = None    # set by the weight coordinator
        self.on_down: Callable[[int], None] = lambda index: None             # the router forgets what it held
        self._rejoining: set[int] = set()

    def live(self) -> list[int]:
        return [index for index, url in enumerate(self.urls) if url is not None]

    async def wait_live(self, timeout: float) -> bool:
        """Whether a replica is up, waiting up to `timeout` seconds for one to come back."""
        deadline = time.monotonic() + timeout
        while not self.live():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def loads(self) -> list[float]:
        """Each replica's load as routing sees it: its requests in flight now, or its recent average if
        higher; a down replica counts as full (DOWN_LOAD) so that nothing is routed to it.

        Why the average: requests that run together on a replica finish together (same step, same length),
        and in a closed loop (conversations, an RL trainer's next batch) they come back at once. Counted
        as they are in that instant, that replica looks idle and takes over the other replica's
        conversations, with their histories recomputed, and the split stays uneven (benchmarks/cluster.py
        measured 8 / 4 of 12 conversations, and fewer tokens per second than round-robin)."""
        for index in range(len(self.actors)):
            self._settle(index)
        return [max(load, recent) if self.urls[index] else DOWN_LOAD
                for index, (load, recent) in enumerate(zip(self.in_flight, self._recent))]

    def started(self, index: int) -> None:
        self._settle(index)
        self.in_flight[index] += 1

    def finished(self, index: int) -> None:
        self._settle(index)
        self.in_flight[index] -= 1

    def _settle(self, index: int) -> None:
        """Bring the recent average up to now (the count has been in_flight since the last change)."""
        now = time.monotonic()
        weight = 1.0 - math.exp(-(now - self._settled_at[index]) / LOAD_SMOOTHING_S)
        self._recent[index] += (self.in_flight[index] - self._recent[index]) * weight
        self._settled_at[index] = now

    async def call(self, index: int, method: str, path: str, *, stream: bool = False, **kwargs) -> httpx.Response:
        """One HTTP call to a replica; ReplicaDown (and the replica marked down) if it cannot answer."""
        url = self.urls[index]
        if url is None:
            raise ReplicaDown(index)
        try:
            return await self.http.send(self.http.build_request(method, url + path, **kwargs), stream=stream)
        except httpx.TransportError:
            self.mark_down(index)
            raise ReplicaDown(index) from None

    def mark_down(self, index: int) -> None:
        if self.urls[index] is not None:
            self.urls[index] = None
            self.times_down[index] += 1
            self.on_down(index)
        if index not in self._rejoining:
            self._rejoining.add(index)
            asyncio.get_running_loop().create_task(self._rejoin(index))

    async def _rejoin(self, index: int) -> None:
        """Wait for the replica's next engine, bring it in line, then route to it again."""
        try:
            while True:
                try:
                    url, pid = await asyncio.wait_for(self.actors[index].endpoint.remote(), timeout=60)
                except Exception:                 # the actor itself is being restarted by Ray
                    await asyncio.sleep(MONITOR_INTERVAL_S)
                    continue
                if self.resync is None or await self.resync(index, url):
                    self.urls[index], self.pids[index] = url, pid
                    return
                await asyncio.sleep(MONITOR_INTERVAL_S)
        finally:
            self._rejoining.discard(index)

    async def monitor(self) -> None:
        """Notice engines that died or were restarted between requests (runs for the front's lifetime)."""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            for index in self.live():
                try:
                    url, pid = await asyncio.wait_for(self.actors[index].state.remote(), ACTOR_CALL_TIMEOUT_S)
                except Exception:
                    url, pid = None, None
                if pid is None or pid != self.pids[index] or url != self.urls[index]:
                    print(f"gorgon: replica {index} restarted; re-syncing it before it serves again",
                          file=sys.stderr, flush=True)
                    self.mark_down(index)

    async def close(self) -> None:
        await self.http.aclose()
