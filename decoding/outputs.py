"""What the engine hands back: a snapshot of a request after a step."""

from __future__ import annotations

from dataclasses import dataclass, field

from decoding.sequence import FinishReason, Request, Sequence, TokenLogprob
from decoding.structured.grammar import schema_valid


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None      # one per generated token, when asked for
    finish_reason: str | None                # "stop", "length", "abort", or None while running
    stop_reason: str | int | None = None     # the stop string or stop token id that ended it
    score: float | None = None               # beam search: sum of logprobs / generated_len ** length_penalty
    # Best-effort JSON schema requests: whether the finished output validated (None: not checked; a
    # strict request's output is valid by construction unless cut by max_tokens, or unless the distinct-
    # items check ran out of lookahead and let an item repeat: then false).
    schema_valid: bool | None = None
    # (first output position, weight version) for each version its tokens were sampled under, in order;
    # more than one only for a request kept across a weight update. Empty before the request starts.
    version_ranges: list[tuple[int, int]] = field(default_factory=list)

    def token_weight_versions(self) -> list[int]:
        """The weight version each generated token was sampled under."""
        ends = [start for start, _ in self.version_ranges[1:]] + [len(self.token_ids)]
        return [version for (start, version), end in zip(self.version_ranges, ends) for _ in range(start, end)]

    @classmethod
    def of(cls, seq: Sequence) -> CompletionOutput:
        params = seq.request.params
        wants_logprobs = params.logprobs is not None
        valid = None
        if params.structured_best_effort and params.json_schema is not None and seq.is_finished:
            valid = seq.finish_reason is FinishReason.STOP and schema_valid(params.json_schema, seq.text)
        if seq.grammar is not None and seq.grammar.repeated_an_item:
            valid = False
        return cls(
            index=seq.index,
            text=seq.text,
            token_ids=seq.output_token_ids,
            logprobs=list(seq.logprobs) if wants_logprobs else None,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            stop_reason=seq.stop_reason,
            schema_valid=valid,
            version_ranges=_version_ranges(seq),
        )


def _version_ranges(seq: Sequence) -> list[tuple[int, int]]:
    first = seq.request.weight_version
    if first is None:
        return []
    ranges = [(0, first)] + seq.version_changes
    if seq.is_finished:             # a change after the last token names no token
        ranges = [ranges[0]] + [(start, v) for start, v in ranges[1:] if start < seq.num_output_tokens]
    # Of several changes before one token (updates while it waited), the last is the one that sampled it.
    return [r for r, after in zip(ranges, ranges[1:] + [None]) if after is None or after[0] != r[0]]


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    weight_version: int | None = None
    num_cached_tokens: int = 0                 # prompt tokens found in the prefix cache
    # time.monotonic() stamps: arrival, first generated token, finish (None until they happen).
    arrival_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @classmethod
    def of(cls, request: Request) -> RequestOutput:
        wants_prompt_logprobs = request.params.prompt_logprobs is not None
        if request.beam_results is not None:
            outputs = [CompletionOutput(index=i, text=h.text, token_ids=h.token_ids,
                                        logprobs=[TokenLogprob(lp) for lp in h.logprobs]
                                        if request.params.logprobs is not None else None,
                                        finish_reason=h.finish_reason, score=h.score,
                                        version_ranges=_beam_version_ranges(request, len(h.token_ids)))
                       for i, h in enumerate(request.beam_results)]
        else:
            outputs = [CompletionOutput.of(seq) for seq in request.seqs]
        return cls(
            request_id=request.req_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=list(request.prompt_logprobs) if wants_prompt_logprobs else None,
            outputs=outputs,
            finished=request.is_finished,
            weight_version=request.weight_version,
            num_cached_tokens=request.num_cached_tokens,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            finish_time=request.finish_time,
        )


def _beam_version_ranges(request: Request, num_tokens: int) -> list[tuple[int, int]]:
    """Beams advance in step, so a change recorded on any beam holds at that position for every
    hypothesis."""
    if request.weight_version is None:
        return []
    changes = sorted({change for seq in request.seqs for change in seq.version_changes if change[0] < num_tokens})
    return [(0, request.weight_version)] + changes
