"""Requests and their sequences: plain Python state that the scheduler and engine drive."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from decoding.detokenizer import IncrementalDetokenizer
from decoding.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"        # not admitted yet, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class TokenLogprob:
    """The logprob of one chosen token and the top-N alternatives (token id -> logprob)."""

    logprob: float
    top: dict[int, float] | None = None
    rank: int | None = None       # prompt logprobs: 1 + how many tokens were more likely than this one
    # With SamplingParams.kept_mass / kept_token_ids: log of the raw-distribution mass of the support the
    # token was sampled from, and that support's ids (None: the whole vocabulary).
    kept_logprob: float | None = None
    kept_token_ids: tuple[int, ...] | None = None


_MASK64 = (1 << 64) - 1


def position_uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) from (seed, position) by SplitMix64's finaliser; 24 bits, so it is exact in
    float32 and never rounds up to 1."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 40) * 2.0**-24


class Sequence:
    """One completion: the prompt plus its generated tokens, and where their KV lives."""

    def __init__(self, seq_id: int, index: int, request: Request, seed: int, detokenizer: IncrementalDetokenizer):
        self.seq_id = seq_id
        self.index = index                       # position within the request's n samples
        self.request = request
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_computed = 0                    # leading tokens whose KV is in the cache
        self.block_table: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[TokenLogprob] = []
        self.seed = seed                         # keys this sequence's random draws (see `uniform`)
        self._generator: torch.Generator | None = None
        self.detokenizer = detokenizer
        self.grammar = None                      # a GrammarCursor when the request's output is constrained
        # Weight versions after the request's first, each with the output position its tokens start at
        # (a request kept across a weight update: pause mode "keep").
        self.version_changes: list[tuple[int, int]] = []

    def uniform(self, num_drafted: int = 0) -> float:
        """The uniform draw that picks the token at the next position (past `num_drafted` draft tokens):
        a function of the seed and that position alone (counter-based, as SGLang's seeded sampling), so
        a request resumed by resending its prompt and partial completion draws exactly what the
        uninterrupted one would have, and a verified draft position draws what plain decoding would."""
        return position_uniform(self.seed, len(self.token_ids) + num_drafted)

    @property
    def generator(self) -> torch.Generator:
        """A sequential generator from the same seed, for the draws verification makes per step."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.detokenizer.text

    def end(self, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """Mark it finished; its text flushed, unless a stop string cut it on purpose."""
        if not isinstance(stop_reason, str):
            self.detokenizer.flush()
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def reset_cache_state(self) -> None:
        """Forget the cache (after preemption): every token will be recomputed."""
        self.num_computed = 0
        self.block_table = []


@dataclass
class Request:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    seqs: list[Sequence] = field(default_factory=list)
    # n > 1: the leader (seqs[0]) prefills the prompt alone, then the others fork its blocks.
    is_forked: bool = False
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    # False: step() reports the request only once it finishes (offline generate, non-streaming HTTP
    # calls), sparing a snapshot of every running request at every step.
    stream: bool = True
    # The weights version the request was admitted under; it finishes under the same one unless it was
    # kept across an update (then each sequence's version_changes says where the newer ones start).
    weight_version: int | None = None
    # Its cache holds keys and values computed under older weights (kept across an update without
    # recomputing): its blocks are never offered to the prefix cache.
    kv_stale: bool = False
    # Prompt tokens whose keys and values came from the prefix cache when the request was admitted.
    num_cached_tokens: int = 0
    # Times a later request with a cached prefix was admitted ahead of this one (bounded: see scheduler).
    num_bypassed: int = 0
    # Set when it continues where another engine left it (decoding/resume.py).
    resumption: object | None = None
    beam: object | None = None                 # BeamSearch state, for use_beam_search requests
    beam_results: list | None = None           # the returned hypotheses once beam search is done
    _banned_before_min: list[int] | None = field(default=None, repr=False)

    def banned_before_min_tokens(self, eos_token_ids: frozenset[int], vocab_size: int) -> list[int]:
        """The token ids min_tokens holds back (EOS and stop_token_ids), sorted; fixed per request."""
        if self._banned_before_min is None:
            stops = self.params.stop_token_set(eos_token_ids)
            self._banned_before_min = sorted(i for i in stops if i < vocab_size)
        return self._banned_before_min

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_seqs_needed(self) -> int:
        """Sequences this request will run at once: its samples, or its beams."""
        return max(len(self.seqs), self.params.num_beams if self.params.use_beam_search else 1)

    @property
    def needs_fork(self) -> bool:
        return len(self.seqs) > 1 and not self.is_forked

    @property
    def started(self) -> bool:
        """Admitted under some weights here, or resumed from another engine (decoding/resume.py): it runs
        on while a weight update waits for started requests, and queues ahead of new ones."""
        return self.weight_version is not None or self.resumption is not None

    @property
    def leader(self) -> Sequence:
        return self.seqs[0]

    def active_seqs(self) -> list[Sequence]:
        """The sequences the scheduler should advance this step."""
        if self.needs_fork:
            return [self.leader]
        return [seq for seq in self.seqs if not seq.is_finished]

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)
