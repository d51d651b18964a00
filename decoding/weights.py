"""Weight updates pushed by a trainer: validated in full before anything is touched, then applied.

A payload is a mapping from HF parameter names (as in the checkpoint, or in the trainer's
`model.state_dict()`) to tensors. Every name, shape and dtype is checked first, so a bad payload changes
nothing and the error names the offending parameter.
"""

from __future__ import annotations

import json
import struct
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


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_payload(buffer: bytearray) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors body as views into `buffer` (no copy; keep the buffer alive)."""
    if len(buffer) < 8:
        raise WeightUpdateError("the body is too short to be a safetensors payload")
    (header_len,) = struct.unpack_from("<Q", buffer, 0)
    if header_len > len(buffer) - 8:
        raise WeightUpdateError("the safetensors header length runs past the end of the body")
    try:
        header = json.loads(bytes(buffer[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightUpdateError(f"the safetensors header is not valid JSON: {err}") from err
    header.pop("__metadata__", None)
    base, tensors = 8 + header_len, {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape, (start, end) = list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise WeightUpdateError(f"tensor {name!r}: malformed safetensors entry", param=name) from err
        numel = 1
        for dim in shape:
            numel *= dim
        itemsize = torch.tensor([], dtype=dtype).element_size()
        if not 0 <= start <= end <= len(buffer) - base or end - start != numel * itemsize:
            raise WeightUpdateError(f"tensor {name!r}: data offsets do not match its shape and dtype", param=name)
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=base + start).view(shape)
    return tensors
