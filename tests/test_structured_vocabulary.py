"""Token byte spellings for the grammar backend, on the tokenizer families it must handle."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from decoding.structured.vocabulary import outlines_vocabulary, token_bytes
from models.loader import DEFAULT_MODEL_DIR
from tiny_models import build_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "héllo wörld — ünïcode ✓ 日本語", '{"key": [1, 2.5, null]}\t\r\n']


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-like tokenizer: metaspace for spaces, byte-fallback tokens <0xHH> (ordinary vocabulary
    entries, as in Llama's) for bytes the merges do not cover."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    trained.train_from_iterator(["def add(a, b): return a + b", "hello world the quick brown fox"] * 50, trainer)
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("family", ["tiny byte-level", "default byte-level", "sentencepiece"])
def test_token_bytes_concatenate_to_the_text(family):
    tokenizer = {"tiny byte-level": build_tokenizer, "sentencepiece": sentencepiece_style_tokenizer,
                 "default byte-level": lambda: AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)}[family]()
    spelled = token_bytes(tokenizer)
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert b"".join(spelled[i] for i in ids) == text.encode()
    for special in tokenizer.all_special_ids:
        assert special not in spelled


def test_outlines_vocabulary_builds_offline():
    tokenizer = build_tokenizer()
    vocabulary = outlines_vocabulary(tokenizer, tokenizer.eos_token_id)
    assert vocabulary.get_eos_token_id() == tokenizer.eos_token_id
