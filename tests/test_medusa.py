"""Medusa: the heads and their published format, tree buffers, tree verification, and decoding end to end."""

import json
import math

import pytest
import torch

from decoding import Engine, SamplingParams
from decoding.step_plan import TokenTree
from decoding.speculative.medusa import DEFAULT_CHOICES, tree_parents
from decoding.speculative.proposer import Proposal
from decoding.speculative.rejection import rejection_sample
from models.loader import DEFAULT_MEDUSA_DIR
from models.medusa import MedusaHeads
from tiny_models import PROMPTS, hf_greedy, hf_logits

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
                   medusa_heads=heads_dir, medusa_choices=CHOICES)
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


def test_greedy_medusa_is_token_identical_on_a_batch(llama_dir, heads_dir):
    engine = medusa_engine(llama_dir, heads_dir)
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS,
                                                      logprobs=0, logprobs_mode="raw"))
    for prompt, output in zip(PROMPTS, outputs):
        completion = output.outputs[0]
        assert completion.token_ids == hf_greedy(llama_dir, prompt, NEW_TOKENS)
        # Logprobs come from the cache after tree compaction and rollback: equal to a fresh forward.
        reference = torch.log_softmax(hf_logits(llama_dir, prompt + completion.token_ids), -1)
        for i, (token, logprob) in enumerate(zip(completion.token_ids, completion.logprobs)):
            assert logprob.logprob == pytest.approx(float(reference[len(prompt) - 1 + i, token]), abs=1e-4)
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
    actual = [engine.add_request(p, q) for p, q in zip(prompts, params)]   # all in the same steps
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    for request_id, prompt, param in zip(actual, prompts, params):
        [expected] = plain.generate([prompt], param)
        got = finished[request_id]
        assert [(o.token_ids, o.text, o.finish_reason) for o in got.outputs] == \
               [(o.token_ids, o.text, o.finish_reason) for o in expected.outputs]


@pytest.mark.parametrize("acceptance", ["typical", "lossless"])
def test_sampled_medusa_runs_and_reports_the_targets_logprobs(llama_dir, heads_dir, acceptance):
    engine = medusa_engine(llama_dir, heads_dir, medusa_acceptance=acceptance)
    params = SamplingParams(temperature=0.7, max_tokens=NEW_TOKENS, seed=5, logprobs=1)
    [first] = engine.generate([PROMPTS[0]], params)
    [again] = medusa_engine(llama_dir, heads_dir, medusa_acceptance=acceptance).generate([PROMPTS[0]], params)
    assert first.outputs[0].token_ids == again.outputs[0].token_ids           # seeded: reproducible
    assert engine.speculation.counters.num_draft_tokens > 0
    completion = first.outputs[0]
    reference = torch.log_softmax(hf_logits(llama_dir, PROMPTS[0] + completion.token_ids) / 0.7, -1)
    for i, (token, logprob) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert logprob.logprob == pytest.approx(float(reference[len(PROMPTS[0]) - 1 + i, token]), abs=1e-4)


def test_lossless_mode_keeps_the_target_distribution(heads_dir):
    """The lossless mode's chain: token k ~ q_k from head k (processed as the request samples), verified
    by the speculative sampling rule. Over 10^5 chains the emitted tokens follow the target's p at every
    position within 5 standard errors."""
    heads = MedusaHeads.load(heads_dir)
    num_chains, vocab = 100_000, 6
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, heads.hidden_size, generator=generator)
    q = torch.softmax(heads(hidden)[:, 0, :vocab] / 0.7, dim=-1).double()     # [K, 6]: the heads' proposals
    k = q.shape[0]
    p = torch.softmax(torch.randn(k + 1, vocab, generator=generator), -1).double()
    draft = torch.stack([torch.multinomial(q[j].float(), num_chains, replacement=True, generator=generator)
                         for j in range(k)], dim=1)
    uniforms = torch.rand(num_chains, k + 1, generator=generator, dtype=torch.float64)
    tokens, accepted = rejection_sample(p.expand(num_chains, -1, -1), q.expand(num_chains, -1, -1), draft, uniforms)
    for j in range(k + 1):
        reached = accepted >= j
        n = int(reached.sum())
        if n < 2000:
            break
        frequencies = torch.bincount(tokens[reached, j], minlength=vocab).double() / n
        assert bool(((frequencies - p[j]).abs() <= 5 * torch.sqrt(p[j] * (1 - p[j]) / n) + 1e-9).all())
    assert j >= 2, "too few chains got past the first positions to test them"


def test_configuration_errors(llama_dir, heads_dir, tmp_path):
    with pytest.raises(ValueError, match="medusa_acceptance"):
        medusa_engine(llama_dir, heads_dir, medusa_acceptance="sometimes")
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
