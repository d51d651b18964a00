"""Constrained output: JSON schema, regex and choice, offline and over HTTP; valid whatever the model."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
from pydantic import BaseModel

from decoding import Engine, SamplingParams
from decoding.structured.constraint import BACKENDS, EXTRAS, installed_backends
from tiny_models import PROMPTS

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module", params=BACKENDS)
def engine(llama_dir, request):
    """An engine whose default structured-output backend is each backend in turn: every test that uses it
    holds for each."""
    if request.param not in installed_backends():
        pytest.skip(f"the {request.param} backend is not installed (pip install 'gorgon[{EXTRAS[request.param]}]')")
    return Engine(model=llama_dir, show_progress=False, num_kv_blocks=512, block_size=4,
                  structured_backends=(request.param, *(b for b in installed_backends() if b != request.param)))


def test_json_schema_outputs_validate_greedy_and_sampled(engine):
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=80, json_schema=SCHEMA))
    outputs += engine.generate(PROMPTS[:2], SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=80,
                                                           json_schema=SCHEMA))
    finished = [c for out in outputs for c in out.outputs if c.finish_reason == "stop"]
    assert len(finished) >= 6, "too few completions finished to judge"
    for completion in finished:
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_schema_from_a_pydantic_model(engine):
    class Point(BaseModel):
        x: int
        y: int
        label: bool

    schema = Point.model_json_schema()
    [out] = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.7, seed=1, max_tokens=60, json_schema=schema))
    if out.outputs[0].finish_reason == "stop":
        Point.model_validate_json(out.outputs[0].text)


def test_regex_and_choice(engine):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for out in engine.generate(PROMPTS, SamplingParams(temperature=1.0, seed=5, max_tokens=12, regex=pattern)):
        assert out.outputs[0].finish_reason == "stop" and re.fullmatch(pattern, out.outputs[0].text)
    choices = ["yes", "no", "maybe later"]
    out = engine.generate([PROMPTS[0]], SamplingParams(temperature=1.0, seed=0, n=8, max_tokens=16, choice=choices))[0]
    assert all(c.text in choices and c.finish_reason == "stop" for c in out.outputs)


def test_a_completion_cut_by_max_tokens_reports_length(engine):
    [out] = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3, json_schema=SCHEMA))
    assert out.outputs[0].finish_reason == "length"


def test_bad_constraints_are_rejected_with_a_reason(engine):
    with pytest.raises(ValueError, match="at most one"):
        SamplingParams(regex="a+", choice=["a"])
    with pytest.raises(ValueError, match="does not compile"):
        engine.make_request("x", SamplingParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="not valid JSON|JSON object"):
        SamplingParams(json_schema="{not json")


def test_over_http_response_format_and_structured_outputs(llama_dir):
    from live_server import start_server, stop_server

    live = start_server(llama_dir)
    try:
        out = live.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "a person"}], max_tokens=80, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
        if out.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
        out = live.client.completions.create(model="tiny", prompt="pick:", max_tokens=8, temperature=1.0, n=4,
                                             extra_body={"structured_outputs": {"choice": ["red", "green"]}})
        assert {c.text for c in out.choices} <= {"red", "green"}
        import httpx
        bad = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "structured_outputs": {"regex": "(x"}})
        assert bad.status_code == 400 and "regex" in bad.json()["error"]["message"]
    finally:
        stop_server(live)


SUITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "json-schema-test-suite" / "draft2020-12"


def python_can_check(schema) -> bool:
    """Whether jsonschema can check outputs against `schema`: its patterns must be Python regexes (the
    grammar engines take the ECMA/Rust syntax, `\\p{Letter}` included, which Python's `re` does not)."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError:
        return False
    return True


def grammar_accepts(engine, params, value) -> bool:
    """Whether the grammar lets a model write `value` as JSON (as this tokenizer splits it) and end there,
    in either spacing a backend writes: json.dumps' (", ", ": ") or compact (",", ":")."""
    for text in {json.dumps(value), json.dumps(value, separators=(",", ":"))}:
        cursor = engine.make_request("x", params).seqs[0].grammar
        for token in engine.tokenizer.encode(text, add_special_tokens=False):
            if not bool(cursor.allowed()[token]):
                break
            cursor.advance(token)
        else:
            if cursor.is_complete:
                return True
    return False


@pytest.mark.skipif(not SUITE.exists(), reason="the JSON-Schema-Test-Suite is not in this checkout's shared data")
def test_json_schema_test_suite_supported_schemas_always_validate(engine):
    """Every schema of the suite is either refused with the construct it uses, or enforced: then no
    instance the suite calls invalid can be written under the grammar, and every sampled output that
    finishes with `stop` validates with jsonschema."""
    supported, refused, validated, rejected = 0, 0, 0, 0
    for path in sorted(SUITE.glob("*.json")):
        for case in json.loads(path.read_text()):
            schema = case["schema"]
            try:
                params = SamplingParams(temperature=1.0, seed=0, n=2, max_tokens=48,
                                        json_schema=schema if isinstance(schema, dict) else json.dumps(schema))
                engine.make_request("x", params)
            except ValueError as err:
                refused += 1
                assert "json_schema" in str(err) or "schema" in str(err), str(err)
                continue
            supported += 1
            for test in case["tests"]:
                if not test["valid"]:
                    assert not grammar_accepts(engine, params, test["data"]), \
                        (path.name, case["description"], test["description"])
                    rejected += 1
            for completion in engine.generate(["x"], params)[0].outputs:
                if completion.finish_reason == "stop" and python_can_check(schema):
                    jsonschema.validate(json.loads(completion.text), schema)
                    validated += 1
    assert supported >= 40 and refused >= 100 and validated >= 50 and rejected >= 40, \
        (supported, refused, validated, rejected)


def test_unsupported_keywords_are_named():
    from decoding.structured.schema_support import unsupported_construct
    assert unsupported_construct({"type": "integer", "minimum": 3}) == "#: minimum"
    assert unsupported_construct({"oneOf": [{"type": "string"}]}) == "#: oneOf"
    assert "external $ref" in unsupported_construct({"$ref": "https://example.com/s.json"})
    assert "pattern" in unsupported_construct({"type": "string", "pattern": "a+", "maxLength": 3})
    assert unsupported_construct(SCHEMA) is None


ANNOTATED = {"type": "object", "self": {"vendor": "acme", "name": "person", "format": "jsonschema", "version": "1-0-0"},
             "id": "http://example.com/person.json", "x-order": 3, "$comment": "no-op", "examples": [{"name": "x"}],
             "properties": {"name": {"type": "string", "maxLength": 8, "x-ui": {"widget": "text"}, "deprecated": False}},
             "required": ["name"], "additionalProperties": False}


def test_keywords_json_schema_does_not_define_are_ignored(engine):
    """Annotations, vendor extensions and unknown keywords do not change what is valid (the specification
    says to ignore them), so they are accepted and the output still validates."""
    outputs = engine.generate(PROMPTS[:2], SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=40,
                                                          json_schema=ANNOTATED))
    finished = [c for out in outputs for c in out.outputs if c.finish_reason == "stop"]
    assert finished
    for completion in finished:
        jsonschema.validate(json.loads(completion.text), ANNOTATED)


