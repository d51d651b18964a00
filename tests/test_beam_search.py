"""Beam search gives the sequences and scores of HF `generate(num_beams=...)` (transformers pinned in the
test extra), on the shared block cache, batched with other requests."""

import itertools

import pytest
import torch

from decoding import Engine, SamplingParams
from tiny_models import hf_model

PROMPTS = [[1, 5, 9, 33, 70, 12], [1, 40, 41], list(range(3, 30))]
NEW_TOKENS = 12


def hf_beams(path, prompt, num_beams, length_penalty, early_stopping, num_return, stop_id=None, **extra):
    kwargs = dict(max_new_tokens=NEW_TOKENS, num_beams=num_beams, length_penalty=length_penalty,
                  early_stopping=early_stopping, num_return_sequences=num_return, do_sample=False,
                  output_scores=True, return_dict_in_generate=True, pad_token_id=0, **extra)
    if stop_id is not None:
        kwargs["eos_token_id"] = stop_id
    out = hf_model(path).generate(torch.tensor([prompt]), **kwargs)
    results = []
    for i in range(num_return):
        if num_beams == 1:
            generated = out.sequences[i, len(prompt):].tolist()
            results.append((generated, None))
            continue
        length = int((out.beam_indices[i] != -1).sum())
        results.append((out.sequences[i, len(prompt) : len(prompt) + length].tolist(), out.sequences_scores[i].item()))
    return results


def frequent_token(path) -> int:
    """A token the model often ranks high: used as the stop token so hypotheses end mid-search."""
    model = hf_model(path)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + list(range(50, 70))])).logits[0]
    return int(torch.mode(logits.topk(4, dim=-1).indices.flatten()).values)


def check(engine, path, num_beams, length_penalty, early_stopping, num_return, stop_id=None):
    params = SamplingParams(use_beam_search=num_beams > 1, num_beams=num_beams, temperature=0,
                            max_tokens=NEW_TOKENS, length_penalty=length_penalty, early_stopping=early_stopping,
                            num_return_sequences=num_return, logprobs=0,
                            **({"stop_token_ids": (stop_id,), "ignore_eos": True} if stop_id is not None else {}))
    if num_beams == 1:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=0,
                                **({"stop_token_ids": (stop_id,), "ignore_eos": True} if stop_id is not None else {}))
    outputs = engine.generate(PROMPTS, [params] * len(PROMPTS))        # all prompts in the same steps
    for prompt, output in zip(PROMPTS, outputs):
        expected = hf_beams(path, prompt, num_beams, length_penalty, early_stopping, num_return, stop_id)
        got = [(c.token_ids, c.score) for c in output.outputs]
        assert [g[0] for g in got] == [e[0] for e in expected], (prompt, got, expected)
        if num_beams > 1:
            for (_, score), (_, expected_score) in zip(got, expected):
                # 1e-5, relative where the score is large: with length_penalty = -1 a score is the logprob
                # sum times the length (|score| ~ 600 here), where one float32 ulp is already 6e-5.
                assert score == pytest.approx(expected_score, abs=1e-5, rel=1e-5)
    assert engine.cache_usage().num_used_blocks == 0


@pytest.fixture(scope="module")
def llama_beams(model_dir):
    path = model_dir("llama")
    return path, Engine(model=path, show_progress=False, num_kv_blocks=512, block_size=4), frequent_token(path)


GRID = list(itertools.product([1, 2, 4, 8], [-1.0, 0.0, 1.0, 2.0], [True, False, "never"]))


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", GRID)
def test_llama_matches_hf_with_hypotheses_ending_mid_search(llama_beams, num_beams, length_penalty, early_stopping):
    path, engine, stop_id = llama_beams
    check(engine, path, num_beams, length_penalty, early_stopping, num_beams, stop_id)


