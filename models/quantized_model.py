"""Which linear layers of a native model keep quantized weights, and in which block format.

`--quantization` (engine option `quantization`):
  auto   a GGUF file's quantized tensors stay in the file's blocks; a float checkpoint stays float32
  none   every weight float32 (a GGUF file dequantized, as transformers reads it)
  int8   every projection and the output head quantized at load: Q8_0's blocks (32 inputs per float16
         scale, round to nearest); q8_0, q4_0 and q4_1 name those formats the same way
  bf16   every projection and the output head in bfloat16 (CPUs with AVX512_BF16)
A weight written later (a pushed update) is quantized into its part's format again, round to nearest.
The input embedding stays float32: a lookup reads one row per token, not the matrix.
"""

from __future__ import annotations

from collections import Counter

from models import kernels
from models.layers import FusedLinear
from models.quantization import FORMATS, LOAD_SCHEMES, QuantizedBlocks

SCHEMES = ("auto", "none", *LOAD_SCHEMES)


def quantize_linears(model, scheme: str, file_blocks: dict[str, QuantizedBlocks] | None = None) -> str | None:
    """Set the block formats of every FusedLinear of `model`: LOAD_SCHEMES' format everywhere, or the
    file's blocks where it has them (a part of a fused matrix the file stores in float takes the format of
    the matrix's first quantized part). -> what the model now runs, e.g. "gguf: q4_1 x 210, q8_0 x 1", or
    None for float32 throughout."""
    counts: Counter[str] = Counter()
    for linear in (module for module in model.modules() if isinstance(module, FusedLinear)):
        if scheme in LOAD_SCHEMES:
            fmt = FORMATS[LOAD_SCHEMES[scheme]]
            linear.quantize([fmt] * len(linear.out_features))
            counts[fmt.name] += 1
            continue
        parts = _file_parts(model, linear, file_blocks or {})
        known = [blocks.format for blocks in parts if blocks is not None]
        if not known:
            continue
        linear.quantize([blocks.format if blocks is not None else known[0] for blocks in parts], parts)
        counts.update(fmt.name for fmt in known)
    if not counts:
        return None
    label = "gguf" if scheme == "auto" else scheme
    return f"{label}: " + ", ".join(f"{name} x {count}" for name, count in sorted(counts.items()))


def quantize_draft_products(module, weights: str) -> None:
    """A draft's (an EAGLE head's, Medusa heads') FusedLinears in `weights`: "float" keeps them float32,
    else a load scheme, bf16 running as Q8_0 where the CPU has no bf16 products. A draft only proposes, so
    its precision never reaches the output, and at batch 1 its products are bound by the bytes they read."""
    if weights != "float" and weights not in LOAD_SCHEMES:
        raise ValueError(f"a draft's weights must be 'float' or one of {', '.join(LOAD_SCHEMES)}, got {weights!r}")
    if weights == "float":
        return
    if weights == "bf16" and not kernels.bf16_products_supported():
        weights = "q8_0"
    quantize_linears(module, weights)


def _file_parts(model, linear: FusedLinear, file_blocks: dict[str, QuantizedBlocks]) -> list[QuantizedBlocks | None]:
    """Per part of `linear`, the file's blocks for it (in the native row order), or None."""
    parts: list[QuantizedBlocks | None] = [None] * len(linear.out_features)
    for name, (covered, slot) in linear.checkpoint_parts.items():
        blocks = file_blocks.get(name)
        if blocks is None and name == "lm_head.weight" and getattr(model, "tied", False):
            blocks = file_blocks.get(model.spec.embed_name)   # the output head is the tied embedding
        if blocks is None or blocks.shape != slot.hf_shape:
            continue
        if slot.row_order is not None:
            blocks = blocks.rows(slot.row_order)
        start = 0
        for part in covered:
            width = linear.out_features[part]
            parts[part] = blocks.rows(slice(start, start + width))
            start += width
    return parts
