"""Weight updates pushed by a trainer: validated in full before anything is touched, then applied.

A payload is a mapping from HF parameter names (as in the checkpoint, or in the trainer's
`model.state_dict()`) to tensors. Every name, shape, dtype and value is checked first (NaN and infinities
are refused unless the caller allows them), so a bad payload changes nothing and the error names the
offending parameter. Files are parsed defensively: a malformed header, offset or index is an error that
says what is wrong, and a folder's index may name only files inside that folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from pathlib import Path

import torch

from models import kernels
from models.base import NativeCausalLM
from wire import safetensors as wire_safetensors


class WeightUpdateError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class NothingToRollBack(WeightUpdateError):
    """No update was kept for a rollback (none made with keep_previous, or it was committed)."""


@dataclass
class SavedWeights:
    """What an update replaced: the values it overwrote and the version before it, so that a caller
    coordinating several servers (cluster/) can undo it when another server failed the same update."""

    tensors: dict[str, torch.Tensor]
    version: int


class ServedWeights:
    """The served model's weights and their version. A validated push is applied while no started
    request is in flight (the async front waits for them or aborts them), so each request is generated
    wholly under one version, unless the caller keeps them (pause mode "keep"): then every token's version
    is recorded. Applying one calls `on_change` (the engine drops its cached prefixes, whose keys and
    values the old weights computed)."""

    def __init__(self, model: NativeCausalLM, requests: Mapping, on_change: Callable[[], None] = lambda: None,
                 draft: DraftWeights | None = None):
        self.model = model
        self.version = 0
        self._requests = requests           # the engine's live requests, by id
        self._on_change = on_change
        self.draft = draft                  # the draft model's weights, pushed under DRAFT_PREFIX names
        self.previous: SavedWeights | None = None    # what the last update asked to keep replaced

    def started_request_ids(self) -> list[str]:
        """Requests admitted under the current weights that have not finished (running or preempted)."""
        return [r.req_id for r in self._requests.values() if r.weight_version is not None]

    def has_started_requests(self) -> bool:
        return any(r.weight_version is not None for r in self._requests.values())

    def update(self, tensors: dict[str, torch.Tensor], version: int | None = None, require_all: bool = False,
               allow_non_finite: bool = False, allow_version_rollback: bool = False) -> int:
        """Validate every tensor (names, shapes, dtypes, and NaN or infinite values unless
        allow_non_finite), then apply them (apply_validated)."""
        self.check_version(version, allow_version_rollback)
        self.validate(tensors, require_all, allow_non_finite)
        return self.apply_validated(tensors, version, allow_version_rollback)

    def validate(self, tensors: Mapping[str, torch.Tensor], require_all: bool = False,
                 allow_non_finite: bool = False) -> None:
        """Check a payload against the model it names: the served one, or the draft for DRAFT_PREFIX
        names (require_all holds for the served model only)."""
        target, draft = split_draft(tensors)
        if draft and self.draft is None:
            raise WeightUpdateError(f"{DRAFT_PREFIX!r} names need a draft model (serve with --speculative draft)",
                                    param=DRAFT_PREFIX + next(iter(draft)))
        if target or require_all:
            validate_update(self.model, target, require_all, allow_non_finite)
        if draft:
            try:
                validate_update(self.draft.model, draft, False, allow_non_finite)
            except WeightUpdateError as err:
                raise WeightUpdateError(f"draft model: {err}", param=DRAFT_PREFIX + (err.param or "")) from err

    @staticmethod
    def changes_outputs(tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether a payload touches the served model (a draft only changes how fast tokens come)."""
        return bool(split_draft(tensors)[0])

    def apply_validated(self, tensors: dict[str, torch.Tensor], version: int | None = None,
                        allow_version_rollback: bool = False, keep_started: bool = False,
                        keep_previous: bool = False) -> int:
        """Copy in tensors that validate_update passed and set (or bump) the version. A version below the
        current one is refused unless allow_version_rollback (a trainer that restarted from an older
        checkpoint says so; anything else is a stale push); checked again here, as the version may have
        moved since the tensors were validated.

        Started requests are refused unless keep_started: then they continue under the new weights, each
        unfinished sequence noting where its tokens under the new version start, and a request with
        cached keys and values from the old weights is marked kv_stale. keep_previous: first save what the
        update overwrites (`previous`), for a rollback."""
        target, draft = split_draft(tensors)
        started = [r for r in self._requests.values() if r.weight_version is not None]
        if target:
            self.check_version(version, allow_version_rollback)
            if started and not keep_started:
                raise RuntimeError("weights cannot change while requests are being generated")
        if keep_previous:
            self.previous = SavedWeights(self.current(tensors), self.version)
        if draft:            # speculation is lossless: new draft weights never change an output
            apply_update(self.draft.model, draft)
            self.draft.forget_states()
        if not target:
            return self.version
        apply_update(self.model, target)
        self._on_change()
        self.version = self.version + 1 if version is None else version
        for request in started:
            request.kv_stale = request.kv_stale or any(seq.num_computed for seq in request.seqs)
            for seq in request.seqs:
                if not seq.is_finished:
                    seq.version_changes.append((seq.num_output_tokens, self.version))
        return self.version

    def forget_previous(self) -> None:
        """The last update is final: drop what it saved for a rollback."""
        self.previous = None

    def current(self, names) -> dict[str, torch.Tensor]:
        """Copies of the named parameters as they are served now (draft ones under DRAFT_PREFIX)."""
        target, draft = split_draft(dict.fromkeys(names))
        served = self.model.param_slots()
        saved = {name: served[name][0].read() for name in target}
        if draft:
            slots = self.draft.model.param_slots()
            saved.update({DRAFT_PREFIX + name: slots[name][0].read() for name in draft})
        return saved

    def check_version(self, version: int | None, allow_version_rollback: bool = False) -> None:
        if version is not None and version < self.version and not allow_version_rollback:
            raise WeightUpdateError(f"weight_version {version} is lower than the served version {self.version}; "
                                    "send a newer version, or allow_version_rollback to go back on purpose",
                                    param="weight_version")


