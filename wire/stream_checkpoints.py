"""Stream checkpoints on the wire: what a resumable completions or chat stream carries so that another
server can continue it (server/resumable.py writes them, cluster/failover.py reads them).

A stream asked with the header `x-gorgon-checkpoints: 1` carries, after the chunks of each engine
snapshot, an SSE comment `: gorgon-checkpoint {json}` (clients ignore comments):
  {"prompt": i, "samples": [{"index", "seed", "from", "token_ids", "finish_reason", "stop_reason",
   "version_ranges"}], "view": {...}}
with each sample's tokens since the last checkpoint (`from`: how many it had before), and last,
`{"done": true}` once the usage chunk is out. `StreamState` folds them into the request's `resume` field.
"""

from __future__ import annotations

import json

HEADER = "x-gorgon-checkpoints"
# On a request sent again whole after its server failed: the weight version it had started under there.
# It runs under those weights if they are still served (ahead of a weight update waiting for started
# requests), else the server answers 409 with code weights_changed.
STARTED_UNDER = "x-gorgon-started-under"
PREFIX = ": gorgon-checkpoint "
_PREFIX = PREFIX.encode()


def comment(payload: dict) -> str:
    return f"{PREFIX}{json.dumps(payload, separators=(',', ':'))}\n\n"


def is_checkpoint(event: bytes) -> bool:
    return event.startswith(_PREFIX)


def parse(event: bytes) -> dict:
    return json.loads(event[len(_PREFIX):])


class StreamState:
    """What the client of one stream has received, as the checkpoints delivered with it say."""

    def __init__(self):
        self.view: dict | None = None
        self.samples: dict[int, dict[int, dict]] = {}      # prompt index -> sample index -> sample
        self.done = False

    @classmethod
    def of(cls, resume: dict | None) -> StreamState:
        """The state a request's own `resume` field starts from (a client resuming a stream itself)."""
        state = cls()
        if isinstance(resume, dict) and isinstance(resume.get("requests"), dict):
            state.view = resume.get("view")
            for prompt, request in resume["requests"].items():
                state.samples[int(prompt)] = {sample["index"]: dict(sample) for sample in request.get("samples", [])}
        return state

    def apply(self, checkpoint: dict) -> None:
        if checkpoint.get("done"):
            self.done = True
            return
        self.view = checkpoint["view"]
        samples = self.samples.setdefault(int(checkpoint["prompt"]), {})
        for sample in checkpoint["samples"]:
            kept = samples.get(sample["index"], {"token_ids": []})["token_ids"]
            if sample["from"] != len(kept):
                raise ValueError(f"a checkpoint continues sample {sample['index']} at token {sample['from']}, "
                                 f"not {len(kept)}")
            samples[sample["index"]] = {key: value for key, value in sample.items() if key != "from"} | \
                {"token_ids": kept + sample["token_ids"]}

    @property
    def started(self) -> bool:
        return self.view is not None

    def last_weight_version(self) -> int | None:
        ends = [s["version_ranges"][-1][1] for samples in self.samples.values() for s in samples.values()
                if s["version_ranges"]]
        return max(ends) if ends else None

    def resume(self, on_weight_change: str = "error") -> dict:
        """The request's `resume` field (server/protocol.py StreamResume)."""
        return {"view": self.view, "on_weight_change": on_weight_change,
                "requests": {str(prompt): {"samples": list(samples.values())}
                             for prompt, samples in self.samples.items()}}
