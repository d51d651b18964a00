"""A GGUF file's quantized tensors as stored, under their HF checkpoint names: transformers' GGUF reader
dequantizes every tensor to float, and the native decoder keeps the file's own blocks instead
(models/quantization.py).

Names come from transformers' GGUF name map, and so does any row order the conversion changed: llama.cpp
stores Llama's q and k rows permuted for its RoPE, and transformers' tensor processor undoes that. Here the
processor is run on the row indices, which gives the same permutation for the blocks (a block lies within
one row). A tensor whose processor does more than reorder rows (experts split, transposed) is left to the
float weights."""

from __future__ import annotations

import contextlib
import functools
import logging

import numpy as np
import torch

from models.quantization import GGUF_TYPES, QuantizedBlocks, from_gguf

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def cached_gguf_name_maps():
    """While open, gguf-py's get_tensor_name_map(arch, blocks) is built once per argument pair.
    transformers' get_gguf_hf_weights_map calls it again for every submodule of the model it walks (some
    450 times for SmolLM2-135M's 30 layers), and each call builds every tensor name of every block: about
    5 s of a GGUF load, twice (transformers' own load, then read_gguf_blocks). The map is a pure function of
    its arguments, read only, so sharing one is safe."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def read_gguf_blocks(path: str, hf_model) -> dict[str, QuantizedBlocks]:
    """HF name -> the file's blocks, in HF's row order, for every 2-D tensor of a supported block type."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = gguf.GGUFReader(path)
    architecture = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_model.config.to_dict())
    with cached_gguf_name_maps():
        names = get_gguf_hf_weights_map(hf_model, processor)
    found: dict[str, QuantizedBlocks] = {}
    unkept: dict[str, int] = {}
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        hf_name = names.get(tensor.name)
        if hf_name is None or len(tensor.shape) != 2 or type_name in ("F32", "F16", "BF16"):
            continue
        if type_name not in GGUF_TYPES:
            unkept[type_name] = unkept.get(type_name, 0) + 1
            continue
        in_features, out_features = (int(n) for n in tensor.shape)
        order = _row_order(processor, tensor.name, out_features)
        if order is None:
            logger.info("%s: its GGUF tensor is more than rows reordered; it runs from the float weights", hf_name)
            continue
        raw = torch.from_numpy(np.array(tensor.data, copy=True)).view(torch.uint8).reshape(out_features, -1)
        blocks = from_gguf(raw, type_name, in_features)
        found[hf_name] = blocks if order is ... else blocks.rows(order)
    if unkept:
        logger.warning("%s: %s matrices run dequantized to float32 (kept in their blocks: %s)", path,
                       ", ".join(f"{count} {name}" for name, count in sorted(unkept.items())), ", ".join(GGUF_TYPES))
    return found


def _row_order(processor, name: str, rows: int):
    """The GGUF row each HF row comes from: ... for the same order, a permutation, or None where the
    processor does more than reorder rows."""
    index = np.arange(rows, dtype=np.float64)[:, None]
    try:
        processed = processor.process(weights=index, name=name).weights
    except Exception:   # noqa: BLE001 - a processor that needs more than the rows (expert tensors) is not a reordering
        return None
    if not isinstance(processed, np.ndarray) or processed.shape != (rows, 1):
        return None
    order = processed[:, 0].astype(np.int64)
    if not np.array_equal(np.sort(order), np.arange(rows)):
        return None
    return ... if np.array_equal(order, np.arange(rows)) else torch.from_numpy(order)
