"""Prefix caching on the work that resends a prefix, over HTTP: Gorgon with the cache on vs off
(`--no-prefix-cache`), and vLLM's CPU build with its prefix caching on the same folder when it can run
here (`--vllm-python`, see benchmarks/vllm_peer.py; skipped with the reason otherwise). The servers run
in turn, one at a time:

(a) multi-turn chat: conversations on `/v1/chat/completions`, streamed, sharing a system prompt with tool
    definitions; each turn resends the history with the previous answer and a new user message. Full: 16
    conversations x 8 turns of 24 new tokens, a 1,000-token system prompt, on the fixed random Llama
    (4,096 positions; the embedded model's 1,024 cannot hold the eighth turn) unless `--model` names one;
    `--quick`: 4 x 4 turns, a 300-token system prompt, the embedded model.
(b) RL-style: prompts sharing an instruction prefix, n = 8: Gorgon through `/v1/rollouts`, vLLM through
    `/v1/completions` (the prompt list and n in one request). Full: 32 prompts, a 512-token prefix;
    `--quick`: 8 prompts, a 256-token prefix.
(c) what the cache costs when nothing is reused: in one process, two engines (cache on, off) decode the
    same batches of 8 distinct random 256-token prompts, 64 new tokens each, in turn; `miss_cost` is the
    median over turns of on-seconds / off-seconds - 1, with its spread.

Reports per scenario `ttft_p50_ratio` (time to first token, off / on; (a) only), `throughput_ratio`
(generated tokens per second, on / off) and `hit_rate` (prompt tokens found in the cache over those
looked up, from /metrics), with each side's medians over the turns; against vLLM, `vllm_*_ratio` is
Gorgon's figure over vLLM's (TTFT: vLLM's over Gorgon's), so above 1 means Gorgon is faster.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import httpx
import torch
from transformers import AutoTokenizer

from benchmarks.common import (RANDOM_LLAMA, benchmark_model_path, cpu_description, gorgon_server, parse_args,
                               random_llama_path, random_prompts, report, stream_events)
from benchmarks.vllm_peer import find_vllm, vllm_server
from client.http import GorgonClient
from decoding import Engine, SamplingParams

WORDS = ("function returns value list table row column index search filter sort merge weather city date "
         "temperature forecast unit celsius fahrenheit query result error retry timeout user name email").split()


def text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def system_prompt(tokenizer, num_tokens: int) -> str:
    """Tool definitions and instructions, cut to `num_tokens` tokens of the served model's tokenizer."""
    rng = random.Random(0)
    tools = [{"name": f"tool_{i}", "description": text(rng, 24),
              "parameters": {"type": "object", "properties": {w: {"type": "string"} for w in rng.sample(WORDS, 4)}}}
             for i in range(max(1, num_tokens // 30))]
    return cut("You are an assistant with these tools:\n" + json.dumps(tools), tokenizer, num_tokens)


def cut(prompt: str, tokenizer, num_tokens: int) -> str:
    return tokenizer.decode(tokenizer.encode(prompt, add_special_tokens=False)[:num_tokens])


async def conversation(client: httpx.AsyncClient, url: str, model: str, system: str, turns: int, seed: int,
                       new_tokens: int, seeded: bool) -> tuple[list[float], int]:
    """One conversation's turns, in order: (time to first token of each turn, tokens generated)."""
    rng, messages, ttfts, generated = random.Random(seed), [{"role": "system", "content": system}], [], 0
    for turn in range(turns):
        messages.append({"role": "user", "content": text(rng, 6)})
        body = {"model": model, "messages": messages, "max_tokens": new_tokens, "temperature": 0.8,
                "stream": True, "stream_options": {"include_usage": True}} | ({"seed": seed + turn} if seeded else {})
        started, first, answer = time.perf_counter(), None, []
        async for event in stream_events(client, f"{url}/v1/chat/completions", body):
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - started
                    answer.append(choice["delta"]["content"])
            if event.get("usage"):
                generated += event["usage"]["completion_tokens"]
        ttfts.append(first if first is not None else time.perf_counter() - started)
        messages.append({"role": "assistant", "content": "".join(answer)})
    return ttfts, generated


async def chat_run(url: str, model: str, system: str, conversations: int, turns: int, new_tokens: int,
                   seeded: bool = True) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(conversation(client, url, model, system, turns, 1000 * i, new_tokens, seeded)
                                         for i in range(conversations)))
        seconds = time.perf_counter() - started
    ttfts = [t for ttft, _ in results for t in ttft]
    return {"ttft_p50": statistics.median(ttfts), "tokens_per_s": sum(g for _, g in results) / seconds}


def rollout_run(url: str, prompts: list[str], new_tokens: int) -> dict:
    started = time.perf_counter()
    out = GorgonClient(url).rollouts(prompts, n=8, max_tokens=new_tokens, temperature=1.0, seed=3)
    seconds = time.perf_counter() - started
    return {"tokens_per_s": sum(len(ids) for ids in out["completion_ids"]) / seconds}


def completions_rollout_run(url: str, model: str, prompts: list[str], new_tokens: int) -> dict:
    """The same rollouts through the OpenAI completions route, for a peer without /v1/rollouts; unseeded
    (see scenarios)."""
    body = {"model": model, "prompt": prompts, "n": 8, "max_tokens": new_tokens, "temperature": 1.0}
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=3600)
    response.raise_for_status()
    return {"tokens_per_s": response.json()["usage"]["completion_tokens"] / (time.perf_counter() - started)}


def hit_rate(url: str, prefix: str = "gorgon:") -> float | None:
    """Cached prompt tokens over those looked up, from the server's counters (labels ignored)."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(prefix + "prefix_cache_"):
            name = line.split("{")[0].split()[0]
            values[name] = values.get(name, 0.0) + float(line.split()[-1])
    queries = values.get(prefix + "prefix_cache_queries_total", 0.0)
    return round(values.get(prefix + "prefix_cache_hits_total", 0.0) / queries, 3) if queries else None


def miss_cost(model: str, quick: bool) -> dict:
    """(c): the cache's cost per step when no prompt shares anything, cache on vs off in one process."""
    engines = {side: Engine(model=model, prefix_caching=side == "on", show_progress=False) for side in ("on", "off")}
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=64, ignore_eos=True)
    vocab = engines["on"].loaded.model.vocab_size
    ratios = []
    for turn in range(3 if quick else 11):
        prompts = random_prompts(8, 256, vocab, seed=100 + turn)      # fresh each turn: nothing to reuse
        seconds = {}
        for side in (("on", "off") if turn % 2 else ("off", "on")):  # alternate who goes first
            started = time.perf_counter()
            engines[side].generate(prompts, params)
            seconds[side] = time.perf_counter() - started
        ratios.append(seconds["on"] / seconds["off"] - 1)
    ratios = ratios[1:]                                                 # the first turn warms both up
    return {"miss_cost": round(statistics.median(ratios), 4),
            "miss_cost_spread": [round(min(ratios), 4), round(max(ratios), 4)], "miss_cost_turns": len(ratios)}


