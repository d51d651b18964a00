"""Time to first token of a long prompt on the native kernels against Gorgon's own torch path
(GORGON_NATIVE_KERNELS=0: oneDNN's linear layers and SDPA), each in a process of its own (the choice is
made once per process), in turn: native, torch, native, ... with fresh prompts per run, medians and the
spread reported. `ratio` is torch seconds over native seconds: above 1, the native path is faster.

Run with `--cpu-class avx2` on an AVX-512 machine to measure the AVX2 build (and torch held to AVX2 too).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from benchmarks.common import benchmark_model_path, cpu_description, parse_args, report

_CHILD = """
import json, sys, time
from decoding import Engine, SamplingParams
from benchmarks.common import random_prompts
model, length, runs, seed, quantization = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
engine = Engine(model=model, show_progress=False, threads=2, quantization=quantization)
vocab = engine.loaded.model.vocab_size
engine.generate(random_prompts(1, length, vocab, seed=7), SamplingParams(max_tokens=1))
seconds = []
for prompt in random_prompts(runs, length, vocab, seed=seed):
    start = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    seconds.append(time.perf_counter() - start)
print(json.dumps(seconds))
"""


def _run(native: bool, model: str, length: int, runs: int, seed: int, quantization: str) -> list[float]:
    env = {**os.environ, "GORGON_NATIVE_KERNELS": "1" if native else "0"}
    done = subprocess.run([sys.executable, "-c", _CHILD, model, str(length), str(runs), str(seed), quantization],
                          env=env, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    def extra(parser):
        parser.add_argument("--length", type=int, default=512, help="prompt tokens")
        parser.add_argument("--rounds", type=int, default=3, help="processes per side, in turn")

    args = parse_args(__doc__.splitlines()[0], extra)
    model = benchmark_model_path(args.model)
    rounds, runs = (1, 2) if args.quick else (args.rounds, 3)
    native, torch_path = [], []
    for round_index in range(rounds):
        native += _run(True, model, args.length, runs, 100 + round_index, "none")
        torch_path += _run(False, model, args.length, runs, 100 + round_index, "none")
    native_s, torch_s = statistics.median(native), statistics.median(torch_path)
    report({"benchmark": "prefill", "model": model, **cpu_description(), "prompt_tokens": args.length,
            "native_s": round(native_s, 4), "torch_s": round(torch_s, 4),
            "native_spread_s": [round(min(native), 4), round(max(native), 4)],
            "torch_spread_s": [round(min(torch_path), 4), round(max(torch_path), 4)],
            "ratio": round(torch_s / native_s, 3)}, args.json)


if __name__ == "__main__":
    main()
