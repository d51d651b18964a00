"""Speculative decoding: the rejection sampler's statistics, hand-built verdicts, and the engine end to end."""

import math

import pytest
import torch

from decoding import Engine, SamplingParams
from decoding.sequence import FinishReason
from decoding.speculative.proposer import Proposal
from decoding.sampling_metadata import SamplingMetadata
from decoding.speculative.rejection import Verdict, _walk_drawn, _walk_lossless, rows_to_verify, verify
from models.loader import DEFAULT_DRAFT_DIR
from tiny_models import PROMPTS, assert_target_logprobs, hf_greedy, hf_logits, save_tiny_model

NEW_TOKENS = 24


@pytest.fixture(scope="session")
def other_llama_dir(tmp_path_factory):
    """Same architecture and tokenizer as llama_dir, different weights: a draft that is often rejected."""
    return str(save_tiny_model("llama", tmp_path_factory.mktemp("llama-draft"), seed=1))


def spec_engine(target, draft=None, **overrides):
    # Every step speculates: these tests check what a speculating step does (the governor that skips
    # unprofitable ones is tested on its own below).
    options = dict(show_progress=False, num_kv_blocks=256, block_size=4, speculative_adaptive=False)
    if draft is not None:
        options |= dict(speculative="draft", draft_model=draft)
    return Engine(model=target, **(options | overrides))


# ---- the rejection sampler, statistically ------------------------------------------------------

def _distributions(case: str, k: int, vocab: int, generator: torch.Generator):
    p = torch.rand(k + 1, vocab, generator=generator).pow(2)
    p /= p.sum(-1, keepdim=True)
    if case == "equal":
        q = p[:k].clone()
    elif case == "disjoint":
        p[:, :2] = 0
        p /= p.sum(-1, keepdim=True)
        q = torch.zeros(k, vocab)
        q[:, :2] = 0.5
    elif case == "one-hot":
        q = torch.zeros(k, vocab)
        q[torch.arange(k), torch.randint(vocab, (k,), generator=generator)] = 1.0
    else:
        q = torch.rand(k, vocab, generator=generator)
        q /= q.sum(-1, keepdim=True)
    return p.double(), q.double()


@pytest.mark.parametrize("case", ["equal", "disjoint", "one-hot", "random"])
def test_rejection_sampler_emits_the_target_distribution_at_every_position(case):
    """With N chains, each emitted position's token frequencies must match p_j within 5 standard errors
    (sqrt(p (1 - p) / n_j) for the n_j chains that reach position j), and the acceptance rate at each
    position must match sum_x min(p_j(x), q_j(x))."""
    num_chains, k, vocab = 30_000, 3, 5
    generator = torch.Generator().manual_seed(["equal", "disjoint", "one-hot", "random"].index(case))
    p, q = _distributions(case, k, vocab, generator)
    draft = torch.stack([torch.multinomial(q[j].float(), num_chains, replacement=True, generator=generator)
                         for j in range(k)], dim=1).tolist()                         # [N, k], x_j ~ q_j
    uniforms = torch.rand(num_chains, k + 1, generator=generator, dtype=torch.float64).tolist()
    tokens, num_accepted = [], []
    for chain, chain_uniforms in zip(draft, uniforms):
        rows, final = _walk_drawn(Proposal(chain, q), p, chain_uniforms)
        assert rows == list(range(1, len(rows) + 1))
        tokens.append(chain[: len(rows)] + [final] + [-1] * (k - len(rows)))
        num_accepted.append(len(rows))
    tokens, num_accepted = torch.tensor(tokens), torch.tensor(num_accepted)
    acceptance = torch.minimum(p[:k], q).sum(-1)                # P(keep draft j | reached j)
    for j in range(k + 1):        # position k is the bonus token
        reached = num_accepted >= j
        n = int(reached.sum())
        expected_reach = float(acceptance[:j].prod()) * num_chains
        if expected_reach < 1000:   # disjoint supports: nothing gets past the first position
            assert n <= expected_reach + 5 * math.sqrt(expected_reach) + 1
            continue
        counts = torch.bincount(tokens[reached, j], minlength=vocab).double()
        assert int(counts.sum()) == n
        frequencies = counts / n
        tolerance = 5 * torch.sqrt(p[j] * (1 - p[j]) / n) + 1e-9
        assert bool(((frequencies - p[j]).abs() <= tolerance).all()), (j, frequencies, p[j])
        if j < k:
            expected = float(acceptance[j])
            rate = float((num_accepted[reached] > j).double().mean())
            assert abs(rate - expected) <= 5 * math.sqrt(max(expected * (1 - expected), 0) / n) + 1e-6


