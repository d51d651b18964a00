"""Weights kept in quantized blocks: the block formats, reading them from a GGUF file, quantizing float
weights into them (int8 at load, and any weight pushed into a quantized engine), and packing them into the
panel layout the native product reads (models/kernels/quant_gemm.c).

Every format is held as one of two kinds, without loss from what the file stores:
  I8: signed 8-bit values times a scale per block (Q8_0: 32 values and a float16 scale; Q6_K: its 6-bit
      values minus 32, per 16 values a float32 scale d * scale_j, exact in float32)
  U4: unsigned 4-bit values times a scale plus a min per block of 32 (Q4_1: float16 scale and min; Q4_0:
      its min is -8 times its scale; Q4_K: per 32 values d * scale_j and -dmin * min_j, float32, exact)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

I8, U4, BF16 = 0, 1, 2  # QUANT_I8, QUANT_U4, QUANT_BF16 of models/kernels/linear.h
PANEL = 16             # output columns per packed panel
INPUT_BLOCK = 32       # inputs per scale of the quantized activations: the packed k is padded to it


@dataclass(frozen=True)
class BlockFormat:
    name: str
    kind: int
    block: int                  # inputs per block
    scale_dtype: torch.dtype    # of the scales (and mins)

    @property
    def bits_per_weight(self) -> float:
        if self.kind == BF16:
            return 16.0
        value_bits = 8 if self.kind == I8 else 4
        scale_bits = torch.finfo(self.scale_dtype).bits * (2 if self.kind == U4 else 1)
        return value_bits + scale_bits / self.block


FORMATS = {
    "q8_0": BlockFormat("q8_0", I8, 32, torch.float16),
    "q6_k": BlockFormat("q6_k", I8, 16, torch.float32),
    "q4_0": BlockFormat("q4_0", U4, 32, torch.float16),
    "q4_1": BlockFormat("q4_1", U4, 32, torch.float16),
    "q4_k": BlockFormat("q4_k", U4, 32, torch.float32),
    # bfloat16 values without scales (models/kernels/bf16_gemm.c; AVX512_BF16 only); `block` pads the inputs
    "bf16": BlockFormat("bf16", BF16, 32, torch.bfloat16),
}
# `--quantization` names for a float checkpoint quantized at load; int8 is Q8_0's blocks (per block of 32
# inputs, a float16 scale, round to nearest).
LOAD_SCHEMES = {"int8": "q8_0", "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1", "bf16": "bf16"}


@dataclass
class QuantizedBlocks:
    """A matrix [out, in] in blocks along `in`: values [out, in] (int8 for I8, uint8 0..15 for U4), scales
    [out, in / block], mins (U4) the same shape."""

    format: BlockFormat
    values: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def rows(self, index: torch.Tensor | slice) -> QuantizedBlocks:
        take = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t.index_select(0, index))
        return QuantizedBlocks(self.format, take(self.values), take(self.scales),
                               None if self.mins is None else take(self.mins))

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix the blocks stand for."""
        out_features, in_features = self.shape
        if self.format.kind == BF16:
            return self.values.float()
        values = self.values.float().view(out_features, -1, self.format.block)
        out = values * self.scales.float().unsqueeze(-1)
        if self.mins is not None:
            out = out + self.mins.float().unsqueeze(-1)
        return out.reshape(out_features, in_features)


def concatenate(parts: list[QuantizedBlocks]) -> QuantizedBlocks:
    """Parts of one format stacked along the output rows (a fused projection)."""
    mins = None if parts[0].mins is None else torch.cat([part.mins for part in parts])
    return QuantizedBlocks(parts[0].format, torch.cat([part.values for part in parts]),
                           torch.cat([part.scales for part in parts]), mins)


