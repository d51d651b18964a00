"""Constrained decoding per backend: which schemas it accepts, whether what it generates validates, how
fast it compiles, and what masking costs per token.

Schemas: the JSON-Schema-Test-Suite (draft 2020-12, `../shared`), and two real-world corpora installed
from PyPI: SchemaStore's CI and tooling schemas as vendored by `check-jsonschema` (GitHub workflows,
GitLab CI, Renovate, compose, ...; `pip install -e ".[bench]"`), and the response and request shapes of
the `openai` SDK (its pydantic models' JSON schemas: nested objects, nullable unions, enums, `$ref`s; the
shapes agents and tool calls use). Per backend and corpus:

- `coverage`: the fraction accepted in strict mode (the rest is refused with the construct it uses);
- `valid_fraction`: of the outputs that finish (`stop`; two samples per accepted schema, up to 48
  tokens, the embedded model), the fraction that validate with jsonschema (bar 1.0; schemas whose
  patterns Python's `re` cannot compile are left out of the check);
- `compile_p50_ms` / `compile_p99_ms`: first compile of each accepted schema (bars 10 ms and 1 s).

Overhead: per-token time of constrained over unconstrained decoding, 8 held-out prompts x 128 tokens and
the same prompts one at a time (bar at batch 8: 0.05); the schema asks for an array of at least 100
integers, so constrained outputs run to max_tokens like unconstrained ones.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import statistics
import time
from pathlib import Path

from benchmarks.common import Timer, benchmark_model_path, cpu_description, parse_args, report
from benchmarks.speculative import PROMPT_TOKENS, heldout_prompts
from decoding import Engine, SamplingParams
from decoding.structured.constraint import BACKENDS, Constraint
from decoding.structured.grammar import GrammarCompiler, GrammarError

SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 100}
SUITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "json-schema-test-suite" / "draft2020-12"


# ---- corpora ---------------------------------------------------------------------------------------
def suite_schemas() -> list:
    if not SUITE.exists():
        return []
    return [case["schema"] for path in sorted(SUITE.glob("*.json")) for case in json.loads(path.read_text())]


def schemastore_schemas() -> list:
    try:
        from importlib.resources import files
        folder = files("check_jsonschema") / "builtin_schemas" / "vendor"
    except ModuleNotFoundError:
        return []
    return [json.loads(entry.read_text()) for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".json")]


def openai_schemas() -> list:
    """The JSON schema of every pydantic model in `openai.types`, one per model."""
    try:
        import openai.types
        import pydantic
    except ModuleNotFoundError:
        return []
    schemas = {}
    for module_info in pkgutil.walk_packages(openai.types.__path__, "openai.types."):
        try:
            module = importlib.import_module(module_info.name)
        except ImportError:
            continue
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, pydantic.BaseModel) and value.__module__ == module.__name__:
                try:
                    schemas[f"{module.__name__}.{name}"] = value.model_json_schema()
                except (TypeError, ValueError, pydantic.PydanticUserError):
                    continue
    return [schemas[key] for key in sorted(schemas)]


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
    accepted, times = [], []
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
        except GrammarError:
            continue
        times.append(time.perf_counter() - started)
        accepted.append((schema, params))
    compiler.close()
    finished = valid = 0
    checked = [(schema, params) for schema, params in accepted[:sample_outputs] if python_can_check(schema)]
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
              "finished_outputs": finished, "valid_fraction": round(valid / finished, 4) if finished else None}
    if times:
        result |= {"compile_p50_ms": round(1e3 * statistics.median(times), 2),
                   "compile_p99_ms": round(1e3 * (statistics.quantiles(times, n=100)[98] if len(times) > 1
                                                  else times[0]), 2)}
    return result


def per_token_seconds(engine: Engine, prompts, params, batch: int) -> float:
    with Timer() as t:
        tokens = 0
        for start in range(0, len(prompts), batch):
            outputs = engine.generate(prompts[start : start + batch], params)
            tokens += sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return t.seconds / tokens


def overhead(engine: Engine, backend: str, prompts, new_tokens: int, batch: int, repeats: int) -> tuple[float, list[float]]:
    """(constrained over plain per-token time - 1, from each side's best run; the same per repeat, for the
    spread)."""
    plain = SamplingParams(temperature=0.8, seed=0, max_tokens=new_tokens)
    constrained = SamplingParams(temperature=0.8, seed=0, max_tokens=new_tokens, json_schema=SCHEMA,
                                 structured_backend=backend)
    plain_s, constrained_s = [], []
    for _ in range(repeats):                 # in turn, so drift on a shared machine hits both alike
        plain_s.append(per_token_seconds(engine, prompts, plain, batch))
        constrained_s.append(per_token_seconds(engine, prompts, constrained, batch))
    return (round(min(constrained_s) / min(plain_s) - 1, 3),
            [round(c / p - 1, 3) for c, p in zip(constrained_s, plain_s)])


def main() -> None:
    args = parse_args(__doc__)
    engine = Engine(model=benchmark_model_path(args.model), dtype=args.dtype, show_progress=False)
    *prompts, warmup = heldout_prompts(engine.tokenizer, 9, PROMPT_TOKENS)
    new_tokens = 64 if args.quick else 128
    repeats = 2 if args.quick else 5
    corpora = {"suite": suite_schemas(), "schemastore": schemastore_schemas(), "openai": openai_schemas()}
    if args.quick:
        corpora = {name: schemas[:: max(1, len(schemas) // 60)] for name, schemas in corpora.items()}
    sample_outputs = 60 if args.quick else 400
    result = {"benchmark": "structured", "model": engine.loaded.name, "dtype": args.dtype, "cpu": cpu_description(),
              "corpus_sizes": {name: len(schemas) for name, schemas in corpora.items()}, "backends": {}}
    for backend in BACKENDS:
        engine.generate([warmup], SamplingParams(max_tokens=8, json_schema=SCHEMA, structured_backend=backend))
        batch8, batch8_runs = overhead(engine, backend, prompts, new_tokens, 8, repeats)
        batch1, batch1_runs = overhead(engine, backend, prompts[:4], new_tokens, 1, repeats)
        section = {"overhead": batch8, "overhead_per_repeat": batch8_runs, "overhead_batch1": batch1,
                   "overhead_batch1_per_repeat": batch1_runs}
        for name, schemas in corpora.items():
            if schemas:
                section[name] = coverage(engine, backend, schemas, sample_outputs)
        result["backends"][backend] = section
        print(f"{backend}: {json.dumps(section)}", flush=True)
    default = result["backends"][BACKENDS[0]]
    suite = default.get("suite", {})
    result |= {"backend": BACKENDS[0], "strict_coverage": suite.get("coverage"),
               "valid_fraction": suite.get("valid_fraction"), "compile_p50_ms": suite.get("compile_p50_ms"),
               "compile_p99_ms": suite.get("compile_p99_ms"), "overhead": default["overhead"],
               "realworld_coverage": {name: default[name]["coverage"] for name in ("schemastore", "openai")
                                      if name in default}}
    report(result, args.json)


if __name__ == "__main__":
    main()
