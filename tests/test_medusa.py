"""Medusa: the heads and their published format, tree buffers, tree verification, and decoding end to end."""

import json
import math

import pytest
import torch

from decoding import Engine, SamplingParams
from decoding.step_plan import TokenTree
from decoding.speculative.medusa import DEFAULT_CHOICES, tree_parents
from decoding.speculative.proposer import Proposal
from models import kernels
from models.loader import DEFAULT_MEDUSA_DIR
from models.medusa import MedusaHeads
from tiny_models import (PROMPTS, assert_chain_runs_as_single_steps, assert_chained_steps_keep_the_proposer_in_step,
                         assert_speculating_chain_ends_where_plain_ends,
                         assert_lossless_sampling_follows_the_target, assert_quantized_speculation_is_plain_decoding,
                         assert_same_steps_match, assert_seeded_speculation, assert_target_logprobs, hf_greedy,
                         hf_logits, recorded_proposals)

NEW_TOKENS = 24
CHOICES = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))


@pytest.fixture(scope="session")
def heads_dir(tmp_path_factory, llama_dir):
    """Random (untrained) heads for the tiny Llama, saved in the published format."""
    torch.manual_seed(0)
    heads = MedusaHeads(64, 384, num_heads=3)
    with torch.no_grad():
        for param in heads.parameters():
            param.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("medusa")
    heads.save(folder, llama_dir)
    return str(folder)


def medusa_engine(llama_dir, heads_dir, **overrides):
    options = dict(show_progress=False, num_kv_blocks=256, block_size=4, speculative="medusa",
                   medusa_heads=heads_dir, medusa_choices=CHOICES, speculative_adaptive=False)
    return Engine(model=llama_dir, **(options | overrides))


# ---- heads and the published format --------------------------------------------------------------

class _ReferenceResBlock(torch.nn.Module):
    """The Medusa repository's ResBlock, written out independently of models/medusa.py."""

    def __init__(self, hidden):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden)
        self.act = torch.nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def test_heads_saved_in_the_published_format_load_and_agree(tmp_path):
    torch.manual_seed(1)
    hidden, vocab, num_heads, num_layers = 32, 50, 3, 2
    published = torch.nn.ModuleList(
        torch.nn.Sequential(*[_ReferenceResBlock(hidden) for _ in range(num_layers)],
                            torch.nn.Linear(hidden, vocab, bias=False))
        for _ in range(num_heads))
    torch.save(published.state_dict(), tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps(
        {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers, "base_model_name_or_path": "some/model"}))
    heads = MedusaHeads.load(tmp_path, hidden_size=hidden, vocab_size=vocab)
    x = torch.randn(5, hidden)
    expected = torch.stack([head(x) for head in published])
    torch.testing.assert_close(heads(x), expected)
    with pytest.raises(ValueError, match="hidden_size 32, the model has 64"):
        MedusaHeads.load(tmp_path, hidden_size=64, vocab_size=vocab)
    with pytest.raises(ValueError, match="no config.json"):
        MedusaHeads.load(tmp_path / "missing")


def test_untrained_heads_start_from_the_models_own_head():
    heads = MedusaHeads(16, 30, num_heads=2)
    lm_head = torch.randn(30, 16)
    heads.init_projections(lm_head)
    heads.prepare_for_inference()
    assert heads._shared_projection is not None          # one matmul for all heads
    x = torch.randn(4, 16)
    # Zero-initialised ResBlock weights: each head sees x shifted by SiLU(its bias), then the model's head.
    expected = torch.stack([(x + torch.nn.functional.silu(head[0].linear.bias)) @ lm_head.t() for head in heads.heads])
    torch.testing.assert_close(heads(x), expected)


