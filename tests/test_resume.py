"""A request resumed on another engine from its samples' seeds and tokens (decoding/resume.py) ends
exactly as the uninterrupted request: tokens, text, logprobs of the tokens after the cut, finish reasons;
bad resumed state is a ValueError that says what is wrong."""

import pytest

from decoding import Engine, SamplingParams
from decoding.resume import ResumedSample, Resumption, WeightsChanged
from tiny_models import PROMPTS


def _engine(llama_dir, **options) -> Engine:
    return Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, **options)


def _cut(engine: Engine, prompt, params: SamplingParams, steps: int) -> tuple[Resumption, object]:
    """Run the request `steps` steps beside another one, then read its state as a failover would."""
    request = engine.make_request(prompt, params, "cut")
    engine.add(request)
    engine.add_request(PROMPTS[1], SamplingParams(max_tokens=40, seed=5, temperature=1.0))
    for _ in range(steps):
        engine.step()
    samples = [ResumedSample(seq.index, seq.seed, list(seq.output_token_ids),
                             seq.finish_reason.value if seq.finish_reason else None, seq.stop_reason,
                             [(0, request.weight_version), *seq.version_changes])
               for seq in request.seqs]
    while engine.has_unfinished_requests():
        engine.step()
    return Resumption(samples), request


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=30, temperature=0, logprobs=2),
    SamplingParams(max_tokens=30, temperature=1.0, seed=7, n=3, logprobs=0, top_p=0.9, presence_penalty=0.5),
    SamplingParams(max_tokens=30, temperature=1.0, seed=3, n=2, min_tokens=4, stop=["e", "a "],
                   repetition_penalty=1.2),
], ids=["greedy", "seeded-n3-penalties", "stop-strings"])
@pytest.mark.parametrize("steps", [1, 3, 9])
def test_a_resumed_request_ends_as_the_uninterrupted_one(llama_dir, params, steps):
    whole = _engine(llama_dir).generate(PROMPTS[0], params)[0]
    resumption, _ = _cut(_engine(llama_dir, block_size=4), PROMPTS[0], params, steps)
    other = _engine(llama_dir, block_size=8, max_num_batched_tokens=16, max_num_seqs=8)     # another cache layout, chunked
    finished = {s.index for s in resumption.samples if s.finish_reason}
    assert len(finished) < params.n, "cut before the end"
    resumed = other.make_request(PROMPTS[0], params, "again", resumption)
    other.add(resumed)
    last = None
    while other.has_unfinished_requests():
        for out in other.step():
            last = out
    for before, after, sample in zip(whole.outputs, last.outputs, resumption.samples):
        assert after.token_ids == before.token_ids and after.text == before.text
        assert after.finish_reason == before.finish_reason and after.stop_reason == before.stop_reason
        if params.logprobs is not None:
            cut = len(sample.token_ids)
            assert [lp.logprob for lp in after.logprobs[cut:]] == [lp.logprob for lp in before.logprobs[cut:]]


def test_bad_resumed_state_is_refused(llama_dir):
    engine = _engine(llama_dir)
    params = SamplingParams(max_tokens=8, temperature=0, n=2)
    vocab = engine.loaded.model.vocab_size
    cases = {
        "outside the vocabulary": Resumption([ResumedSample(0, 1, [vocab])]),
        "distinct indices below n=2": Resumption([ResumedSample(2, 1, [3])]),
        "more than max_tokens": Resumption([ResumedSample(0, 1, [3] * 9)]),
        "finish_reason": Resumption([ResumedSample(0, 1, [3, 4], "stop")]),
        "on_weight_change": Resumption([ResumedSample(0, 1, [3])], on_weight_change="maybe"),
    }
    for message, resumption in cases.items():
        with pytest.raises(ValueError, match=message):
            engine.make_request(PROMPTS[0], params, None, resumption)
    with pytest.raises(ValueError, match="beam search"):
        engine.make_request(PROMPTS[0], SamplingParams(max_tokens=4, use_beam_search=True, num_beams=2), None,
                            Resumption([ResumedSample(0, 1, [3])]))


def test_a_resumed_request_whose_weights_changed_is_refused_or_kept_as_asked(llama_dir):
    engine = _engine(llama_dir)
    params = SamplingParams(max_tokens=6, temperature=0)
    stale = [ResumedSample(0, 1, [3, 4], version_ranges=[(0, 0)])]
    engine.weights.version = 2
    with pytest.raises(WeightsChanged, match="weight version 0, which is no longer served"):
        engine.add(engine.make_request(PROMPTS[0], params, "stale", Resumption(stale)))
    kept = engine.make_request(PROMPTS[0], params, "kept", Resumption(stale, on_weight_change="keep"))
    engine.add(kept)
    while engine.has_unfinished_requests():
        engine.step()
    assert kept.seqs[0].version_changes == [(2, 2)] and len(kept.seqs[0].output_token_ids) == 6


def test_a_resumed_request_joins_a_full_batch_and_a_new_one_waits(llama_dir):
    """A replica's streams moved to a survivor go on at once (up to twice max_num_seqs): they were
    running already; a new request still waits for a free slot."""
    engine = _engine(llama_dir, max_num_seqs=2)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    for index in range(2):
        engine.add_request(PROMPTS[index], params, f"running-{index}")
    engine.step()
    resumed = engine.make_request(PROMPTS[2], params, "resumed", Resumption([ResumedSample(0, 1, [5, 6])]))
    engine.add_request(PROMPTS[3], params, "new")
    engine.add(resumed)
    engine.step()
    running = {request.req_id for request in engine.scheduler.running}
    assert running == {"running-0", "running-1", "resumed"}
    assert [request.req_id for request in engine.scheduler.waiting] == ["new"]
