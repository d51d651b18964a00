"""Group rollouts for RL: 8 prompts x G = 8 samples x 128 new tokens through `/v1/rollouts` of a
`gorgon serve` process, vs HF `generate(num_return_sequences=8)` per prompt in this process.

Then the asynchronous pattern, weight pushes while rollouts run, with pause "keep" vs "wait": 16 client
workers each send one rollout after another (n = 4 samples), and a trainer pushes new weights after every
16 finished rollouts, with policy keep (applied at once; in-flight rollouts go on) or wait (new rollouts
are held until the started ones finish). Each run lasts a fixed window (60 s; `--quick` 20 s), the
steady state of a pipeline that never stops, and counts the tokens of rollouts finished inside it. Two
length mixes: `moderate_tail` (1 rollout in 4 asks for 256 tokens, the rest for 32) and `long_tail`
(1 in 16 asks for 512: the few long reasoning rollouts RL runs see). The servers run in turn. Reported
per mix and policy: generated tokens per second, rollouts finished, and the seconds the pushes took
(with wait, the time only the tail ran while new rollouts waited); `keep_vs_wait` is keep's throughput
over wait's (the bar: >= 1.5 with long tails).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import random
import statistics
import threading
import time

import httpx

from benchmarks.common import Timer, benchmark_model_path, gorgon_server, parse_args, random_prompts, report
from client import GorgonClient

NUM_WORKERS, PUSH_EVERY, GROUP, SHORT = 16, 16, 4, 32
TAILS = {"moderate_tail": (256, 1 / 4), "long_tail": (512, 1 / 16)}     # (long length, share of rollouts)


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    num_prompts, group, new_tokens = 8, 8, (32 if args.quick else 128)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    lengths = torch.randint(32, 129, (num_prompts,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = random_prompts(num_prompts, lengths, hf.config.vocab_size)
    sampling = dict(n=group, max_tokens=new_tokens, min_tokens=new_tokens, temperature=1.0, seed=0)
    with gorgon_server(path, "--dtype", args.dtype) as url:
        client = GorgonClient(url)
        client.rollouts(prompts[:1], n=2, max_tokens=4)                       # warm-up
        with Timer() as ours:
            out = client.rollouts(prompts, **sampling)
    generated = sum(len(ids) for ids in out["completion_ids"])
    with torch.inference_mode(), Timer() as baseline:
        for prompt in prompts:
            hf.generate(torch.tensor([prompt]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        num_return_sequences=group, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        pad_token_id=hf.config.pad_token_id or 0)
    window = 20.0 if args.quick else 60.0
    pushes = {}
    for tail, shape in TAILS.items():
        runs = {"keep": [], "wait": []}
        for _ in range(1 if args.quick else 2):
            for policy in runs:
                with gorgon_server(path, "--dtype", args.dtype, "--admin-key", "bench") as url:
                    runs[policy].append(async_run(url, policy, prompts, window, hf.config.hidden_size, *shape))
        medians = {policy: {key: round(statistics.median(run[key] for run in results), 3) for key in results[0]}
                   for policy, results in runs.items()}
        pushes[tail] = {**medians, "keep_vs_wait": round(medians["keep"]["tok_s"] / medians["wait"]["tok_s"], 2)}
    report({
        "benchmark": "rollout", "model": path, "dtype": args.dtype, "prompts": num_prompts, "group_size": group,
        "async": {"seconds": window, "workers": NUM_WORKERS, "push_every": PUSH_EVERY, **pushes},
        "new_tokens": new_tokens, "ours_tok_s": round(generated / ours.seconds, 2),
        "baseline_tok_s": round(num_prompts * group * new_tokens / baseline.seconds, 2),
        "ratio": round(baseline.seconds / ours.seconds * generated / (num_prompts * group * new_tokens), 3),
        "baseline": "transformers generate(num_return_sequences=8) per prompt, same model, same machine",
    }, args.json)


def async_run(url: str, policy: str, prompts: list[list[int]], seconds: float, hidden_size: int, long: int,
              long_share: float) -> dict:
    """NUM_WORKERS workers send rollouts for `seconds` while a trainer pushes weights after every
    PUSH_EVERY finished ones: the steady state of an asynchronous RL pipeline. Tokens count when their
    rollout finishes inside the window; what is still running at its end is aborted and not counted."""
    client = GorgonClient(url, admin_key="bench")
    client.rollouts(prompts[:1], n=2, max_tokens=4)                             # warm-up
    lengths, lock = random.Random(0), threading.Lock()
    counts = {"finished": 0, "tokens": 0}
    push_seconds: list[float] = []
    deadline = time.monotonic() + seconds

    def worker(index: int) -> None:
        http = httpx.Client(base_url=url, timeout=3600)
        while time.monotonic() < deadline:
            with lock:
                length = long if lengths.random() < long_share else SHORT
            body = {"prompts": [prompts[index % len(prompts)]], "n": GROUP, "max_tokens": length,
                    "min_tokens": length, "temperature": 1.0}
            out = http.post("/v1/rollouts", json=body).json()
            if time.monotonic() < deadline:
                with lock:
                    counts["tokens"] += sum(len(ids) for ids in out["completion_ids"])
                    counts["finished"] += 1

    def trainer() -> None:
        while time.monotonic() < deadline:
            if counts["finished"] >= (len(push_seconds) + 1) * PUSH_EVERY:
                weights = {"model.norm.weight": 1.0 + 0.01 * torch.randn(hidden_size)}
                with Timer() as push:
                    client.push_weights(weights, policy=policy)
                push_seconds.append(push.seconds)
            time.sleep(0.01)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(NUM_WORKERS)]
    threads.append(threading.Thread(target=trainer))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, deadline - time.monotonic()))
    window = time.monotonic() - started
    client.abort()                                                  # the stragglers, not counted
    for thread in threads:
        thread.join()
    return {"tok_s": counts["tokens"] / window, "rollouts": counts["finished"], "pushes": len(push_seconds),
            "push_seconds_total": sum(push_seconds)}


if __name__ == "__main__":
    main()