def test_rejection_sampler_marks_the_end_of_each_chain():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]).double()
    q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).double()
    rows, final = _walk_drawn(Proposal([1, 0], q), p, [0.5, 0.5, 0.5])
    assert rows == [1] and final == 2             # kept 1, rejected 0, drew 2 from the residual


@pytest.mark.parametrize("case", ["random", "peaked", "draft-equals-target"])
def test_drawn_tree_walk_emits_the_target_distribution_along_every_path(case):
    """Recursive rejection sampling over a tree drawn without replacement (EAGLE's drawn tree under the
    lossless rule): the root's children are three draws from q_0, the first one's children two draws from
    q_1, and the first of those has one child from q_2, redrawn every walk (the proposer's own
    `_drawn_without_replacement`). The token emitted after each node follows that node's p (5 standard
    errors), and the root keeps its first child as often as sum(min(p_0, q_0))."""
    from decoding.speculative.eagle import _drawn_without_replacement

    vocab, walks = 6, 20_000
    generator = torch.Generator().manual_seed(["random", "peaked", "draft-equals-target"].index(case))
    parents = (-1, -1, -1, 0, 0, 3)                # rows 1-3 under the root, 4-5 under row 1, 6 under row 4
    p = torch.rand(7, vocab, generator=generator).pow(4 if case == "peaked" else 1).double()
    p /= p.sum(-1, keepdim=True)
    q = p[[0, 1, 4]].clone() if case == "draft-equals-target" else torch.rand(3, vocab, generator=generator).double()
    q /= q.sum(-1, keepdim=True)
    emitted: dict[int, list[int]] = {row: [] for row in range(7)}
    first_kept = 0
    for _ in range(walks):
        tokens, dists = [], []
        for node_q, count in zip(q, (3, 2, 1)):
            first = int(torch.multinomial(node_q, 1, generator=generator))
            for token, _, dist in _drawn_without_replacement(node_q, first, count, generator):
                tokens.append(token)
                dists.append(dist)
        assert len(set(tokens[:3])) == 3 and len(set(tokens[3:5])) == 2      # without replacement
        uniforms = torch.rand(7, generator=generator, dtype=torch.float64).tolist()
        rows, final = _walk_drawn(Proposal(tokens, torch.stack(dists), parents), p, uniforms)
        walked = [0] + rows
        assert all(parents[r - 1] + 1 == walked[i] for i, r in enumerate(rows))
        for at, row in enumerate(walked):
            emitted[row].append(tokens[walked[at + 1] - 1] if at + 1 < len(walked) else final)
        first_kept += bool(rows) and rows[0] == 1
    for row, row_tokens in emitted.items():
        n = len(row_tokens)
        if n < 2000:
            continue
        frequencies = torch.bincount(torch.tensor(row_tokens), minlength=vocab).double() / n
        tolerance = 5 * torch.sqrt(p[row] * (1 - p[row]) / n) + 1e-9
        assert bool(((frequencies - p[row]).abs() <= tolerance).all()), (row, frequencies, p[row])
    assert len(emitted[1]) >= 2000 and len(emitted[4]) >= 2000, "too few walks got below the root"
    expected = float(torch.minimum(p[0], q[0]).sum())
    assert abs(first_kept / walks - expected) <= 5 * math.sqrt(expected * (1 - expected) / walks) + 1e-9
    if case == "draft-equals-target":
        assert first_kept == walks                 # q == p: the first draw is always kept