def quantize(weight: torch.Tensor, fmt: BlockFormat) -> QuantizedBlocks:
    """Round-to-nearest blocks of a float matrix [out, in] (llama.cpp's reference quantizers for Q8_0,
    Q4_0 and Q4_1; Q4_K and Q6_K, whose files carry searched scales, get the same rule with float32
    scales). `in` is padded with zeros to a whole block."""
    weight = weight.detach().float()
    pad = -weight.shape[1] % fmt.block
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    blocks = weight.view(weight.shape[0], -1, fmt.block)
    if fmt.kind == BF16:
        return QuantizedBlocks(fmt, weight.to(torch.bfloat16), weight.new_empty(weight.shape[0], 0))
    if fmt.kind == I8:
        levels = 127.0 if fmt.block == 32 else 31.0
        scale = blocks.abs().amax(-1) / levels
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        scaled = blocks * inverse.unsqueeze(-1)     # rounded half away from zero, as C's roundf
        values = (scaled.sign() * (scaled.abs() + 0.5).floor()).clamp_(-levels, levels).to(torch.int8)
        return QuantizedBlocks(fmt, values.view(weight.shape), scale.to(fmt.scale_dtype))
    if fmt.name == "q4_0":   # the value of largest magnitude maps to -8: scale = that value / -8
        index = blocks.abs().argmax(-1, keepdim=True)
        scale = blocks.gather(-1, index).squeeze(-1) / -8.0
        inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        values = (blocks * inverse.unsqueeze(-1) + 8.5).to(torch.int32).clamp_(0, 15).to(torch.uint8)
        scale = scale.to(fmt.scale_dtype)
        return QuantizedBlocks(fmt, values.view(weight.shape), scale, (scale.float() * -8.0).to(fmt.scale_dtype))
    low, high = blocks.amin(-1), blocks.amax(-1)
    scale = (high - low) / 15.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    values = ((blocks - low.unsqueeze(-1)) * inverse.unsqueeze(-1) + 0.5).to(torch.int32).clamp_(0, 15)
    return QuantizedBlocks(fmt, values.to(torch.uint8).view(weight.shape), scale.to(fmt.scale_dtype),
                           low.to(fmt.scale_dtype))


# ---- GGUF's block layouts (ggml-common.h), per row of `in` values ----

def _half(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float16).squeeze(-1)


def _nibbles_32(qs: torch.Tensor) -> torch.Tensor:
    """GGUF's 4-bit order in a block of 32: byte j holds value j (low nibble) and value 16 + j (high)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q8_0(raw):
    return QuantizedBlocks(FORMATS["q8_0"], raw[..., 2:].contiguous().view(torch.int8), _half(raw[..., :2]))


def _q4_0(raw):
    scale = _half(raw[..., :2])
    return QuantizedBlocks(FORMATS["q4_0"], _nibbles_32(raw[..., 2:]), scale, (scale.float() * -8.0).half())


def _q4_1(raw):
    return QuantizedBlocks(FORMATS["q4_1"], _nibbles_32(raw[..., 4:]), _half(raw[..., :2]), _half(raw[..., 2:4]))


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 8 six-bit scales and mins from their 12 bytes (get_scale_min_k4)."""
    q = packed.to(torch.int32)
    low_scales, low_mins = q[..., 0:4] & 63, q[..., 4:8] & 63
    high_scales = (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)
    high_mins = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return torch.cat([low_scales, high_scales], -1), torch.cat([low_mins, high_mins], -1)


def _q4_k(raw):
    d, dmin = _half(raw[..., 0:2]).float(), _half(raw[..., 2:4]).float()
    scales, mins = _k_scales(raw[..., 4:16])
    qs = raw[..., 16:144].reshape(*raw.shape[:-1], 4, 32)      # four chunks of 64 values
    values = torch.stack([qs & 0x0F, qs >> 4], dim=-2)          # [..., chunk, low/high, 32]
    return QuantizedBlocks(FORMATS["q4_k"], values.flatten(-3), (d.unsqueeze(-1) * scales).flatten(-2),
                           (-(dmin.unsqueeze(-1) * mins)).flatten(-2))