def test_heads_stored_from_the_targets_head_project_through_it(tmp_path):
    """Heads trained on the frozen output head and stored in bfloat16 project through the target's own
    head (full precision, one copy); heads with any other projection keep theirs."""
    from models.layers import FusedLinear

    torch.manual_seed(2)
    hidden, vocab = 16, 40
    output_head = FusedLinear(hidden, [vocab], [False], torch.float32, "cpu")
    weight = torch.randn(vocab, hidden)
    output_head.slots(["w"], [None])["w"].copy_(weight)
    heads = MedusaHeads(hidden, vocab, num_heads=2)
    heads.init_projections(weight)
    heads.save(tmp_path / "bf16", "base", torch.bfloat16)
    loaded = MedusaHeads.load(tmp_path / "bf16")
    x = torch.randn(3, hidden)
    assert loaded.use_output_head(output_head)
    features = loaded._features(x)
    torch.testing.assert_close(loaded(x), features @ weight.t())

    other = MedusaHeads(hidden, vocab, num_heads=2)
    other.init_projections(weight + 0.1)
    other.save(tmp_path / "other", "base")
    assert not MedusaHeads.load(tmp_path / "other").use_output_head(output_head)


def test_draft_vocabulary_heads_save_only_their_blocks_and_score_their_tokens(tmp_path):
    """Heads over a draft vocabulary whose projections are the output head's rows: the file holds the
    ResBlocks and the token ids only; loaded beside the model's head they score exactly those rows, map
    ranks back to the model's ids, and spread over the whole vocabulary with -inf elsewhere."""
    torch.manual_seed(3)
    hidden, vocab = 16, 60
    weight = torch.randn(vocab, hidden)
    draft_vocab = torch.tensor([2, 5, 7, 11, 40, 59])
    heads = MedusaHeads(hidden, vocab, num_heads=3, draft_vocab=draft_vocab)
    heads.init_projections(weight)
    with torch.no_grad():
        for head in heads.heads:
            head[0].linear.weight.normal_(0, 0.3)
    heads.save(tmp_path / "pruned", "base", omit_projection=True)
    state = torch.load(tmp_path / "pruned" / "medusa_lm_head.pt", weights_only=True)
    assert not any(name.endswith(".1.weight") for name in state)               # no projection stored
    with pytest.raises(ValueError, match="beside their model"):
        MedusaHeads.load(tmp_path / "pruned")
    with pytest.raises(ValueError, match="vocab_size 60, the model has 61"):
        MedusaHeads.load(tmp_path / "pruned", vocab_size=61, output_head=weight)
    loaded = MedusaHeads.load(tmp_path / "pruned", vocab_size=vocab, output_head=weight)
    x = torch.randn(4, hidden)
    expected = torch.stack([(head[0](x)) @ weight[draft_vocab].t() for head in heads.heads])
    logits = loaded(x)
    torch.testing.assert_close(logits, expected)
    best = loaded.token_ids(logits.argmax(-1))
    assert torch.equal(best, draft_vocab[expected.argmax(-1)])
    # Trained projections cannot be left out; a draft vocabulary must fit the model's.
    trained = MedusaHeads(hidden, vocab, num_heads=1, draft_vocab=draft_vocab)
    with pytest.raises(ValueError, match="only frozen output-head projections"):
        trained.save(tmp_path / "trained", "base", omit_projection=True)
    with pytest.raises(ValueError, match="token ids below 60"):
        MedusaHeads(hidden, vocab, num_heads=1, draft_vocab=torch.tensor([3, 60]))


def test_pruned_heads_score_the_same_tokens_as_before(llama_dir, tmp_path):
    """Heads on the frozen output head, pruned to a draft vocabulary without retraining: on those tokens
    their logits are the unpruned heads' own; the tree in the config goes along."""
    from collections import Counter

    from transformers import AutoModelForCausalLM

    from training.medusa_prune import prune

    lm_head = AutoModelForCausalLM.from_pretrained(llama_dir).get_output_embeddings().weight.detach()
    torch.manual_seed(5)
    heads = MedusaHeads(64, 384, num_heads=3)
    heads.init_projections(lm_head)
    with torch.no_grad():
        for head in heads.heads:
            head[0].linear.weight.normal_(0, 0.2)
    heads.save(tmp_path / "full", llama_dir)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    (tmp_path / "full" / "config.json").write_text(json.dumps(config | {"medusa_choices": [[0], [1]]}))
    counts = Counter({token: 1000 - token for token in range(300)})
    figures = prune(llama_dir, tmp_path / "full", tmp_path / "pruned", 50, counts)
    assert figures["draft_vocab"] == 50 and 0 < figures["coverage"] < 1
    pruned = MedusaHeads.load(tmp_path / "pruned", output_head=lm_head)
    assert pruned.choices == ((0,), (1,)) and pruned.draft_vocab.numel() == 50
    x = torch.randn(3, 64)
    full = MedusaHeads.load(tmp_path / "full")(x)
    torch.testing.assert_close(pruned(x), full[..., pruned.draft_vocab])
    engine = medusa_engine(llama_dir, str(tmp_path / "pruned"))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    [out] = engine.generate([PROMPTS[0]], params)
    assert out.outputs[0].token_ids == hf_greedy(llama_dir, PROMPTS[0], NEW_TOKENS)