def scenarios(url: str, model: str, system: str, rollout_prompts: list[str], sizes: dict, peer: bool) -> dict:
    # vLLM's CPU build (0.32) dies on a seeded request whose prompt it prefills in chunks ("CPU Generator
    # does not use offset"), so the peer's requests carry no seed; the timings do not depend on it.
    chat = asyncio.run(chat_run(url, model, system, sizes["conversations"], sizes["turns"], sizes["new_tokens"],
                                seeded=not peer))
    rollout = (completions_rollout_run(url, model, rollout_prompts, sizes["rollout_tokens"]) if peer
               else rollout_run(url, rollout_prompts, sizes["rollout_tokens"]))
    return chat | {"rollout_tokens_per_s": rollout["tokens_per_s"]}


def main() -> None:
    args = parse_args(__doc__, lambda parser: parser.add_argument(
        "--vllm-python", default=None, help="the python of an environment with vLLM's CPU build"))
    model = args.model or (benchmark_model_path(None) if args.quick else _long_context_model())
    system_tokens, prefix_tokens = (300, 256) if args.quick else (1000, 512)
    sizes = (dict(conversations=4, turns=4, new_tokens=16, num_prompts=8, rollout_tokens=16) if args.quick else
             dict(conversations=16, turns=8, new_tokens=24, num_prompts=32, rollout_tokens=32))
    tokenizer = AutoTokenizer.from_pretrained(model)
    system = system_prompt(tokenizer, system_tokens)
    prefix = cut(text(random.Random(2), 4 * prefix_tokens), tokenizer, prefix_tokens)
    rng = random.Random(1)
    rollout_prompts = [prefix + "\nTask: " + text(rng, 10) for _ in range(sizes["num_prompts"])]
    vllm, vllm_why = find_vllm(args.vllm_python)
    servers = {"on": lambda: gorgon_server(model, "--max-num-seqs", "64"),
               "off": lambda: gorgon_server(model, "--max-num-seqs", "64", "--no-prefix-cache")}
    if vllm:
        servers["vllm"] = lambda: vllm_server(vllm, model, threads=torch.get_num_threads())
    runs, hits = {side: [] for side in servers}, {}
    for _ in range(1 if args.quick else 2):            # the servers in turn
        for side, server in servers.items():
            with server() as url:
                runs[side].append(scenarios(url, model, system, rollout_prompts, sizes, peer=side == "vllm"))
                hits[side] = hit_rate(url, "vllm:" if side == "vllm" else "gorgon:")
    med = {side: {key: statistics.median(run[key] for run in runs[side])
                  for key in ("ttft_p50", "tokens_per_s", "rollout_tokens_per_s")} for side in runs}
    result = {"benchmark": "multiturn", "model": model, "cpu": cpu_description(), "on": med["on"], "off": med["off"],
              "chat_ttft_p50_ratio": round(med["off"]["ttft_p50"] / med["on"]["ttft_p50"], 2),
              "chat_throughput_ratio": round(med["on"]["tokens_per_s"] / med["off"]["tokens_per_s"], 2),
              "rollout_throughput_ratio": round(med["on"]["rollout_tokens_per_s"] / med["off"]["rollout_tokens_per_s"], 2),
              "hit_rate": hits["on"], "hit_rate_off": hits["off"]}
    if vllm:
        result |= {"vllm": med["vllm"] | {"version": vllm_why, "hit_rate": hits["vllm"]},
                   "vllm_chat_ttft_p50_ratio": round(med["vllm"]["ttft_p50"] / med["on"]["ttft_p50"], 2),
                   "vllm_chat_throughput_ratio": round(med["on"]["tokens_per_s"] / med["vllm"]["tokens_per_s"], 2),
                   "vllm_rollout_throughput_ratio":
                       round(med["on"]["rollout_tokens_per_s"] / med["vllm"]["rollout_tokens_per_s"], 2)}
    else:
        result["vllm_skipped"] = vllm_why
    report(result | miss_cost(model, args.quick), args.json)


def _long_context_model() -> str:
    """The fixed random Llama (4,096 positions) unless the embedded model's context is long enough."""
    from models.loader import DEFAULT_MODEL_DIR
    config = DEFAULT_MODEL_DIR / "config.json"
    if config.exists() and json.loads(config.read_text()).get("max_position_embeddings", 0) >= 4096:
        return str(DEFAULT_MODEL_DIR)
    assert RANDOM_LLAMA["max_position_embeddings"] >= 4096
    return random_llama_path()


if __name__ == "__main__":
    main()
