"""Group rollouts for RL: 8 prompts x G = 8 samples x 128 new tokens through `/v1/rollouts` of a
`gorgon serve` process, vs HF `generate(num_return_sequences=8)` per prompt in this process.

Then the asynchronous pattern, weight pushes while rollouts run, with pause "keep" vs "wait": 16 client
workers each send one rollout after another (n = 4 samples, lengths with a long tail: 3 in 4 ask for 32
tokens, 1 in 4 for 256), and a trainer pushes new weights after every 16 finished rollouts, with policy
keep (applied at once; in-flight rollouts go on) or wait (new rollouts are held until the started ones
finish). The two servers run in turn. Reported per policy: generated tokens per second and the seconds
the pushes took (with wait, the time generation stood nearly idle draining the tail); `keep_vs_wait` is
keep's throughput over wait's (the bar: >= 1.5).
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

NUM_WORKERS, PUSH_EVERY, GROUP = 16, 16, 4
SHORT, LONG = 32, 256


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
    total = 48 if args.quick else 128
    runs = {"keep": [], "wait": []}
    for _ in range(1 if args.quick else 2):
        for policy in runs:
            with gorgon_server(path, "--dtype", args.dtype, "--admin-key", "bench") as url:
                runs[policy].append(async_run(url, policy, prompts, total, hf.config.hidden_size))
    medians = {policy: {key: round(statistics.median(run[key] for run in results), 3) for key in results[0]}
               for policy, results in runs.items()}
    report({
        "benchmark": "rollout", "model": path, "dtype": args.dtype, "prompts": num_prompts, "group_size": group,
        "async": {"rollouts": total, "workers": NUM_WORKERS, "push_every": PUSH_EVERY, **medians},
        "keep_vs_wait": round(medians["keep"]["tok_s"] / medians["wait"]["tok_s"], 2),
        "new_tokens": new_tokens, "ours_tok_s": round(generated / ours.seconds, 2),
        "baseline_tok_s": round(num_prompts * group * new_tokens / baseline.seconds, 2),
        "ratio": round(baseline.seconds / ours.seconds * generated / (num_prompts * group * new_tokens), 3),
        "baseline": "transformers generate(num_return_sequences=8) per prompt, same model, same machine",
    }, args.json)


def async_run(url: str, policy: str, prompts: list[list[int]], total: int, hidden_size: int) -> dict:
    """`total` rollouts from NUM_WORKERS workers while a trainer pushes weights every PUSH_EVERY of them."""
    client = GorgonClient(url, admin_key="bench")
    client.rollouts(prompts[:1], n=2, max_tokens=4)                             # warm-up
    lengths = random.Random(0)
    plan = [(prompts[i % len(prompts)], LONG if lengths.random() < 0.25 else SHORT) for i in range(total)]
    lock, finished, generated, push_seconds = threading.Lock(), [0], [0], []

    def worker() -> None:
        http = httpx.Client(base_url=url, timeout=3600)
        while True:
            with lock:
                if not plan:
                    return
                prompt, length = plan.pop()
            body = {"prompts": [prompt], "n": GROUP, "max_tokens": length, "min_tokens": length, "temperature": 1.0}
            out = http.post("/v1/rollouts", json=body).json()
            with lock:
                generated[0] += sum(len(ids) for ids in out["completion_ids"])
                finished[0] += 1

    def trainer() -> None:
        pushed = 0
        while pushed < total // PUSH_EVERY - 1:
            if finished[0] >= (pushed + 1) * PUSH_EVERY:
                weights = {"model.norm.weight": 1.0 + 0.01 * torch.randn(hidden_size)}
                with Timer() as push:
                    client.push_weights(weights, policy=policy)
                push_seconds.append(push.seconds)
                pushed += 1
            time.sleep(0.01)

    threads = [threading.Thread(target=worker) for _ in range(NUM_WORKERS)] + [threading.Thread(target=trainer)]
    with Timer() as wall:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return {"tok_s": generated[0] / wall.seconds, "seconds": wall.seconds, "pushes": len(push_seconds),
            "push_seconds_total": sum(push_seconds)}


if __name__ == "__main__":
    main()
