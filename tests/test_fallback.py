"""The transformers fallback (models/fallback.py) as users reach it: an MoE model with MLA attention served over
HTTP with groups, beam search and a JSON schema; and the models it cannot serve, refused with the reason.
(Exactness against HF on every fallback family is in test_families.py.)"""

import json

import subprocess
import sys

import httpx
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from decoding import Engine, SamplingParams
from live_server import start_server, stop_server
from models import ModelLoadError
from tiny_models import build_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def live(model_dir):
    server = start_server(model_dir("deepseek_v3"))
    yield server
    stop_server(server)


def test_a_fallback_model_serves_groups_beams_and_schemas_over_http(live):
    [listed] = httpx.get(f"{live.url}/v1/models").json()["data"]
    assert listed["backend"] == "transformers" and listed["model_type"] == "deepseek_v3"
    group = live.client.completions.create(model="tiny", prompt="def fibonacci(n):", max_tokens=8, n=4,
                                           temperature=1.0, seed=3)
    assert len(group.choices) == 4 and len({c.text for c in group.choices}) > 1
    beams = live.client.completions.create(model="tiny", prompt=[1, 5, 9, 33], max_tokens=6, n=3,
                                           extra_body={"use_beam_search": True})
    scores = [c.model_extra["score"] for c in beams.choices]
    assert len(beams.choices) == 3 and scores == sorted(scores, reverse=True)
    chat = live.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a person"}], max_tokens=48, temperature=0.8, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    person = json.loads(chat.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)


def _save(tmp_path, model_type: str, **options) -> str:
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **options)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("model_type,options,reason", [
    ("bloom", dict(hidden_size=32, n_layer=1, n_head=2), "computes attention in its own modules"),
])
def test_what_the_fallback_cannot_serve_is_refused_with_the_reason(tmp_path, model_type, options, reason):
    with pytest.raises(ModelLoadError, match=reason):
        Engine(model=_save(tmp_path, model_type, **options), show_progress=False)


def test_gorgon_models_lists_the_native_families_and_the_catalog():
    listing = json.loads(subprocess.run([sys.executable, "-m", "server.cli", "models", "--json"], check=True,
                                        capture_output=True, text=True, timeout=120).stdout)
    assert {"llama", "qwen3", "gemma", "olmo2", "gpt2"} <= set(listing["native_families"])
    assert "deepseek_v3" not in listing["native_families"] and "smollm2" in listing["catalog"]


def test_short_convolutions_keep_their_history_across_prefix_hits_forks_and_speculation(model_dir):
    """LFM2's convolution inputs live in the paged cache: a prompt served again from the prefix cache, a
    group forked from one prompt, and prompt-lookup speculation (drafts verified, then rolled back) give
    the tokens of a plain run."""
    path = model_dir("lfm2")
    repetitive = [1, 5, 9, 33, 70, 5, 9, 33, 70, 5, 9, 33, 70, 5, 9, 33, 70, 5, 9]
    greedy = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    plain = Engine(model=path, show_progress=False, num_kv_blocks=128, block_size=4)
    expected = plain.generate([repetitive], greedy)[0].outputs[0].token_ids
    computed = plain.counters.num_prompt_tokens_computed
    again = plain.generate([repetitive], greedy)[0]
    assert plain.counters.num_prompt_tokens_computed - computed < len(repetitive)     # a prefix cache hit
    assert again.outputs[0].token_ids == expected
    group = plain.generate([repetitive], SamplingParams(n=3, temperature=0, max_tokens=16, min_tokens=16))[0]
    assert [c.token_ids for c in group.outputs] == [expected] * 3
    speculative = Engine(model=path, show_progress=False, num_kv_blocks=128, block_size=4, speculative="ngram")
    assert speculative.generate([repetitive], greedy)[0].outputs[0].token_ids == expected
