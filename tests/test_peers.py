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
    peer = CTranslate2Side(llama_dir, threads, ours.engine.tokenizer)
    for prompt in PROMPTS[:3]:
        assert peer.greedy(prompt, 12) == ours.greedy(prompt, 12)


def test_both_sides_sample_the_asked_number_of_tokens(llama_dir):
    from benchmarks.peers import CTranslate2Side, GorgonSide

    ours = GorgonSide(llama_dir, torch.get_num_threads())
    peer = CTranslate2Side(llama_dir, torch.get_num_threads(), ours.engine.tokenizer)
    for side in (ours, peer):
        assert side.sample(PROMPTS[:2], 8, 1, seed=0) == 2 * 8
        assert side.sample(PROMPTS[:1], 8, 4, seed=0) == 4 * 8