@pytest.mark.parametrize("backend, schema, named", [
    ("llguidance", {"type": "object", "propertyNames": {"pattern": "^a"}}, "#: propertyNames"),
    ("llguidance", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "#/properties/a: not"),
    ("llguidance", {"type": "object", "properties": {"a": {"type": "integer"}},
                    "unevaluatedProperties": False}, "#: unevaluatedProperties"),
    ("llguidance", {"type": "array", "contains": {"type": "integer"}}, "#: contains"),
    ("llguidance", {"if": {"type": "string"}, "then": {"maxLength": 3}}, "#: if"),
    ("outlines-core", {"type": "integer", "minimum": 3}, "#: minimum"),
    ("outlines-core", {"oneOf": [{"type": "integer"}, {"type": "number"}]}, "#: oneOf"),
    ("outlines-core", {"type": "object", "properties": {"a": {"type": "array", "contains": {"type": "integer"}}}},
     "#/properties/a: contains"),
    ("outlines-core", {"type": "string", "pattern": "a+", "maxLength": 3}, "#: more than one of"),
    ("outlines-core", {"$ref": "https://example.com/s.json"}, "external $ref"),
    ("xgrammar", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "#/properties/a: not"),
    ("xgrammar", {"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}},
     "#: dependentRequired"),
    ("xgrammar", {"oneOf": [{"type": "integer"}, {"type": "number"}]}, "#: oneOf"),
    ("xgrammar", {"allOf": [{"type": "integer"}, {"minimum": 2}]}, "#: allOf with more than one branch"),
    ("xgrammar", {"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a", "minimum": 3}, "#: minimum beside $ref"),
    ("xgrammar", {"type": "integer", "anyOf": [{"minimum": 3}, {"maximum": -3}]}, "#: type beside anyOf"),
    ("xgrammar", {"minimum": 3}, "#: minimum without a type"),
    ("xgrammar", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["z"]},
     "#: required 'z' is not among the properties"),
    ("xgrammar", {"type": "number", "multipleOf": 0.5}, "#: multipleOf"),
    ("xgrammar", {"type": "string", "pattern": "^a", "format": "email"}, "#: pattern beside format"),
    ("xgrammar", {"type": "string", "pattern": "^a", "maxLength": 3}, "#: pattern beside maxLength"),
    ("xgrammar", {"type": "object", "properties": {"ab": {"type": "integer"}}, "patternProperties": {"^a": {"type": "string"}}},
     "#: property 'ab' also matched by patternProperties"),
    ("xgrammar", {"$defs": {"a": {"$anchor": "x", "type": "integer"}}, "$ref": "#x"}, "#: $ref to an anchor"),
    ("xgrammar", {"$ref": "https://example.com/s.json"}, "#: external $ref"),
    ("xgrammar", {"type": "array", "contains": {"type": "integer"}}, "#: contains"),
    ("xgrammar", {"type": "integer", "if": {"minimum": 3}, "then": {"maximum": 5}}, "#: if"),
])
def test_each_refusal_names_the_construct_and_where_it_is(engine, backend, schema, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        engine.make_request("x", SamplingParams(json_schema=schema, structured_backend=backend))


def test_a_request_may_pick_only_an_enabled_backend(llama_dir):
    only = Engine(model=llama_dir, show_progress=False, num_kv_blocks=64, block_size=4,
                  structured_backends=("llguidance",))
    with pytest.raises(ValueError, match="'outlines-core' structured-output backend is not enabled"):
        only.make_request("x", SamplingParams(choice=["a"], structured_backend="outlines-core"))
    with pytest.raises(ValueError, match="not enabled"):
        only.make_request("x", SamplingParams(choice=["a"], structured_backend="xgrammar"))
    assert only.make_request("x", SamplingParams(choice=["a"], structured_backend="llguidance"))
    with pytest.raises(ValueError, match="structured_backends"):
        Engine(model=llama_dir, show_progress=False, structured_backends=("nope",))


def test_min_tokens_never_forces_output_past_a_complete_grammar(engine):
    [out] = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20, min_tokens=20,
                                                         choice=["yes", "no"]))
    assert out.outputs[0].text in ("yes", "no") and out.outputs[0].finish_reason == "stop"


