"""Scale-out on Ray (`gorgon serve --replicas 2 --threads 1`) against one server with both cores
(`gorgon serve --threads 2`), both up at once (the idle one waits on its sockets) and measured in turn:

(a) rollout throughput: RL rollouts through `/v1/rollouts` (prompts of a shared instruction plus their own
    question, n samples each, temperature 1), the front spreading the prompts over the replicas; the same
    calls to the single server, interleaved round by round. `rollout_throughput_ratio` is the cluster's
    generated tokens per second over the single server's (median over rounds, with the spread).
(b) routing overhead: a one-token completion through the front and straight to a replica, in alternation;
    `routing_overhead_ms` is the median of the per-pair differences (the bar is 5 ms).
(c) routing and the prefix cache on multi-turn chat: concurrent conversations sharing a system prompt, each
    turn resending the history; through the front (prefix-aware routing) and spread round-robin over the
    replicas' own addresses, in turn for `chat_rounds` rounds, the caches reset before each run (medians
    and ranges over the rounds); and once on the single server, where every
    turn finds its history (the ceiling). `hit_rate_*` is cached prompt tokens over those looked up, summed
    over the replicas (/metrics); `chat_tokens_per_s_*` the throughput; `chat_replica_shares_*` each
    replica's share of the prompt tokens (0.5 each is an even split).

(d) failover: streamed completions (sampled, seeded) through the front at once, undisturbed, then again
    with one replica's engine SIGKILLed 2 s in (`--failover-only`: this part alone). `failover_errors`:
    streams whose client saw an error (a 503, an error event, no [DONE]); `failover_identical`: every
    stream's text, token ids and logprobs equal the undisturbed run's; `failover_recovery_s`: for the
    streams cut by the kill, from the kill to their next chunk.

Full: 16 prompts x 8 samples x 64 tokens, 5 rounds; 40 overhead pairs; 12 conversations x 6 turns, 3 rounds;
120 streams x 96 tokens. `--quick`: 8 x 4 x 32, 3 rounds; 20 pairs; 6 conversations x 4 turns, 2 rounds;
40 streams x 48 tokens. The embedded model unless
--model; `--cluster-args` passes routing options (`--balance-abs`, `--balance-rel`, `--cache-threshold`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import statistics
import time

import httpx
from transformers import AutoTokenizer

from benchmarks.common import benchmark_model_path, cpu_description, gorgon_server, parse_args, report
from benchmarks.multiturn import system_prompt, text

ADMIN_KEY = "bench"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KILL_AFTER_S = 2.0           # (d): when the replica's engine is killed, after the streams start


def rollout_tokens_per_s(url: str, prompts: list[str], n: int, new_tokens: int) -> float:
    body = {"prompts": prompts, "n": n, "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 1.0,
            "seed": 3}
    started = time.perf_counter()
    answer = httpx.post(url + "/v1/rollouts", json=body, headers=ADMIN, timeout=3600)
    answer.raise_for_status()
    return sum(len(ids) for ids in answer.json()["completion_ids"]) / (time.perf_counter() - started)


def routing_overhead_ms(front: str, replica: str, pairs: int) -> dict:
    body = {"prompt": "Hello there", "max_tokens": 1, "temperature": 0}
    differences = []
    with httpx.Client(timeout=60) as client:
        for url in (front, replica):                  # warm both paths (connections, the tokenizer)
            client.post(url + "/v1/completions", json=body, headers=ADMIN).raise_for_status()
        for _ in range(pairs):
            seconds = {}
            for url in (front, replica):
                started = time.perf_counter()
                client.post(url + "/v1/completions", json=body, headers=ADMIN).raise_for_status()
                seconds[url] = time.perf_counter() - started
            differences.append((seconds[front] - seconds[replica]) * 1000)
    quartiles = statistics.quantiles(differences, n=4)
    return {"routing_overhead_ms": round(statistics.median(differences), 3),
            "routing_overhead_ms_iqr": [round(quartiles[0], 3), round(quartiles[2], 3)]}


async def conversation(client: httpx.AsyncClient, next_url, system: str, turns: int, seed: int,
                       new_tokens: int) -> int:
    rng, messages, generated = random.Random(seed), [{"role": "system", "content": system}], 0
    for turn in range(turns):
        messages.append({"role": "user", "content": text(rng, 6)})
        body = {"messages": messages, "max_tokens": new_tokens, "temperature": 0.8, "seed": seed + turn}
        answer = await client.post(next_url() + "/v1/chat/completions", json=body, headers=ADMIN)
        answer.raise_for_status()
        reply = answer.json()
        messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
        generated += reply["usage"]["completion_tokens"]
    return generated


def cache_counters(front: str) -> dict[str, float]:
    """Prompt tokens looked up in the prefix cache and found there, per replica (the front's /metrics)."""
    totals: dict[str, float] = {}
    for line in httpx.get(front + "/metrics", headers=ADMIN).text.splitlines():
        name = line.split("{")[0].split()[0] if line and not line.startswith("#") else ""
        if name in ("gorgon:prefix_cache_queries_total", "gorgon:prefix_cache_hits_total"):
            replica = line.split('replica="')[1].split('"')[0] if 'replica="' in line else "0"
            key = f"{name.split('_')[-2]}_{replica}"
            totals[key] = totals.get(key, 0.0) + float(line.split()[-1])
    return totals


def chat_run(front: str, urls: list[str], system: str, sizes: dict) -> dict:
    """Multi-turn chat with each request sent to next(urls); the hit rate over the run, from zero."""
    httpx.post(front + "/v1/reset_prefix_cache", headers=ADMIN).raise_for_status()
    before = cache_counters(front)
    cycle = itertools.cycle(urls)

    async def run() -> int:
        async with httpx.AsyncClient(timeout=600) as client:
            done = await asyncio.gather(*(conversation(client, lambda: next(cycle), system, sizes["turns"], 1000 * i,
                                                       sizes["chat_tokens"]) for i in range(sizes["conversations"])))
        return sum(done)

    started = time.perf_counter()
    generated = asyncio.run(run())
    seconds = time.perf_counter() - started
    delta = {key: value - before.get(key, 0.0) for key, value in cache_counters(front).items()}
    queries = {key: value for key, value in delta.items() if key.startswith("queries")}
    hits = sum(value for key, value in delta.items() if key.startswith("hits"))
    return {"hit_rate": round(hits / max(1.0, sum(queries.values())), 3), "tokens_per_s": round(generated / seconds, 1),
            # how the prompt tokens were spread: 0.5 each is an even split over two replicas
            "replica_shares": [round(queries[key] / max(1.0, sum(queries.values())), 3) for key in sorted(queries)]}


async def _failover_stream(client: httpx.AsyncClient, front: str, index: int, new_tokens: int) -> dict:
    """One streamed completion (sampled, seeded): what its client received, and when."""
    body = {"prompt": f"Write a story about the number {index}.", "max_tokens": new_tokens, "min_tokens": new_tokens,
            "temperature": 1.0, "seed": 1000 + index, "stream": True, "logprobs": 0, "return_token_ids": True}
    outcome = {"text": "", "token_ids": [], "logprobs": [], "event_times": [], "error": None, "done": 0}
    async with client.stream("POST", front + "/v1/completions", json=body, headers=ADMIN) as response:
        outcome["replica"] = response.headers.get("x-gorgon-replica")
        if response.status_code != 200:
            outcome["error"] = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return outcome
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            outcome["event_times"].append(time.perf_counter())
            if line == "data: [DONE]":
                outcome["done"] += 1
                continue
            payload = json.loads(line[6:])
            if "error" in payload:
                outcome["error"] = payload["error"]["message"]
                continue
            for choice in payload["choices"]:
                outcome["text"] += choice["text"]
                outcome["token_ids"] += choice.get("token_ids") or []
                outcome["logprobs"] += (choice["logprobs"] or {}).get("token_logprobs") or []
    if outcome["done"] != 1 and outcome["error"] is None:
        outcome["error"] = f"the stream ended with {outcome['done']} [DONE] events"
    return outcome


def failover(front: str, streams: int, new_tokens: int, kill_after_s: float) -> dict:
    """`streams` streamed completions through the front at once, first undisturbed, then again with one
    replica's engine SIGKILLed `kill_after_s` seconds in. Errors the clients saw, whether every output
    equals the undisturbed one, and how long the streams of the killed replica waited for their next chunk."""
    async def run(kill_pid: int | None) -> tuple[list[dict], float | None]:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams + 8)) as client:
            tasks = [asyncio.create_task(_failover_stream(client, front, i, new_tokens)) for i in range(streams)]
            killed_at = None
            if kill_pid is not None:
                await asyncio.sleep(kill_after_s)
                killed_at = time.perf_counter()
                os.kill(kill_pid, signal.SIGKILL)
            return await asyncio.gather(*tasks), killed_at

    def members() -> list[dict]:
        return httpx.get(front + "/cluster/replicas", headers=ADMIN).json()["replicas"]

    undisturbed, _ = asyncio.run(run(None))
    victim = members()[0]
    disturbed, killed_at = asyncio.run(run(victim["pid"]))
    fields = ("text", "token_ids", "logprobs")
    cut = [o for o in disturbed if o["replica"] == "0" and o["event_times"] and o["event_times"][0] < killed_at
           and o["event_times"][-1] > killed_at]
    # A cut stream's stall: its longest wait between two chunks from the kill on (chunks made before the
    # kill may still be in flight after it, so the first chunk after the kill is not the measure).
    waits = [max(later - earlier for earlier, later in zip([killed_at, *o["event_times"]], o["event_times"])
                 if later > killed_at) for o in cut]
    undisturbed_gaps = [max(b - a for a, b in zip(o["event_times"], o["event_times"][1:])) for o in undisturbed
                        if len(o["event_times"]) > 1]
    deadline = time.time() + 120
    while not all(m["up"] for m in members()) and time.time() < deadline:        # back before the next part
        time.sleep(0.5)
    return {"failover_streams": streams, "failover_new_tokens": new_tokens, "failover_kill_after_s": kill_after_s,
            "failover_finished": sum(o["done"] == 1 and o["error"] is None for o in disturbed),
            "failover_errors": sum(o["error"] is not None for o in disturbed),
            "failover_error_samples": [o["error"] for o in disturbed if o["error"]][:3],
            "failover_undisturbed_errors": sum(o["error"] is not None for o in undisturbed),
            "failover_identical": all(all(a[f] == b[f] for f in fields) for a, b in zip(undisturbed, disturbed)),
            "failover_streams_cut": len(cut),
            "failover_recovery_s": {"max": round(max(waits), 3), "median": round(statistics.median(waits), 3),
                                    "p90": round(sorted(waits)[int(0.9 * (len(waits) - 1))], 3),
                                    "over_2s": sum(wait > 2.0 for wait in waits)} if waits else None,
            # the same stall measure with no kill: each stream's longest wait between two chunks
            "undisturbed_longest_gap_s": {"max": round(max(undisturbed_gaps), 3),
                                          "median": round(statistics.median(undisturbed_gaps), 3)}}