@pytest.mark.parametrize("case", ["random", "peaked", "candidates-hold-everything"])
def test_lossless_tree_walk_emits_the_target_distribution_along_every_path(case):
    """EAGLE's rule for a tree of fixed candidates: whatever the tree, the first emitted token follows the
    root's p, and the token after each kept node follows that node's p (each within 5 standard errors);
    a node is kept with the target's whole mass on its children's tokens."""
    vocab, walks = 5, 40_000
    generator = torch.Generator().manual_seed(["random", "peaked", "candidates-hold-everything"].index(case))
    # Root children 2, 0, 4 (rows 1-3); under row 1: 1, 2 (rows 4, 5); under row 4: 3 (row 6).
    proposal = Proposal([2, 0, 4, 1, 2, 3], parents=(-1, -1, -1, 0, 0, 3))
    p = torch.rand(7, vocab, generator=generator).pow(6 if case == "peaked" else 1).double()
    if case == "candidates-hold-everything":
        p[0, [1, 3]] = 0.0                       # the root's children cover its whole support
    p[0, 2] += 1.0                               # deep enough paths to test rows 1 and 4 too
    p[1, 1] += 1.0
    p /= p.sum(-1, keepdim=True)
    paths: list[list[int]] = []
    for _ in range(walks):
        uniforms = torch.rand(7, generator=generator, dtype=torch.float64).tolist()
        rows, final = _walk_lossless(proposal, p, uniforms)
        walked = [0] + rows                      # each kept row is a child of the row before it
        assert rows == sorted(rows) and all(proposal.parent_rows()[r - 1] == walked[i] for i, r in enumerate(rows))
        paths.append([0] + rows + [final])       # the rows walked, then the token drawn at the last one
    token_row = {(parent_row, proposal.token_ids[r - 1]): r for r, parent_row in enumerate(proposal.parent_rows(), 1)}

    def emitted_after(row: int) -> list[int]:
        """The token emitted at the position row scores, over the walks that reached row."""
        out = []
        for path in paths:
            if row in path[:-1]:
                at = path.index(row)
                nxt = path[at + 1]
                out.append(proposal.token_ids[nxt - 1] if at + 1 < len(path) - 1 else nxt)
        return out

    for row in range(7):
        tokens = emitted_after(row)
        n = len(tokens)
        if n < 2000:
            continue
        frequencies = torch.bincount(torch.tensor(tokens), minlength=vocab).double() / n
        tolerance = 5 * torch.sqrt(p[row] * (1 - p[row]) / n) + 1e-9
        assert bool(((frequencies - p[row]).abs() <= tolerance).all()), (row, frequencies, p[row])
        kept = sum(1 for t in tokens if (row, t) in token_row) / n
        mass = float(sum(p[row, t] for (parent, t) in token_row if parent == row))
        assert abs(kept - mass) <= 5 * math.sqrt(max(mass * (1 - mass), 1e-12) / n) + 1e-9
    assert len(emitted_after(4)) >= 2000, "too few walks got below the root to test a deeper node"
    if case == "candidates-hold-everything":
        assert all(len(path) > 2 for path in paths)        # the root's children are never all rejected


# ---- hand-built verdicts -----------------------------------------------------------------------

def _greedy_rows(argmaxes: list[int], vocab: int) -> torch.Tensor:
    rows = torch.zeros(len(argmaxes), vocab)
    rows[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return rows


def verify_alone(engine, seqs, proposals, logits):
    """The verifier as a step runs it: the rows' metadata (None when plainly greedy), then the verdicts."""
    vocab, cpu = engine.loaded.model.vocab_size, torch.device("cpu")
    [batch] = SamplingMetadata.for_step([rows_to_verify(seqs, proposals, [None] * len(seqs))], vocab,
                                        engine.eos_token_ids, cpu)
    return verify(engine.sampler, seqs, proposals, logits, batch, vocab, engine.eos_token_ids, cpu)


@pytest.mark.parametrize("draft,target,emitted,kept", [
    ([7, 8, 9], [7, 8, 9, 10], [7, 8, 9, 10], 3),     # all accepted, plus the bonus token
    ([7, 8, 9], [3, 8, 9, 10], [3], 0),               # rejected at the first position
    ([7, 8, 9], [7, 4, 9, 10], [7, 4], 1),            # rejected mid-way
    ([], [11], [11], 0),                              # empty draft: a plain decode
])
def test_greedy_verdicts(llama_engine, draft, target, emitted, kept):
    request = llama_engine.make_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=8, logprobs=0))
    vocab = llama_engine.loaded.model.vocab_size
    seq = request.seqs[0]
    [verdict] = verify_alone(llama_engine, [seq], [Proposal(draft)], [_greedy_rows(target, vocab)])
    assert verdict.token_ids == emitted and verdict.num_accepted == kept
    expected = torch.log_softmax(_greedy_rows(target, vocab), -1)
    for j, (token, logprob) in enumerate(zip(verdict.token_ids, verdict.logprobs)):
        assert logprob.logprob == pytest.approx(float(expected[j, token]), abs=1e-6)


