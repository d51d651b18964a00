"""Beam search with the semantics of transformers' `generate(num_beams=...)` (v5), one request at a time.

Plain bookkeeping over small tensors: the engine hands in the log-probabilities of the running beams,
`BeamSearch.step` returns which (parent beam, token) pairs run next and records finished hypotheses.
The engine then re-points each beam's block table at its parent's (fork, copy-on-write), so beams share
their common prefix in the KV cache and never copy a whole sequence.

HF's rules, mirrored here: scores are log_softmax of float32 logits after the logits processors
(repetition penalty and the min_tokens ban, applied to log-probs), plus the running beam score; the
first step expands beam 0 only; the top K = max(2, 1 + #stop ids) * num_beams candidates are kept; a
candidate that ends (stop token, stop string, or max length) joins the finished pool only if it ranks
within the top num_beams candidates, with score sum_logprobs / generated_len ** length_penalty;
`early_stopping` True stops once num_beams hypotheses are finished, False when the best running beam
cannot beat the worst finished one at its current length, "never" (with length_penalty > 0) at max length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


NEG = -1.0e9


@dataclass
class Hypothesis:
    token_ids: list[int]          # generated tokens (the stop token included)
    score: float
    logprobs: list[float]         # per-token processed log-probs
    finish_reason: str = "stop"
    text: str = ""


@dataclass
class BeamStepResult:
    parents: list[int]            # for each new running beam, the index of the beam it extends
    tokens: list[int]             # the token it appends
    token_logprobs: list[float]
    done: bool


@dataclass
class BeamSearch:
    num_beams: int
    prompt_len: int
    max_len: int                  # prompt_len + max_tokens
    stop_token_ids: frozenset[int]
    length_penalty: float
    early_stopping: bool | str
    # Whether appending a token to a beam's generated tokens completes a stop string.
    hits_stop_string: Callable[[list[int], int], bool] | None = None
    running_scores: list[float] = field(default_factory=list)
    running_tokens: list[list[int]] = field(default_factory=list)
    running_logprobs: list[list[float]] = field(default_factory=list)
    finished: list[Hypothesis] = field(default_factory=list)   # the pool: at most num_beams, best first
    improvement_possible: bool = True

    def __post_init__(self):
        # All beams start as the prompt; only beam 0 may expand on the first step.
        self.running_scores = [0.0] + [NEG] * (self.num_beams - 1)
        self.running_tokens = [[] for _ in range(self.num_beams)]
        self.running_logprobs = [[] for _ in range(self.num_beams)]
        self.beams_to_keep = max(2, 1 + len(self.stop_token_ids)) * self.num_beams

    @property
    def cur_len(self) -> int:
        return self.prompt_len + len(self.running_tokens[0])

    def step(self, log_probs: torch.Tensor) -> BeamStepResult:
        """log_probs [num_beams, vocab]: processed log-probs of each running beam's next token."""
        num_beams, vocab = log_probs.shape
        accumulated = log_probs + torch.tensor(self.running_scores, dtype=log_probs.dtype)[:, None]
        top_scores, top_indices = torch.topk(accumulated.reshape(-1), k=self.beams_to_keep)
        parents = (top_indices // vocab).tolist()
        tokens = (top_indices % vocab).tolist()
        scores = top_scores.tolist()
        token_logprobs = log_probs.reshape(-1)[top_indices].tolist()
        generated_len = self.cur_len + 1 - self.prompt_len
        reasons = [self._stop_reason(parent, token) for parent, token in zip(parents, tokens)]
        hits = [reason is not None for reason in reasons]
        # Divided in float32, as HF does, so scores agree to the last bit rather than to float32 noise.
        final_scores = (top_scores / generated_len ** self.length_penalty).tolist()
        self._update_finished(parents, tokens, final_scores, token_logprobs, reasons)
        # The best num_beams candidates that did not stop run on (finished ones are pushed to the back).
        ranked = sorted(range(self.beams_to_keep), key=lambda i: -(scores[i] + (NEG if hits[i] else 0.0)))
        chosen = ranked[:num_beams]
        self.running_scores = [scores[i] + (NEG if hits[i] else 0.0) for i in chosen]
        self.running_tokens = [self.running_tokens[parents[i]] + [tokens[i]] for i in chosen]
        self.running_logprobs = [self.running_logprobs[parents[i]] + [token_logprobs[i]] for i in chosen]
        self._update_early_stop()
        done = (not self.improvement_possible
                or (self.early_stopping is True and len(self.finished) == self.num_beams)
                or all(hits))
        return BeamStepResult([parents[i] for i in chosen], [tokens[i] for i in chosen],
                              [token_logprobs[i] for i in chosen], done)

    def _stop_reason(self, parent: int, token: int) -> str | None:
        """Why appending `token` to beam `parent` ends it ("stop" or "length"), or None."""
        if token in self.stop_token_ids:
            return "stop"
        if self.hits_stop_string is not None and self.hits_stop_string(self.running_tokens[parent], token):
            return "stop"
        return "length" if self.cur_len + 1 >= self.max_len else None

    def _update_finished(self, parents, tokens, final_scores, token_logprobs, reasons) -> None:
        pool_full = self.early_stopping is True and len(self.finished) == self.num_beams
        if pool_full or not self.improvement_possible:
            return
        for rank in range(self.num_beams):           # only the top num_beams candidates may finish
            reason = reasons[rank]
            if reason is None:
                continue
            parent, token = parents[rank], tokens[rank]
            self.finished.append(Hypothesis(self.running_tokens[parent] + [token], final_scores[rank],
                                            self.running_logprobs[parent] + [token_logprobs[rank]], reason))
        # Stable sort keeps earlier hypotheses ahead of equal later ones, as HF's merge does.
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.num_beams :]

    def _update_early_stop(self) -> None:
        """HF's heuristic: stop when the best running beam cannot beat the worst finished hypothesis."""
        if len(self.finished) < self.num_beams:
            return
        if self.early_stopping == "never" and self.length_penalty > 0:
            best_len = self.max_len - self.prompt_len
        else:
            best_len = self.cur_len - self.prompt_len
        best_possible = self.running_scores[0] / best_len ** self.length_penalty
        worst_finished = min(h.score for h in self.finished)
        self.improvement_possible = self.improvement_possible and best_possible > worst_finished

    def best(self, count: int) -> list[Hypothesis]:
        return self.finished[:count]
