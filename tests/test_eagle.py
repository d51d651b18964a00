"""EAGLE: the head's format, the native draft against the training layer, and decoding end to end."""

import json

import pytest
import torch

from decoding import Engine, SamplingParams
from models.eagle import EagleDraft, EagleTree
from tiny_models import (PROMPTS, assert_chain_runs_as_single_steps, assert_chained_steps_keep_the_proposer_in_step,
                         assert_speculating_chain_ends_where_plain_ends,
                         assert_lossless_sampling_follows_the_target, assert_quantized_speculation_is_plain_decoding,
                         assert_same_steps_match, assert_seeded_speculation, assert_target_logprobs, hf_greedy,
                         recorded_proposals, within_binomial_bounds)

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def answers_file(llama_dir, tmp_path_factory):
    from training.self_distill import generate

    path = tmp_path_factory.mktemp("eagle_answers") / "answers.jsonl"
    assert generate(llama_dir, path, 24, [0.0, 1.0], max_tokens=24, seed=0) == 24
    return path


@pytest.fixture(scope="module")
def eagle_dir(llama_dir, answers_file, tmp_path_factory):
    """A head trained by `gorgon train eagle` on the tiny Llama's own answers (a few steps)."""
    from server.cli import main

    out = tmp_path_factory.mktemp("eagle")
    assert main(["train", "eagle", "--model", llama_dir, "--answers", str(answers_file), "--out", str(out),
                 "--draft-vocab", "200", "--epochs", "20", "--unroll", "2", "--save-dtype", "float32"]) == 0
    return str(out / "final")


def eagle_engine(llama_dir, eagle_dir, **overrides):
    options = dict(show_progress=False, num_kv_blocks=256, block_size=4, speculative="eagle", eagle_head=eagle_dir,
                   speculative_adaptive=False)
    return Engine(model=llama_dir, **(options | overrides))


def without_native_chain(engine: Engine) -> Engine:
    engine.speculating_chain.available = False
    return engine


# ---- the head ------------------------------------------------------------------------------------