def _median_and_range(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "range": [round(min(values), 3), round(max(values), 3)]}


def main() -> None:
    def options(parser) -> None:
        parser.add_argument("--cluster-args", default="",
                            help="more options for the cluster's gorgon serve, e.g. '--balance-abs 1'")
        parser.add_argument("--failover-only", action="store_true", help="only (d), the replica kill")

    args = parse_args(__doc__.split("\n\n")[0], options)
    model = benchmark_model_path(args.model)
    sizes = (dict(prompts=8, n=4, new_tokens=32, rounds=3, pairs=20, conversations=6, turns=4, chat_tokens=16,
                  system=300, chat_rounds=2, failover_streams=40, failover_tokens=48) if args.quick else
             dict(prompts=16, n=8, new_tokens=64, rounds=5, pairs=40, conversations=12, turns=6, chat_tokens=24,
                  system=300, chat_rounds=3, failover_streams=120, failover_tokens=96))
    common = ("--admin-key", ADMIN_KEY, "--kv-cache-memory-gb", "1")
    cluster_args = ("--replicas", "2", "--threads", "1", *common, *args.cluster_args.split())
    figures = {}
    if args.failover_only:
        with gorgon_server(model, *cluster_args) as front:
            figures = failover(front, sizes["failover_streams"], sizes["failover_tokens"], KILL_AFTER_S)
    else:
        with gorgon_server(model, "--threads", "2", *common) as single, gorgon_server(model, *cluster_args) as front:
            figures = scale_out(model, single, front, sizes)
            figures |= failover(front, sizes["failover_streams"], sizes["failover_tokens"], KILL_AFTER_S)
    report({"benchmark": "cluster", "model": model, "cpu": cpu_description(), "sizes": sizes, **figures}, args.json)