@pytest.mark.parametrize("parents", [None, (-1, 0, 0, 2)])
@pytest.mark.parametrize("min_tokens", [0, 2, 3, 9])
def test_greedy_verification_without_logprobs_matches_the_sampling_pipeline(llama_engine, parents, min_tokens):
    """Greedy rows that want no logprobs skip the sampler; where min_tokens bans the target's favourite
    (EOS here, with the runner-up differing by row) they must still emit what the pipeline emits."""
    vocab = llama_engine.loaded.model.vocab_size
    eos = min(llama_engine.eos_token_ids)
    draft = [7, 8, 9, 10]
    rows = torch.zeros(len(draft) + 1, vocab)
    rows[:, eos] = 9.0                                 # EOS leads every row...
    for row, token in enumerate([7, 8, 9, 10, 11]):
        rows[row, token] = 5.0                         # ...then the token the chain drafted
    rows[2, eos] = 1.0                                 # one row where EOS is not the favourite
    if parents is not None:
        rows[1, 9] = 6.0                               # the walk goes down the second branch (depth != row)
    verdicts = []
    for logprobs in (None, 0):
        request = llama_engine.make_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=16, min_tokens=min_tokens,
                                                                      logprobs=logprobs))
        [verdict] = verify_alone(llama_engine, request.seqs, [Proposal(draft, parents=parents)], [rows.clone()])
        verdicts.append((verdict.token_ids, verdict.num_accepted, verdict.rows))
    assert verdicts[0] == verdicts[1]


def test_eos_inside_accepted_drafts_ends_the_sequence(llama_dir):
    engine = spec_engine(llama_dir, llama_dir)
    request = engine.make_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, min_tokens=1))
    engine.add(request)
    while request.seqs[0].num_output_tokens == 0:
        engine.step()
    seq, eos = request.seqs[0], min(engine.eos_token_ids)
    assert not seq.is_finished
    before = seq.num_output_tokens
    seq.num_computed = len(seq.token_ids) + 3          # as if a 3-token chain had just been scored
    engine.update.apply_verdict(seq, Verdict([40, eos, 41, 42], [None] * 4, num_accepted=3, rows=[1, 2, 3]))
    assert seq.finish_reason is FinishReason.STOP
    assert seq.output_token_ids[before:] == [40, eos]   # nothing after EOS
    assert engine.update.retire(request).outputs[0].finish_reason == "stop"   # what step() does last
    assert not engine.has_unfinished_requests()
    assert engine.cache_usage().num_used_blocks == 0
    assert engine.speculation.proposer.kv.num_free_blocks == engine.speculation.proposer.kv.num_blocks - 1


# ---- the engine, end to end --------------------------------------------------------------------

@pytest.mark.parametrize("draft", ["same", "other"])
def test_greedy_speculation_is_token_identical_on_a_batch(llama_dir, other_llama_dir, draft):
    draft_dir = llama_dir if draft == "same" else other_llama_dir
    engine = spec_engine(llama_dir, draft_dir, num_speculative_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outputs = engine.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(llama_dir, prompt, NEW_TOKENS)
    counters = engine.speculation.counters
    assert counters.num_draft_tokens > 0
    if draft == "same":
        assert counters.num_accepted_tokens > 0.9 * counters.num_draft_tokens
    else:
        assert counters.num_accepted_tokens < counters.num_draft_tokens    # rejections were rolled back
    assert engine.cache_usage().num_used_blocks == 0
    draft_blocks = engine.speculation.proposer.kv
    assert draft_blocks.num_free_blocks == draft_blocks.num_blocks - 1


def test_cache_after_rollback_equals_a_fresh_prefill(llama_dir, other_llama_dir):
    """A poor draft forces rollbacks nearly every step; each returned logprob is computed from the cache
    that survived them and must equal a teacher-forced forward of the accepted sequence. Every proposal
    must also equal the draft model's own greedy continuation, so the draft's cache rolled back too."""
    engine = spec_engine(llama_dir, other_llama_dir, num_speculative_tokens=4)
    proposer = engine.speculation.proposer
    seen = []
    propose = proposer.propose

    def recording(seqs, max_tokens):
        proposals = propose(seqs, max_tokens)
        seen.extend((list(seq.token_ids), list(p.token_ids)) for seq, p in zip(seqs, proposals))
        return proposals

    proposer.propose = recording
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=0,
                            logprobs_mode="raw")
    outputs = engine.generate(PROMPTS[:2], params)
    counters = engine.speculation.counters
    assert counters.num_accepted_tokens < counters.num_draft_tokens
    for prompt, output in zip(PROMPTS[:2], outputs):
        completion = output.outputs[0]
        assert_target_logprobs(llama_dir, prompt, completion)
    assert seen
    for tokens, proposal in seen:
        assert proposal == hf_greedy(other_llama_dir, tokens, len(proposal))