# A construct each backend cannot enforce, and how to tell whether an output met it.
UNENFORCED = {
    "llguidance": ({"type": "object", "properties": {"n": {"type": "integer", "not": {"const": 3}}}, "required": ["n"],
                    "additionalProperties": False}, "not", lambda value: value["n"] != 3),
    "outlines-core": ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 10}}, "required": ["n"]},
                      "minimum", lambda value: value["n"] >= 10),
    "xgrammar": ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "multipleOf": 3}},
                  "required": ["n"]}, "multipleOf", lambda value: value["n"] % 3 == 0),
}


@pytest.mark.parametrize("backend", sorted(UNENFORCED))
def test_best_effort_accepts_an_unsupported_schema_and_says_whether_it_validated(engine, llama_dir, backend):
    schema, construct, holds = UNENFORCED[backend]
    with pytest.raises(ValueError, match=f"#/properties/n: {construct}"):
        engine.make_request("x", SamplingParams(json_schema=schema, structured_backend=backend))
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=1.0, seed=2, n=3, max_tokens=40, json_schema=schema,
                                                      structured_best_effort=True, structured_backend=backend))
    checked = [c for out in outputs for c in out.outputs if c.finish_reason == "stop"]
    assert checked
    for c in checked:
        assert c.schema_valid == holds(json.loads(c.text))

    from live_server import start_server, stop_server
    import httpx
    live = start_server(llama_dir)
    try:
        body = {"prompt": "x", "max_tokens": 40, "temperature": 0, "structured_outputs": {"json": schema},
                "structured_backend": backend}
        refused = httpx.post(f"{live.url}/v1/completions", json=body)
        assert refused.status_code == 400 and construct in refused.json()["error"]["message"]
        accepted = httpx.post(f"{live.url}/v1/completions", json=body | {"structured_best_effort": True}).json()
        choice = accepted["choices"][0]
        assert choice["finish_reason"] != "stop" or isinstance(choice["schema_valid"], bool)
    finally:
        stop_server(live)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer"}}, "required": ["city", "days"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_tool_calls_through_the_openai_client(llama_dir, backend):
    from live_server import start_server, stop_server

    if backend not in installed_backends():
        pytest.skip(f"the {backend} backend is not installed (pip install 'gorgon[{EXTRAS[backend]}]')")
    live = start_server(llama_dir, engine_options={"structured_backends": (backend,)})
    messages = [{"role": "user", "content": "weather in Paris?"}]
    calls_made = 0
    try:
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            out = live.client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, CLOCK],
                                                      tool_choice=choice, max_tokens=80, temperature=0.8, seed=1, n=3)
            for c in out.choices:
                if c.finish_reason == "length":
                    continue
                assert c.finish_reason == "tool_calls" and c.message.content is None
                assert c.message.tool_calls and (choice == "required" or len(c.message.tool_calls) == 1)
                for call in c.message.tool_calls:
                    calls_made += 1
                    spec = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]["function"]
                    jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])
                    if isinstance(choice, dict):
                        assert call.function.name == "get_time"
        assert calls_made >= 3
        # A conversation that carries the call and its result back to the model.
        history = messages + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
        out = live.client.chat.completions.create(model="tiny", messages=history, tools=[CLOCK], tool_choice="none",
                                                  max_tokens=8, temperature=0)
        assert out.choices[0].message.tool_calls is None
        import httpx
        bad = httpx.post(f"{live.url}/v1/chat/completions", json={
            "messages": messages, "tools": [CLOCK], "tool_choice": {"type": "function", "function": {"name": "nope"}}})
        assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
    finally:
        stop_server(live)


