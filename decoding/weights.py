"""Weight updates pushed by a trainer: validated in full before anything is touched, then applied.

A payload is a mapping from HF parameter names (as in the checkpoint, or in the trainer's
`model.state_dict()`) to tensors. Every name, shape, dtype and value is checked first (NaN and infinities
are refused unless the caller allows them), so a bad payload changes nothing and the error names the
offending parameter. Files are parsed defensively: a malformed header, offset or index is an error that
says what is wrong, and a folder's index may name only files inside that folder.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from models.base import NativeCausalLM


class WeightUpdateError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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
    if not isinstance(header, dict):
        raise WeightUpdateError("the safetensors header must be a JSON object of tensor entries")
    header.pop("__metadata__", None)
    base, tensors = 8 + header_len, {}
    for name, info in header.items():
        dtype, shape, start, end = _entry(name, info)
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


def _entry(name: str, info) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, start, end) of one header entry, each checked for type and range."""
    def bad(what: str) -> WeightUpdateError:
        return WeightUpdateError(f"tensor {name!r}: malformed safetensors entry ({what})", param=name)

    if not isinstance(info, dict):
        raise bad("not an object with dtype, shape and data_offsets")
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise bad(f"dtype must be one of {', '.join(SAFETENSORS_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise bad("shape must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(offset) is int and offset >= 0 for offset in offsets)):
        raise bad("data_offsets must be two non-negative integers")
    return dtype, shape, offsets[0], offsets[1]