def test_groups_stop_strings_and_max_tokens_mid_draft(llama_dir):
    plain = spec_engine(llama_dir)
    engine = spec_engine(llama_dir, llama_dir, num_speculative_tokens=4)
    prompts = ["def add(a, b):", "class Stack:", "import os"]
    reference = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=30))
    stop = reference[0].outputs[0].text[5:8]             # a stop string that greedy output will hit
    cases = [SamplingParams(temperature=0, max_tokens=7),                  # 7 is not a multiple of k + 1
             SamplingParams(temperature=0, max_tokens=30, stop=[stop]),
             SamplingParams(temperature=0, max_tokens=13, n=3)]
    for params in cases:
        expected = plain.generate(prompts, params)
        actual = engine.generate(prompts, params)
        for a, b in zip(actual, expected):
            for x, y in zip(a.outputs, b.outputs):
                assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
    assert engine.speculation.counters.num_accepted_tokens > 0
    assert engine.cache_usage().num_used_blocks == 0


def test_sampled_speculation_returns_the_targets_logprobs_and_is_reproducible(llama_dir, other_llama_dir):
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=NEW_TOKENS, logprobs=2, seed=11, n=2)
    runs = []
    for _ in range(2):
        engine = spec_engine(llama_dir, other_llama_dir, num_speculative_tokens=3)
        runs.append(engine.generate(PROMPTS[:2], params))
        assert engine.speculation.counters.num_draft_tokens > 0
    for first, second in zip(*runs):
        assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    for prompt, output in zip(PROMPTS[:2], runs[0]):
        for completion in output.outputs:
            logits = hf_logits(llama_dir, prompt + completion.token_ids) / 0.8
            top = logits.topk(50, dim=-1)
            truncated = torch.full_like(logits, float("-inf")).scatter_(1, top.indices, top.values)
            reference = torch.log_softmax(truncated, -1)
            for i, (token, logprob) in enumerate(zip(completion.token_ids, completion.logprobs)):
                assert logprob.logprob == pytest.approx(float(reference[len(prompt) - 1 + i, token]), abs=1e-4)


def test_sampled_speculation_with_an_identical_draft_accepts_nearly_everything(llama_dir):
    engine = spec_engine(llama_dir, llama_dir, num_speculative_tokens=4, speculative_acceptance="lossless")
    engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS, seed=0))
    counters = engine.speculation.counters
    assert counters.num_draft_tokens > 0
    assert counters.acceptance_rate > 0.95          # p == q: min(1, p/q) = 1 up to float rounding


def test_ngram_proposer_is_token_identical_and_accepts(llama_dir):
    # Greedy output of a random model soon repeats itself: prompt lookup then proposes the repeat.
    engine = spec_engine(llama_dir, speculative="ngram", num_speculative_tokens=4, prompt_lookup_min=1)
    params = SamplingParams(temperature=0, max_tokens=48, min_tokens=48)
    outputs = engine.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(llama_dir, prompt, 48)
    counters = engine.speculation.counters
    assert counters.num_draft_tokens > 0 and counters.num_accepted_tokens > 0


def test_ngram_lookup_finds_the_latest_longest_match():
    from decoding.speculative.ngram import NgramProposer
    proposer = NgramProposer(num_tokens=4, max_ngram=3, min_ngram=1)
    assert proposer.lookup([1, 2, 3, 9, 1, 2, 3, 8, 7, 1, 2, 3], 2) == [8, 7]
    assert proposer.lookup([5, 6, 7], 3) == []
    assert proposer.lookup([4, 1, 4], 5) == [1, 4]


def test_per_request_opt_out(llama_dir):
    engine = spec_engine(llama_dir, llama_dir)
    engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, speculative=False))
    assert engine.speculation.counters.num_drafts == 0
    engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    assert engine.speculation.counters.num_drafts > 0


def test_speculation_pauses_while_the_batch_is_larger_than_the_limit(llama_dir):
    """With a limit of 2 decoding sequences, a batch of 3 decodes plainly until one finishes; a lone
    request speculates. Outputs are the same either way."""
    engine = spec_engine(llama_dir, llama_dir, speculative_disable_by_batch_size=2)
    drafts_per_step = []
    step = engine.step
    def counting_step():
        before = engine.speculation.counters.num_drafts
        outputs = step()
        drafts_per_step.append(engine.speculation.counters.num_drafts - before)
        return outputs
    engine.step = counting_step
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (6, 16, 16)]
    outputs = engine.generate(PROMPTS[:3], params)
    plain = spec_engine(llama_dir).generate(PROMPTS[:3], params)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in plain]
    assert drafts_per_step[0] == 0 and drafts_per_step[1] == 0     # the prefill, then three decoding
    assert sum(drafts_per_step) > 0                                 # two after the first finishes
    engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8))
    assert engine.speculation.counters.num_drafts > 0