def _streamed_calls(live, **request) -> list[dict]:
    """Each choice of a streamed chat completion: its content, its calls assembled from the deltas, and
    its finish reason, checked against OpenAI's delta shape on the way."""
    import httpx
    choices: dict[int, dict] = {}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "weather in Paris?"}], "stream": True, **request}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            [choice] = json.loads(line[6:])["choices"]
            state = choices.setdefault(choice["index"], {"content": "", "calls": {}, "finish_reason": None})
            delta = choice["delta"]
            state["content"] += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                if "id" in call:          # a call's first delta: its id, type and name, no arguments yet
                    assert call["type"] == "function" and call["function"]["arguments"] == ""
                    assert call["index"] not in state["calls"]
                    state["calls"][call["index"]] = {"id": call["id"], "name": call["function"]["name"], "arguments": ""}
                else:
                    state["calls"][call["index"]]["arguments"] += call["function"]["arguments"]
            if choice["finish_reason"]:
                state["finish_reason"] = choice["finish_reason"]
    return [choices[i] for i in sorted(choices)]


def test_tool_calls_stream_in_openais_delta_shape(llama_dir):
    """required (one call, or several with parallel_tool_calls), a named function and auto, streamed:
    the deltas add up to calls whose arguments validate, and to what the same request returns unstreamed."""
    from live_server import start_server, stop_server

    live = start_server(llama_dir)
    functions = {"get_weather": WEATHER["function"], "get_time": CLOCK["function"]}
    common = {"tools": [WEATHER, CLOCK], "max_tokens": 120, "temperature": 0.8, "seed": 4, "n": 4}
    seen_calls, seen_parallel = 0, 0
    try:
        for extra in ({"tool_choice": "required", "parallel_tool_calls": False},
                      {"tool_choice": "required"},
                      {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                      {"tool_choice": "auto"}):
            streamed = _streamed_calls(live, **common, **extra)
            unstreamed = live.client.chat.completions.create(model="tiny", messages=[
                {"role": "user", "content": "weather in Paris?"}], **common, **extra).choices
            for state, plain in zip(streamed, unstreamed):
                if state["finish_reason"] != "tool_calls":
                    assert extra["tool_choice"] == "auto" or state["finish_reason"] == "length"
                    continue
                calls = [state["calls"][i] for i in sorted(state["calls"])]
                seen_calls += 1
                seen_parallel += len(calls) > 1
                assert extra.get("parallel_tool_calls", True) or len(calls) == 1
                assert [(c["name"], c["arguments"]) for c in calls] == \
                    [(c.function.name, c.function.arguments) for c in plain.message.tool_calls]
                for call in calls:
                    jsonschema.validate(json.loads(call["arguments"]), functions[call["name"]]["parameters"])
                    if "function" in extra.get("tool_choice", {}):
                        assert call["name"] == "get_weather"
        assert seen_calls >= 6
    finally:
        stop_server(live)


@pytest.mark.parametrize("mode", ["draft", "ngram"])
def test_constraints_with_speculation(llama_dir, engine, mode):
    """Draft tokens are checked against the grammar at every verified position: greedy output equals
    plain constrained greedy, sampled outputs stay valid, and drafts are verified (not skipped)."""
    options = dict(draft_model=llama_dir) if mode == "draft" else dict(prompt_lookup_min=1)
    spec = Engine(model=llama_dir, show_progress=False, num_kv_blocks=512, block_size=4, speculative=mode,
                  num_speculative_tokens=4, structured_backends=engine.config.structured_backends,
                  speculative_adaptive=False, **options)
    greedy = SamplingParams(temperature=0, max_tokens=60, json_schema=SCHEMA)
    for a, b in zip(spec.generate(PROMPTS, greedy), engine.generate(PROMPTS, greedy)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    sampled = spec.generate(PROMPTS, SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=60, json_schema=SCHEMA))
    for completion in (c for out in sampled for c in out.outputs if c.finish_reason == "stop"):
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert spec.speculation.counters.num_draft_tokens > 0
    if mode == "draft":
        assert spec.speculation.counters.num_accepted_tokens > 0


def test_constraints_with_beam_search(engine):
    """A grammar state per beam, reordered with the beams: every returned hypothesis that ended with EOS
    is valid, and the beams still share their prompt blocks."""
    bounded = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
               "required": ["ok", "n"], "additionalProperties": False}
    params = SamplingParams(use_beam_search=True, num_beams=4, num_return_sequences=4, temperature=0,
                            max_tokens=40, json_schema=bounded)
    outputs = engine.generate(PROMPTS[:2], params)
    finished = [c for out in outputs for c in out.outputs if c.finish_reason == "stop"]
    assert len(finished) >= 4
    for completion in finished:
        jsonschema.validate(json.loads(completion.text), bounded)
    # Each hypothesis, finished or cut, walked its own path: a fresh cursor allows every one of its tokens.
    for completion in (c for out in outputs for c in out.outputs):
        cursor = engine.make_request("x", params).seqs[0].grammar
        for token in completion.token_ids:
            assert bool(cursor.allowed()[token]), completion.token_ids
            cursor.advance(token)
    [out] = engine.generate([PROMPTS[0]], SamplingParams(use_beam_search=True, num_beams=3, num_return_sequences=3,
                                                         temperature=0, max_tokens=8, choice=["yes", "no", "maybe"]))
    # Hypotheses are token paths: the same text may come back twice, spelled by different tokens.
    assert all(c.text in ("yes", "no", "maybe") and c.finish_reason == "stop" for c in out.outputs)
    assert engine.cache_usage().num_used_blocks == 0


