"""Decode steps chained in one native call (`decode_steps`, decoding/multi_step.py) against one step per call.

Two engines on the same model, `decode_steps` 1 and the default, generate the same requests in turn
(single, chained, single, ...): held-out chat prompts (corpus windows for a model without a chat
template), 128 new tokens each (EOS held back by min_tokens, so both sides generate the same count), at
batch 1 and batch 8, greedy and sampled at T = 0.7 with the chosen tokens' logprobs (seeded). Reported per
workload: each engine's generated tokens per second over the whole `generate` call (prompt included), the
median of the per-repeat ratios chained / single with their spread, and whether tokens (and logprobs)
were identical. `--model` takes a catalog name, an HF folder or a GGUF file (kept in its own blocks).
"""

from __future__ import annotations

import statistics

from benchmarks.common import Timer, benchmark_model_path, cpu_description, parse_args, report
from benchmarks.medusa import benchmark_prompts
from decoding import Engine, SamplingParams
from decoding.config import EngineConfig

NEW_TOKENS = 128


def _workloads(quick: bool) -> dict[str, tuple[int, SamplingParams]]:
    new = 32 if quick else NEW_TOKENS
    greedy = SamplingParams(temperature=0, max_tokens=new, min_tokens=new)
    sampled = SamplingParams(temperature=0.7, max_tokens=new, min_tokens=new, seed=0, logprobs=0)
    return {"batch1_greedy": (1, greedy), "batch1_sampled": (1, sampled),
            "batch8_greedy": (8, greedy), "batch8_sampled": (8, sampled)}


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list]:
    with Timer() as t:
        outputs = engine.generate(prompts, params)
    results = [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs or []]) for o in outputs]
    return t.seconds, results


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    common = dict(model=path, dtype=args.dtype, show_progress=False)
    single = Engine(decode_steps=1, **common)
    chained = Engine(decode_steps=EngineConfig.decode_steps, **common)
    repeats = 2 if args.quick else 4
    prompts = benchmark_prompts(single.tokenizer, 1 + 8 * repeats)
    warmup, prompts = prompts[0], prompts[1:]
    for engine in (single, chained):
        engine.generate([warmup], SamplingParams(temperature=0, max_tokens=16))
    result = {"benchmark": "multi_step", "model": path, "dtype": args.dtype, **cpu_description(),
              "decode_steps": EngineConfig.decode_steps, "repeats": repeats}
    for name, (batch, params) in _workloads(args.quick).items():
        ratios, identical, tok_s = [], True, {"single": [], "chained": []}
        for repeat in range(repeats):
            batch_prompts = prompts[repeat * 8 : repeat * 8 + batch]
            single_seconds, single_results = _run(single, batch_prompts, params)
            chained_seconds, chained_results = _run(chained, batch_prompts, params)
            generated = batch * params.max_tokens
            tok_s["single"].append(generated / single_seconds)
            tok_s["chained"].append(generated / chained_seconds)
            ratios.append(single_seconds / chained_seconds)
            identical &= single_results == chained_results
        result[name] = {"single_tok_s": round(statistics.median(tok_s["single"]), 1),
                        "chained_tok_s": round(statistics.median(tok_s["chained"]), 1),
                        "speedup": round(statistics.median(ratios), 3),
                        "speedup_spread": [round(min(ratios), 3), round(max(ratios), 3)], "identical": identical}
    result["speedup_batch1_greedy"] = result["batch1_greedy"]["speedup"]
    result["identical"] = all(result[name]["identical"] for name in _workloads(args.quick))
    report(result, args.json)


if __name__ == "__main__":
    main()
