"""What bytes each token of an HF tokenizer produces, built in memory (no hub access).

A grammar engine matches the bytes of the text, so every token must be mapped to the exact bytes it
appends when decoded in the middle of a text. HF fast tokenizers store tokens in one of three spellings:

- byte-level BPE (GPT-2, Llama 3, Qwen): every byte is a printable stand-in character (GPT-2's
  bytes_to_unicode table), so a token's bytes are that table inverted;
- SentencePiece-style (Llama 2, Mistral): "▁" stands for a space, and with byte fallback the tokens
  "<0x0A>" and so on stand for single raw bytes;
- anything else: the token string's own UTF-8.

Special tokens (BOS, EOS, pad, chat markers) are left out: they never spell text.
"""

from __future__ import annotations

import json
import re
from functools import cache

SENTENCEPIECE_SPACE = "\u2581"
BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def byte_level_table() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shift)
            shift += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


def _spelling(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "plain"
    spec = json.loads(backend.to_str())
    decoders = [spec.get("decoder") or {}]
    if decoders[0].get("type") == "Sequence":
        decoders = decoders[0].get("decoders", [])
    kinds = {d.get("type") for d in decoders}
    if "ByteLevel" in kinds:
        return "byte-level"
    if "Metaspace" in kinds or "ByteFallback" in kinds or (spec.get("model") or {}).get("byte_fallback"):
        return "sentencepiece"
    return "plain"


def token_bytes(tokenizer) -> dict[int, bytes]:
    """token id -> the bytes it spells, for every non-special token of the tokenizer."""
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, token in added.items() if getattr(token, "special", False)}
    spelling = _spelling(tokenizer)
    table = byte_level_table() if spelling == "byte-level" else None
    result: dict[int, bytes] = {}
    for text, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        if table is not None:
            try:
                result[token_id] = bytes(table[char] for char in text)
            except KeyError:            # an added, non-byte-level token: its text is literal
                result[token_id] = text.encode()
        elif spelling == "sentencepiece" and (match := BYTE_FALLBACK.match(text)):
            result[token_id] = bytes([int(match.group(1), 16)])
        elif spelling == "sentencepiece":
            result[token_id] = text.replace(SENTENCEPIECE_SPACE, " ").encode()
        else:
            result[token_id] = text.encode()
    return result


def outlines_vocabulary(tokenizer, eos_token_id: int):
    """An outlines-core Vocabulary of the tokenizer's byte spellings; EOS ends an accepted match."""
    from outlines_core import Vocabulary

    by_bytes: dict[bytes, list[int]] = {}
    for token_id, spelled in token_bytes(tokenizer).items():
        if spelled:
            by_bytes.setdefault(spelled, []).append(token_id)
    return Vocabulary(eos_token_id, by_bytes)
