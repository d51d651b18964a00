"""Constrained output: JSON schema, regex and choice, offline and over HTTP; valid whatever the model."""

import json
import re

import jsonschema
import pytest
from pydantic import BaseModel

from decoding import Engine, SamplingParams
from tiny_models import PROMPTS

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb"]}, "maxItems": 3}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def engine(llama_dir):
    return Engine(model=llama_dir, show_progress=False, num_kv_blocks=512, block_size=4)


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
    with pytest.raises(ValueError, match="beam search"):
        SamplingParams(use_beam_search=True, num_beams=2, temperature=0, choice=["a", "b"])


def test_over_http_response_format_and_structured_outputs(llama_dir):
    from test_server import start_server, stop_server

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
