"""The cache supports tree-shaped verification, compaction of the accepted path and rollback, at the
runner level (speculative decoding and Medusa build on these)."""

import pytest
import torch

from decoding import Engine, SamplingParams
from decoding.step_plan import ScheduledSeq, SchedulerOutput, TokenTree
from tiny_models import hf_model

PROMPT = [1, 17, 93, 4, 250, 61, 8, 120, 33]


def hf_last_logits(path, token_ids):
    with torch.no_grad():
        return hf_model(path)(torch.tensor([token_ids])).logits[0, -1].float()


def run(engine, item, want_chunk=True):
    seq = item.seq
    assert seq.num_computed == item.start
    copies = engine.kv.reserve(seq, item.num_new_tokens)
    out = engine.runner.execute(SchedulerOutput([item], copies, chunk_logits_for={seq.seq_id} if want_chunk else set()))
    seq.num_computed = item.start + item.num_new_tokens
    return out


@pytest.fixture
def prefilled(model_dir):
    def make(arch):
        engine = Engine(model=model_dir(arch), show_progress=False, num_kv_blocks=64, block_size=4)
        seq = engine.make_request(PROMPT, SamplingParams()).leader
        run(engine, ScheduledSeq.of(seq, len(PROMPT)), want_chunk=False)
        return engine, seq
    return make


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral-sliding"])
def test_tree_verification_logits_equal_sequential_decoding_of_each_path(model_dir, prefilled, arch):
    engine, seq = prefilled(arch)
    tokens = [40, 41, 42, 43, 44]            # a -> (b -> d, c -> e)
    tree = TokenTree(parents=(-1, 0, 0, 1, 2))
    seq.token_ids += tokens
    item = ScheduledSeq(seq, len(PROMPT), len(tokens), reaches_end=True, tree=tree)
    logits = run(engine, item).chunk[seq.seq_id]                     # [5, vocab]
    paths = {0: [40], 1: [40, 41], 2: [40, 42], 3: [40, 41, 43], 4: [40, 42, 44]}
    for node, path in paths.items():
        expected = hf_last_logits(model_dir(arch), PROMPT + path)
        assert torch.allclose(logits[node], expected, atol=1e-4), node


@pytest.mark.parametrize("native", [True, False])
def test_a_tree_grown_a_level_at_a_time_sees_the_same_ancestors(model_dir, prefilled, native):
    """EAGLE's draft grows its tree one level per forward: the levels before are in the cache
    (`TokenTree.computed`) and each new node still sees exactly the context and its own ancestors."""
    engine, seq = prefilled("llama")
    engine.runner.native_decode = native and engine.runner.native_decode      # off: the masked segment path
    parents = (-1, -1, 0, 1, 1, 2)            # a, b; a -> c; b -> d, e; c -> f
    tokens = [40, 41, 42, 43, 44, 45]
    start = len(PROMPT)
    levels = [(0, 2), (2, 5), (5, 6)]
    logits = []
    for first, end in levels:
        seq.token_ids += tokens[first:end]
        item = ScheduledSeq(seq, start + first, end - first, reaches_end=True, tree=TokenTree(parents[:end], first))
        logits += list(run(engine, item).chunk[seq.seq_id])
    paths = {0: [40], 1: [41], 2: [40, 42], 3: [41, 43], 4: [41, 44], 5: [40, 42, 45]}
    for node, path in paths.items():
        expected = hf_last_logits(model_dir("llama"), PROMPT + path)
        assert torch.allclose(logits[node], expected, atol=1e-4), node


def test_compacting_the_accepted_path_then_rolling_back_matches_a_fresh_prefill(model_dir, prefilled):
    engine, seq = prefilled("llama")
    start = len(PROMPT)
    seq.token_ids += [40, 41, 42, 43]
    run(engine, ScheduledSeq(seq, start, 4, reaches_end=True, tree=TokenTree(parents=(-1, 0, 0, 2))))
    # Accept the path a -> c -> d (new indices 0, 2, 3): move c and d down to sequence indices start+1, +2.
    engine.kv.compact(seq, [start + 2, start + 3], [start + 1, start + 2])
    seq.token_ids[start:] = [40, 42, 43]
    engine.kv.roll_back(seq, start + 3)
    # Decode one more token from the compacted cache; it must see exactly PROMPT + a, c, d.
    seq.token_ids.append(44)
    logits = run(engine, ScheduledSeq.of(seq, 1)).last[0]
    expected = hf_last_logits(model_dir("llama"), PROMPT + [40, 42, 43, 44])
    assert torch.allclose(logits, expected, atol=1e-4)


def test_rollback_of_rejected_tokens_matches_a_fresh_prefill(model_dir, prefilled):
    engine, seq = prefilled("llama")
    start = len(PROMPT)
    seq.token_ids += [40, 41, 42, 43, 44, 45]                         # crosses a block boundary
    run(engine, ScheduledSeq.of(seq, 6))
    del seq.token_ids[start + 2 :]                                    # keep 2 of the 6
    engine.kv.roll_back(seq, start + 2)
    seq.token_ids.append(50)
    logits = run(engine, ScheduledSeq.of(seq, 1)).last[0]
    assert torch.allclose(logits, hf_last_logits(model_dir("llama"), PROMPT + [40, 41, 50]), atol=1e-4)
