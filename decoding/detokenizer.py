"""Incremental detokenization and stop-string detection.

Decoding a growing token list from scratch each step is quadratic, and decoding one token at a time
breaks multi-byte characters and leading spaces. We decode a short window instead: the text of
ids[prefix:] minus the text of ids[prefix:read] is the new text, held back while it ends in an
incomplete UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Callable

import tokenizers

# Prompt tokens kept as left context so the first generated token decodes with the right spacing.
CONTEXT_TOKENS = 6
INCOMPLETE_CHAR = "\ufffd"


def _decoder(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """ids -> text without clean-up of spaces. A fast tokenizer's Rust backend does exactly what its
    `decode(..., clean_up_tokenization_spaces=False)` does, without the Python wrapper (about 3/4 of the
    cost of a call on a few ids, and this runs twice per generated token)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._decode = _decoder(tokenizer, skip_special_tokens)
        self._ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""

    def append(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(INCOMPLETE_CHAR):
            return ""
        new_text = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += new_text
        return new_text

    def flush(self) -> str:
        """At the end of the sequence: the text still held back for an incomplete character, as the
        tokenizer decodes it (U+FFFD for the missing bytes), so that the text is the decoding of every
        token. Returns what it added."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before):
            return ""
        new_text = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += new_text
        return new_text


def find_stop_string(text: str, num_new_chars: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the newest `num_new_chars` characters of `text`.

    A stop string split across several tokens is found on the step that completes it.
    Returns (index where the stop string starts, the stop string).
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best
