"""Sampler tests on hand-built logits."""

import math

import pytest
import torch

from decoding.params import SamplingParams
from decoding.sampler import Sampler
from decoding.sampling_metadata import SamplingMetadata
from decoding.sequence import Request, Sequence

VOCAB = 8
EOS = 7


def make_seqs(params_list, output=(), seed=0):
    seqs = []
    for i, params in enumerate(params_list):
        request = Request(f"r{i}", None, [1, 2, 3], params)
        seq = Sequence(i, 0, request, seed + i, detokenizer=None)
        seq.token_ids += list(output)
        request.seqs.append(seq)
        seqs.append(seq)
    return seqs


def sample(logits, params_list, output=(), seed=0):
    seqs = make_seqs(params_list, output, seed)
    batch = SamplingMetadata.from_sequences(seqs, VOCAB, frozenset({EOS}), torch.device("cpu"))
    return Sampler()(logits, batch)


LOGITS = torch.tensor([[0.5, 2.0, -1.0, 1.5, 0.0, -2.0, 1.0, 0.2]])


def test_greedy_takes_the_argmax_and_processed_logprobs_are_log_softmax():
    out = sample(LOGITS, [SamplingParams(temperature=0, logprobs=3)])
    assert out.token_ids == [1]
    expected = torch.log_softmax(LOGITS, -1)[0]
    assert out.logprobs[0].logprob == pytest.approx(expected[1].item(), abs=1e-6)
    assert list(out.logprobs[0].top) == [1, 3, 6]


def test_processed_logprobs_use_temperature_and_raw_do_not():
    processed = sample(LOGITS, [SamplingParams(temperature=0.5, logprobs=0, seed=1)])
    raw = sample(LOGITS, [SamplingParams(temperature=0.5, logprobs=0, seed=1, logprobs_mode="raw")])
    token = processed.token_ids[0]
    assert raw.token_ids[0] == token
    assert processed.logprobs[0].logprob == pytest.approx(torch.log_softmax(LOGITS / 0.5, -1)[0, token].item(), abs=1e-6)
    assert raw.logprobs[0].logprob == pytest.approx(torch.log_softmax(LOGITS, -1)[0, token].item(), abs=1e-6)


def test_top_k_top_p_min_p_truncate_and_renormalise():
    logits = LOGITS.repeat(200, 1)
    for params, allowed in [
        (SamplingParams(top_k=2, logprobs=0), {1, 3}),
        (SamplingParams(top_p=0.5, logprobs=0), {1, 3}),     # p(1) = 0.34 < 0.5, p(1)+p(3) = 0.55
        (SamplingParams(min_p=0.5, logprobs=0), {1, 3}),     # p(3)/p(1) = 0.61, p(6)/p(1) = 0.37
    ]:
        out = sample(logits, [params] * 200)
        assert set(out.token_ids) == allowed
        probs = torch.softmax(LOGITS[0, sorted(allowed)], -1)
        for token, lp in zip(out.token_ids, out.logprobs):
            assert math.exp(lp.logprob) == pytest.approx(probs[sorted(allowed).index(token)].item(), abs=1e-5)


def test_sampling_matches_the_distribution():
    num = 20000
    logits = LOGITS.repeat(num, 1)
    out = sample(logits, [SamplingParams(temperature=1.0)] * num)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=VOCAB).float() / num
    expected = torch.softmax(LOGITS[0], -1)
    # 5 standard deviations of a binomial frequency: fails by chance about once in 10^6 runs per token.
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / num)
    assert torch.all((counts - expected).abs() <= tolerance + 1e-9), (counts, expected)


def test_seeded_rows_reproduce_regardless_of_neighbours():
    logits = torch.zeros(1, VOCAB)                   # uniform: every draw depends on the generator alone
    params = SamplingParams(temperature=1.0)
    draws_alone, draws_batched = [], []
    for trial in range(20):
        [alone] = make_seqs([params], seed=1000 + trial)
        draws_alone += Sampler()(logits, SamplingMetadata.from_sequences(
            [alone], VOCAB, frozenset({EOS}), torch.device("cpu"))).token_ids
        neighbour, same = make_seqs([params, params], seed=999 + trial)   # `same` gets seed 1000 + trial
        draws_batched += Sampler()(logits.repeat(2, 1), SamplingMetadata.from_sequences(
            [neighbour, same], VOCAB, frozenset({EOS}), torch.device("cpu"))).token_ids[1:]
    assert draws_alone == draws_batched
    assert len(set(draws_alone)) > 1


