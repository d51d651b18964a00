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

Full: 16 prompts x 8 samples x 64 tokens, 5 rounds; 40 overhead pairs; 12 conversations x 6 turns, 3 rounds.
`--quick`: 8 x 4 x 32, 3 rounds; 20 pairs; 6 conversations x 4 turns, 2 rounds. The embedded model unless
--model; `--cluster-args` passes routing options (`--balance-abs`, `--balance-rel`, `--cache-threshold`).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time

import httpx
from transformers import AutoTokenizer

from benchmarks.common import benchmark_model_path, cpu_description, gorgon_server, parse_args, report
from benchmarks.multiturn import system_prompt, text

ADMIN_KEY = "bench"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


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


def _median_and_range(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "range": [round(min(values), 3), round(max(values), 3)]}


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], lambda parser: parser.add_argument(
        "--cluster-args", default="", help="more options for the cluster's gorgon serve, e.g. '--balance-abs 1'"))
    model = benchmark_model_path(args.model)
    sizes = (dict(prompts=8, n=4, new_tokens=32, rounds=3, pairs=20, conversations=6, turns=4, chat_tokens=16,
                  system=300, chat_rounds=2) if args.quick else
             dict(prompts=16, n=8, new_tokens=64, rounds=5, pairs=40, conversations=12, turns=6, chat_tokens=24,
                  system=300, chat_rounds=3))
    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)
    instruction = "Solve the problem and give the answer in a box. " + text(rng, 40)
    prompts = [f"{instruction}\nProblem {i}: {text(rng, 12)}" for i in range(sizes["prompts"])]
    system = system_prompt(tokenizer, sizes["system"])
    common = ("--admin-key", ADMIN_KEY, "--kv-cache-memory-gb", "1")
    with gorgon_server(model, "--threads", "2", *common) as single, \
            gorgon_server(model, "--replicas", "2", "--threads", "1", *common, *args.cluster_args.split()) as front:
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
    report({"benchmark": "cluster", "model": model, "cpu": cpu_description(), "sizes": sizes,
            "rollout_throughput_ratio": round(statistics.median(ratios), 3),
            "rollout_throughput_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "rollout_tokens_per_s": {side: round(statistics.median(v), 1) for side, v in per_side.items()},
            **overhead, "routing_overhead_bar_ms": 5.0,
            **{f"{figure}_{policy}": _median_and_range([run[key] for run in runs])
               for policy, runs in chats.items() for figure, key in (("hit_rate", "hit_rate"),
                                                                      ("chat_tokens_per_s", "tokens_per_s"))},
            "hit_rate_one_server": one_server["hit_rate"], "replica_times_down": times_down,
            "chat_replica_shares": {policy: [run["replica_shares"] for run in runs]
                                    for policy, runs in chats.items()}}, args.json)


if __name__ == "__main__":
    main()
