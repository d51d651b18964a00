"""`uniqueItems: true`, enforced beside every backend (decoding/structured/distinct_items.py): outputs keep
their items distinct as JSON compares them, never get stuck where the grammar would force a repeat, and
everything that works with constraints (n > 1, beams, speculation) works with it."""

import json

import jsonschema
import pytest

from decoding import Engine, SamplingParams
from decoding.structured.constraint import BACKENDS, EXTRAS, installed_backends
from decoding.structured.json_position import JsonPosition, SchemaPlaces, canonical
from test_structured import grammar_accepts
from tiny_models import PROMPTS

# Each is met only by a few arrays, so a model that repeats itself would be forced into a repeat
# (or a dead end) without both rules: every enum value used, bounded integers, both booleans, and
# objects whose last field is an enum.
FORCING = [
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True, "minItems": 3},
    {"type": "array", "items": {"enum": ["red", "green", "reddish"]}, "uniqueItems": True, "minItems": 2},
    {"type": "array", "items": {"type": "integer", "enum": [0, 1, 2, 3]}, "uniqueItems": True, "minItems": 4},
    {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True, "minItems": 2},
    {"type": "object", "required": ["Tags"], "additionalProperties": False,
     "properties": {"Tags": {"type": "array", "uniqueItems": True, "minItems": 3, "maxItems": 4,
                             "items": {"$ref": "#/definitions/Tag"}}},
     "definitions": {"Tag": {"type": "object", "required": ["Key", "Value"], "additionalProperties": False,
                             "properties": {"Key": {"enum": ["env", "team"]}, "Value": {"enum": ["x", "y"]}}}}},
]


@pytest.fixture(scope="module", params=BACKENDS)
def engine(llama_dir, request):
    if request.param not in installed_backends():
        pytest.skip(f"the {request.param} backend is not installed (pip install 'gorgon[{EXTRAS[request.param]}]')")
    return Engine(model=llama_dir, show_progress=False, num_kv_blocks=512, block_size=4,
                  structured_backends=(request.param,))


def finished_texts(outputs) -> list[str]:
    return [c.text for out in outputs for c in out.outputs if c.finish_reason == "stop"]


@pytest.mark.parametrize("schema", FORCING, ids=["enum", "prefixes", "integers", "booleans", "tags"])
def test_sampled_outputs_keep_items_distinct(engine, schema):
    params = SamplingParams(temperature=1.5, seed=2, n=8, max_tokens=160, json_schema=schema)
    outputs = engine.generate(PROMPTS[:2], params)
    texts = finished_texts(outputs)
    assert len(texts) == 16, texts          # none got stuck: every one finishes inside max_tokens
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    # Valid by construction, so not flagged: the lookahead's trial walks are no repeat of the output's.
    assert all(c.schema_valid is None for out in outputs for c in out.outputs)


def test_repeats_cannot_be_written_in_any_spelling(engine):
    """Rule 1 compares values: 1 and 1.0, objects with keys in another order, and the same string."""
    numbers = {"type": "array", "items": {"type": "number"}, "uniqueItems": True}
    objects = {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                          "b": {"type": "integer"}}},
               "uniqueItems": True}
    strings = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    for schema, repeated, distinct in [(numbers, [1, 1.0], [1, 2.5]), (objects, [{"a": 1}, {"a": 1}], [{"a": 1}, {"b": 1}]),
                                       (strings, ["ab", "ab"], ["ab", "ba"])]:
        params = SamplingParams(json_schema=schema)
        assert not grammar_accepts(engine, params, repeated), repeated
        assert grammar_accepts(engine, params, distinct), distinct
    # Nested arrays are items like any other; an inner array kept distinct is checked on its own.
    nested = {"type": "array", "uniqueItems": True,
              "items": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}
    params = SamplingParams(json_schema=nested)
    assert grammar_accepts(engine, params, [[1, 2], [2, 1]])
    assert not grammar_accepts(engine, params, [[1, 2], [1, 2]])
    assert not grammar_accepts(engine, params, [[1, 1]])


def test_a_schema_no_output_can_meet_is_refused(engine):
    schema = {"type": "object", "properties": {"pick": {"type": "array", "items": {"enum": ["a", "b"]},
                                                        "uniqueItems": True, "minItems": 3}}}
    with pytest.raises(ValueError, match="#/properties/pick: minItems 3 with uniqueItems, but the items have 2"):
        engine.make_request("x", SamplingParams(json_schema=schema))