@pytest.mark.skipif(not kernels.native_ops_available(torch.device("cpu"), torch.float32),
                    reason="the native CPU kernels did not build")
@pytest.mark.parametrize("shared", [True, False], ids=["shared-projection", "own-projections"])
def test_native_heads_compute_the_used_heads_as_the_module_does(shared):
    """The proposer's heads on the native products: in float32 the first `used` heads' logits are the
    module's; in Q8_0 (the default) they stay close, and rank the same token first where the module's
    margin is clear; bad weight names are refused."""
    from models.medusa_native import NativeMedusaHeads

    torch.manual_seed(6)
    hidden, vocab = 64, 200
    heads = MedusaHeads(hidden, vocab, num_heads=4, num_layers=2)
    with torch.no_grad():
        for param in heads.parameters():
            param.normal_(0, 0.2)
        if shared:
            heads.init_projections(torch.randn(vocab, hidden))
    heads.prepare_for_inference()
    assert (heads.shared_projection is not None) == shared
    x = torch.randn(5, hidden)
    with torch.inference_mode():
        expected = heads(x)
        for used in (1, 3):
            torch.testing.assert_close(NativeMedusaHeads(heads, used, "float")(x), expected[:used], atol=1e-4, rtol=1e-4)
        quantized = NativeMedusaHeads(heads, 4, "q8_0")(x)
    scale = expected.abs().max()
    assert (quantized - expected).abs().max() < 0.05 * scale
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1 * scale
    assert clear.sum() > 5
    assert torch.equal(quantized.argmax(-1)[clear], expected.argmax(-1)[clear])
    with pytest.raises(ValueError, match="'float' or one of"):
        NativeMedusaHeads(heads, 2, "fp4")
    with pytest.raises(ValueError, match="5 heads asked of 4"):
        NativeMedusaHeads(heads, 5)


def test_a_tree_in_the_heads_config_is_the_proposers_default(llama_dir, heads_dir, tmp_path):
    import shutil

    folder = tmp_path / "with-tree"
    shutil.copytree(heads_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["medusa_choices"] = [[0], [0, 0], [1]]
    (folder / "config.json").write_text(json.dumps(config))
    assert MedusaHeads.load(folder).choices == ((0,), (0, 0), (1,))
    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=64, block_size=4, speculative="medusa",
                    medusa_heads=str(folder))
    assert engine.speculation.proposer.choices == ((0,), (0, 0), (1,))
    named = Engine(model=llama_dir, show_progress=False, num_kv_blocks=64, block_size=4, speculative="medusa",
                   medusa_heads=str(folder), medusa_choices=((0,),))
    assert named.speculation.proposer.choices == ((0,),)
    # The heads' quantized tree is the default over quantized weights only; medusa_choices still wins.
    config["quantized_medusa_choices"] = [[0], [1]]
    (folder / "config.json").write_text(json.dumps(config))
    options = dict(model=llama_dir, show_progress=False, num_kv_blocks=64, block_size=4, speculative="medusa",
                   medusa_heads=str(folder))
    assert Engine(**options).speculation.proposer.choices == ((0,), (0, 0), (1,))
    assert Engine(**options, quantization="int8").speculation.proposer.choices == ((0,), (1,))
    assert Engine(**options, quantization="int8", medusa_choices=((0,),)).speculation.proposer.choices == ((0,),)


