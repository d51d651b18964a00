"""Failover: a replica's death costs the cluster capacity, never an answer.

A call whose replica fails before it answers (it was dead before the front noticed, or died while
generating an answer that is not streamed) is sent again, whole, to a live replica: nothing of it reached
the client, and a greedy or seeded request samples the same tokens anywhere (counter-based sampling,
batch-invariant kernels). It says which weights it started under (header x-gorgon-started-under): while
they are served it runs under them as a started request, ahead of a weight update waiting for started
requests, as it would have on its own replica; if they are gone, it is sent once more as a new call. A
rollout call is split over replicas; each part fails over on its own.

A completions or chat stream is relayed with checkpoints (server/resumable.py): the front holds each
snapshot's chunks until the checkpoint that follows them, then delivers them and records the checkpoint
(wire/stream_checkpoints.py), so its state is always exactly what the client has. If the replica dies
mid-stream, the request goes to a live replica with that state as `resume`; the client's stream goes on with the next
chunk, with no gap or duplicate, and the same tokens an uninterrupted stream would have had. Its tokens'
weights must still be served, or every update since must have had policy keep (then it goes on under the
new weights, as a request kept across such an update does); otherwise it ends with a retriable
`weights_changed` error. Streams without checkpoints (SGLang's /generate, beam search) fail over only
before their first chunk; later, they end with a retriable error event as before.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from cluster.answers import error_body

ATTEMPTS = 4                 # replicas tried for one call before the client gets the failure
WAIT_FOR_REPLICA_S = 30.0    # with every replica down, how long a call waits for one to come back
RESUMABLE = ("/v1/completions", "/v1/chat/completions")
DONE = b"data: [DONE]\n\n"


async def events(response: httpx.Response) -> AsyncIterator[bytes]:
    """The SSE events of a response, each whole with its blank line (the server writes each at once)."""
    buffered = b""
    async for chunk in response.aiter_raw():
        buffered += chunk
        *whole, buffered = buffered.split(b"\n\n")
        for event in whole:
            yield event + b"\n\n"
    if buffered.strip():
        yield buffered


def error_event(message: str, code: str = "replica_unavailable") -> bytes:
    """A retriable error as the stream's last event, then [DONE]."""
    return f"data: {json.dumps(error_body(message, 'server_overloaded', code))}\n\n".encode() + DONE


def weights_changed(response: httpx.Response) -> bool:
    """A replica's refusal of a call sent again under weights it no longer serves."""
    if response.status_code != 409:
        return False
    try:
        return response.json()["error"]["code"] == "weights_changed"
    except (ValueError, KeyError, TypeError):
        return False
