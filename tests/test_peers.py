"""The peer benchmark's harness: CTranslate2 converts the same HF folder and, greedy, generates the
tokens Gorgon generates (a benchmark comparing engines that compute different things proves nothing)."""

import importlib.util

import pytest
import torch

from tiny_models import PROMPTS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is None,
                                reason="ctranslate2 is not installed (pip install -e '.[peers]')")


def test_ctranslate2_greedy_tokens_match_gorgon(llama_dir):
    from benchmarks.peers import CTranslate2Side, GorgonSide

    threads = torch.get_num_threads()
    ours = GorgonSide(llama_dir, threads)
    peer = CTranslate2Side(llama_dir, threads)
    for prompt in PROMPTS[:3]:
        assert peer.greedy(prompt, 12) == ours.greedy(prompt, 12)


def test_both_sides_sample_the_asked_number_of_tokens(llama_dir):
    from benchmarks.peers import CTranslate2Side, GorgonSide

    ours = GorgonSide(llama_dir, torch.get_num_threads())
    peer = CTranslate2Side(llama_dir, torch.get_num_threads())
    for side in (ours, peer):
        assert side.sample(PROMPTS[:2], 8, 1, seed=0) == 2 * 8
        assert side.sample(PROMPTS[:1], 8, 4, seed=0) == 4 * 8


def test_a_peer_in_its_own_process_answers_timed_calls(llama_dir):
    from benchmarks.peers import GorgonSide, PeerProcess

    ours = GorgonSide(llama_dir, torch.get_num_threads())
    peer = PeerProcess("ctranslate2", llama_dir, torch.get_num_threads())
    try:
        tokens, seconds = peer.timed("greedy", PROMPTS[0], 8)
        assert tokens == ours.greedy(PROMPTS[0], 8) and seconds > 0
        with pytest.raises(RuntimeError, match="peer failed"):
            peer.timed("greedy", [10**9], 4)     # a token id outside the vocabulary
    finally:
        peer.close()


def test_greedy_agreement_reads_first_tokens_and_leading_runs(llama_dir):
    """The decode entry's agreement report: two engines that compute the same tokens agree on every first
    token and on whole chat answers (the report's own arithmetic, with a peer that does)."""
    from benchmarks.peers import (AGREEMENT_CHAT_PROMPTS, AGREEMENT_RANDOM_PROMPTS, GorgonSide, PeerProcess,
                                  _greedy_agreement)

    ours = GorgonSide(llama_dir, torch.get_num_threads())
    peer = PeerProcess("ctranslate2", llama_dir, torch.get_num_threads())
    try:
        agreement = _greedy_agreement(ours, peer, ours.engine.loaded.model.vocab_size, 6)
    finally:
        peer.close()
    assert agreement["first_token_agreement"] == f"{AGREEMENT_RANDOM_PROMPTS}/{AGREEMENT_RANDOM_PROMPTS}"
    assert agreement["chat_leading_tokens"] == [6] * AGREEMENT_CHAT_PROMPTS     # the tiny tokenizer has a chat template