# ---- tree buffers --------------------------------------------------------------------------------

def test_tree_buffers():
    parents = tree_parents(CHOICES)
    assert parents == (-1, -1, 0, 0, 1, 2)
    proposal = Proposal([10, 11, 12, 13, 14, 15], parents=parents)
    tree = TokenTree((-1, *proposal.parent_rows()))
    # Positions are depths: the last known token at 0, then each node one deeper than its parent.
    assert tree.depths() == [0, 1, 1, 2, 2, 2, 3]
    visibility = torch.tensor(tree.visibility())
    for node, parent in enumerate(tree.parents):
        ancestors = {node}
        while parent >= 0:
            ancestors.add(parent)
            parent = tree.parents[parent]
        assert set(torch.nonzero(visibility[node]).flatten().tolist()) == ancestors   # ancestors only
    # Paths go root to leaf: each node's path is its parent's path plus its own token.
    assert proposal.path(5) == [10, 12, 15] and proposal.path(4) == [11, 14] and proposal.path(0) == [10]
    with pytest.raises(ValueError, match="no parent"):
        tree_parents(((0,), (1, 0)))


def test_default_tree_is_valid():
    parents = tree_parents(DEFAULT_CHOICES)
    assert all(p < i for i, p in enumerate(parents))


# ---- verification and decoding ---------------------------------------------------------------------

def test_tree_verification_logits_equal_sequential_decoding_of_each_path(llama_dir, heads_dir):
    engine = medusa_engine(llama_dir, heads_dir)
    captured = []
    verify = engine.speculation.verify

    def capturing(chains, logits, masks):
        for chain in chains:
            captured.append((list(chain.seq.token_ids), engine.speculation._proposals[chain.seq.seq_id],
                             logits.chunk[chain.seq.seq_id].clone()))
        return verify(chains, logits, masks)

    engine.speculation.verify = capturing
    engine.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=10, min_tokens=10))
    assert captured and any(p.parents is not None and len(p.token_ids) > 2 for _, p, _ in captured)
    for tokens, proposal, rows in captured[:6]:
        assert torch.allclose(rows[0], hf_logits(llama_dir, tokens)[-1], atol=1e-4)
        for node in range(len(proposal.token_ids)):
            expected = hf_logits(llama_dir, tokens + proposal.path(node))[-1]
            assert torch.allclose(rows[node + 1], expected, atol=1e-4)


@pytest.mark.parametrize("weights", ["q8_0", "float"])
def test_greedy_medusa_is_token_identical_on_a_batch(llama_dir, heads_dir, weights):
    engine = medusa_engine(llama_dir, heads_dir, medusa_weights=weights)
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS,
                                                      logprobs=0, logprobs_mode="raw"))
    for prompt, output in zip(PROMPTS, outputs):
        completion = output.outputs[0]
        assert completion.token_ids == hf_greedy(llama_dir, prompt, NEW_TOKENS)
        # Logprobs come from the cache after tree compaction and rollback: equal to a fresh forward.
        assert_target_logprobs(llama_dir, prompt, completion)
    assert engine.speculation.counters.num_draft_tokens > 0
    assert engine.cache_usage().num_used_blocks == 0


def test_medusa_with_other_traffic_groups_and_stop_strings(llama_dir, heads_dir):
    plain = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
    engine = medusa_engine(llama_dir, heads_dir)
    prompts = ["def add(a, b):", "class Stack:", "import os"]
    reference = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=30))
    stop = reference[0].outputs[0].text[4:7]
    params = [SamplingParams(temperature=0, max_tokens=30, stop=[stop]), SamplingParams(temperature=0, max_tokens=9, n=2),
              SamplingParams(temperature=0, max_tokens=12, speculative=False)]
    assert_same_steps_match(engine, plain, prompts, params)


