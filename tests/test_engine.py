"""End-to-end engine tests on tiny random HF models saved to disk."""

import pytest
import torch

from decoding import Engine, SamplingParams
from tiny_models import PROMPTS, hf_greedy, hf_logits

@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "mistral-sliding", "gpt2"])
def test_greedy_matches_hf_generate_on_a_batch_of_different_lengths(model_dir, arch):
    path = model_dir(arch)
    engine = Engine(model=path, show_progress=False, num_kv_blocks=128, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
    outputs = engine.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(path, prompt, 24)
    assert engine.cache_usage().num_used_blocks == 0


def test_chunked_prefill_matches_hf(model_dir):
    path = model_dir("llama")
    engine = Engine(model=path, show_progress=False, num_kv_blocks=128, block_size=4,
                    max_num_seqs=4, max_num_batched_tokens=8)
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, min_tokens=12))
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(path, prompt, 12)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_logprobs_match_a_full_hf_forward(model_dir, arch, mode):
    path = model_dir(arch)
    engine = Engine(model=path, show_progress=False, num_kv_blocks=128, block_size=4)
    temperature = 0.7
    params = SamplingParams(temperature=temperature, max_tokens=16, logprobs=3, prompt_logprobs=2,
                            logprobs_mode=mode, seed=7)
    [out] = engine.generate([PROMPTS[0]], params)
    completion = out.outputs[0]
    logits = hf_logits(path, PROMPTS[0] + completion.token_ids)
    scaled = logits if mode == "raw" else logits / temperature
    reference = torch.log_softmax(scaled, dim=-1)
    start = len(PROMPTS[0]) - 1
    for i, (token, logprob) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert logprob.logprob == pytest.approx(reference[start + i, token].item(), abs=1e-4)
        top_ids = reference[start + i].topk(3).indices.tolist()
        assert list(logprob.top) == top_ids
    assert out.prompt_logprobs[0] is None
    for i, logprob in enumerate(out.prompt_logprobs[1:]):
        assert logprob.logprob == pytest.approx(reference[i, PROMPTS[0][i + 1]].item(), abs=1e-4)


def test_group_shares_prompt_blocks_and_prefills_once(llama_dir):
    # One decode step per call, so the blocks can be counted after each (chained steps would finish here).
    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4, decode_steps=1)
    prompt = list(range(3, 43))                                   # 40 tokens = 10 full blocks
    engine.add_request(prompt, SamplingParams(n=8, temperature=1.0, max_tokens=6, seed=3))
    engine.step()                                                 # prefill + fork + first tokens
    assert engine.counters.num_prompt_tokens_computed == 40
    assert engine.cache_usage().num_used_blocks == 10             # the prompt is stored once
    engine.step()                                                 # each sample writes its own block
    assert engine.cache_usage().num_used_blocks == 10 + 8
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.cache_usage().num_used_blocks == 0


def test_abort_frees_every_block(llama_engine):
    request_id = llama_engine.add_request(PROMPTS[2], SamplingParams(n=4, max_tokens=50, seed=1))
    for _ in range(3):
        llama_engine.step()
    assert llama_engine.cache_usage().num_used_blocks > 0
    out = llama_engine.abort(request_id)
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 4
    assert llama_engine.cache_usage().num_used_blocks == 0
    assert not llama_engine.has_unfinished_requests()


def test_a_cache_too_small_for_the_batch_preempts_and_still_matches(llama_dir):
    params = SamplingParams(temperature=0, max_tokens=30, min_tokens=30)
    roomy = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
    tight = Engine(model=llama_dir, show_progress=False, num_kv_blocks=24, block_size=4)
    expected = roomy.generate(PROMPTS, params)
    got = tight.generate(PROMPTS, params)
    assert tight.counters.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert tight.cache_usage().num_used_blocks == 0


def test_preempted_group_resumes_with_the_same_samples(llama_dir):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=30, min_tokens=30, seed=11)
    roomy = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
    tight = Engine(model=llama_dir, show_progress=False, num_kv_blocks=40, block_size=4)
    expected = roomy.generate([PROMPTS[2], PROMPTS[0]], [params, params])
    got = tight.generate([PROMPTS[2], PROMPTS[0]], [params, params])
    assert tight.counters.num_preemptions > 0
    for a, b in zip(got, expected):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_seeded_sampling_reproduces_run_after_run(llama_dir, llama_engine):
    params = SamplingParams(n=4, temperature=1.0, top_p=0.9, max_tokens=20, seed=42)
    first = llama_engine.generate([PROMPTS[1]], params)[0]
    again = Engine(model=llama_dir, show_progress=False, num_kv_blocks=64, block_size=8).generate([PROMPTS[1]], params)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1   # the samples of a group differ


def test_stop_strings_including_one_split_across_tokens(llama_engine):
    base = llama_engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, min_tokens=30))[0]
    tokens = base.outputs[0].token_ids
    pieces = [llama_engine.tokenizer.decode([t]) for t in tokens]
    # A stop string made of the end of one token and the start of the next, well inside the output.
    i = next(i for i in range(4, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    stop = pieces[i][-2:] + pieces[i + 1][:1]
    text = base.outputs[0].text
    params = SamplingParams(temperature=0, max_tokens=30, stop=[stop])
    out = llama_engine.generate([PROMPTS[0]], params)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = llama_engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                              include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_and_length(llama_engine):
    base = llama_engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, min_tokens=10))[0]
    tokens = base.outputs[0].token_ids
    out = llama_engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[tokens[3]]))
    completion = out[0].outputs[0]
    assert completion.token_ids == tokens[: tokens.index(tokens[3]) + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == tokens[3]
    assert base.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n must be"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(logprobs=50), "logprobs"),
])
def test_invalid_parameters_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_prompts_that_cannot_fit_are_rejected(llama_engine):
    with pytest.raises(ValueError, match="context length"):
        llama_engine.add_request(list(range(3, 300)), SamplingParams())
    with pytest.raises(ValueError, match="lower max_tokens"):
        llama_engine.add_request(PROMPTS[0], SamplingParams(max_tokens=255))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llama_engine.add_request([1, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        llama_engine.add_request([], SamplingParams())
    assert not llama_engine.has_unfinished_requests()


def test_string_prompts_and_text(llama_engine):
    [out] = llama_engine.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=8, min_tokens=8))
    completion = out.outputs[0]
    assert out.prompt == "def fibonacci(n):"
    assert completion.text == llama_engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_eos_stops_unless_ignored(llama_engine):
    eos = llama_engine.tokenizer.eos_token_id
    for ignore_eos, expected in [(False, "stop"), (True, None)]:
        request = llama_engine.make_request(PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=ignore_eos))
        seq = request.leader
        llama_engine.update.append_token(seq, eos, None)
        assert (seq.finish_reason.value if seq.finish_reason else None) == expected