# Pushed names under this prefix are the draft model's (speculative decoding), e.g.
# "draft.model.layers.0.self_attn.q_proj.weight".
DRAFT_PREFIX = "draft."


class DraftWeights(Protocol):
    model: NativeCausalLM

    def forget_states(self) -> None:
        """Drop every draft cache (computed under the old draft weights)."""


def split_draft(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the served model's tensors, the draft's tensors without the prefix)."""
    target = {name: t for name, t in tensors.items() if not name.startswith(DRAFT_PREFIX)}
    draft = {name[len(DRAFT_PREFIX):]: t for name, t in tensors.items() if name.startswith(DRAFT_PREFIX)}
    return target, draft


def validate_update(model: NativeCausalLM, tensors: Mapping[str, torch.Tensor], require_all: bool = False,
                    allow_non_finite: bool = False) -> None:
    slots = model.param_slots()
    for name, tensor in tensors.items():
        if name not in slots:
            raise WeightUpdateError(f"unknown parameter {name!r}: the served model has no parameter of that name",
                                    param=name)
        expected = slots[name][0].hf_shape
        if tuple(tensor.shape) != tuple(expected):
            raise WeightUpdateError(f"parameter {name!r} has shape {list(tensor.shape)}, expected {list(expected)}",
                                    param=name)
        if not tensor.dtype.is_floating_point:
            raise WeightUpdateError(f"parameter {name!r} has dtype {tensor.dtype}, expected a floating-point dtype",
                                    param=name)
        if not allow_non_finite and not kernels.all_finite(tensor):
            raise WeightUpdateError(f"parameter {name!r} holds NaN or infinite values; fix the checkpoint, or allow "
                                    "them explicitly (allow_non_finite)", param=name)
    if require_all:
        missing = [name for name in slots if name not in tensors and name not in model.optional_param_names]
        if missing:
            raise WeightUpdateError(f"parameter {missing[0]!r} is missing ({len(missing)} missing in all)",
                                    param=missing[0])


@torch.inference_mode()
def apply_update(model: NativeCausalLM, tensors: Mapping[str, torch.Tensor]) -> None:
    slots = model.param_slots()
    for name, tensor in tensors.items():
        for slot in slots[name]:
            slot.copy_(tensor.to(slot.target.device))


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an HF folder (one or several safetensors shards) or of a single .safetensors file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _load_shard(path)
    if not path.is_dir():
        raise WeightUpdateError(f"{str(path)!r} is neither an HF model folder nor a .safetensors file")
    folder = path.resolve()
    index = folder / "model.safetensors.index.json"
    names = _index_shards(index) if index.exists() else sorted(p.name for p in folder.glob("*.safetensors"))
    if not names:
        raise WeightUpdateError(f"no .safetensors files in {str(path)!r}")
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        shard = (folder / name).resolve()
        if shard.parent != folder and folder not in shard.parents:
            raise WeightUpdateError(f"the index names {name!r}, which is outside the model folder")
        if not shard.is_file():
            raise WeightUpdateError(f"the index names {name!r}, which is not a file in the model folder")
        tensors.update(_load_shard(shard))
    return tensors


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise WeightUpdateError(f"{index.name} is not a valid index (a JSON object with a weight_map): {err}") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise WeightUpdateError(f"{index.name}: weight_map must map parameter names to shard file names")
    return sorted(set(weight_map.values()))


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, checked as read_payload checks a pushed body (the file is read whole)."""
    try:
        buffer = bytearray(path.read_bytes())
    except OSError as err:
        raise WeightUpdateError(f"cannot read {path.name}: {err.strerror or err}") from err
    try:
        return read_payload(buffer)
    except WeightUpdateError as err:
        raise WeightUpdateError(f"{path.name}: {err}", param=err.param) from err


def read_payload(buffer: bytearray) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors body as views into `buffer` (no copy; keep the buffer alive)."""
    try:
        return wire_safetensors.read_payload(buffer)
    except wire_safetensors.PayloadError as err:
        raise WeightUpdateError(str(err), param=err.param) from err