def test_exact_medusa_samples_the_plain_tokens(llama_dir, heads_dir):
    """The exact rule over Medusa's trees: sampled requests get plain sampling's tokens, token for token."""
    plain = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
    params = SamplingParams(temperature=0.7, max_tokens=NEW_TOKENS, seed=3, n=2)
    for adaptive in (False, True):
        engine = medusa_engine(llama_dir, heads_dir, speculative_adaptive=adaptive)
        for got, expected in zip(engine.generate(PROMPTS[:3], params), plain.generate(PROMPTS[:3], params)):
            assert [o.token_ids for o in got.outputs] == [o.token_ids for o in expected.outputs]
        assert engine.speculation.counters.num_draft_tokens > 0


@pytest.mark.parametrize("acceptance", ["typical", "lossless", "exact"])
def test_sampled_medusa_runs_and_reports_the_targets_logprobs(llama_dir, heads_dir, acceptance):
    params = SamplingParams(temperature=0.7, max_tokens=NEW_TOKENS, seed=5, logprobs=1)
    assert_seeded_speculation(llama_dir, lambda: medusa_engine(llama_dir, heads_dir, medusa_acceptance=acceptance),
                              PROMPTS[0], params)


def test_lossless_medusa_verifies_its_tree_and_keeps_the_targets_distribution(llama_dir, heads_dir):
    """Lossless sampled requests get the same tree of the heads' best candidates as greedy ones, verified
    by the tree rule (tested alone in test_speculative.py); the samples follow the target's distribution."""
    engine = medusa_engine(llama_dir, heads_dir, medusa_acceptance="lossless")
    seen = recorded_proposals(engine)
    assert_lossless_sampling_follows_the_target(llama_dir, engine, min_kept=0.0)
    assert seen and all(p.parents == tree_parents(CHOICES) and p.probs is None for p in seen if p.token_ids)


def test_medusa_over_quantized_weights_decodes_as_plain_decoding(llama_dir, heads_dir):
    assert_quantized_speculation_is_plain_decoding(llama_dir, lambda **options: medusa_engine(llama_dir, heads_dir,
                                                                                             **options))


