"""Weight updates pushed by a trainer: validated in full before anything is touched, then applied.

A payload is a mapping from HF parameter names (as in the checkpoint, or in the trainer's
`model.state_dict()`) to tensors. Every name, shape and dtype is checked first, so a bad payload changes
nothing and the error names the offending parameter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.base import NativeCausalLM


class WeightUpdateError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def validate_update(model: NativeCausalLM, tensors: Mapping[str, torch.Tensor], require_all: bool = False) -> None:
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
        return load_file(path)
    if not path.is_dir():
        raise WeightUpdateError(f"{str(path)!r} is neither an HF model folder nor a .safetensors file")
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise WeightUpdateError(f"no .safetensors files in {str(path)!r}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(path / shard))
    return tensors
