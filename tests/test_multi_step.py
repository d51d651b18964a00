"""Decode steps chained in one native call (decoding/multi_step.py): the same tokens, logprobs, text,
finish reasons and stop reasons as one step per call, wherever sequences end inside a chain."""

import pytest
import torch

from decoding import Engine, SamplingParams
from models import kernels
from tiny_models import PROMPTS, finished_together, hf_greedy

needs_kernel = pytest.mark.skipif(not kernels.native_ops_available(torch.device("cpu"), torch.float32),
                                  reason="the native kernels do not build here")


def _engine(path: str, decode_steps: int, **options) -> Engine:
    options = {"num_kv_blocks": 256, "block_size": 4, **options}
    return Engine(model=path, show_progress=False, decode_steps=decode_steps, **options)


def _finished(engine: Engine, prompts: list, params: list) -> list:
    """Every request submitted at once, stepped to the end: per request its sequences' results."""
    return [[(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in output.outputs]
            for output in finished_together(engine, prompts, params)]


def _greedy_batch(engine: Engine) -> tuple[list, list]:
    """Greedy requests that end at different points of a chain: by length, a stop token past min_tokens,
    a stop string, EOS held back by min_tokens, and a group of two."""
    plain = _engine(engine.config.model, 1, quantization=engine.config.quantization)
    [free] = plain.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0))
    generated = free.outputs[0].token_ids
    text = free.outputs[0].text
    stop_string = text[len(text) // 2 : len(text) // 2 + 2] if len(text) > 4 else "zz"
    params = [SamplingParams(max_tokens=13, temperature=0),
              SamplingParams(max_tokens=40, temperature=0, stop_token_ids=(generated[9],), min_tokens=4),
              SamplingParams(max_tokens=30, temperature=0, stop=(stop_string,)),
              SamplingParams(max_tokens=25, min_tokens=25, temperature=0),
              SamplingParams(n=2, max_tokens=11, temperature=0)]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    return prompts, params


@needs_kernel
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_chained_greedy_steps_end_as_single_steps_do(llama_dir, quantization):
    chained = _engine(llama_dir, 8, quantization=quantization)
    prompts, params = _greedy_batch(chained)
    results = _finished(chained, prompts, params)
    assert chained.multi_step.num_calls > 0 and chained.multi_step.num_chained_steps > 2 * chained.multi_step.num_calls
    assert results == _finished(_engine(llama_dir, 1, quantization=quantization), prompts, params)
    if quantization == "none":   # and they are HF's greedy tokens
        assert results[3][0][0] == hf_greedy(llama_dir, PROMPTS[1], 25)


@needs_kernel
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_chained_sampled_steps_draw_and_report_as_single_steps_do(llama_dir, quantization):
    """Seeded sampling draws each position's token from its own uniform, so a chain draws what single steps
    do: the same tokens, and the same logprobs in either mode, in a group, with min_tokens' bans, beside a
    greedy request reporting its logprobs."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[0]]
    params = [SamplingParams(max_tokens=24, temperature=0.8, seed=11, logprobs=0),
              SamplingParams(n=3, max_tokens=17, temperature=1.0, seed=5, logprobs=0, logprobs_mode="raw"),
              SamplingParams(max_tokens=20, min_tokens=20, temperature=1.2, seed=7, logprobs=0),
              SamplingParams(max_tokens=19, temperature=0, logprobs=0, kept_mass=True),
              SamplingParams(max_tokens=15, temperature=0.7, seed=2, stop_token_ids=(5, 9, 33))]

    def run(decode_steps: int) -> tuple[Engine, list]:
        engine = _engine(llama_dir, decode_steps, quantization=quantization)
        return engine, [[(o.token_ids, o.finish_reason, o.logprobs) for o in output.outputs]
                        for output in finished_together(engine, prompts, params)]

    chained, chained_results = run(8)
    assert chained.multi_step.num_calls > 0
    assert chained_results == run(1)[1]
    assert all(len(o[2]) == len(o[0]) for result in chained_results[:4] for o in result)


@needs_kernel
def test_a_request_that_cannot_chain_keeps_its_steps_single(llama_dir):
    """Truncated sampling, top-N logprobs and penalties are applied in Python: while such a request is in
    the batch, no step chains, and every request ends as it does alone."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    params = [SamplingParams(max_tokens=30, temperature=0),
              SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=3),
              SamplingParams(max_tokens=6, temperature=0, logprobs=2),
              SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1.3)]
    for prompt, param in zip(prompts[1:], params[1:]):
        engine = _engine(llama_dir, 8)
        engine.generate([prompt], param)
        assert engine.multi_step.num_calls == 0
    mixed = _engine(llama_dir, 8)
    assert _finished(mixed, prompts, params) == _finished(_engine(llama_dir, 1), prompts, params)
    assert mixed.multi_step.num_calls > 0    # the greedy request chains once it is alone


@needs_kernel
def test_chains_shrink_to_the_free_blocks(llama_dir):
    """With too few blocks for every request at once, chains take only what is free (never preempting
    for it), requests are preempted and recomputed as the scheduler decides, and all end as with single
    steps."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    chained, single = _engine(llama_dir, 8, num_kv_blocks=24), _engine(llama_dir, 1, num_kv_blocks=24)
    assert _finished(chained, prompts, [params] * 3) == _finished(single, prompts, [params] * 3)
    assert single.counters.num_preemptions > 0 and chained.multi_step.num_calls > 0


def test_decode_steps_must_be_positive():
    with pytest.raises(ValueError, match="decode_steps must be >= 1"):
        Engine(decode_steps=0, show_progress=False)


@needs_kernel
def test_a_speculating_engine_chains_the_steps_it_keeps_plain(llama_dir):
    """Where speculation is off for a step (here: more sequences than speculative_disable_by_batch_size),
    prompt lookup's engine chains plain steps and speculates again once the batch shrinks, every request
    ending as on a plain engine."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (10, 18, 40)]
    engine = _engine(llama_dir, 8, speculative="ngram", speculative_disable_by_batch_size=1,
                     prompt_lookup_min=1, speculative_adaptive=False)
    assert _finished(engine, prompts, params) == _finished(_engine(llama_dir, 1), prompts, params)
    assert engine.multi_step.num_calls > 0 and engine.speculation.counters.num_drafts > 0



@needs_kernel
def test_a_stream_gets_the_snapshots_single_steps_give(llama_dir):
    """A streamed request is reported after every token of a chain (several reports from one engine step),
    so its chunks are those of single steps, only sooner."""
    params = [SamplingParams(max_tokens=21, temperature=0.8, seed=3), SamplingParams(n=2, max_tokens=13, temperature=0)]

    def snapshots(decode_steps: int) -> tuple[Engine, list]:
        engine = _engine(llama_dir, decode_steps)
        ids = [engine.add_request(prompt, param) for prompt, param in zip(PROMPTS[:2], params)]
        seen = {request_id: [] for request_id in ids}
        while engine.has_unfinished_requests():
            for out in engine.step():
                seen[out.request_id].append([(o.token_ids, o.text, o.finish_reason) for o in out.outputs])
        return engine, [seen[request_id] for request_id in ids]

    chained, chained_snapshots = snapshots(8)
    assert chained.multi_step.num_calls > 0
    assert chained_snapshots == snapshots(1)[1]