def scale_out(model: str, single: str, front: str, sizes: dict) -> dict:
    """(a) to (c): rollout throughput, routing overhead, routing and the prefix cache."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)
    instruction = "Solve the problem and give the answer in a box. " + text(rng, 40)
    prompts = [f"{instruction}\nProblem {i}: {text(rng, 12)}" for i in range(sizes["prompts"])]
    system = system_prompt(tokenizer, sizes["system"])
    replicas = [m["url"] for m in httpx.get(front + "/cluster/replicas", headers=ADMIN).json()["replicas"]]
    for url in (single, front):                         # warm-up: first calls compile and allocate
        rollout_tokens_per_s(url, prompts[:2], 2, 4)
    ratios, per_side = [], {"cluster": [], "single": []}
    for _ in range(sizes["rounds"]):
        cluster_rate = rollout_tokens_per_s(front, prompts, sizes["n"], sizes["new_tokens"])
        single_rate = rollout_tokens_per_s(single, prompts, sizes["n"], sizes["new_tokens"])
        per_side["cluster"].append(cluster_rate)
        per_side["single"].append(single_rate)
        ratios.append(cluster_rate / single_rate)
    overhead = routing_overhead_ms(front, replicas[0], sizes["pairs"])
    chats = {"prefix": [], "round_robin": []}
    for _ in range(sizes["chat_rounds"]):                 # the two policies in turn, from empty caches
        chats["prefix"].append(chat_run(front, [front], system, sizes))
        chats["round_robin"].append(chat_run(front, replicas, system, sizes))
    one_server = chat_run(single, [single], system, sizes)      # every turn finds its history: the ceiling
    times_down = [m["times_down"] for m in httpx.get(front + "/cluster/replicas", headers=ADMIN).json()["replicas"]]
    return {"rollout_throughput_ratio": round(statistics.median(ratios), 3),
            "rollout_throughput_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "rollout_tokens_per_s": {side: round(statistics.median(v), 1) for side, v in per_side.items()},
            **overhead, "routing_overhead_bar_ms": 5.0,
            **{f"{figure}_{policy}": _median_and_range([run[key] for run in runs])
               for policy, runs in chats.items() for figure, key in (("hit_rate", "hit_rate"),
                                                                      ("chat_tokens_per_s", "tokens_per_s"))},
            "hit_rate_one_server": one_server["hit_rate"], "replica_times_down": times_down,
            "chat_replica_shares": {policy: [run["replica_shares"] for run in runs] for policy, runs in chats.items()}}


if __name__ == "__main__":
    main()
