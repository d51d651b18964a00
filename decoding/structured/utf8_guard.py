"""Well-formed UTF-8 beside a backend that admits byte sequences UTF-8 forbids.

xgrammar 0.2's string rules accept overlong forms and encoded surrogates inside a JSON string (after
E0 it allows 80-9F, after ED it allows A0-BF), so a byte-level model can spell `E0 80 B2` or `ED B5 B7`.
Those decode to three U+FFFD characters each: the text breaks the schema it was constrained by
(`maxLength`, `pattern`, `enum`). The guard tracks the decoder's state along the output and clears, in
the backend's bits, every token whose bytes would leave well-formed UTF-8 (RFC 3629's table of
well-formed byte sequences). Tokens that spell no bytes (special tokens) pass in every state.
"""

from __future__ import annotations

import torch

from decoding.structured.vocabulary import token_bytes

# Decoder states: what the next byte may be.
ACCEPT, TAIL1, TAIL2, TAIL3, AFTER_E0, AFTER_ED, AFTER_F0, AFTER_F4 = range(8)
NUM_STATES = 8
REJECT = -1
# A state inside a character -> (lowest byte, highest byte, the state after it).
_CONTINUATIONS = {TAIL1: (0x80, 0xBF, ACCEPT), TAIL2: (0x80, 0xBF, TAIL1), TAIL3: (0x80, 0xBF, TAIL2),
                  AFTER_E0: (0xA0, 0xBF, TAIL1), AFTER_ED: (0x80, 0x9F, TAIL1),
                  AFTER_F0: (0x90, 0xBF, TAIL2), AFTER_F4: (0x80, 0x8F, TAIL2)}


def next_state(state: int, byte: int) -> int:
    if state != ACCEPT:
        low, high, then = _CONTINUATIONS[state]
        return then if low <= byte <= high else REJECT
    if byte < 0x80:
        return ACCEPT
    if 0xC2 <= byte <= 0xDF:
        return TAIL1
    if byte in (0xE0, 0xED, 0xF0, 0xF4):
        return {0xE0: AFTER_E0, 0xED: AFTER_ED, 0xF0: AFTER_F0, 0xF4: AFTER_F4}[byte]
    if 0xE1 <= byte <= 0xEF:
        return TAIL2
    if 0xF1 <= byte <= 0xF3:
        return TAIL3
    return REJECT


class Utf8Table:
    """Per decoder state: the tokens allowed there (packed int32 bits, as the grammar's) and the state
    each leaves. Built once per tokenizer: tokens of ASCII bytes alone are set in bulk, the rest walked."""

    def __init__(self, tokenizer, vocab_size: int):
        allowed = torch.zeros(NUM_STATES, vocab_size, dtype=torch.bool)
        self.after = torch.full((NUM_STATES, vocab_size), REJECT, dtype=torch.int8)
        spelled = token_bytes(tokenizer)
        plain = torch.ones(vocab_size, dtype=torch.bool)         # spells nothing: passes in every state
        ascii_only = torch.zeros(vocab_size, dtype=torch.bool)
        for token, text in spelled.items():
            if token >= vocab_size:
                continue
            plain[token] = False
            if text.isascii():
                ascii_only[token] = True
            else:
                self.after[:, token] = torch.tensor([_walk(state, text) for state in range(NUM_STATES)],
                                                    dtype=torch.int8)
        self.after[ACCEPT, ascii_only] = ACCEPT
        self.after[:, plain] = torch.arange(NUM_STATES, dtype=torch.int8).unsqueeze(1)
        allowed |= self.after != REJECT
        self.bits = _pack(allowed)


def _walk(state: int, text: bytes) -> int:
    for byte in text:
        state = next_state(state, byte)
        if state == REJECT:
            break
    return state


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """bool [rows, vocab] -> int32 [rows, ceil(vocab / 32)], token i at bit i % 32 of word i // 32."""
    rows, vocab = allowed.shape
    padded = torch.zeros(rows, (vocab + 31) // 32 * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.to(torch.int64)
    weights = torch.tensor([1 << bit for bit in range(32)], dtype=torch.int64)
    words = (padded.view(rows, -1, 32) * weights).sum(dim=2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
