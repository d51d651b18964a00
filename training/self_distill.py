"""Self-distillation data: the model's own answers to chat prompts, as token ids.

Draft heads (Medusa, EAGLE) are trained to predict what the model itself will say, so their data is the
model's own continuations: each training prompt of `training.chat_prompts` in the model's chat template,
answered by the model on Gorgon's engine, greedily or sampled as `--temperatures` asks (split evenly, in
order; 0 = greedy, the continuations greedy verification accepts).

    python -m training.self_distill --model M --out runs/smollm2-answers.jsonl --prompts 2400

Each line: {"prompt": [ids], "answer": [ids], "temperature": t}. Re-running appends only what is missing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from training.chat_prompts import chat_prompt_ids, prompts

BATCH = 48                  # prompts per engine call: enough rows to keep the cores busy, progress visible


def read_samples(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def generate(model: str, out: Path, count: int, temperatures: list[float], max_tokens: int, seed: int,
             quantization: str = "none") -> int:
    """Append answers to `out` until it holds `count`; returns how many it holds."""
    from decoding import Engine, SamplingParams

    done = len(read_samples(out))
    if done >= count:
        return done
    engine = Engine(model=model, show_progress=False, quantization=quantization)
    chat = [chat_prompt_ids(engine.tokenizer, text) for text in prompts("train", seed)[:count]]
    per_temperature = -(-count // len(temperatures))
    started = time.perf_counter()
    with open(out, "a") as handle:
        for start in range(done, count, BATCH):
            batch = chat[start : min(start + BATCH, count)]
            params = [SamplingParams(temperature=temperatures[i // per_temperature], max_tokens=max_tokens,
                                     seed=seed + i) for i in range(start, start + len(batch))]
            for prompt, param, output in zip(batch, params, engine.generate(batch, params)):
                handle.write(json.dumps({"prompt": prompt, "answer": output.outputs[0].token_ids,
                                         "temperature": param.temperature}) + "\n")
            handle.flush()
            print(json.dumps({"samples": start + len(batch), "of": count,
                              "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=2400)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.0, 0.0, 0.7])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--quantization", default="none", help="the engine's weights while answering")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"samples": generate(args.model, args.out, args.prompts, args.temperatures, args.max_tokens,
                                          args.seed, args.quantization)}))


if __name__ == "__main__":
    main()
