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
from pathlib import Path

import torch

from models.base import NativeCausalLM
from wire import safetensors as wire_safetensors


class WeightUpdateError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ServedWeights:
    """The served model's weights and their version. A validated push is applied only while no started
    request is in flight (the async front waits for them or aborts them), so every request is generated
    wholly under one version. Applying one calls `on_change` (the engine drops its cached prefixes,
    whose keys and values the old weights computed)."""

    def __init__(self, model: NativeCausalLM, requests: Mapping, on_change: Callable[[], None] = lambda: None):
        self.model = model
        self.version = 0
        self._requests = requests           # the engine's live requests, by id
        self._on_change = on_change

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
        validate_update(self.model, tensors, require_all, allow_non_finite)
        return self.apply_validated(tensors, version, allow_version_rollback)

    def apply_validated(self, tensors: dict[str, torch.Tensor], version: int | None = None,
                        allow_version_rollback: bool = False) -> int:
        """Copy in tensors that validate_update passed and set (or bump) the version. A version below the
        current one is refused unless allow_version_rollback (a trainer that restarted from an older
        checkpoint says so; anything else is a stale push); checked again here, as the version may have
        moved since the tensors were validated."""
        self.check_version(version, allow_version_rollback)
        if self.has_started_requests():
            raise RuntimeError("weights cannot change while requests are being generated")
        apply_update(self.model, tensors)
        self._on_change()
        self.version = self.version + 1 if version is None else version
        return self.version

    def check_version(self, version: int | None, allow_version_rollback: bool = False) -> None:
        if version is not None and version < self.version and not allow_version_rollback:
            raise WeightUpdateError(f"weight_version {version} is lower than the served version {self.version}; "
                                    "send a newer version, or allow_version_rollback to go back on purpose",
                                    param="weight_version")


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
        if not allow_non_finite and not bool(torch.isfinite(tensor).all()):
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
