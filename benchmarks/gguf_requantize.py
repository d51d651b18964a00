"""A GGUF file rewritten with its matrices in another type (F32, Q8_0, Q4_0, Q4_1), as llama.cpp's quantize
tool would write it from the same float weights (round to nearest; gguf-py's reference quantizers), so
that Gorgon and llama.cpp read the very same file at each format. Metadata is copied as it is; tensors
that are not quantized (norms) are copied unchanged."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

TARGETS = ("F32", "Q8_0", "Q4_0", "Q4_1")


def requantized(source: str, type_name: str) -> Path:
    """`source` with every quantized matrix in type_name, made once beside it."""
    if type_name not in TARGETS:
        raise ValueError(f"type {type_name!r}: choose from {', '.join(TARGETS)}")
    stem = Path(source).name.split(".")[0]
    target = Path(source).with_name(f"{stem}.{type_name}.gguf")
    if target.exists():
        return target
    reader = gguf.GGUFReader(source)
    partial = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    kind = gguf.GGMLQuantizationType[type_name]
    for tensor in reader.tensors:
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
            continue
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        data = weights if type_name == "F32" else gguf.quants.quantize(weights, kind)
        writer.add_tensor(tensor.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(target)
    return target
