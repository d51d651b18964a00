"""Every natively served family (models/families.py) against HF's own modeling code on a tiny random
checkpoint: greedy tokens equal to HF generate's over a batch of prompts longer than the sliding windows,
and the logprobs of sampled tokens and of the prompt within 1e-4 of a full HF forward (float32)."""

import pytest
import torch
from transformers import AutoTokenizer

from decoding import Engine, SamplingParams
from families import FALLBACK_OPTIONS, FAMILY_OPTIONS
from tiny_models import PROMPTS, hf_greedy, hf_logits

FAMILIES = sorted(FAMILY_OPTIONS)


def _engine(path: str, **options) -> Engine:
    return Engine(model=path, show_progress=False, num_kv_blocks=128, block_size=4, **options)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate(model_dir, family):
    path = model_dir(family)
    engine = _engine(path)
    assert engine.loaded.backend == ("transformers" if family in FALLBACK_OPTIONS else "native")
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, min_tokens=20))
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(path, prompt, 20)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_and_prompt_logprobs_match_a_full_hf_forward(model_dir, family):
    path = model_dir(family)
    params = SamplingParams(n=2, temperature=0.9, max_tokens=12, logprobs=2, prompt_logprobs=1, seed=11,
                            logprobs_mode="raw")
    # Chunked prefill beside other requests: the logprobs must not depend on how the prompt was split.
    engine = _engine(path, max_num_seqs=4, max_num_batched_tokens=16)
    for prompt, out in zip(PROMPTS[2:], engine.generate(PROMPTS[2:], params)):
        for completion in out.outputs:
            reference = torch.log_softmax(hf_logits(path, prompt + completion.token_ids), dim=-1)
            start = len(prompt) - 1
            for i, (token, logprob) in enumerate(zip(completion.token_ids, completion.logprobs)):
                assert logprob.logprob == pytest.approx(reference[start + i, token].item(), abs=1e-4)
        assert len(out.prompt_logprobs) == len(prompt)
        for i, logprob in enumerate(out.prompt_logprobs[1:]):
            assert logprob.logprob == pytest.approx(reference[i, prompt[i + 1]].item(), abs=1e-4)


def test_qwen3_runs_the_one_call_native_stack(model_dir):
    model = _engine(model_dir("qwen3")).loaded.model
    if not model.native_ops:
        pytest.skip("the native kernels do not build here")
    assert model.plain_stack and model.spec.qk_norm == "head"


def test_moe_routing_ties_pick_as_hf_does_and_rows_do_not_depend_on_the_batch(model_dir, tmp_path):
    """Two experts with the same router row tie on every token: the choice is HF's (torch.topk's), and a
    prompt's logprobs are bit-identical alone and beside other prompts."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir("qwen3_moe"), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight[1] = layer.mlp.gate.weight[0]
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(model_dir("qwen3_moe")).save_pretrained(tmp_path)
    path = str(tmp_path)
    engine = _engine(path)
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12, logprobs=0)
    batch = engine.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, batch):
        assert output.outputs[0].token_ids == hf_greedy(path, prompt, 12)
    [alone] = _engine(path).generate([PROMPTS[2]], params)
    assert [t.logprob for t in alone.outputs[0].logprobs] == [t.logprob for t in batch[2].outputs[0].logprobs]


@pytest.mark.parametrize("family", ["gpt_neox", "cohere", "qwen3_moe", "gpt_oss", "apertus", "gpt2-layer-scaled",
                                    "deepseek_v3"])
def test_a_weight_push_serves_what_a_fresh_load_of_the_pushed_weights_serves(model_dir, family, tmp_path):
    """Checkpoint tensors that the native storage regroups (GPT-NeoX's per-head q/k/v, Cohere's
    interleaved RoPE channels, stacked and interleaved experts, GPT-2's [in, out] projections, a learned
    activation's parameters) or the fallback keeps as HF's: a push of a trainer's state dict, and reading
    the served weights back, in the checkpoint's layout."""
    from transformers import AutoModelForCausalLM
    path = model_dir(family)
    trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    trained.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path)
    state = trained.state_dict()
    served = _engine(path)
    served.weights.update(dict(state), version=1)
    fresh = _engine(str(tmp_path))
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=10, logprobs=0)
    for a, b in zip(served.generate(PROMPTS, params), fresh.generate(PROMPTS, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [t.logprob for t in a.outputs[0].logprobs] == pytest.approx([t.logprob for t in b.outputs[0].logprobs],
                                                                           abs=1e-5)
    read = served.weights.current(list(state))
    for name, tensor in state.items():
        assert torch.equal(read[name], tensor), name


# The structurally different native shapes: RoPE tables per layer kind and sandwich norms, experts,
# sinks, a parallel LayerNorm block with partial RoPE, regrouped q/k/v, learned positions.
FEATURE_FAMILIES = ["gemma3_text", "qwen3_moe", "gpt_oss", "phi", "gpt_neox", "gpt2-layer-scaled"]


@pytest.mark.parametrize("family", FEATURE_FAMILIES)
def test_beams_speculation_and_schemas_work_on_every_shape(model_dir, family):
    """Beam search gives HF generate's beams; prompt-lookup speculation gives plain greedy's tokens; a JSON
    schema is obeyed."""
    import json

    import jsonschema
    from test_beam_search import hf_beams

    path = model_dir(family)
    prompt = [1, 5, 9, 33, 70, 5, 9, 33, 70, 5, 9, 33, 70, 5, 9]
    engine = _engine(path)
    beams = engine.generate([prompt], SamplingParams(use_beam_search=True, num_beams=3, temperature=0,
                                                     max_tokens=12, num_return_sequences=3))[0]
    expected = hf_beams(path, prompt, 3, 1.0, False, 3)
    assert [c.token_ids for c in beams.outputs] == [tokens for tokens, _ in expected]
    greedy = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    plain = engine.generate([prompt], greedy)[0].outputs[0].token_ids
    speculative = _engine(path, speculative="ngram").generate([prompt], greedy)[0].outputs[0].token_ids
    assert speculative == plain
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    [out] = engine.generate(["answer:"], SamplingParams(temperature=0.8, seed=2, max_tokens=48, json_schema=schema))
    assert out.outputs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.outputs[0].text), schema)