def test_constraints_with_medusa_trees(llama_dir, engine, tmp_path):
    """Every node of a Medusa tree is verified under the grammar state of its own path."""
    import torch

    from models.medusa import MedusaHeads
    torch.manual_seed(0)
    heads = MedusaHeads(64, 384, num_heads=4)       # the default tree is 4 deep
    with torch.no_grad():
        for param in heads.parameters():
            param.normal_(0, 0.2)
    heads.save(tmp_path, llama_dir)
    medusa = Engine(model=llama_dir, show_progress=False, num_kv_blocks=512, block_size=4, speculative="medusa",
                    medusa_heads=str(tmp_path), structured_backends=engine.config.structured_backends)
    greedy = SamplingParams(temperature=0, max_tokens=60, json_schema=SCHEMA)
    for a, b in zip(medusa.generate(PROMPTS, greedy), engine.generate(PROMPTS, greedy)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert medusa.speculation.counters.num_draft_tokens > 0


def test_a_slow_compile_ends_in_a_clear_error():
    from transformers import AutoTokenizer

    from decoding.structured.constraint import Constraint
    from decoding.structured.grammar import GrammarCompiler, GrammarError
    from models.loader import DEFAULT_MODEL_DIR
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    compiler = GrammarCompiler(tokenizer, frozenset({tokenizer.eos_token_id}), 8192, cpu_budget_s=1)
    # Any JSON object, for an 8,192-token vocabulary: seconds of CPU to compile, past a 1 s budget.
    with pytest.raises(GrammarError, match="CPU time"):
        compiler.compile(Constraint.of(SamplingParams(json_schema={"type": "object"}), "outlines-core"))
    # The stopped compile does not hold up the next constraint.
    assert compiler.compile(Constraint.of(SamplingParams(choice=["a", "b"]), "outlines-core")) is not None
    compiler.close()


REWRITTEN = [
    # oneOf whose branches only share null: exactly one matches for a string or a number, both for null.
    ({"type": "object", "properties": {"q": {"oneOf": [{"type": ["string", "null"]}, {"type": ["number", "null"]}]}},
      "required": ["q"], "additionalProperties": False}, [{"q": "1"}, {"q": 2.5}], [{"q": None}]),
    # oneOf of branches with different types or literals is anyOf.
    ({"type": "object", "properties": {"v": {"oneOf": [{"enum": ["a", "b"]}, {"type": "integer"}]}},
      "required": ["v"], "additionalProperties": False}, [{"v": "a"}, {"v": 4}], [{"v": 2.5}, {"v": "c"}]),
    # A format the backend does not know is an annotation: any string is valid.
    ({"type": "object", "properties": {"k": {"type": "string", "format": "int64", "maxLength": 4}}, "required": ["k"],
      "additionalProperties": False}, [{"k": "ab"}], [{"k": "abcde"}]),
    # Keywords at the value they have when absent assert nothing (CloudFormation's uniqueItems: false).
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": False, "minItems": 0, "maxItems": 3},
     [[1, 1], []], [["a"], [1, 2, 3, 4]]),
    # A pattern whose top level is an alternation; outlines-core sees each branch matched in full.
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": "^ab|cd$"}},
      "required": ["s"], "additionalProperties": False}, [{"s": "ab"}, {"s": "cd"}], [{"s": "xy"}, {"s": "ba"}]),
]