def test_a_trained_head_is_saved_in_the_eagle_layout(eagle_dir):
    from safetensors.torch import load_file

    config = json.loads(open(f"{eagle_dir}/config.json").read())
    assert config["num_hidden_layers"] == 1 and config["model_type"] == "llama"
    assert config["eagle"]["draft_vocab_size"] == 200 and config["eagle"]["projection"] == "output_head"
    state = load_file(f"{eagle_dir}/model.safetensors")
    assert {"fc.weight", "fc.bias", "d2t", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight"} <= set(state)
    assert not any("embed" in name or "lm_head" in name for name in state)      # the model's own, not copied
    assert state["fc.weight"].shape == (64, 128)
    draft_vocab = state["d2t"] + torch.arange(200)
    assert bool((draft_vocab[1:] > draft_vocab[:-1]).all()) and int(draft_vocab.max()) < 384
    evaluation = json.loads(open(f"{eagle_dir}/evaluation.json").read())
    assert set(evaluation) == {"top1", "top4"} and len(evaluation["top1"]) == 2


def test_the_native_draft_computes_what_the_training_layer_does(llama_dir, eagle_dir):
    """Catch-up rows and a draft row after them on the engine's layer and paged cache equal the training
    module (transformers' own Llama layer) over the same rows."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from decoding.speculative.eagle import EagleProposer, EagleState
    from decoding.step_plan import ScheduledSeq
    from training.eagle_distill import EagleTrainingHead

    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=64, block_size=4)
    target = engine.loaded.model
    draft = EagleDraft.load(eagle_dir, target, torch.float32, "cpu", weights="float")
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    state = load_file(f"{eagle_dir}/model.safetensors")
    vocab = state.pop("d2t") + torch.arange(200)
    head = EagleTrainingHead(AutoConfig.from_pretrained(llama_dir), hf.get_input_embeddings().weight.detach(),
                             hf.get_output_embeddings().weight.detach()[vocab])
    head.fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    head.layers[0].load_state_dict({k[len("layers.0."):]: v for k, v in state.items() if k.startswith("layers.0.")})
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 384, (9,), generator=generator)
    features = torch.randn(9, 64, generator=generator)
    with torch.no_grad():
        expected = head(tokens[None], features[None], torch.tensor([9]))[0]
    proposer = EagleProposer(draft, 16, 4, engine.sampler, frozenset(), 384, torch.device("cpu"))
    seq = EagleState(seq_id=1, start=0, token_ids=tokens.tolist())
    proposer.kv.reserve(seq, 9)
    got = proposer._forward([ScheduledSeq(seq, 0, 8, reaches_end=True)], [features[:8]])
    seq.num_computed = 8
    torch.testing.assert_close(got[0], expected[7], atol=1e-4, rtol=1e-4)
    got = proposer._forward([ScheduledSeq(seq, 8, 1, reaches_end=True)], [features[8:]])
    torch.testing.assert_close(got[0], expected[8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(draft.logits(got), head.logits(expected[8:]), atol=1e-3, rtol=1e-4)


def test_eagle_over_quantized_weights_decodes_as_plain_decoding(llama_dir, eagle_dir):
    assert_quantized_speculation_is_plain_decoding(llama_dir, lambda **options: eagle_engine(llama_dir, eagle_dir,
                                                                                            **options))


def test_a_head_that_does_not_fit_is_refused(llama_dir, eagle_dir, tmp_path):
    import shutil

    folder = tmp_path / "head"
    shutil.copytree(eagle_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_size 32, the model has 64"):
        eagle_engine(llama_dir, str(folder))
    with pytest.raises(ValueError, match="not an EAGLE head folder"):
        eagle_engine(llama_dir, str(tmp_path))
    with pytest.raises(ValueError, match="no EAGLE head is shipped"):
        eagle_engine(llama_dir, None)
    with pytest.raises(ValueError, match="eagle_tree"):
        eagle_engine(llama_dir, eagle_dir, eagle_tree=(0, 4, 2))
    with pytest.raises(ValueError, match="eagle_drawn"):
        eagle_engine(llama_dir, eagle_dir, eagle_drawn=(2, 0))
    with pytest.raises(ValueError, match="candidates per level"):
        EagleTree.parse_drawn("2,x")
    with pytest.raises(ValueError, match="every level of a drawn tree"):
        EagleTree(drawn=(1, 0))
    # A head's drawn tree is its default; eagle_tree replaces the other numbers and keeps it.
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 64
    config["eagle"]["tree"]["drawn"] = [2, 1]
    (folder / "config.json").write_text(json.dumps(config))
    assert eagle_engine(llama_dir, str(folder)).speculation.proposer.tree.drawn == (2, 1)
    proposer = eagle_engine(llama_dir, str(folder), eagle_tree=(4, 3, 2)).speculation.proposer
    assert proposer.tree == EagleTree(4, 3, 2, drawn=(2, 1)) and proposer.max_tokens_per_step == 4
    assert eagle_engine(llama_dir, str(folder), eagle_drawn=(6, 3, 2)).speculation.proposer.max_tokens_per_step == 11
    # A head's quantized_tree is the default over quantized weights only (keeping the drawn tree); eagle_tree
    # still wins.
    config["eagle"]["quantized_tree"] = {"nodes": 2, "depth": 2, "top_k": 1}
    (folder / "config.json").write_text(json.dumps(config))
    assert eagle_engine(llama_dir, str(folder)).speculation.proposer.tree == EagleTree(**config["eagle"]["tree"])
    quantized = eagle_engine(llama_dir, str(folder), quantization="int8").speculation.proposer
    assert quantized.tree == EagleTree(2, 2, 1, drawn=(2, 1))
    assert eagle_engine(llama_dir, str(folder), quantization="int8", eagle_tree=(4, 3, 2)).speculation.proposer.tree \
        == EagleTree(4, 3, 2, drawn=(2, 1))


# ---- decoding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tree", [None, (1, 1, 1), (3, 2, 3), (12, 8, 4), (6, 4, 3, 2), (12, 6, 4, 4)])
def test_greedy_eagle_is_token_identical_on_a_batch(llama_dir, eagle_dir, tree):
    engine = eagle_engine(llama_dir, eagle_dir, eagle_tree=tree)
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS,
                                                      logprobs=0, logprobs_mode="raw"))
    for prompt, output in zip(PROMPTS, outputs):
        completion = output.outputs[0]
        assert completion.token_ids == hf_greedy(llama_dir, prompt, NEW_TOKENS)
        assert_target_logprobs(llama_dir, prompt, completion)
    counters = engine.speculation.counters
    assert counters.num_draft_tokens > 0 and counters.num_accepted_tokens > 0
    assert engine.cache_usage().num_used_blocks == 0
    assert engine.speculation.proposer.kv.usage().num_used_blocks == 0     # the draft's own cache is given back


def test_the_draft_reads_its_tokens_features(llama_dir, eagle_dir):
    """The head accepts several times more than the same head fed no features (a wiring check: wrong
    features, or features misaligned with their tokens, drop acceptance to the blind level). Measured
    here: 0.13 against 0.02 with a one-node tree."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    engine = eagle_engine(llama_dir, eagle_dir, eagle_tree=(1, 1, 1))
    engine.generate(PROMPTS, params)
    trained = engine.speculation.counters.acceptance_rate
    blind = eagle_engine(llama_dir, eagle_dir, eagle_tree=(1, 1, 1))
    observe = blind.speculation.proposer.observe
    blind.speculation.proposer.observe = lambda seq, hidden: observe(seq, torch.zeros_like(hidden))
    blind.generate(PROMPTS, params)
    assert trained > 0.08 and trained > 2.5 * blind.speculation.counters.acceptance_rate


def test_eagle_with_other_traffic_groups_stop_strings_and_preemption(llama_dir, eagle_dir):
    plain = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
    prompts = ["def add(a, b):", "class Stack:", "import os", "The quick brown fox"]
    reference = plain.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=30))
    stop = reference[0].outputs[0].text[4:7]
    params = [SamplingParams(temperature=0, max_tokens=30, stop=[stop]), SamplingParams(temperature=0, max_tokens=9, n=2),
              SamplingParams(temperature=0, max_tokens=12, speculative=False),
              SamplingParams(temperature=0.8, max_tokens=20, seed=4, n=2)]
    for blocks in (256, 16):           # 16 blocks of 4 tokens: sequences are preempted and recomputed
        engine = eagle_engine(llama_dir, eagle_dir, num_kv_blocks=blocks)
        assert_same_steps_match(engine, plain, prompts, params)
        assert engine.speculation.proposer.kv.usage().num_used_blocks == 0
    assert engine.counters.num_preemptions > 0


