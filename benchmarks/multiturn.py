"""Prefix caching on the work that resends a prefix, over HTTP, cache on vs off (`--no-prefix-cache`), the
two servers run in turn:

(a) multi-turn chat: conversations on `/v1/chat/completions`, streamed, sharing a system prompt with tool
    definitions; each turn resends the history with the previous answer and a new user message. Full: 16
    conversations x 8 turns of 24 new tokens, a 900-token system prompt, on a model with a 2,048-token
    context, which the eighth turn nearly fills (the embedded model's is 1,024, so the full run uses the
    fixed random Llama unless `--model` names one); `--quick`: 4 x 4 turns, a 300-token system prompt,
    the embedded model.
(b) RL-style: prompts sharing an instruction prefix, n = 8, through `/v1/rollouts`. Full: 32 prompts, a
    512-token prefix; `--quick`: 8 prompts, a 256-token prefix.

Reports per scenario `ttft_p50_ratio` (time to first token, off / on; (a) only), `throughput_ratio`
(generated tokens per second, on / off) and `hit_rate` (prompt tokens found in the cache over those
looked up, from /metrics), with each side's medians over the turns.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import httpx
from transformers import AutoTokenizer

from benchmarks.common import (RANDOM_LLAMA, benchmark_model_path, cpu_description, gorgon_server, parse_args,
                               random_llama_path, report, stream_events)
from client.http import GorgonClient

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
                       new_tokens: int) -> tuple[list[float], int]:
    """One conversation's turns, in order: (time to first token of each turn, tokens generated)."""
    rng, messages, ttfts, generated = random.Random(seed), [{"role": "system", "content": system}], [], 0
    for turn in range(turns):
        messages.append({"role": "user", "content": text(rng, 6)})
        body = {"model": model, "messages": messages, "max_tokens": new_tokens, "temperature": 0.8, "seed": seed + turn,
                "stream": True, "stream_options": {"include_usage": True}}
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


async def chat_run(url: str, model: str, system: str, conversations: int, turns: int, new_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(conversation(client, url, model, system, turns, 1000 * i, new_tokens)
                                         for i in range(conversations)))
        seconds = time.perf_counter() - started
    ttfts = [t for ttft, _ in results for t in ttft]
    return {"ttft_p50": statistics.median(ttfts), "tokens_per_s": sum(g for _, g in results) / seconds}


def rollout_run(url: str, prefix: str, num_prompts: int, new_tokens: int) -> dict:
    rng = random.Random(1)
    prompts = [prefix + "\nTask: " + text(rng, 10) for _ in range(num_prompts)]
    started = time.perf_counter()
    out = GorgonClient(url).rollouts(prompts, n=8, max_tokens=new_tokens, temperature=1.0, seed=3)
    seconds = time.perf_counter() - started
    generated = sum(len(ids) for ids in out["completion_ids"])
    return {"tokens_per_s": generated / seconds}


def hit_rate(url: str) -> float | None:
    metrics = httpx.get(f"{url}/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("gorgon:prefix_cache_")}
    queries = values.get("gorgon:prefix_cache_queries_total", 0.0)
    return round(values.get("gorgon:prefix_cache_hits_total", 0.0) / queries, 3) if queries else None


def main() -> None:
    args = parse_args(__doc__)
    model = args.model or (benchmark_model_path(None) if args.quick else _long_context_model())
    system_tokens, conversations, turns, new_tokens = (300, 4, 4, 16) if args.quick else (900, 16, 8, 24)
    prefix_tokens, num_prompts, rollout_tokens = (256, 8, 16) if args.quick else (512, 32, 32)
    tokenizer = AutoTokenizer.from_pretrained(model)
    system = system_prompt(tokenizer, system_tokens)
    prefix = cut(text(random.Random(2), 4 * prefix_tokens), tokenizer, prefix_tokens)
    runs = {"on": {"chat": [], "rollout": []}, "off": {"chat": [], "rollout": []}}
    hits = {}
    for _ in range(1 if args.quick else 2):            # the two servers in turn
        for side, extra in (("on", ()), ("off", ("--no-prefix-cache",))):
            with gorgon_server(model, "--max-num-seqs", "64", *extra) as url:
                runs[side]["chat"].append(asyncio.run(chat_run(url, model, system, conversations, turns, new_tokens)))
                runs[side]["rollout"].append(rollout_run(url, prefix, num_prompts, rollout_tokens))
                hits[side] = hit_rate(url)
    med = {side: {key: statistics.median(run[key] for run in runs[side]["chat"]) for key in ("ttft_p50", "tokens_per_s")}
           | {"rollout_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[side]["rollout"])}
           for side in runs}
    report({"benchmark": "multiturn", "model": model, "cpu": cpu_description(), "on": med["on"], "off": med["off"],
            "chat_ttft_p50_ratio": round(med["off"]["ttft_p50"] / med["on"]["ttft_p50"], 2),
            "chat_throughput_ratio": round(med["on"]["tokens_per_s"] / med["off"]["tokens_per_s"], 2),
            "rollout_throughput_ratio": round(med["on"]["rollout_tokens_per_s"] / med["off"]["rollout_tokens_per_s"], 2),
            "hit_rate": hits.get("on"), "hit_rate_off": hits.get("off")}, args.json)


def _long_context_model() -> str:
    """The fixed random Llama (2,048 positions) unless the embedded model's context is long enough."""
    from models.loader import DEFAULT_MODEL_DIR
    config = DEFAULT_MODEL_DIR / "config.json"
    if config.exists() and json.loads(config.read_text()).get("max_position_embeddings", 0) >= 2048:
        return str(DEFAULT_MODEL_DIR)
    assert RANDOM_LLAMA["max_position_embeddings"] >= 2048
    return random_llama_path()


if __name__ == "__main__":
    main()
