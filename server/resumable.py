"""Streams that another server can take up where this one left them (the cluster's failover:
cluster/failover.py; the checkpoints' wire format: wire/stream_checkpoints.py).

Asked by the header `x-gorgon-checkpoints: 1`, a completions or chat stream carries, after the chunks of
each engine snapshot, a checkpoint: for each sample of the snapshot's prompt, its seed and the tokens
sampled since the last checkpoint, how it finished, the weight versions of its tokens, and the view's
own bookkeeping (response id, text sent per choice, tool-call progress; server/responses.py). After the
usage chunk comes a last checkpoint, `{"done": true}`. Whoever relays the stream applies a checkpoint
only once the chunks before it are delivered, so the state it holds is exactly what its client has.

Sending the request again with that state as `resume` (server/protocol.py StreamResume) continues the
stream: each sample is rebuilt from its seed and tokens (decoding/resume.py), the view from its
bookkeeping, and the next chunks are those the uninterrupted stream would have sent. A beam search stream
has no checkpoints (its state is not carried); a resumed request whose weights are no longer served ends
with a `weights_changed` error unless the state says on_weight_change "keep".
"""

from __future__ import annotations

from fastapi import Request

from decoding.outputs import RequestOutput
from decoding.resume import Resumption
from server.errors import APIError
from wire.stream_checkpoints import HEADER, STARTED_UNDER, comment

__all__ = ["HEADER", "Checkpoints", "resumptions", "sent_tokens", "started_under"]


class Checkpoints:
    def __init__(self, view, streams: list):
        self.view = view
        self.seeds = {stream.prompt_index: stream.seeds for stream in streams}

    def after(self, prompt_index: int, output: RequestOutput) -> str:
        return comment(self.view.checkpoint(prompt_index, output, self.seeds[prompt_index]))

    @staticmethod
    def done() -> str:
        return comment({"done": True})


def sent_tokens(resume, n: int) -> dict[int, int]:
    """Each choice's tokens that the interrupted stream delivered (choice index: prompt * n + sample)."""
    return {prompt_index * n + sample.index: len(sample.token_ids)
            for prompt_index, state in resume.requests.items() for sample in state.samples}


def started_under(request: Request, num_prompts: int) -> list[Resumption | None] | None:
    """For a call sent again whole after its server failed (header x-gorgon-started-under), each
    prompt's Resumption: no tokens, the weights it had started under; None for a first call."""
    value = request.headers.get(STARTED_UNDER)
    if value is None:
        return None
    if not value.isdigit():
        raise APIError(400, f"{STARTED_UNDER} must be a weight version (a non-negative integer)")
    return [Resumption([], started_under=int(value))] * num_prompts


def resumptions(body, request: Request, num_prompts: int) -> list[Resumption | None] | None:
    """A completions or chat call's resumptions: its `resume` field's (a stream taken up where it was),
    or the weights it started under (a call sent again whole), or none."""
    if body.resume is not None:
        return body.resumptions(num_prompts)
    return started_under(request, num_prompts)