def test_exact_eagle_samples_the_plain_tokens(llama_dir, eagle_dir):
    plain = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
    params = SamplingParams(temperature=0.7, max_tokens=NEW_TOKENS, seed=3, n=2)
    for adaptive in (False, True):
        engine = eagle_engine(llama_dir, eagle_dir, speculative_adaptive=adaptive)
        for got, expected in zip(engine.generate(PROMPTS[:3], params), plain.generate(PROMPTS[:3], params)):
            assert [o.token_ids for o in got.outputs] == [o.token_ids for o in expected.outputs]
        assert engine.speculation.counters.num_draft_tokens > 0     # (the tiny model samples nearly uniformly)


@pytest.mark.parametrize("acceptance", ["typical", "lossless", "exact"])
def test_sampled_eagle_runs_and_reports_the_targets_logprobs(llama_dir, eagle_dir, acceptance):
    params = SamplingParams(temperature=0.7, max_tokens=NEW_TOKENS, seed=5, logprobs=1)
    assert_seeded_speculation(llama_dir, lambda: eagle_engine(llama_dir, eagle_dir, speculative_acceptance=acceptance),
                              PROMPTS[0], params)


@pytest.mark.parametrize("drawn", [None, (3, 2, 1)])
def test_lossless_eagle_proposes_drawn_candidates_with_their_distributions(llama_dir, eagle_dir, drawn):
    """The rejection rule needs each token's distribution: the draft's own (processed as the request
    samples), zero off the draft vocabulary, summing to one. By default a chain; a drawn tree (3, 2, 1)
    has 3 candidates under the root and 2 under the first, the path drafted on from the first, siblings
    distinct, each later sibling's distribution the first's without the earlier ones, renormalised."""
    engine = eagle_engine(llama_dir, eagle_dir, speculative_acceptance="lossless", eagle_drawn=drawn)
    proposer = engine.speculation.proposer
    seen = recorded_proposals(engine)
    engine.generate([PROMPTS[1]], SamplingParams(temperature=0.9, max_tokens=16, seed=1))
    drafted = [p for p in seen if p.token_ids]
    assert drafted
    off_vocab = torch.ones(384, dtype=torch.bool)
    off_vocab[proposer.draft.draft_vocab] = False
    for proposal in drafted:
        assert proposal.probs.shape == (len(proposal.token_ids), 384)
        torch.testing.assert_close(proposal.probs.sum(-1), torch.ones(len(proposal.token_ids)))
        assert float(proposal.probs[:, off_vocab].sum()) == 0.0
        assert all(float(proposal.probs[j, t]) > 0 for j, t in enumerate(proposal.token_ids))
        if drawn is None:
            assert proposal.parents is None
            continue
        full = len(proposal.token_ids) == 6
        assert proposal.parents == (-1, -1, -1, 0, 0, 3) or not full
        for first, siblings in ((0, (1, 2)), (3, (4,))):
            if max(siblings) >= len(proposal.token_ids):
                continue
            earlier = [proposal.token_ids[first]]
            for sibling in siblings:
                expected = proposal.probs[first].clone()
                expected[earlier] = 0.0
                torch.testing.assert_close(proposal.probs[sibling], expected / expected.sum())
                assert proposal.token_ids[sibling] not in earlier
                earlier.append(proposal.token_ids[sibling])
    assert any(len(p.token_ids) == 6 for p in drafted)