def test_configuration_errors(llama_dir):
    with pytest.raises(ValueError, match="speculative_disable_by_batch_size"):
        spec_engine(llama_dir, speculative="ngram", speculative_disable_by_batch_size=0)
    with pytest.raises(ValueError, match="speculative must be"):
        spec_engine(llama_dir, speculative="medusa-ish")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        spec_engine(llama_dir, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="vocabulary"):
        spec_engine(llama_dir, str(DEFAULT_DRAFT_DIR))       # 8192 tokens against the tiny model's 384


def test_default_model_with_its_draft_is_identical():
    plain = Engine(show_progress=False)
    engine = Engine(show_progress=False, speculative="draft")
    prompts = ["def fibonacci(n):", "import os\n\ndef main():\n"]
    params = SamplingParams(temperature=0, max_tokens=40)
    for a, b in zip(engine.generate(prompts, params), plain.generate(prompts, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert engine.speculation.counters.num_accepted_tokens > 0


# ---- over HTTP -----------------------------------------------------------------------------------

def test_server_speculates_reports_metrics_and_honours_the_opt_out(llama_dir):
    import httpx

    from server.cli import build_parser
    from live_server import start_server, stop_server

    args = build_parser().parse_args(["serve", "--speculative", "draft", "--draft-model", llama_dir,
                                      "--num-speculative-tokens", "3"])
    assert (args.speculative, args.draft_model, args.num_speculative_tokens) == ("draft", llama_dir, 3)
    plain = spec_engine(llama_dir)
    expected = plain.generate(["def add(a, b):"], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0].text
    live = start_server(llama_dir, engine_options=dict(speculative="draft", draft_model=llama_dir,
                                                       num_speculative_tokens=3))
    try:
        counters = live.engine.speculation.counters
        opted_out = live.client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=20,
                                                   temperature=0, extra_body={"speculative": False})
        assert opted_out.choices[0].text == expected and counters.num_drafts == 0
        out = live.client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=20, temperature=0)
        assert out.choices[0].text == expected
        assert counters.num_drafts > 0
        metrics = httpx.get(f"{live.url}/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("gorgon:spec_decode")}
        assert values["gorgon:spec_decode_num_drafts_total"] == counters.num_drafts
        assert values["gorgon:spec_decode_num_accepted_tokens_total"] == counters.num_accepted_tokens > 0
        assert values['gorgon:spec_decode_num_accepted_tokens_per_pos_total{position="0"}'] > 0
        assert 1 < values["gorgon:spec_decode_mean_acceptance_length"] <= 4
    finally:
        stop_server(live)


@pytest.mark.parametrize("mode", ["draft", "ngram"])
def test_a_cache_too_small_preempts_speculating_requests_and_still_matches(llama_dir, other_llama_dir, mode):
    params = SamplingParams(temperature=0, max_tokens=30, min_tokens=30)
    options = dict(draft_model=other_llama_dir) if mode == "draft" else dict(prompt_lookup_min=1)
    tight = spec_engine(llama_dir, speculative=mode, num_kv_blocks=24, **options)
    got = tight.generate(PROMPTS, params)
    assert tight.counters.num_preemptions > 0
    for prompt, output in zip(PROMPTS, got):
        assert output.outputs[0].token_ids == hf_greedy(llama_dir, prompt, 30)
    assert tight.cache_usage().num_used_blocks == 0
    assert tight.speculation.counters.num_draft_tokens > 0
    if mode == "draft":     # the draft's own cache is released with its sequences, preempted or finished
        blocks = tight.speculation.proposer.kv
        assert blocks.num_free_blocks == blocks.num_blocks - 1


def test_greedy_drafts_in_one_native_call_match_the_per_step_loop(llama_dir, other_llama_dir, monkeypatch):
    """After the catch-up step a greedy draft runs its remaining steps in one native call; its proposals
    are the per-step loop's, with stop tokens banned below min_tokens in both (a batch whose rows draft
    different counts near max_tokens falls back to the loop)."""
    from models import kernels

    if not kernels.native_ops_available(torch.device("cpu"), torch.float32):
        pytest.skip("needs the native kernels")
    params = [SamplingParams(temperature=0, max_tokens=19, min_tokens=12),
              SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)]
    runs = []
    for chain in (True, False):
        engine = spec_engine(llama_dir, other_llama_dir, num_speculative_tokens=4)
        proposer = engine.speculation.proposer
        if not chain:
            monkeypatch.setattr(proposer, "_greedy_chain", lambda *args: False)
        proposals, calls = [], []
        propose = proposer.propose
        monkeypatch.setattr(proposer, "propose", lambda seqs, k: proposals.append(
            [p.token_ids for p in propose(seqs, k)]) or [Proposal(t) for t in proposals[-1]])
        chain_call = proposer.model.greedy_chain
        monkeypatch.setattr(proposer.model, "greedy_chain", lambda *a: calls.append(1) or chain_call(*a))
        outputs = engine.generate(PROMPTS[:2], params)
        runs.append((proposals, [o.outputs[0].token_ids for o in outputs], bool(calls)))
    (chained, chained_out, used), (looped, looped_out, _) = runs
    assert used, "greedy drafting should take the one-call chain"
    assert chained == looped and chained_out == looped_out