def _q6_k(raw):
    ql = raw[..., 0:128].reshape(*raw.shape[:-1], 2, 64).to(torch.int32)
    qh = raw[..., 128:192].reshape(*raw.shape[:-1], 2, 32).to(torch.int32)
    sc = raw[..., 192:208].contiguous().view(torch.int8).float()
    d = _half(raw[..., 208:210]).float()
    quarters = [(ql[..., :32] & 0x0F) | ((qh & 3) << 4), (ql[..., 32:] & 0x0F) | (((qh >> 2) & 3) << 4),
                (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)]
    values = (torch.stack(quarters, dim=-2) - 32).to(torch.int8)   # [..., half, quarter, 32]
    return QuantizedBlocks(FORMATS["q6_k"], values.flatten(-3), (d.unsqueeze(-1) * sc).flatten(-2))


# ggml type name -> (bytes per block, values per block, reader)
GGUF_TYPES = {"Q8_0": (34, 32, _q8_0), "Q4_0": (18, 32, _q4_0), "Q4_1": (20, 32, _q4_1),
              "Q4_K": (144, 256, _q4_k), "Q6_K": (210, 256, _q6_k)}


def from_gguf(raw: torch.Tensor, type_name: str, in_features: int) -> QuantizedBlocks:
    """A GGUF tensor's bytes [out, row bytes] (uint8) in its type's blocks, as stored."""
    block_bytes, block_values, reader = GGUF_TYPES[type_name]
    rows = raw.shape[0]
    blocks = reader(raw.reshape(rows, in_features // block_values, block_bytes))
    mins = None if blocks.mins is None else blocks.mins.reshape(rows, -1)
    return QuantizedBlocks(blocks.format, blocks.values.reshape(rows, in_features), blocks.scales.reshape(rows, -1), mins)


# ---- the panel layout of quant_gemm.c ----

def pack(blocks: QuantizedBlocks) -> torch.Tensor:
    """[panels][blocks along in][scales, mins, values] as uint8, out padded to whole panels and in to whole
    input blocks with zeros (which add nothing: the activations there are zero too)."""
    fmt = blocks.format
    out_features, in_features = blocks.shape
    padded_in = -(-in_features // INPUT_BLOCK) * INPUT_BLOCK
    rows = -(-out_features // PANEL) * PANEL
    values = _pad(blocks.values, rows, padded_in)
    if fmt.kind == BF16:   # [panels][pairs of inputs][16 columns][2]
        pairs = values.view(rows // PANEL, PANEL, padded_in // 2, 2).permute(0, 2, 1, 3)
        return pairs.contiguous().view(torch.uint8).reshape(-1)
    per_row = padded_in // fmt.block
    panels = rows // PANEL
    parts = [_panel_major(_pad(blocks.scales, rows, per_row), panels)]
    if fmt.kind == U4:
        parts.append(_panel_major(_pad(blocks.mins, rows, per_row), panels))
    v = values.view(panels, PANEL, per_row, fmt.block)
    if fmt.kind == I8:
        packed_values = v.view(panels, PANEL, per_row, fmt.block // 4, 4).permute(0, 2, 3, 1, 4)
        parts.append(packed_values.contiguous().view(torch.uint8).reshape(panels, per_row, -1))
    else:
        octets = v.view(panels, PANEL, per_row, fmt.block // 8, 2, 4).permute(0, 2, 3, 1, 5, 4)
        packed_values = octets[..., 0] | (octets[..., 1] << 4)
        parts.append(packed_values.contiguous().reshape(panels, per_row, -1))
    return torch.cat(parts, dim=-1).reshape(-1).contiguous()


def _pad(tensor: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, columns - tensor.shape[1], 0, rows - tensor.shape[0]))


def _panel_major(per_block: torch.Tensor, panels: int) -> torch.Tensor:
    """[rows, blocks] scales -> [panels, blocks, 16 * bytes]: each block's 16 columns together."""
    grouped = per_block.view(panels, PANEL, -1).permute(0, 2, 1).contiguous()
    return grouped.view(torch.uint8).reshape(panels, grouped.shape[1], -1)