@pytest.mark.parametrize("items, values", [
    ({"anyOf": [{"const": 1}, {"type": "boolean"}]}, 3),              # a branch or another: the sum
    ({"$ref": "#/$defs/level"}, 2),                                     # through a reference
    ({"allOf": [{"enum": [1, 2, 3]}, {"enum": [1, 1.0, 2]}]}, 2),      # every branch: the fewest; 1 == 1.0
    ({"type": ["null", "boolean"]}, 3),
])
def test_how_many_values_items_take_is_counted_through_combinators(items, values):
    from decoding.structured.distinct_items import unmeetable
    schema = {"$defs": {"level": {"enum": ["low", "high"]}},
              "type": "array", "items": items, "uniqueItems": True, "minItems": values + 1}
    assert unmeetable(schema) == f"#: minItems {values + 1} with uniqueItems, but the items have {values} values"
    assert unmeetable({**schema, "minItems": values}) is None
    assert unmeetable({**schema, "items": {"anyOf": [items, {"type": "string"}]}}) is None   # unbounded


def test_a_repeat_let_through_past_the_lookahead_budget_is_reported(engine, monkeypatch):
    """With no lookahead budget rule 2 cannot see the dead end after `"a` (both "aa" and "ab" used):
    the backend's tokens stay allowed rather than none, and the completion says schema_valid false."""
    import decoding.structured.distinct_items as distinct_items
    from decoding.outputs import CompletionOutput
    monkeypatch.setattr(distinct_items, "LOOKAHEAD_STATES", 0)
    schema = {"type": "array", "items": {"enum": ["aa", "ab", "b"]}, "uniqueItems": True, "minItems": 3, "maxItems": 3}
    for text in ('["aa","ab","a', '["aa", "ab", "a'):
        seq = engine.make_request("x", SamplingParams(json_schema=schema)).seqs[0]
        tokens = engine.tokenizer.encode(text, add_special_tokens=False)
        if all(seq.grammar.allowed()[token] and seq.grammar.advance(token) is None for token in tokens):
            break
    else:
        pytest.fail("neither spacing of the prefix was allowed")
    for _ in range(3):                                     # the item's last letter and its quote
        allowed = seq.grammar.allowed()
        assert allowed.any()                               # never a dead end for the step
        seq.grammar.advance(int(allowed.nonzero()[0]))
        if seq.grammar.repeated_an_item:
            break
    assert seq.grammar.repeated_an_item
    assert CompletionOutput.of(seq).schema_valid is False


def test_beams_and_speculation_keep_items_distinct(llama_dir, engine):
    schema = FORCING[0]
    beams = engine.generate(PROMPTS[:2], SamplingParams(use_beam_search=True, num_beams=4, num_return_sequences=4,
                                                        temperature=0, max_tokens=30, json_schema=schema))
    assert len(finished_texts(beams)) >= 4
    for text in finished_texts(beams):
        jsonschema.validate(json.loads(text), schema)
    spec = Engine(model=llama_dir, show_progress=False, num_kv_blocks=512, block_size=4, speculative="draft",
                  draft_model=llama_dir, num_speculative_tokens=4, structured_backends=engine.config.structured_backends)
    greedy = SamplingParams(temperature=0, max_tokens=40, json_schema=FORCING[4])
    for a, b in zip(spec.generate(PROMPTS, greedy), engine.generate(PROMPTS, greedy)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    sampled = spec.generate(PROMPTS[:2], SamplingParams(temperature=1.0, seed=1, n=4, max_tokens=60, json_schema=FORCING[4]))
    for text in finished_texts(sampled):
        jsonschema.validate(json.loads(text), FORCING[4])
    assert spec.speculation.counters.num_draft_tokens > 0


def test_positions_follow_the_schema_through_references_and_branches():
    schema = {"type": "object", "$defs": {"ids": {"type": "array", "uniqueItems": True}},
              "properties": {"a": {"$ref": "#/$defs/ids"}, "b": {"type": "array"}},
              "patternProperties": {"^x-": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/ids"}]}},
              "additionalProperties": {"type": "object", "properties": {"deep": {"$ref": "#/$defs/ids"}}}}

    def writes(text: str) -> bool:
        return JsonPosition(SchemaPlaces(schema)).feed(text.encode())

    assert not writes('{"a": [1, 1]') and writes('{"b": [1, 1]')
    assert not writes('{"x-1": ["q", "q"]') and not writes('{"other": {"deep": [{"k": 1}, {"k": 1}]')
    assert writes('{"other": {"deep": [{"k": 1}, {"k": 2}], "z": [3, 3]')
    assert canonical({"b": 1, "a": [1.0, True]}) == canonical({"a": [1, True], "b": 1.0})
    assert canonical([True]) != canonical([1])
