"""Soak: the server under rounds of many concurrent streams from careless clients, then admission and
liveness under pressure. A `gorgon serve` subprocess on the embedded model.

Each round opens `--streams` streams at once (completions and chat, n = 1 or 2, 8-48 new tokens); 30% of
the clients walk away after a few chunks. After each round, once the server is idle: KV blocks still in
use (`leaked_blocks`, bar 0) and the server's resident memory; `rss_growth` is the growth from the end of
the first round (allocators warm) to the end of the last (bar < 0.05). `five_xx` counts 5xx answers and
streams that ended without `[DONE]` although their client stayed (bar 0).

Then, on the idle server, a burst of as many requests as there are running slots (`admitted_fraction`,
bar 1.0); and on a second server with 4 slots and 4 queue places, filled with long streams, requests
that must be refused (half with a schema whose grammar would take seconds to compile): their latency
(`refusal_p99_ms`, bar 50) and /health's while 10 MB bodies are refused (`health_p99_ms`, bar 100).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import cpu_description, free_port, parse_args, report, wait_healthy

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\nimport sys\n\n",
           "# Parse the arguments", "SELECT name FROM users WHERE", "for i in range(10):"]
SLOW_SCHEMA = {"type": "object"}   # seconds of CPU to compile with outlines-core
DISCONNECT_FRACTION = 0.3


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--log-level",
                                "warning", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process)
    return process, url


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_idle(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if gauge(url, "gorgon:num_requests_running") == 0 and gauge(url, "gorgon:num_requests_waiting") == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("the server did not go idle")


async def one_stream(client: httpx.AsyncClient, url: str, rng: random.Random, tally: dict) -> None:
    chat = rng.random() < 0.3
    common = {"max_tokens": rng.randint(8, 48), "n": rng.choice([1, 1, 1, 2]), "stream": True,
              "temperature": rng.choice([0, 0.8])}
    route, body = (("/v1/chat/completions", {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], **common})
                   if chat else ("/v1/completions", {"prompt": rng.choice(PROMPTS), **common}))
    leave_after = rng.randint(1, 5) if rng.random() < DISCONNECT_FRACTION else None
    try:
        async with client.stream("POST", url + route, json=body) as response:
            tally[response.status_code // 100 * 100] = tally.get(response.status_code // 100 * 100, 0) + 1
            if response.status_code != 200:
                return
            seen, last = 0, None
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    seen, last = seen + 1, line
                    if leave_after is not None and seen >= leave_after:
                        tally["left"] = tally.get("left", 0) + 1
                        return                            # the client walks away mid-stream
            if last != "data: [DONE]":
                tally["truncated"] = tally.get("truncated", 0) + 1
    except httpx.HTTPError:
        tally["transport_errors"] = tally.get("transport_errors", 0) + 1


async def round_of_streams(url: str, num: int, seed: int) -> dict:
    rng, tally = random.Random(seed), {}
    limits = httpx.Limits(max_connections=num + 16, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(one_stream(client, url, rng, tally) for _ in range(num)))
    return tally


async def burst(url: str, num: int) -> list[int]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=num + 4)) as client:
        responses = await asyncio.gather(*(client.post(f"{url}/v1/completions", json={"prompt": PROMPTS[i % len(PROMPTS)],
                                                                                        "max_tokens": 8})
                                           for i in range(num)))
    return [r.status_code for r in responses]


def pressure(quick: bool) -> dict:
    """A small server filled with long streams: how fast refusals come, and /health beside 10 MB bodies."""
    process, url = start_server("--max-num-seqs", "4", "--max-queued", "4", "--max-num-batched-tokens", "64")
    results: dict = {}
    try:
        async def fill_and_probe():
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
                body = {"prompt": "def f(x):", "max_tokens": 900, "ignore_eos": True, "stream": True}
                streams = [await client.send(client.build_request("POST", f"{url}/v1/completions", json=body), stream=True)
                           for _ in range(8)]
                refusals, statuses = [], []
                for i in range(50 if quick else 200):
                    extra = {"structured_backend": "outlines-core", "response_format": {
                        "type": "json_schema", "json_schema": {"name": "s", "schema": SLOW_SCHEMA}}} if i % 2 else {}
                    started = time.perf_counter()
                    response = await client.post(f"{url}/v1/completions", json={"prompt": "x", **extra})
                    refusals.append(time.perf_counter() - started)
                    statuses.append(response.status_code)
                health, big = [], json.dumps({"prompt": "word " * (2 * 2**20)})

                async def poll(stop: asyncio.Event):
                    while not stop.is_set():
                        started = time.perf_counter()
                        await client.get(f"{url}/health")
                        health.append(time.perf_counter() - started)
                        await asyncio.sleep(0.01)

                stop = asyncio.Event()
                poller = asyncio.create_task(poll(stop))
                big_statuses = [(await client.post(f"{url}/v1/completions", content=big,
                                                   headers={"Content-Type": "application/json"})).status_code
                                for _ in range(3 if quick else 10)]
                stop.set()
                await poller
                for stream in streams:
                    await stream.aclose()
                return refusals, statuses, health, big_statuses

        refusals, statuses, health, big_statuses = asyncio.run(fill_and_probe())
        results = {"refusal_p99_ms": round(1e3 * statistics.quantiles(refusals, n=100)[98], 1),
                   "refusal_median_ms": round(1e3 * statistics.median(refusals), 1),
                   "refused_fraction": round(statuses.count(503) / len(statuses), 3),
                   "health_p99_ms": round(1e3 * statistics.quantiles(health, n=100)[98], 1),
                   "large_body_statuses": sorted(set(big_statuses))}
    finally:
        process.terminate()
        process.wait(timeout=60)
    return results


def main() -> None:
    def extra(parser):
        parser.add_argument("--streams", type=int, default=None, help="concurrent streams per round (default 1000)")
        parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5; --quick: 3)")

    args = parse_args(__doc__, extra)
    num = args.streams or (200 if args.quick else 1000)
    rounds = args.rounds or (3 if args.quick else 5)
    slots = 64
    process, url = start_server("--max-num-seqs", str(slots), "--max-queued", str(num), "--kv-cache-memory-gb", "0.5")
    result = {"benchmark": "soak", "cpu": cpu_description(), "streams_per_round": num, "rounds": rounds,
              "disconnect_fraction": DISCONNECT_FRACTION}
    try:
        tallies, rss, leaked, seconds = [], [], [], []
        for index in range(rounds):
            started = time.perf_counter()
            tallies.append(asyncio.run(round_of_streams(url, num, seed=index)))
            seconds.append(time.perf_counter() - started)
            wait_idle(url)
            leaked.append(int(gauge(url, "gorgon:kv_cache_used_blocks")))
            rss.append(rss_bytes(process.pid))
            print(f"round {index}: {tallies[-1]} in {seconds[-1]:.1f} s, {leaked[-1]} blocks in use, "
                  f"RSS {rss[-1] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        statuses = asyncio.run(burst(url, slots))
        result |= {
            "five_xx": sum(t.get(500, 0) + t.get("truncated", 0) for t in tallies),
            "leaked_blocks": max(leaked),
            "rss_growth": round((rss[-1] - rss[0]) / rss[0], 4),
            "rss_mib": [round(r / 2**20) for r in rss],
            "admitted_fraction": round(statuses.count(200) / len(statuses), 3),
            "round_seconds": [round(s, 1) for s in seconds],
            "tallies": tallies,
        }
    finally:
        process.terminate()
        process.wait(timeout=60)
    result |= pressure(args.quick)
    report(result, args.json)


if __name__ == "__main__":
    main()