# ---- exact acceptance and the governor -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["same", "other", "ngram"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_exact_acceptance_samples_the_plain_tokens(llama_dir, other_llama_dir, mode, adaptive):
    """Under the exact rule a sampled request's tokens and logprobs are plain sampling's, token for token,
    whatever the proposer and whichever steps speculated; a draft that equals the target and draws with
    the same uniforms is accepted every time."""
    plain = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
    options = dict(speculative="ngram", prompt_lookup_min=1) if mode == "ngram" else \
        dict(speculative="draft", draft_model=llama_dir if mode == "same" else other_llama_dir)
    engine = spec_engine(llama_dir, num_speculative_tokens=3, speculative_adaptive=adaptive, **options)
    params = [SamplingParams(temperature=0.8, max_tokens=NEW_TOKENS, seed=7, logprobs=1, n=2),
              SamplingParams(temperature=1.0, top_p=0.9, max_tokens=NEW_TOKENS, seed=8),
              SamplingParams(temperature=0, max_tokens=NEW_TOKENS)]
    prompts = PROMPTS[:3]
    for got, expected in zip(engine.generate(prompts, params), plain.generate(prompts, params)):
        assert [o.token_ids for o in got.outputs] == [o.token_ids for o in expected.outputs]
        for a, b in zip(got.outputs, expected.outputs):
            assert [x.logprob for x in a.logprobs or []] == pytest.approx([x.logprob for x in b.logprobs or []], abs=1e-5)
    counters = engine.speculation.counters
    assert counters.num_draft_tokens > 0
    if mode == "same" and not adaptive:
        assert counters.acceptance_rate > 0.95


