"""Rollout logprobs that a trainer reproduces bit for bit: the engine's raw logprobs do not depend on how a
token was computed, and decoding.matched_forward.MatchedPolicy recomputes them exactly, trains through
transformers' model and pushes its weights back."""

import pytest
import torch

from decoding import Engine, SamplingParams
from decoding.matched_forward import MatchedPolicy
from tiny_models import PROMPTS

RAW = dict(temperature=1.0, logprobs=0, logprobs_mode="raw", ignore_eos=True)


def _prompts(vocab: int, lengths=(5, 14, 23, 41)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def _logprobs(output) -> list[list[float]]:
    return [[lp.logprob for lp in completion.logprobs] for completion in output.outputs]


def test_rollout_logprobs_do_not_depend_on_how_the_prompt_was_computed(llama_dir):
    """The same request, seeded, computed whole; in 7-token chunks beside other requests' prefills and
    decodes; under another block size; from a prefix-cache hit; recomputed after its cache was dropped
    mid-generation: the same tokens and the same logprob bits."""
    params = SamplingParams(max_tokens=24, seed=11, **RAW)

    def run(prompts, mid_generation=None, **options):
        engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, **options)
        if mid_generation is None:
            return engine, engine.generate(prompts, [params] * len(prompts))[0]
        engine.add_request(prompts[0], params, request_id="probe")
        probe = engine.scheduler.waiting[-1]
        while probe.seqs[0].num_output_tokens < 5:        # mid-generation (a chained step makes up to 8)
            engine.step()
        assert not probe.is_finished
        mid_generation(engine)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    return engine, out

    prompt = _prompts(128, (45,))[0]
    _, whole = run([prompt], block_size=16, max_num_batched_tokens=512)
    others = _prompts(128, (30, 12, 50))
    _, chunked = run([prompt, *others], block_size=16, max_num_batched_tokens=7, max_num_seqs=4)
    _, small_blocks = run([prompt], block_size=4)
    engine, _ = run([prompt[:33]], block_size=4)
    cached = engine.generate([prompt], params)[0]
    assert cached.num_cached_tokens > 0
    _, recomputed = run([prompt], mid_generation=lambda e: e.recompute_started(), block_size=4)
    for other in (chunked, small_blocks, cached, recomputed):
        assert other.outputs[0].token_ids == whole.outputs[0].token_ids
        assert _logprobs(other) == _logprobs(whole)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral-sliding", "gemma2", "phi", "qwen3_moe"])
def test_the_matched_forward_reproduces_rollout_logprobs_bit_for_bit(model_dir, arch):
    """Rollouts (n = 2, chunked prefills beside decodes), recomputed as one padded batch laid out as TRL
    lays it out: prompts left-padded, completions right-padded. Every completion token's logprob equals
    the rollout's exactly; transformers' own forward does not."""
    path = model_dir(arch)
    engine = Engine(model=path, show_progress=False, num_kv_blocks=512, block_size=4, max_num_batched_tokens=16,
                    max_num_seqs=16)
    prompts = _prompts(engine.loaded.model.vocab_size)
    outputs = engine.generate(prompts, SamplingParams(n=2, max_tokens=20, seed=3, **RAW))
    pairs = [(prompt, completion) for prompt, output in zip(prompts, outputs) for completion in output.outputs]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(pairs), width + 20, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(pairs):
        ids[row, width - len(prompt) : width + len(completion.token_ids)] = torch.tensor(prompt + completion.token_ids)
        mask[row, width - len(prompt) : width + len(completion.token_ids)] = 1
    policy = MatchedPolicy.from_pretrained(path)
    matched = policy(ids, mask)
    transformers_forward = policy.hf_logprobs(ids, mask)
    hf_differs = False
    for row, (_, completion) in enumerate(pairs):
        served = torch.tensor([lp.logprob for lp in completion.logprobs])
        assert torch.equal(matched[row, width : width + len(served)], served)
        hf_differs |= not torch.equal(transformers_forward[row, width : width + len(served)], served)
        torch.testing.assert_close(transformers_forward[row, width : width + len(served)], served, atol=2e-4, rtol=0)
    assert hf_differs, "transformers' forward should not already be bit-exact (nothing would be tested)"
    assert (matched[mask == 0] == 0).all()