def accepts_text(engine, params, text: str) -> bool:
    """Whether the grammar lets a model write exactly `text` (as this tokenizer splits it) and end."""
    cursor = engine.make_request("x", params).seqs[0].grammar
    for token in engine.tokenizer.encode(text, add_special_tokens=False):
        if not bool(cursor.allowed()[token]):
            return False
        cursor.advance(token)
    return cursor.is_complete


def test_an_alternation_pattern_stays_inside_the_quotes(engine):
    """`^ab|cd$` between a string's quotes is `"(ab|cd)"`, not `"ab` or `cd"` (text that is not JSON)."""
    schema = REWRITTEN[-1][0]
    params = SamplingParams(max_tokens=20, json_schema=schema)
    assert accepts_text(engine, params, '{"s":"ab"}') or accepts_text(engine, params, '{"s": "ab"}')
    for broken in ('{"s":"ab}', '{"s":cd"}', '{"s": "ab}', '{"s": cd"}'):
        assert not accepts_text(engine, params, broken), broken


LOOKAHEADS = [r"^(?!aws:)[a-zA-Z+-=._:/]+$", r"^(?=.{1,6})(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
              r"^(?!aws:.*)", r"^(?!\s*$).+$", r"^(?=^[a-z0-9-]+$).{3,8}$", r"^(?!0000-)[0-9a-f]{4}-[0-9a-f]{2}$"]


@pytest.mark.parametrize("pattern", LOOKAHEADS)
def test_patterns_that_open_with_lookaheads_are_split_for_llguidance(llama_dir, pattern):
    """A pattern's leading lookaheads become patterns of an allOf that llguidance intersects: the same
    strings match (checked with Python's re on probes), and outputs under the rewritten schema match
    the original pattern."""
    from decoding.structured.schema_rewrites import split_lookaheads
    parts = split_lookaheads(pattern)
    assert parts and len(parts) >= 2
    probes = ["aws:x", "awsx", "", "aw", "abc", "  ", " a", "a-b", "-ab", "0000-00", "000a-00", "abcdefghij", "x1"]
    for probe in probes:
        assert bool(re.search(pattern, probe)) == all(re.search(part, probe) for part in parts), probe
    schema = {"type": "object", "properties": {"k": {"type": "string", "pattern": pattern, "maxLength": 10}},
              "required": ["k"], "additionalProperties": False}
    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4,
                    structured_backends=("llguidance",))
    outputs = engine.generate(PROMPTS[:2], SamplingParams(temperature=1.0, seed=1, n=4, max_tokens=30, json_schema=schema))
    finished = [c for out in outputs for c in out.outputs if c.finish_reason == "stop"]
    assert finished
    for completion in finished:
        jsonschema.validate(json.loads(completion.text), schema)


