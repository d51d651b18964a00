"""Constrained decoding's cost: per-token time of JSON-schema-constrained over unconstrained decoding at
batch 8 (`overhead` = ratio - 1), and grammar compile times over the JSON-Schema-Test-Suite schemas that
the backend enforces (first compile p50 / p90, and a cached compile).

Both runs decode 8 held-out prompts x 128 tokens with the same sampling; the schema asks for an array
of at least 100 integers, so constrained outputs run to max_tokens like unconstrained ones and the
per-token times compare like with like.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from benchmarks.common import Timer, benchmark_model_path, parse_args, report
from benchmarks.speculative import PROMPT_TOKENS, heldout_prompts
from decoding import Engine, SamplingParams
from decoding.structured.constraint import Constraint
from decoding.structured.grammar import GrammarCompiler, GrammarError

SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 100}
SUITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "json-schema-test-suite" / "draft2020-12"


def per_token_seconds(engine: Engine, prompts, params) -> float:
    with Timer() as t:
        outputs = engine.generate(prompts, params)
    return t.seconds / sum(len(c.token_ids) for out in outputs for c in out.outputs)


def compile_times(engine: Engine, limit: int) -> tuple[list[float], float]:
    """Seconds per first compile (schema to regex to token index, in the engine's compile workers) of the
    suite's schemas that compile, and of one cached compile."""
    schemas = [case["schema"] for path in sorted(SUITE.glob("*.json")) for case in json.loads(path.read_text())]
    compiler = GrammarCompiler(engine.tokenizer, engine.eos_token_ids, engine.loaded.model.vocab_size)
    compiler.compile(Constraint.of(SamplingParams(choice=["warm", "up"])))     # starts a worker
    times, last = [], None
    for schema in schemas:
        try:
            constraint = Constraint.of(SamplingParams(json_schema=schema if isinstance(schema, dict) else json.dumps(schema)))
        except ValueError:
            continue                                     # not a schema SamplingParams accepts
        started = time.perf_counter()
        try:
            compiler.compile(constraint)
        except GrammarError:
            continue                                     # refused: not a compile time
        times.append(time.perf_counter() - started)
        last = constraint
        if len(times) == limit:
            break
    started = time.perf_counter()
    compiler.compile(last)
    cached = time.perf_counter() - started
    compiler.close()
    return times, cached


def main() -> None:
    args = parse_args(__doc__)
    engine = Engine(model=benchmark_model_path(args.model), dtype=args.dtype, show_progress=False)
    *prompts, warmup = heldout_prompts(engine.tokenizer, 9, PROMPT_TOKENS)
    new_tokens = 64 if args.quick else 128
    plain = SamplingParams(temperature=0.8, seed=0, max_tokens=new_tokens)
    constrained = SamplingParams(temperature=0.8, seed=0, max_tokens=new_tokens, json_schema=SCHEMA)
    for params in (plain, constrained):
        engine.generate([warmup], params)
    plain_s, constrained_s = [], []
    for _ in range(2 if args.quick else 3):     # in turn, so drift on a shared machine hits both alike
        plain_s.append(per_token_seconds(engine, prompts, plain))
        constrained_s.append(per_token_seconds(engine, prompts, constrained))
    ratio = min(constrained_s) / min(plain_s)
    result = {"benchmark": "structured", "model": engine.loaded.name, "dtype": args.dtype, "batch": len(prompts),
              "new_tokens": new_tokens, "plain_ms_per_token": round(min(plain_s) * 1e3, 3),
              "constrained_ms_per_token": round(min(constrained_s) * 1e3, 3), "overhead": round(ratio - 1, 3)}
    if SUITE.exists():
        times, cached = compile_times(engine, 12 if args.quick else 1000)
        result |= {"compiled_schemas": len(times), "compile_p50_s": round(statistics.median(times), 4),
                   "compile_p90_s": round(statistics.quantiles(times, n=10)[-1], 4) if len(times) > 1 else None,
                   "cached_compile_s": round(cached, 6)}
    report(result, args.json)


if __name__ == "__main__":
    main()