def test_gradients_are_transformers_and_a_trained_step_is_served_as_computed(llama_dir):
    """The backward is transformers' gradient of the same logprobs; after an optimizer step the forward
    runs the new weights, and a server they are pushed to samples with logprobs the forward reproduces."""
    policy = MatchedPolicy.from_pretrained(llama_dir)
    ids = torch.tensor([[0, 0, *PROMPTS[0], 7, 8, 9], [*PROMPTS[1], 100, 101, 0, 0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[0, 0] + [1] * 10, [1] * 5 + [0] * 7])
    weights = torch.randn(ids.shape)
    (policy(ids, mask) * weights).sum().backward()
    ours = {name: p.grad.clone() for name, p in policy.hf.named_parameters()}
    policy.hf.zero_grad()
    (policy.hf_logprobs(ids, mask) * weights).sum().backward()
    for name, p in policy.hf.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, msg=name)

    optimizer = torch.optim.SGD(policy.hf.parameters(), lr=0.5)
    optimizer.step()
    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
    before = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=12, seed=1, **RAW))[0].outputs[0]
    assert policy.push_to(engine, weight_version=1) == 1
    after = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=12, seed=1, **RAW))[0].outputs[0]
    assert after.logprobs != before.logprobs
    [recomputed] = policy.native_logprobs([PROMPTS[2] + after.token_ids])
    assert torch.equal(recomputed[len(PROMPTS[2]) - 1 :], torch.tensor([lp.logprob for lp in after.logprobs]))
    assert torch.equal(MatchedPolicy.from_engine(engine).native_logprobs([PROMPTS[2] + after.token_ids])[0], recomputed)


def test_packed_rows_give_the_padded_batch_numbers_and_gradients(llama_dir):
    """Padding-free packing (sequences back to back in one row, position_ids restarting at 0) gives each
    sequence the logprobs and the gradient it has in a padded batch."""
    policy = MatchedPolicy.from_pretrained(llama_dir)
    first, second = PROMPTS[0] + [7, 8, 9], PROMPTS[3] + [11, 12]
    packed = torch.tensor([first + second])
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    width = max(len(first), len(second))
    padded = torch.tensor([first + [0] * (width - len(first)), second + [0] * (width - len(second))])
    mask = torch.tensor([[1] * len(first) + [0] * (width - len(first)), [1] * len(second) + [0] * (width - len(second))])
    weights = torch.randn(len(first) + len(second))
    (policy(packed, position_ids=positions)[0] * weights).sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in policy.hf.named_parameters()}
    policy.hf.zero_grad()
    out = policy(padded, mask)
    in_padded = torch.cat([out[0, : len(first)], out[1, : len(second)]])
    assert torch.equal(policy(packed, position_ids=positions)[0], in_padded)
    (in_padded * weights).sum().backward()
    for name, p in policy.hf.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, msg=name)


def test_a_mask_with_padding_inside_a_row_is_refused(llama_dir):
    policy = MatchedPolicy.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match="row 0 of attention_mask is not one run"):
        policy(torch.tensor([[5, 6, 7, 8]]), torch.tensor([[1, 0, 1, 1]]))


def test_a_fused_optimizer_step_is_seen(llama_dir):
    """A fused AdamW writes parameters without bumping their version counters; the next forward still
    runs the new weights (they equal a fresh policy loaded with them)."""
    policy = MatchedPolicy.from_pretrained(llama_dir)
    sequence = PROMPTS[0] + [7, 8, 9]
    before = policy.native_logprobs([sequence])[0]
    optimizer = torch.optim.AdamW(policy.hf.parameters(), lr=0.05, fused=True)
    policy(torch.tensor([sequence])).sum().backward()
    optimizer.step()
    after = policy.native_logprobs([sequence])[0]
    assert not torch.equal(after, before)
    fresh = MatchedPolicy.from_pretrained(llama_dir)
    fresh.hf.load_state_dict(policy.hf.state_dict())
    assert torch.equal(fresh.native_logprobs([sequence])[0], after)