def test_sampled_drafts_over_the_draft_vocabulary_draw_what_the_whole_vocabulary_would(llama_dir, eagle_dir):
    """A sampled row's draft distribution runs over the draft's 200 columns where the request's pipeline
    only scales, truncates and bans: the same distribution and, from the same uniform, the same token as
    the pipeline over all 384 ids with the others at -inf; a penalised row takes the whole vocabulary."""
    from decoding.logits_processing import process_logits
    from decoding.sampling_metadata import SamplingMetadata
    from models.layers import spread_over_vocab

    engine = eagle_engine(llama_dir, eagle_dir)
    proposer = engine.speculation.proposer
    vocab = proposer.draft.draft_vocab
    eos = int(vocab[5])                                # an end token the draft can propose, banned below
    options = [dict(temperature=0.8, top_p=0.7), dict(temperature=1.3, top_k=7), dict(temperature=0.5, min_p=0.1),
               dict(temperature=1.0, min_tokens=4)]
    seqs = []
    for n, extra in enumerate(options):
        engine.add_request(PROMPTS[n % len(PROMPTS)], SamplingParams(max_tokens=8, seed=n, **extra))
        seqs += engine.scheduler.waiting[-1].seqs
    logits = torch.randn(len(seqs), vocab.numel(), generator=torch.Generator().manual_seed(0)) * 3
    for seed in range(20):
        for seq in seqs:
            seq.seed = seed
        batch = SamplingMetadata.from_sequences(seqs, 384, frozenset({eos}), torch.device("cpu"), drafted=[[]] * 4)
        assert batch.banned
        narrow, columns = proposer._sampling_distribution(logits, batch)
        assert narrow.shape == (4, vocab.numel()) and torch.equal(columns, vocab)
        wide = process_logits(spread_over_vocab(logits, vocab, 384), batch).logprobs.exp()
        torch.testing.assert_close(torch.zeros_like(wide).index_copy_(1, vocab, narrow), wide)
        assert float(narrow[3, 5]) == 0.0                                       # the ban reached its column
        assert torch.equal(vocab[proposer.sampler.sample(narrow, batch)], proposer.sampler.sample(wide, batch))
    engine.add_request(PROMPTS[0], SamplingParams(temperature=1.0, repetition_penalty=1.3, max_tokens=8))
    penalised = SamplingMetadata.from_sequences(engine.scheduler.waiting[-1].seqs, 384, frozenset({eos}),
                                                torch.device("cpu"))
    assert proposer._sampling_distribution(logits[:1], penalised)[1] is None