def test_governor_takes_the_faster_mode_per_batch_size_and_keeps_measuring():
    from decoding.speculative.governor import (EXPLORE_EVERY, PLAIN_SAMPLES, SPECULATING_SAMPLES, SpeculationGovernor,
                                               batch_bucket, speculating_samples)

    assert [batch_bucket(b) for b in (1, 2, 8, 9, 16, 17, 32, 33)] == [1, 2, 8, 9, 9, 10, 10, 11]
    governor = SpeculationGovernor()
    decisions = []
    for _ in range(4 * EXPLORE_EVERY):
        on = governor.speculate(1)
        decisions.append(on)
        # batch 1: speculation emits 2.5 tokens in 1.2 units of time, plain 1 token in 1 unit
        governor.record(1, on, 25 if on else 10, 12.0 if on else 10.0)
    plain = PLAIN_SAMPLES + 1                         # plain's timed steps, after the untimed switch
    first = SPECULATING_SAMPLES + 1                   # (the very first step is not timed either)
    assert decisions[:first] == [True] * first                              # measure speculation first
    assert decisions[first : first + plain] == [False] * plain              # then plain decoding
    steady = decisions[first + plain :]
    rechecks = [i for i, on in enumerate(steady) if not on and (i == 0 or steady[i - 1])]   # each starts a run
    assert all(steady[i : i + plain] == [False] * plain and steady[i + plain] for i in rechecks)
    assert sum(steady) == len(steady) - plain * len(rechecks)             # speculation, re-checking plain
    assert rechecks[0] == EXPLORE_EVERY - 1                               # backing off:
    assert rechecks[1] - rechecks[0] == 2 * EXPLORE_EVERY + PLAIN_SAMPLES  # (the next count starts after it)
    decisions = []
    for _ in range(4 * EXPLORE_EVERY):
        on = governor.speculate(8)
        decisions.append(on)
        # batch 8: verification costs more than it returns
        governor.record(8, on, 12 if on else 8, 20.0 if on else 10.0)
    at_8 = speculating_samples(8) + 1
    assert at_8 == PLAIN_SAMPLES + 1 < SPECULATING_SAMPLES and decisions[:at_8] == [True] * at_8
    steady = decisions[at_8 + plain :]
    assert sum(steady) <= (len(steady) // EXPLORE_EVERY + 1) * (at_8 + 1) and any(steady)
    summary = governor.summary()
    assert summary[1]["on_tok_s"] > summary[1]["off_tok_s"] and summary[8]["on_tok_s"] < summary[8]["off_tok_s"]


def test_governor_counts_a_chained_call_as_its_steps():
    """A native call that ran several steps or speculating rounds measures its mode as that many single
    steps: the samples a mode needs come from fewer calls, and its speed is the calls' tokens over their time."""
    from decoding.speculative.governor import PLAIN_SAMPLES, SPECULATING_SAMPLES, SpeculationGovernor

    governor = SpeculationGovernor()
    decisions = []
    for call in range(8):
        on = governor.speculate(1)
        decisions.append(on)
        # eight rounds (or steps) a call: speculation 2.5 tokens a round in 1.5 units, plain 1 token in 1 unit
        governor.record(1, on, 20 if on else 8, 12.0 if on else 8.0, steps=8)
        if call == 4:
            summary = governor.summary()[1]
    assert SPECULATING_SAMPLES > 8 and PLAIN_SAMPLES <= 8
    # The untimed first call, two timed speculating calls (16 rounds), the untimed switch, one timed plain
    # call: both measured in five calls (one step a call would take 18), and speculation runs from then on.
    assert decisions == [True, True, True, False, False, True, True, True]
    assert summary["on_steps"] == 16 and summary["off_steps"] == 8
    assert summary["on_tok_s"] == pytest.approx(20 / 12, abs=0.05) and summary["off_tok_s"] == 1.0


def test_governor_keeps_a_noisy_winner():
    """Sampled speculation emits 1 to 6 tokens a step: its figure must average enough steps that a mode
    45% faster on average is not lost to a run of short steps (the old 6-sample, 10-step-memory governor
    ran plain in a third of these steps, as it did serving EAGLE at T = 0.7)."""
    import random

    from decoding.speculative.governor import SpeculationGovernor

    rng = random.Random(0)
    # tokens 1..6 by a geometric-like acceptance: mean 1.94; a step costs 1.35 plain steps
    weights = [0.5, 0.25, 0.12, 0.07, 0.04, 0.02]
    for seed in range(5):
        rng.seed(seed)
        governor, decisions = SpeculationGovernor(), []
        for _ in range(1000):
            on = governor.speculate(1)
            decisions.append(on)
            tokens = rng.choices(range(1, 7), weights)[0] if on else 1
            governor.record(1, on, tokens, (1.35 if on else 1.0) * rng.uniform(0.95, 1.05))
        assert sum(decisions) >= 0.9 * len(decisions), (seed, sum(decisions))


def test_the_step_that_switches_speculation_on_is_not_timed():
    """Switching on, a draft first catches up on the tokens it missed: that step is slow once and says
    nothing about the mode, so it must not drag speculation's figure down after each re-measurement."""
    from decoding.speculative.governor import EXPLORE_EVERY, SpeculationGovernor

    governor = SpeculationGovernor()
    previous, decisions = None, []
    for _ in range(4 * EXPLORE_EVERY):
        on = governor.speculate(1)
        catching_up = on and previous is False
        governor.record(1, on, 25 if on else 10, (60.0 if catching_up else 12.0) if on else 10.0)
        previous = on
        decisions.append(on)
    assert decisions.count(False) < len(decisions) // 4
    assert governor._buckets[1].on.tokens_per_second == pytest.approx(25 / 12)


def test_governed_engine_stops_speculating_where_it_does_not_pay(llama_dir, other_llama_dir):
    """A slow draft that is always rejected costs every step it runs in: the governor measures that and
    switches speculation off, with outputs unchanged."""
    import time

    engine = spec_engine(llama_dir, other_llama_dir, num_speculative_tokens=4, speculative_adaptive=True)

    def slow_and_wrong(seqs, k):
        time.sleep(0.01)
        return [Proposal([0] * n) for n in k]

    engine.speculation.proposer.propose = slow_and_wrong
    plain = spec_engine(llama_dir)
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    got, expected = engine.generate(PROMPTS[:1], params), plain.generate(PROMPTS[:1], params)
    assert got[0].outputs[0].token_ids == expected[0].outputs[0].token_ids
    summary = engine.speculation.governor.summary()[1]
    # Measured, then left: plain steps (several decode steps per call, decoding/multi_step.py) ran faster and
    # made most of the tokens.
    assert summary["on_steps"] >= 3 and summary["off_tok_s"] > summary["on_tok_s"]
    assert engine.speculation.counters.num_drafts < params.max_tokens // 2
