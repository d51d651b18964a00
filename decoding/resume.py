"""Resuming a request where another engine left it: its samples' seeds and the tokens they had sampled
(a replica that died mid-stream; cluster/failover.py), so that it continues exactly as the
uninterrupted request would have.

Sampling is counter-based (Sequence.uniform: a function of the seed and the token's position), the
kernels give the same bits whatever the batch or chunking, and every stop condition is a function of the
tokens (update.extend), so a sequence rebuilt from (seed, tokens) and recomputed like a preempted one
draws the same next tokens as the original. The resumed tokens' logprobs are not recomputed: their
caller has them already (their entries are None). Beam search and speculation keep state that is not
carried over: a beam request is not resumable, and a resumed request's speculation starts afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from decoding.sequence import Request
from decoding.update import extend

WEIGHT_CHANGES = ("error", "keep")


class WeightsChanged(ValueError):
    """A resumed request's tokens were sampled under weights this engine no longer serves."""


@dataclass(frozen=True)
class ResumedSample:
    index: int                             # the sample's place among the request's n
    seed: int                              # the seed its draws were keyed by
    token_ids: list[int]                   # what it had sampled
    finish_reason: str | None = None       # set if it had finished (the others of its request had not)
    stop_reason: str | int | None = None
    # (first output position, weight version) of each version its tokens were sampled under, in order.
    version_ranges: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Resumption:
    samples: list[ResumedSample]
    # What to do if the engine serves other weights than the last tokens were sampled under: "error"
    # (WeightsChanged, a retriable failure) or "keep" (go on under the served weights, as a request kept
    # across a weight update with policy keep).
    on_weight_change: str = "error"
    # The version the request started under, for one resumed with no tokens (sent again whole after its
    # engine failed): it runs under those weights if they are still served.
    started_under: int | None = None

    @property
    def weight_version(self) -> int | None:
        """The version the request was admitted under."""
        ranges = [sample.version_ranges for sample in self.samples if sample.version_ranges]
        return ranges[0][0][1] if ranges else self.started_under

    @property
    def last_weight_version(self) -> int | None:
        ends = [sample.version_ranges[-1][1] for sample in self.samples if sample.version_ranges]
        return max(ends) if ends else self.started_under


def restore(request: Request, resumption: Resumption, eos_token_ids: frozenset[int], vocab_size: int,
            max_model_len: int) -> None:
    """Give `request`'s sequences the resumed seeds and tokens (grammar, text and stop conditions
    replayed); raises ValueError where the resumed state does not fit the request."""
    params = request.params
    if params.use_beam_search and resumption.samples:
        raise ValueError("a beam search request cannot be resumed; send it again")
    if resumption.on_weight_change not in WEIGHT_CHANGES:
        raise ValueError(f"on_weight_change must be one of {', '.join(WEIGHT_CHANGES)}")
    by_index = {sample.index: sample for sample in resumption.samples}
    if len(by_index) != len(resumption.samples) or not set(by_index) <= set(range(len(request.seqs))):
        raise ValueError(f"resumed samples must have distinct indices below n={len(request.seqs)}")
    for seq in request.seqs:
        sample = by_index.get(seq.index)
        if sample is None:
            continue
        seq.seed = sample.seed
        if len(sample.token_ids) > params.max_tokens:
            raise ValueError(f"sample {seq.index} resumes {len(sample.token_ids)} tokens, more than max_tokens")
        ending = None
        for position, token in enumerate(sample.token_ids):
            if ending is not None:
                raise ValueError(f"sample {seq.index} ended at token {position - 1} of the tokens it resumes")
            if not isinstance(token, int) or not 0 <= token < vocab_size:
                raise ValueError(f"sample {seq.index}: token id {token!r} is outside the vocabulary")
            if seq.grammar is not None and not seq.grammar.allows(token):
                raise ValueError(f"sample {seq.index}: token {position} is outside the request's grammar")
            seq.logprobs.append(None)
            ending = extend(seq, token, eos_token_ids, max_model_len)
        ended = None if ending is None else ending[0].value
        if ended != sample.finish_reason:
            raise ValueError(f"sample {seq.index}'s tokens end it with finish_reason {ended!r}, not "
                             f"{sample.finish_reason!r}")
        if ending is not None:
            seq.end(*ending)
        if sample.version_ranges:
            seq.version_changes = [tuple(change) for change in sample.version_ranges[1:]]
    request.resumption = resumption
    # Started already: it runs on while a weight update waits for started requests (generation_control).
    request.weight_version = resumption.weight_version


def check_weights(request: Request, served_version: int) -> None:
    """On the engine thread, as the request is added: its weights are still served, or it goes on under
    the served ones (on_weight_change keep), or WeightsChanged."""
    resumption = request.resumption
    last = resumption.last_weight_version
    if last is None or last == served_version:
        return
    if resumption.on_weight_change != "keep":
        raise WeightsChanged(f"this request's tokens were sampled under weight version {last}, which is no longer "
                             f"served (now {served_version}); send it again")
    for seq in request.seqs:
        if not seq.is_finished:
            seq.version_changes.append((seq.num_output_tokens, served_version))