def test_the_tree_keeps_the_most_confident_candidates(llama_dir, eagle_dir):
    """Of the candidates a proposal grew, the `nodes` of highest cumulative draft log-probability are kept,
    parents before children; a tie goes to the shallower node (its parent is kept first)."""
    from decoding.speculative.eagle import _Candidate

    engine = eagle_engine(llama_dir, eagle_dir, eagle_tree=(4, 3, 3))
    proposer = engine.speculation.proposer
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))
    [seq] = engine.scheduler.waiting[0].seqs
    # depth 1: 10 (-0.1, the path), 11 (-2.0), 12 (-3.0); depth 2 under 10: 20 (-0.5), 21 (-2.0), 22 (-4.0);
    # depth 3 under 20: 30 (-1.5), 31 (-2.5), 32 (-5.0)
    candidates = [_Candidate(10, -0.1, 1, -1, 0), _Candidate(11, -2.0, 1, -1, 1), _Candidate(12, -3.0, 1, -1, 2),
                  _Candidate(20, -0.5, 2, 0, 0), _Candidate(21, -2.0, 2, 0, 1), _Candidate(22, -4.0, 2, 0, 2),
                  _Candidate(30, -1.5, 3, 3, 0), _Candidate(31, -2.5, 3, 3, 1), _Candidate(32, -5.0, 3, 3, 2)]
    proposal = proposer._proposal(seq, candidates, 8)
    assert proposal.token_ids == [10, 11, 20, 30] and proposal.parents == (-1, -1, 0, 2)
    assert proposer._proposal(seq, candidates, 2).token_ids == [10, 20]      # max_tokens bounds it



def test_each_level_expands_its_most_confident_candidates_that_could_still_be_kept(llama_dir, eagle_dir):
    """EAGLE-2's expansion: a level's `width` best candidates get draft rows, except those whose
    descendants could no longer be kept (the tree's `nodes` best already score at least as high)."""
    from decoding.speculative.eagle import _Candidate, _Growth

    engine = eagle_engine(llama_dir, eagle_dir, eagle_tree=(4, 3, 3, 2))
    proposer = engine.speculation.proposer
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))
    [seq] = engine.scheduler.waiting[0].seqs
    candidates = [_Candidate(10, -0.1, 1, -1, 0), _Candidate(11, -2.0, 1, -1, 1), _Candidate(12, -3.0, 1, -1, 2),
                  _Candidate(20, -0.5, 2, 0, 0), _Candidate(21, -2.0, 2, 0, 1), _Candidate(22, -4.0, 2, 0, 2)]
    grown = lambda n: _Growth(frontier=[], outputs=torch.zeros(1, 1), candidates=candidates[:n])  # noqa: E731
    assert proposer._expansions(grown(3), 1, seq, 8) == [0, 1]            # the level's two best
    # With level 2 drafted, 11 (-2.0) has 10, 20 and 21 at or above it: a child of it would be 5th.
    assert proposer._expansions(grown(6), 1, seq, 8) == [0]
    assert proposer._expansions(grown(6), 2, seq, 8) == [3]
    assert proposer._expansions(grown(6), 2, seq, 2) == []                # max_tokens 2: 10 and 20 fill it
    proposer.tree = EagleTree(4, 3, 3)                                      # width 1: the best path only
    assert proposer._expansions(grown(3), 1, seq, 8) == [0]


