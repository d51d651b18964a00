"""64 concurrent streaming completions (prompts of 16-2,048 tokens, to the model's context, 128 new tokens, sampled) against
`gorgon serve` and against `transformers serve --continuous-batching` on the same model, one after the
other, both on loopback. Reports generated tokens per second and time-to-first-token percentiles."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import time

import httpx
from transformers import AutoConfig, AutoTokenizer

from benchmarks.common import (benchmark_model_path, free_port, parse_args, random_prompts, report, server_process,
                               stream_events, user_prompt_lengths)


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, new_tokens: int, seed: int):
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 1.0, "stream": True,
            "seed": seed}
    started = time.perf_counter()
    first, text = None, []
    async for event in stream_events(client, f"{url}/v1/completions", body):
        for choice in event.get("choices", []):
            if choice.get("text"):
                first = first or time.perf_counter() - started
                text.append(choice["text"])
    return first, "".join(text)


async def drive(url: str, model: str, prompts: list[str], new_tokens: int, tokenizer) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, model, p, new_tokens, i) for i, p in enumerate(prompts)))
        seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(text, add_special_tokens=False).input_ids) for _, text in results)
    ttfts = sorted(t for t, _ in results if t is not None)
    return {"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def run_server(command: list[str], url: str, model: str, prompts, new_tokens, tokenizer) -> dict:
    with server_process(command, url):
        asyncio.run(drive(url, model, prompts[:2], 4, tokenizer))            # warm-up
        return asyncio.run(drive(url, model, prompts, new_tokens, tokenizer))


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    num, new_tokens = (16, 32) if args.quick else (64, 128)
    tokenizer = AutoTokenizer.from_pretrained(path)
    context = AutoConfig.from_pretrained(path).max_position_embeddings
    # Detokenized random ids can re-tokenize a little longer: keep a margin under the context.
    lengths = user_prompt_lengths(num, int(context * 0.9), new_tokens)
    prompts = [tokenizer.decode(ids) for ids in random_prompts(num, lengths, len(tokenizer))]
    port = free_port()
    ours = run_server([sys.executable, "-m", "server.cli", "serve", "--model", path, "--port", str(port),
                       "--dtype", args.dtype, "--served-model-name", "bench", "--log-level", "warning"],
                      f"http://127.0.0.1:{port}", "bench", prompts, new_tokens, tokenizer)
    result = {"benchmark": "serve", "model": path, "dtype": args.dtype, "concurrent_requests": num,
              "new_tokens": new_tokens, "ours_tok_s": round(ours["tok_s"], 2),
              "ttft_p50_s": round(ours["ttft_p50_s"], 3), "ttft_p99_s": round(ours["ttft_p99_s"], 3)}
    executable = shutil.which("transformers")
    try:
        if executable is None:
            raise RuntimeError("the `transformers` command is not installed")
        port = free_port()
        baseline = run_server([executable, "serve", path, "--continuous-batching", "--port", str(port),
                               "--host", "127.0.0.1", "--device", "cpu", "--dtype", args.dtype,
                               "--log-level", "warning"],
                              f"http://127.0.0.1:{port}", path, prompts, new_tokens, tokenizer)
        result |= {"baseline_tok_s": round(baseline["tok_s"], 2), "ratio": round(ours["tok_s"] / baseline["tok_s"], 3),
                   "baseline_ttft_p50_s": round(baseline["ttft_p50_s"], 3),
                   "baseline_ttft_p99_s": round(baseline["ttft_p99_s"], 3)}
    except Exception as err:   # report why the baseline could not run instead of hiding it
        result |= {"baseline_tok_s": None, "ratio": None, "baseline_error": f"{err.__class__.__name__}: {err}"[:1000]}
    result["baseline"] = "transformers serve --continuous-batching, same model, same machine, run after ours"
    report(result, args.json)


if __name__ == "__main__":
    main()
