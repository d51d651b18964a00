"""Request intake: a prompt and its sampling parameters become a `Request` ready to queue, or a
ValueError that says what to fix. Validating, tokenizing, checking the request against the context and
the KV cache, compiling its constraint, and making its seeded sequences happen here, before the engine
sees it; nothing here changes what the engine is running, so it may run on any thread.
"""

from __future__ import annotations

import itertools
import random
import threading
from functools import cached_property

from decoding.kv_cache_manager import KVCacheManager
from decoding.config import EngineConfig
from decoding.detokenizer import IncrementalDetokenizer
from decoding.params import SamplingParams
from decoding.resume import Resumption, restore
from decoding.sequence import Request, Sequence
from decoding.structured.constraint import Constraint
from decoding.structured.grammar import GrammarCompiler

Prompt = str | list[int]


class RequestIntake:
    def __init__(self, config: EngineConfig, tokenizer, eos_token_ids: frozenset[int], vocab_size: int,
                 max_model_len: int, kv: KVCacheManager):
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv = kv
        self._grammars: GrammarCompiler | None = None      # built on the first constrained request
        self._grammar_lock = threading.Lock()
        self._request_counter = itertools.count()
        self._seq_counter = itertools.count()
        self._seed_rng = random.Random(config.seed)

    def make_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                     resumption: Resumption | None = None) -> Request:
        """resumption: the request continues where another engine left it (decoding/resume.py)."""
        prompt_text, prompt_ids = self._tokenize(prompt)
        self._check_fits(prompt_ids, params)
        request = Request(request_id or f"req-{next(self._request_counter)}", prompt_text, prompt_ids, params)
        grammar = self._compile_constraint(params)
        for index in range(params.n):
            request.seqs.append(self.new_sequence(request, index))
            if grammar is not None:
                request.seqs[-1].grammar = self._grammars.cursor(grammar)
        if resumption is not None:
            restore(request, resumption, self.eos_token_ids, self.vocab_size, self.max_model_len)
        return request

    def new_sequence(self, request: Request, index: int) -> Sequence:
        """A sequence of `request` with its own seed (from the request's seed and its index, so a seeded
        request draws the same whatever else runs) and incremental detokenizer."""
        params = request.params
        seed = self._seed_rng.getrandbits(63) if params.seed is None else (params.seed * 1_000_003 + index) % 2**63
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        return Sequence(next(self._seq_counter), index, request, seed, detokenizer)

    def _compile_constraint(self, params: SamplingParams):
        cfg = self.config
        constraint = Constraint.of(params, params.structured_backend or cfg.structured_backends[0])
        if constraint is None:
            return None
        with self._grammar_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.eos_token_ids, self.vocab_size,
                                                 cpu_budget_s=cfg.grammar_cpu_budget_s, memory_gb=cfg.grammar_memory_gb,
                                                 max_workers=cfg.grammar_workers, backends=cfg.structured_backends)
        return self._grammars.compile(constraint)

    @cached_property
    def _max_token_chars(self) -> int:
        """The most characters one token spells (its vocabulary entry is at least as long: byte-level
        and SentencePiece spellings map each character of text to one or more characters)."""
        return max(map(len, self.tokenizer.get_vocab()), default=1)

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        # A prompt that cannot fit the context whatever its tokens is refused before any work on it
        # (tokenizing megabytes of text takes seconds, only to find it too long).
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if len(prompt) > self.max_model_len * self._max_token_chars:
                raise ValueError(f"the prompt is {len(prompt)} characters long, more than {self.max_model_len} tokens "
                                 f"(the model's context length) can spell; shorten the prompt")
            return prompt, self.tokenizer(prompt).input_ids
        if not isinstance(prompt, (list, tuple)):
            raise ValueError("a prompt must be a string or a list of token ids")
        self._check_prompt_length(len(prompt), scoring_only=True)   # _check_fits decides on ==
        if not all(isinstance(t, int) for t in prompt):
            raise ValueError("a prompt must be a string or a list of token ids")
        if not prompt:
            raise ValueError("prompt is empty")
        vocab = self.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return None, list(prompt)

    def _check_prompt_length(self, prompt_len: int, scoring_only: bool = False) -> None:
        """A prompt leaves room for one generated token, unless the request only scores it (max_tokens 0)."""
        if prompt_len > self.max_model_len or (prompt_len == self.max_model_len and not scoring_only):
            raise ValueError(f"prompt has {prompt_len} tokens, but the model's context length is "
                             f"{self.max_model_len}; shorten the prompt")

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        prompt_len = len(prompt_ids)
        self._check_prompt_length(prompt_len, scoring_only=params.max_tokens == 0)
        if prompt_len + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context length {self.max_model_len}; lower max_tokens to at most "
                             f"{self.max_model_len - prompt_len}")
        if max(params.n, params.num_beams) > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} / num_beams={params.num_beams} exceeds max_num_seqs="
                             f"{self.config.max_num_seqs}")
        # A request must fit the cache alone, or preemption could not guarantee progress. Each sample
        # may copy the shared last prompt block once (copy-on-write), hence the +1.
        blocks = self.kv.blocks_for
        width = max(params.n, params.num_beams if params.use_beam_search else 1)
        worst = blocks(prompt_len) + width * (blocks(params.max_tokens) + 1)
        usable = self.kv.usage().num_blocks
        if worst > usable:
            raise ValueError(f"the request may need {worst} KV blocks but the cache has {usable}; lower n or "
                             "max_tokens, or start the engine with a larger KV cache")
