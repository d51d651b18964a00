"""The weight-update body: a safetensors payload (an 8-byte little-endian header length, a JSON header of
tensor entries, the tensors' bytes), written by the client (`safetensors_header`) and read by the server
(`read_payload`, which checks every entry before it makes a tensor of it)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import torch


class PayloadError(ValueError):
    """A malformed payload; `param` names the tensor entry at fault, when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def payload_header(buffer: bytes | bytearray) -> tuple[dict, int]:
    """A safetensors body's tensor entries (name -> dtype, shape, offsets; no metadata) and where its data
    starts; PayloadError if the header is malformed. Reads the header only."""
    if len(buffer) < 8:
        raise PayloadError("the body is too short to be a safetensors payload")
    (header_len,) = struct.unpack_from("<Q", buffer, 0)
    if header_len > len(buffer) - 8:
        raise PayloadError("the safetensors header length runs past the end of the body")
    try:
        header = json.loads(bytes(buffer[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PayloadError(f"the safetensors header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise PayloadError("the safetensors header must be a JSON object of tensor entries")
    header.pop("__metadata__", None)
    return header, 8 + header_len


def read_payload(buffer: bytearray) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors body as views into `buffer` (no copy; keep the buffer alive)."""
    header, base = payload_header(buffer)
    tensors = {}
    for name, info in header.items():
        dtype, shape, start, end = _entry(name, info)
        numel = 1
        for dim in shape:
            numel *= dim
        itemsize = torch.tensor([], dtype=dtype).element_size()
        if not 0 <= start <= end <= len(buffer) - base or end - start != numel * itemsize:
            raise PayloadError(f"tensor {name!r}: data offsets do not match its shape and dtype", param=name)
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=base + start).view(shape)
    return tensors


def _entry(name: str, info) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, start, end) of one header entry, each checked for type and range."""
    def bad(what: str) -> PayloadError:
        return PayloadError(f"tensor {name!r}: malformed safetensors entry ({what})", param=name)

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


SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def safetensors_header(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, list[torch.Tensor]]:
    """The safetensors prefix (8-byte length + JSON header, padded to 8 bytes) and the tensors in order."""
    entries, ordered, offset = {}, [], 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": SAFETENSORS_CODES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        ordered.append(tensor)
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header, ordered


def encode_payload(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A whole safetensors body in memory (for a payload that is kept and sent again)."""
    header, ordered = safetensors_header(tensors)
    return header + b"".join(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                             for t in ordered)