def test_lossless_eagle_draws_its_chain_from_the_distributions_it_states(llama_dir, eagle_dir):
    """What the rejection rule (tested on its own in test_speculative.py) needs of a proposer to keep the
    target's distribution: each draft token is drawn from the distribution the proposal states for it.
    Over 3000 proposals from one context with 3000 seeds, the first draft token's frequencies match the
    stated q (an exact binomial test per token), and so do the second's, given the most frequent first."""
    engine = eagle_engine(llama_dir, eagle_dir, speculative_acceptance="lossless")
    proposer = engine.speculation.proposer
    engine.add_request(PROMPTS[2], SamplingParams(temperature=0.25, max_tokens=8, seed=0))
    engine.step()                                       # the prompt, its first token, its feature observed
    [seq] = engine.scheduler.running[0].seqs
    state = proposer._states[seq.seq_id]
    features, computed = list(state.features), state.num_computed
    firsts, seconds, q_first, q_second = [], {}, None, {}
    for seed in range(3000):
        seq.seed = seed
        state.features = list(features)
        proposer.kv.roll_back(state, computed)
        [proposal] = proposer.propose([seq], [2])
        first, second = proposal.token_ids
        firsts.append(first)
        q_first = proposal.probs[0] if q_first is None else q_first
        torch.testing.assert_close(proposal.probs[0], q_first)            # one context, one distribution
        seconds.setdefault(first, []).append(second)
        q_second.setdefault(first, proposal.probs[1])

    assert within_binomial_bounds(firsts, q_first)
    common = max(seconds, key=lambda token: len(seconds[token]))
    assert len(seconds[common]) >= 300
    assert within_binomial_bounds(seconds[common], q_second[common])


@pytest.mark.parametrize("drawn", [None, (3, 2, 1)])
def test_lossless_eagle_samples_follow_the_targets_distribution(llama_dir, eagle_dir, drawn):
    assert_lossless_sampling_follows_the_target(llama_dir, eagle_engine(llama_dir, eagle_dir, eagle_drawn=drawn,
                                                                        speculative_acceptance="lossless"))


def test_training_continues_from_a_saved_head(llama_dir, eagle_dir):
    """--init: the training module takes a saved head's fc and layer as they were saved."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from training.eagle_distill import EagleTrainingHead

    state = load_file(f"{eagle_dir}/model.safetensors")
    head = EagleTrainingHead(AutoConfig.from_pretrained(llama_dir), torch.zeros(384, 64), torch.zeros(200, 64))
    head.load_head_state(state)
    saved = head.head_state()
    assert set(saved) == set(state) - {"d2t"}
    for name, tensor in saved.items():
        assert torch.equal(tensor, state[name].float()), name


@pytest.mark.smollm2
def test_smollm2_with_its_shipped_head_is_identical_and_accepts():
    """`Engine(model="smollm2", speculative="eagle")` takes the head shipped for it, over the GGUF's own blocks
    as plain decoding runs them: greedy outputs equal plain decoding's, and on held-out chat prompts the head
    gains well over one token per forward."""
    from models.catalog import shipped_heads
    from training.chat_prompts import chat_prompt_ids, prompts

    assert shipped_heads("smollm2", "eagle") is not None
    plain = Engine(model="smollm2", show_progress=False)
    eagle = Engine(model="smollm2", show_progress=False, speculative="eagle", speculative_adaptive=False)
    assert eagle.loaded.quantization == plain.loaded.quantization is not None      # the GGUF's own blocks
    assert eagle.speculation.proposer.tree == EagleTree(3, 3, 2, 1, drawn=(3, 1, 1))     # the head's quantized_tree
    chats = [chat_prompt_ids(plain.tokenizer, text) for text in prompts("heldout")[:2]]
    params = SamplingParams(temperature=0, max_tokens=64)
    for got, expected in zip(eagle.generate(chats, params), plain.generate(chats, params)):
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids
    assert eagle.speculation.counters.mean_acceptance_length > 1.6     # 2.05 on the benchmark's 8 prompts
    # Lossless sampling with the drawn tree keeps its later draws too (about 2.0 per verification at T = 0.7
    # on the benchmark's prompts; one seed of two answers varies more).
    lossless = Engine(model="smollm2", show_progress=False, speculative="eagle", speculative_adaptive=False,
                      speculative_acceptance="lossless")
    verdicts, verify = [], lossless.speculation.verify

    def recording(*args):
        verdicts.extend(step_verdicts := verify(*args))
        return step_verdicts

    lossless.speculation.verify = recording
    lossless.generate(chats, SamplingParams(temperature=0.7, max_tokens=64, seed=0))
    assert lossless.speculation.counters.mean_acceptance_length > 1.5
    assert any(verdict.rows[:1] in ([2], [3]) for verdict in verdicts)     # a second or third draw kept


def test_steps_chained_while_eagle_is_off_give_its_draft_every_feature(llama_dir, eagle_dir):
    """Above speculative_disable_by_batch_size the engine chains plain decode steps (decoding/multi_step.py)
    and hands the draft the target's features of every token they made: once the batch shrinks and EAGLE
    proposes again, its proposals are those of an engine that took every step singly, and so are the
    tokens. (About the Python proposer: the native chain, which would take the lone request's speculating
    steps once the other ends, is off here; with it on, the next test.)"""
    assert_chained_steps_keep_the_proposer_in_step(
        llama_dir, lambda **options: without_native_chain(eagle_engine(llama_dir, eagle_dir, **options)))


def test_the_native_chain_catches_up_on_the_features_of_chained_plain_steps(llama_dir, eagle_dir):
    """After plain steps chained while speculation was off, the native chain's first catch-up covers every
    token they made: its rounds keep what the Python steps keep, and the tokens are plain greedy's."""
    params = [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)]
    runs = []
    for native in (True, False):
        engine = eagle_engine(llama_dir, eagle_dir, speculative_disable_by_batch_size=1, decode_steps=8)
        if not native:
            without_native_chain(engine)
        outputs = engine.generate([PROMPTS[0], PROMPTS[1]], params)
        counters = engine.speculation.counters
        runs.append(([o.outputs[0].token_ids for o in outputs], counters.num_drafts, counters.accepted_per_position))
        assert engine.multi_step.num_calls > 0 and (engine.speculating_chain.num_calls > 0) == native
    assert runs[0] == runs[1] and runs[0][1] > 0
    plain = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
    assert runs[0][0] == [o.outputs[0].token_ids for o in plain.generate([PROMPTS[0], PROMPTS[1]], params)]