def test_configuration_errors(llama_dir, heads_dir, tmp_path):
    with pytest.raises(ValueError, match="medusa_acceptance"):
        medusa_engine(llama_dir, heads_dir, medusa_acceptance="sometimes")
    with pytest.raises(ValueError, match="medusa_weights must be one of float, q8_0"):
        medusa_engine(llama_dir, heads_dir, medusa_weights="fp4")
    with pytest.raises(ValueError, match="only 3 heads"):
        medusa_engine(llama_dir, heads_dir, medusa_choices=((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="medusa_num_heads"):
        medusa_engine(llama_dir, str(tmp_path))


@pytest.mark.skipif(not (DEFAULT_MEDUSA_DIR / "config.json").exists(), reason="the default heads are not built")
def test_default_model_with_its_heads_is_identical_and_accepts():
    plain = Engine(show_progress=False)
    engine = Engine(show_progress=False, speculative="medusa")
    prompts = ["def fibonacci(n):", "import os\n\ndef main():\n"]
    params = SamplingParams(temperature=0, max_tokens=40)
    for a, b in zip(engine.generate(prompts, params), plain.generate(prompts, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert engine.speculation.counters.num_accepted_tokens > 0
    assert math.isfinite(engine.speculation.counters.mean_acceptance_length)


def test_training_heads_for_an_hf_model_saves_loadable_heads(llama_dir, tmp_path):
    """`gorgon train medusa` end to end on the tiny Llama: a few seeded steps, heads in the published
    format, per-head accuracies on held-out text."""
    from server.cli import main as gorgon

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 30 for i in range(20)]
    for name, part in (("train.jsonl", texts[:16]), ("heldout.jsonl", texts[16:])):
        (corpus / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    out = tmp_path / "heads"
    assert gorgon(["train", "medusa", "--model", llama_dir, "--out", str(out), "--corpus", str(corpus),
                   "--heads", "2", "--max-steps", "3", "--batch-size", "2"]) == 0
    heads = MedusaHeads.load(out / "final", hidden_size=64, vocab_size=384)
    assert heads.num_heads == 2 and heads._shared_projection is not None
    evaluation = json.loads((out / "final" / "evaluation.json").read_text())
    assert len(evaluation["text_top1"]) == 2 and all(0 <= a <= 1 for a in evaluation["model_top1"])
    assert '"step": 3' in (out / "train.log").read_text()


def test_self_distillation_data_continues_corpus_windows(llama_dir):
    from training.medusa import corpus_windows, generated_texts

    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 6 for i in range(8)]
    samples = generated_texts(llama_dir, texts, 4, 6, [0.0, 1.0], seed=3, prompt_tokens=8)
    assert len(samples) == 4
    assert samples == generated_texts(llama_dir, texts, 4, 6, [0.0, 1.0], seed=3, prompt_tokens=8)
    # The first half: each window followed by the model's own greedy continuation.
    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=64, block_size=4)
    windows = corpus_windows([engine.tokenizer(t, add_special_tokens=False).input_ids for t in texts], 4, 8, 3)
    greedy = engine.generate(windows[:2], SamplingParams(temperature=0, max_tokens=6))
    assert samples[:2] == [engine.tokenizer.decode(w + o.outputs[0].token_ids) for w, o in zip(windows, greedy)]


def test_tree_tuning_walks_continuations_like_the_decoder():
    from training.medusa_tree import grow_tree, tokens_per_step

    # Position ranks (head 0, head 1): the first position accepts two drafts with the tree {0, 00}, and
    # the decoder then jumps over the next two positions, whose ranks must not count.
    continuation = [(0, 0), (5, 5), (5, 5), (1, 5), (0, 5)]
    tree = {(0,), (0, 0)}
    assert tokens_per_step(tree, [continuation]) == pytest.approx((3 + 1 + 2) / 3)
    assert tokens_per_step(set(), [continuation]) == 1.0
    grown = grow_tree([continuation] * 3, max_nodes=3, top_k=4)
    assert [path for path, _ in grown][:2] == [(0,), (0, 0)]   # each node after its parent, best first
    assert all(score >= 1.0 for _, score in grown)
    assert all(max(path) < 4 for path, _ in grown)             # ranks past top_k are never candidates


# ---- heads for an instruct model: self-distilled chat answers, a draft vocabulary ----------------

def test_chat_prompts_split_by_subject_and_are_stable():
    from training.chat_prompts import SUBJECTS, TEMPLATES, is_heldout, prompts

    train, heldout = set(prompts("train")), prompts("heldout")
    assert len(train) > 1000 and len(heldout) > 100 and not train & set(heldout)
    assert prompts("heldout") == heldout                                     # deterministic
    held_subjects = [s for s in SUBJECTS if is_heldout(s)]
    asked = {template.format(s=subject) for subject in held_subjects for template in TEMPLATES}
    assert held_subjects and asked <= set(heldout) and not asked & train


@pytest.fixture(scope="module")
def answers_file(llama_dir, tmp_path_factory):
    """The tiny Llama's own answers to 12 chat prompts, half greedy, half sampled."""
    from training.self_distill import generate

    path = tmp_path_factory.mktemp("answers") / "answers.jsonl"
    assert generate(llama_dir, path, 12, [0.0, 1.0], max_tokens=16, seed=0) == 12
    return path


def test_self_distilled_answers_are_the_models_own(llama_dir, answers_file):
    from training.draft_features import read_samples
    from training.self_distill import generate

    samples = read_samples(answers_file)
    assert [s["temperature"] for s in samples] == [0.0] * 6 + [1.0] * 6
    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=64, block_size=4)
    [greedy] = engine.generate([samples[0]["prompt"]], SamplingParams(temperature=0, max_tokens=16))
    assert samples[0]["answer"] == greedy.outputs[0].token_ids
    assert generate(llama_dir, answers_file, 12, [0.0, 1.0], max_tokens=16, seed=0) == 12   # nothing re-done
    assert len(read_samples(answers_file)) == 12


def test_answer_features_hold_the_models_hidden_states_and_the_tokens_after(llama_dir, answers_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.draft_features import LOOKAHEAD, answer_features, draft_vocabulary, read_samples

    samples = read_samples(answers_file)
    features = answer_features(llama_dir, samples, tmp_path / "features.pt")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    sample = samples[3]
    sequence = sample["prompt"] + sample["answer"]
    rows = (features.sample == 3).nonzero().squeeze(1)
    assert rows.numel() == len(sample["answer"])
    with torch.no_grad():
        states = model.model(torch.tensor([sequence])).last_hidden_state[0]
    start = len(sample["prompt"]) - 1
    torch.testing.assert_close(features.hidden[rows].float(), states[start : start + rows.numel()], atol=2e-3, rtol=2e-3)
    for r, t in enumerate(range(start, len(sequence) - 1)):
        expected = [sequence[t + 1 + j] if t + 1 + j < len(sequence) else -1 for j in range(LOOKAHEAD)]
        assert features.next_tokens[rows[r]].tolist() == expected
    again = answer_features(llama_dir, samples, tmp_path / "features.pt")      # from the cache
    assert torch.equal(again.hidden, features.hidden)
    vocab = draft_vocabulary(samples, 10, always=(0,))
    assert vocab.numel() == 10 and 0 in vocab.tolist() and torch.equal(vocab, vocab.sort().values)


def test_heads_trained_on_answers_decode_identically_and_tune_a_tree(llama_dir, answers_file, tmp_path):
    """`gorgon train medusa --answers --draft-vocab` end to end on the tiny Llama: heads saved without
    projections, loaded by the engine beside the model; greedy decoding equals HF's, lossless sampling is
    seeded-reproducible; the tree tool reads the held-out answers."""
    from server.cli import main as gorgon
    from training.medusa_tree import rank_vectors_from_answers

    out = tmp_path / "heads"
    assert gorgon(["train", "medusa", "--model", llama_dir, "--out", str(out), "--answers", str(answers_file),
                   "--heads", "3", "--draft-vocab", "40", "--max-steps", "4", "--warmup", "1"]) == 0
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["draft_vocab_size"] == 40 and config["projection"] == "output_head"
    evaluation = json.loads((out / "final" / "evaluation.json").read_text())
    assert len(evaluation["top1"]) == 3 and all(0 <= a <= b <= 1 for a, b in zip(evaluation["top1"], evaluation["top8"]))
    engine = medusa_engine(llama_dir, str(out / "final"))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    for prompt, output in zip(PROMPTS[:2], engine.generate(PROMPTS[:2], params)):
        assert output.outputs[0].token_ids == hf_greedy(llama_dir, prompt, NEW_TOKENS)
    assert engine.speculation.counters.num_draft_tokens > 0
    lossless = SamplingParams(temperature=0.8, max_tokens=12, seed=4)
    runs = [medusa_engine(llama_dir, str(out / "final"), medusa_acceptance="lossless").generate([PROMPTS[0]], lossless)
            for _ in range(2)]
    assert runs[0][0].outputs[0].token_ids == runs[1][0].outputs[0].token_ids
    continuations = rank_vectors_from_answers(llama_dir, str(out / "final"), answers_file, top_k=4)
    assert continuations and all(len(v) == 3 and max(v) <= 4 for c in continuations for v in c)


@pytest.mark.smollm2
def test_smollm2_with_its_shipped_heads_is_identical_and_accepts():
    """`Engine(model="smollm2", speculative="medusa")` takes the heads shipped for it (a draft vocabulary,
    projections from the model's own head) over the GGUF's own Q4_1 blocks, as plain decoding runs it:
    greedy and exact-rule sampled outputs equal plain decoding's (a quantized row's products are exact
    integer sums, so a tree row is its decode row bit for bit), and on held-out chat prompts the heads gain
    well over one token per forward."""
    from models.catalog import shipped_heads
    from training.chat_prompts import chat_prompt_ids, prompts

    assert shipped_heads("smollm2", "medusa") is not None
    plain = Engine(model="smollm2", show_progress=False)
    medusa = Engine(model="smollm2", show_progress=False, speculative="medusa", speculative_adaptive=False)
    assert medusa.loaded.quantization == plain.loaded.quantization is not None
    chats = [chat_prompt_ids(plain.tokenizer, text) for text in prompts("heldout")[:2]]
    for params in (SamplingParams(temperature=0, max_tokens=64), SamplingParams(temperature=0.7, max_tokens=64, seed=0)):
        for got, expected in zip(medusa.generate(chats, params), plain.generate(chats, params)):
            assert got.outputs[0].token_ids == expected.outputs[0].token_ids
    assert medusa.speculation.counters.mean_acceptance_length > 1.4     # 1.68 on the benchmark's 8 prompts


@pytest.mark.skipif(not kernels.native_ops_available(torch.device("cpu"), torch.float32),
                    reason="the native kernels do not build here")
def test_steps_chained_while_medusa_is_off_leave_the_heads_the_newest_state(llama_dir, heads_dir):
    """Above speculative_disable_by_batch_size the engine chains plain decode steps (decoding/multi_step.py)
    and hands the heads each sequence's newest hidden state: once the batch shrinks and Medusa proposes
    again, its proposals are those of an engine that took every step singly, and so are the tokens."""
    # About the Python proposer after chained plain steps: the native Medusa chain, which would take the
    # lone request's speculating steps once the other ends, is off here (its own tests are below).
    assert_chained_steps_keep_the_proposer_in_step(
        llama_dir, lambda **options: without_native_chain(medusa_engine(llama_dir, heads_dir, **options)))


def without_native_chain(engine: Engine) -> Engine:
    engine.speculating_chain.available = False
    return engine


# ---- the native Medusa chain (decoding/speculative/chain.py, medusa_chain.py) ------------------------

def test_native_chain_decodes_plain_greedy_with_the_python_steps_proposals(llama_dir, heads_dir):
    """A lone greedy request's speculating steps run several to a call: the tokens are HF's greedy ones, and
    the rounds propose and keep what the engine's Python steps propose and keep."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    assert_chain_runs_as_single_steps(lambda: medusa_engine(llama_dir, heads_dir), llama_dir, params)


@pytest.mark.skipif(not (DEFAULT_MEDUSA_DIR / "config.json").exists(), reason="the default heads are not built")
def test_native_chain_keeps_what_the_python_steps_keep_with_trained_heads():
    """With heads that guess right (the embedded model's), the rounds keep paths deeper than one node, so
    the kept nodes' keys and values move in the cache; tokens and acceptance at every depth are the
    Python steps', and the tokens plain greedy's."""
    prompts = ["def fibonacci(n):", "import os\n\ndef main():\n", "The capital of France"]
    params = SamplingParams(temperature=0, max_tokens=48, min_tokens=48)
    runs = []
    for native in (True, False):
        engine = Engine(show_progress=False, speculative="medusa", speculative_adaptive=False)
        if not native:
            without_native_chain(engine)
        tokens = [engine.generate([prompt], params)[0].outputs[0].token_ids for prompt in prompts]
        counters = engine.speculation.counters
        runs.append((tokens, counters.num_drafts, counters.accepted_per_position))
    assert runs[0] == runs[1] and runs[0][2][1] > 0     # kept paths two nodes deep and more
    plain = Engine(show_progress=False)
    assert runs[0][0] == [plain.generate([prompt], params)[0].outputs[0].token_ids for prompt in prompts]


@pytest.mark.parametrize("mode", ["processed", "raw"])
def test_native_chain_samples_the_plain_tokens_and_logprobs(llama_dir, heads_dir, mode):
    """A lone sampled request under exact acceptance: each round's rows draw as plain sampling draws at
    their positions, so the chain emits plain sampling's tokens and logprobs, and keeps what the Python
    steps keep."""
    # ignore_eos rather than min_tokens: raw logprobs of rows with banned tokens are not drawn natively.
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0,
                            logprobs_mode=mode)
    assert_chain_runs_as_single_steps(lambda: medusa_engine(llama_dir, heads_dir), llama_dir, params)


def test_native_chain_ends_where_single_steps_end(llama_dir, heads_dir):
    """Stop strings, stop tokens held back by min_tokens, and max_tokens reached inside a round end the
    request where single steps end it; a streamed request gets its tokens round by round."""
    assert_speculating_chain_ends_where_plain_ends(medusa_engine(llama_dir, heads_dir), llama_dir)