@pytest.mark.parametrize("num_beams, early_stopping", [(4, False), (8, True)])
def test_llama_matches_hf_returning_the_best_only_and_with_the_natural_eos(llama_beams, num_beams, early_stopping):
    path, engine, _ = llama_beams
    check(engine, path, num_beams, 1.0, early_stopping, 1)


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", [(2, 1.0, False), (4, 2.0, "never"),
                                                                     (8, 0.0, True), (4, -1.0, False)])
def test_gpt2_matches_hf(model_dir, num_beams, length_penalty, early_stopping):
    path = model_dir("gpt2")
    engine = Engine(model=path, show_progress=False, num_kv_blocks=512, block_size=4)
    check(engine, path, num_beams, length_penalty, early_stopping, num_beams, frequent_token(path))


def test_repetition_penalty_and_min_tokens_apply_as_in_hf(llama_beams):
    path, engine, stop_id = llama_beams
    params = SamplingParams(use_beam_search=True, num_beams=4, temperature=0, max_tokens=NEW_TOKENS,
                            num_return_sequences=4, repetition_penalty=1.3, min_tokens=6,
                            stop_token_ids=(stop_id,), ignore_eos=True)
    [output] = engine.generate([PROMPTS[0]], params)
    expected = hf_beams(path, PROMPTS[0], 4, 1.0, False, 4, stop_id, repetition_penalty=1.3, min_new_tokens=6)
    assert [c.token_ids for c in output.outputs] == [e[0] for e in expected]
    assert all(len(c.token_ids) >= 6 for c in output.outputs)


def test_beams_share_blocks_and_run_with_other_requests(llama_beams):
    path, engine, _ = llama_beams
    beam_id = engine.add_request(PROMPTS[2], SamplingParams(use_beam_search=True, num_beams=4, temperature=0,
                                                            max_tokens=NEW_TOKENS, ignore_eos=True))
    other_id = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=NEW_TOKENS, seed=0))
    engine.step()                       # prefill of both
    engine.step()                       # first beam expansion
    prompt_blocks = engine.kv.blocks_for(len(PROMPTS[2]))
    beam_request = engine._requests[beam_id]
    shared = set(beam_request.seqs[0].block_table[: prompt_blocks - 1])
    assert all(set(seq.block_table[: prompt_blocks - 1]) == shared for seq in beam_request.seqs)
    assert other_id in engine._requests
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.cache_usage().num_used_blocks == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(use_beam_search=True, num_beams=2, num_return_sequences=3, temperature=0), "num_return_sequences"),
    (dict(use_beam_search=True, num_beams=2, n=2, temperature=0), "n=1"),
    (dict(use_beam_search=True, num_beams=2, temperature=0.7), "temperature=0"),
    (dict(use_beam_search=True, num_beams=2, temperature=0, top_p=0.9), "top_k, top_p"),
    (dict(use_beam_search=True, num_beams=2, temperature=0, early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=4), "use_beam_search"),
])
def test_bad_beam_parameters_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_stop_token_ranked_below_the_top_num_beams_does_not_finish():
    from decoding.beam import BeamSearch
    search = BeamSearch(num_beams=2, prompt_len=3, max_len=10, stop_token_ids=frozenset({0}),
                        length_penalty=1.0, early_stopping=False)
    # Beam 0 only (first step): token 1 and 2 lead, the stop token 0 ranks third of K = 4.
    log_probs = torch.log_softmax(torch.tensor([[2.0, 2.5, 3.0, 1.0, -5.0]]), -1).expand(2, -1)
    result = search.step(log_probs)
    assert search.finished == [] and 0 not in result.tokens and result.tokens == [2, 1]
    # Next step: the stop token ranks first for beam 0, so that hypothesis finishes and beam search goes on.
    log_probs = torch.log_softmax(torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]]), -1)
    result = search.step(log_probs)
    assert [h.token_ids for h in search.finished] == [[2, 0]] and not result.done
    assert 0 not in result.tokens