@pytest.mark.parametrize("schema, valid, invalid", REWRITTEN)
def test_rewrites_keep_exactly_the_instances_the_schema_allows(engine, schema, valid, invalid):
    """Schemas a backend sees rewritten (schema_rewrites): accepted, the suite-style check holds on the
    original schema, and outputs validate against the original."""
    params = SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=40, json_schema=schema)
    request = engine.make_request("x", params)
    for instance in invalid:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(instance, schema)
        assert not grammar_accepts(engine, params, instance), instance
    accepted = 0
    for instance in valid:
        jsonschema.validate(instance, schema)
        accepted += grammar_accepts(engine, params, instance)
    assert accepted >= 1 and request.seqs[0].grammar is not None
    for completion in engine.generate(PROMPTS[:2], params)[0].outputs + engine.generate(PROMPTS[2:], params)[0].outputs:
        if completion.finish_reason == "stop":
            jsonschema.validate(json.loads(completion.text), schema)


def test_rollouts_are_constrained_by_every_backend(llama_dir):
    """/v1/rollouts with a schema: every group member of every backend is valid when it finishes, with
    token ids and one logprob per token, as an RL trainer reads them."""
    from live_server import start_server, stop_server
    import httpx
    live = start_server(llama_dir)
    try:
        for backend in installed_backends():
            body = {"prompts": [PROMPTS[0], PROMPTS[1]], "n": 3, "max_tokens": 60, "temperature": 1.0, "seed": 11,
                    "structured_outputs": {"json": SCHEMA}, "structured_backend": backend}
            out = httpx.post(f"{live.url}/v1/rollouts", json=body, timeout=120).json()
            assert len(out["completion_ids"]) == 6, out
            assert all(len(lp) == len(ids) for lp, ids in zip(out["logprobs"], out["completion_ids"]))
            finished = [text for text, reason in zip(out["texts"], out["finish_reasons"]) if reason == "stop"]
            assert finished, (backend, out["finish_reasons"])
            for text in finished:
                jsonschema.validate(json.loads(text), SCHEMA)
    finally:
        stop_server(live)


def test_the_utf8_guard_accepts_exactly_what_python_decodes():
    """The decoder states of utf8_guard against Python's UTF-8 decoder, on every 1-2 byte string and on
    random 3-4 byte strings (overlong forms, surrogates, code points past U+10FFFF included)."""
    import random

    from decoding.structured.utf8_guard import ACCEPT, _walk

    def well_formed(data: bytes) -> bool:
        try:
            data.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    rng = random.Random(0)
    cases = [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    cases += [bytes(rng.choice([rng.randrange(256), rng.randrange(0x80, 0xC0), rng.randrange(0xE0, 0xF5)])
                    for _ in range(rng.choice([3, 4]))) for _ in range(200_000)]
    for data in cases:
        assert (_walk(ACCEPT, data) == ACCEPT) == well_formed(data), data


@pytest.mark.skipif("xgrammar" not in installed_backends(), reason="xgrammar is not installed")
def test_xgrammar_strings_are_well_formed_utf8(llama_dir):
    """xgrammar 0.2 lets overlong forms and encoded surrogates into JSON strings; the guard beside it
    keeps every output decodable, so maxLength counts the characters the schema meant."""
    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4,
                    structured_backends=("xgrammar",))
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"],
              "additionalProperties": False}
    outputs = [out for seed in range(4) for out in engine.generate(
        PROMPTS[:2], SamplingParams(temperature=0.8, seed=seed, n=8, max_tokens=40, json_schema=schema))]
    tokenizer = engine.tokenizer
    finished = [c for out in outputs for c in out.outputs if c.finish_reason == "stop"]
    assert len(finished) > 16
    for completion in finished:
        assert "\ufffd" not in tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        jsonschema.validate(json.loads(completion.text), schema)
