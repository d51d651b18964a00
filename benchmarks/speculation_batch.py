"""Speculation as served at batch 8: governed speculating engines against the plain engine.

A server started with speculation must never be slower than one without. At batch 8 the governor
(decoding/speculative/governor.py) keeps speculation off where it does not pay, and those plain steps
chain as the plain engine's do (decoding/multi_step.py), so what remains is the speculating engine's own
cost. 16 held-out prompts submitted at once to engines with `max_num_seqs` 8 (the embedded model, its draft
model and its Medusa heads), 128 new tokens each, greedy and at T = 0.7 (seeded); each submission runs on
the plain engine, then on each speculating engine, in turn, `repeats` times. Reported per proposer and mode:
the median of the per-repeat ratios plain seconds / speculating seconds, their spread, whether the tokens
were identical to plain decoding's, and how many chained calls each engine made.
"""

from __future__ import annotations

import statistics

from benchmarks.common import Timer, parse_args, report
from benchmarks.medusa import benchmark_prompts
from decoding import Engine, SamplingParams

PROPOSERS = ("draft", "medusa")


def main() -> None:
    args = parse_args(__doc__)
    common = dict(dtype=args.dtype, show_progress=False, max_num_seqs=8)
    plain = Engine(**common)
    speculating = {kind: Engine(speculative=kind, **common) for kind in PROPOSERS}
    repeats, new_tokens = (2, 32) if args.quick else (7, 128)
    prompts = benchmark_prompts(plain.tokenizer, 17)
    warmup, prompts = prompts[0], prompts[1:]
    for engine in (plain, *speculating.values()):
        engine.generate([warmup] * 8, SamplingParams(temperature=0, max_tokens=16))
    result = {"benchmark": "speculation_batch", "dtype": args.dtype, "prompts": len(prompts), "max_num_seqs": 8,
              "new_tokens": new_tokens, "repeats": repeats}
    for mode, temperature in (("greedy", 0.0), ("t0.7", 0.7)):
        params = SamplingParams(temperature=temperature, max_tokens=new_tokens, min_tokens=new_tokens,
                                seed=0 if temperature else None)
        ratios = {kind: [] for kind in PROPOSERS}
        identical = {kind: True for kind in PROPOSERS}
        for _ in range(repeats):
            with Timer() as t:
                expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
            plain_seconds = t.seconds
            for kind, engine in speculating.items():
                with Timer() as t:
                    got = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
                ratios[kind].append(plain_seconds / t.seconds)
                identical[kind] &= got == expected
        for kind, engine in speculating.items():
            result[f"{kind}_{mode}"] = {"speedup": round(statistics.median(ratios[kind]), 3),
                                        "speedup_spread": [round(min(ratios[kind]), 3), round(max(ratios[kind]), 3)],
                                        "identical": identical[kind]}
    result["chained_calls"] = {"plain": plain.multi_step.num_calls,
                               **{kind: engine.multi_step.num_calls for kind, engine in speculating.items()}}
    result["speedup_min"] = min(entry["speedup"] for entry in result.values() if isinstance(entry, dict)
                                and "speedup" in entry)
    report(result, args.json)


if __name__ == "__main__":
    main()