def test_a_row_draws_the_same_beside_rows_that_take_the_other_sampling_path():
    """Rows without truncation go to the native kernel, rows with top-k through torch; a seeded row's
    draws must not depend on which paths its neighbours take."""
    logits = torch.tensor([[0.3, 1.0, -0.5, 0.8, 0.0, -1.0, 0.6, 0.1]])
    plain, truncated = SamplingParams(temperature=0.9, logprobs=0), SamplingParams(temperature=0.9, top_k=3, logprobs=0)
    for trial in range(30):
        [alone] = make_seqs([plain], seed=2000 + trial)
        expected = Sampler()(logits, SamplingMetadata.from_sequences([alone], VOCAB, frozenset({EOS}), torch.device("cpu")))
        neighbour, same = make_seqs([truncated, plain], seed=1999 + trial)
        mixed = Sampler()(logits.repeat(2, 1), SamplingMetadata.from_sequences(
            [neighbour, same], VOCAB, frozenset({EOS}), torch.device("cpu")))
        assert mixed.token_ids[1] == expected.token_ids[0]
        assert mixed.logprobs[1].logprob == pytest.approx(expected.logprobs[0].logprob, abs=1e-6)
        assert mixed.token_ids[0] in (1, 3, 6)


def test_a_rows_logprob_is_the_same_bits_whichever_path_scores_it():
    """The native draw reports the chosen token's logprob; a row asking for alternatives (or verified by
    speculation) is scored by process_logits instead: the same bits either way, greedy or sampled."""
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(4)) * 3
    for temperature in (0, 0.7, 1.0, 1.3):
        native = sample(logits, [SamplingParams(temperature=temperature, logprobs=0, seed=9)] * 64, seed=50)
        scored = sample(logits, [SamplingParams(temperature=temperature, logprobs=2, seed=9)] * 64, seed=50)
        assert native.token_ids == scored.token_ids
        assert [lp.logprob for lp in native.logprobs] == [lp.logprob for lp in scored.logprobs]


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, EOS] = 10.0
    logits[0, 4] = 9.0
    params = SamplingParams(temperature=0, min_tokens=2, max_tokens=4, stop_token_ids=(4,))
    out = sample(logits, [params])
    assert out.token_ids[0] not in (EOS, 4)
    assert sample(logits, [params], output=(5, 5)).token_ids == [EOS]


def test_penalties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, -1.0, 0.0, 0.0, 0.0]])
    # Token 0 was generated twice: frequency and presence push it below the others.
    out = sample(logits, [SamplingParams(temperature=0, frequency_penalty=0.5, logprobs=0)], output=(0, 0))
    assert out.token_ids[0] != 0
    # Repetition penalty (HF): positive logits of seen tokens (prompt 1, 2, 3) are divided.
    out = sample(logits, [SamplingParams(temperature=0, repetition_penalty=2.0)])
    assert out.token_ids == [0]


def test_allowed_token_masks_constrain_every_mode():
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[[0, 4]] = True
    params = [SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=1.0, logprobs=0)] * 100
    seqs = make_seqs(params)
    batch = SamplingMetadata.from_sequences(seqs, VOCAB, frozenset({EOS}), torch.device("cpu"),
                                         allowed={row: mask for row in range(len(seqs))})
    out = Sampler()(LOGITS.repeat(len(seqs), 1), batch)
    assert set(out.token_ids) <= {0, 4} and out.token_ids[0] == 0
    renormalised = torch.log_softmax(LOGITS[0, [0, 4]], -1)
    for token, lp in zip(out.token_ids[1::2], out.logprobs[1::2]):
        assert lp.logprob == pytest.approx(renormalised[[0, 4].index(token)].item(), abs=1e-6)


def test_packed_grammar_bits_act_like_bool_masks():
    """The engine hands the grammar's packed bits to the sampler; they must mask exactly as bool masks,
    including the fallback where the grammar allows only what min_tokens bans."""
    def bits_of(mask):
        words = torch.zeros((VOCAB + 31) // 32, dtype=torch.int64)
        for token in mask.nonzero().flatten().tolist():
            words[token // 32] |= 1 << (token % 32)
        return words.to(torch.int32)

    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[[1, 3, 6]] = True
    only_eos = torch.zeros(VOCAB, dtype=torch.bool)
    only_eos[EOS] = True
    params = [SamplingParams(temperature=0.9, logprobs=0, seed=5), SamplingParams(temperature=0, logprobs=2),
              SamplingParams(temperature=0.9, min_tokens=5, seed=6)]
    outputs = []
    for as_bits in (False, True):
        masks = {0: mask, 1: mask, 2: only_eos}
        allowed = {row: bits_of(m) if as_bits else m for row, m in masks.items()}
        batch = SamplingMetadata.from_sequences(make_seqs(params), VOCAB, frozenset({EOS}), torch.device("cpu"), allowed)
        outputs.append(Sampler()(LOGITS.repeat(3, 1), batch))
    bool_out, bits_out = outputs
    assert bits_out.token_ids == bool_out.token_ids
    assert bits_out.token_ids[0] in (1, 3, 6) and bits_out.token_ids[1] == 1 and bits_out.token_ids[2] == EOS
    for a, b in zip(bits_out.logprobs[:2], bool_out.logprobs[:2]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-6)
        assert a.top == b.top