# ---- the native EAGLE chain (decoding/speculative/chain.py, eagle_chain.py) ---------------------------


@pytest.mark.parametrize("tree", [None, (1, 1, 1), (3, 2, 3), (6, 4, 3, 2), (12, 6, 4, 4)])
def test_native_chain_decodes_plain_greedy_with_the_python_steps_proposals(llama_dir, eagle_dir, tree):
    """A lone greedy request's speculating rounds run several to a call: the tokens are HF's greedy ones, the
    rounds propose and keep what the engine's Python steps propose and keep, and the draft's cache comes
    back whole."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    for engine in assert_chain_runs_as_single_steps(lambda: eagle_engine(llama_dir, eagle_dir, eagle_tree=tree),
                                                    llama_dir, params):
        assert engine.speculation.proposer.kv.usage().num_used_blocks == 0


@pytest.mark.parametrize("mode", ["processed", "raw"])
def test_native_chain_samples_the_plain_tokens_and_logprobs(llama_dir, eagle_dir, mode):
    """A lone sampled request under exact acceptance: the draft draws each level's row as the Python proposer
    draws it and the target's rows draw as plain sampling draws at their positions, so the chain emits plain
    sampling's tokens and logprobs, and proposes and keeps what the Python steps do."""
    # ignore_eos rather than min_tokens: raw logprobs of rows with banned tokens are not drawn natively.
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0,
                            logprobs_mode=mode)
    assert_chain_runs_as_single_steps(lambda: eagle_engine(llama_dir, eagle_dir, eagle_tree=(4, 3, 3)), llama_dir,
                                      params)


def test_native_chain_ends_where_single_steps_end(llama_dir, eagle_dir):
    """Stop strings, stop tokens held back by min_tokens (banned in the draft's draws too), and max_tokens
    reached inside a round end the request where plain decoding ends it; a streamed request gets its tokens
    round by round; the draft's cache comes back whole."""
    engine = eagle_engine(llama_dir, eagle_dir)
    assert_speculating_chain_ends_where_plain_ends(engine, llama_dir, sampled_stop=True)
    assert engine.speculation.proposer.kv.usage().num_used_blocks == 0
