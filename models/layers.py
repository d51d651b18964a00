"""Building blocks shared by the native model implementations.

Weights are stored transposed ([in, out]) because a batch-1 decode step on the CPU is a matrix-vector
product that streams every weight once: `x @ W_t` over a contiguous [in, out] matrix reaches ~1.6x the
memory bandwidth of `F.linear(x, W)` over [out, in] on the machines we measured (benchmarks/decode.py).
Projections that read the same input (q/k/v, gate/up) are fused into one matrix for the same reason.

On the CPU in float32 each matrix is also kept packed (built on first use, rebuilt after any write to
the matrix), and the products run on the packed copy: the native panel kernel (models/kernels/gemm.c)
where the kernels build, else oneDNN's matmul over its own blocked layout. Bias and residual add ride in
the product. With the whole model streaming through the caches every step, on an AVX-512 AMD EPYC the
panel kernel runs 1.1-1.5x faster than packed oneDNN from 1 to 64 rows (within 5% above), and packed
oneDNN 1.2-1.6x faster than `mm`. The price is a second copy of the weights in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from models import kernels, quantization
from models.quantization import BlockFormat, QuantizedBlocks
from models.cpu_allocator import on_weight_pages

# oneDNN's fused linear and weight packing (the ops inductor lowers CPU linears to); absent from builds
# without oneDNN.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise if _ONEDNN else None
_ONEDNN_PACK = torch.ops.mkldnn._reorder_linear_weight if _ONEDNN else None

# For a single row, below this many weights oneDNN's fixed cost per call (~15 us) outweighs its faster
# kernel.
_ONEDNN_MIN_WEIGHTS_ONE_ROW = 1 << 17
# The batch size oneDNN picks its blocked layout for; any row count runs on it. 16-64 measured within
# 5% of each other from 1 to 256 rows.
_PACK_FOR_ROWS = 32


@dataclass(frozen=True)
class ParamSlot:
    """Where one HF checkpoint tensor lives inside a native parameter.

    `target` is a view into the native storage; `transpose` says the HF tensor is [out, in] and the
    native view is [in, out]. Loading a checkpoint or a pushed weight update is one `copy_` per slot.
    """

    target: torch.Tensor
    hf_shape: tuple[int, ...]
    transpose: bool = False
    on_write: Callable[[], None] | None = None    # told after every write (a packed copy goes stale)
    # The checkpoint's rows (dim 0) in the order the native storage keeps them: a fused [q, k, v] per head
    # (GPT-NeoX), or the interleaved RoPE channels of q and k (Cohere, GLM-4) as rotate-half expects them.
    row_order: torch.Tensor | None = None

    def copy_(self, tensor: torch.Tensor) -> None:
        if self.row_order is not None:
            tensor = tensor.index_select(0, self.row_order.to(tensor.device))
        if not (self.transpose and kernels.copy_transposed(self.target, tensor)):
            source = tensor.t() if self.transpose else tensor
            self.target.copy_(source.to(self.target.dtype))
        if self.on_write is not None:
            self.on_write()

    def read(self) -> torch.Tensor:
        """A copy of the slot's current value in the checkpoint's layout (for a later copy_ back)."""
        value = (self.target.t() if self.transpose else self.target).clone(memory_format=torch.contiguous_format)
        if self.row_order is None:
            return value
        restored = torch.empty_like(value)
        restored[self.row_order.to(value.device)] = value
        return restored


class FusedLinear(torch.nn.Module):
    """One matrix for several projections of the same input, stored as [in, sum(out)]."""

    def __init__(self, in_features: int, out_features: list[int], bias: list[bool], dtype, device):
        super().__init__()
        self.out_features = list(out_features)
        total = sum(out_features)
        self.weight_t = torch.nn.Parameter(
            torch.empty(in_features, total, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = None
        if any(bias):
            # A missing bias for one part of a fused matrix is a zero slice of the fused bias.
            self.bias = torch.nn.Parameter(torch.zeros(total, dtype=dtype, device=device), requires_grad=False)
        self._has_bias = list(bias)
        self._packed: torch.Tensor | None = None     # weight_t packed for the CPU product, built on first use
        # The native panels a weight update made stale, packed into again on next use: a push then frees
        # and a forward maps no memory (each a few ms per model on a trainer's every step).
        self._stale_panels: torch.Tensor | None = None
        self._native: bool | None = None
        # Quantized weights (models/quantization.py): per part its block format (None: float32), and the
        # blocks a GGUF file stored, used until a write replaces them (then weight_t is quantized again).
        self.block_formats: list[BlockFormat | None] = [None] * len(out_features)
        self._file_blocks: list[QuantizedBlocks | None] = [None] * len(out_features)
        self._linear: kernels.LinearWeights | None = None    # what linear_product reads, built on first use
        self._linear_storage: list[torch.Tensor] = []
        # The checkpoint names of the parts: name -> (the parts it covers, its slot).
        self.checkpoint_parts: dict[str, tuple[list[int], ParamSlot]] = {}
        # Told after every weight write, for whoever keeps pointers to the packed copy (the one-call
        # decoder stack's layer table).
        self.on_change: list[Callable[[], None]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, sum(out)]
        if self._native_panels(x):
            return kernels.linear_product(x, self.linear_weights(), self.weight_t.shape[1], self.bias)
        if self._use_onednn(x):
            return _ONEDNN_LINEAR(x.contiguous(), self._pack(), self.bias, "none", [], "")
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x @ W (+ bias): the residual add rides in the product, one op instead of two."""
        if self._native_panels(x):
            return kernels.linear_product(x, self.linear_weights(), self.weight_t.shape[1], self.bias, residual)
        if self._use_onednn(x):
            return _ONEDNN_LINEAR.binary(x.contiguous(), residual, self._pack(), self.bias, "add")
        out = torch.addmm(residual, x, self.weight_t)
        return out if self.bias is None else out.add_(self.bias)

    def _native_panels(self, x: torch.Tensor) -> bool:
        if self._native is None:   # fixed by where the weights live; asked once
            self._native = kernels.native_ops_available(self.weight_t.device, self.weight_t.dtype)
        return self._native and x.dtype == torch.float32

    def _use_onednn(self, x: torch.Tensor) -> bool:
        if not (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and self.weight_t.dtype == torch.float32):
            return False
        return x.shape[0] > 1 or self.weight_t.numel() >= _ONEDNN_MIN_WEIGHTS_ONE_ROW

    @property
    def quantized(self) -> bool:
        return any(fmt is not None for fmt in self.block_formats)

    def quantize(self, formats: list[BlockFormat], file_blocks: list[QuantizedBlocks | None] | None = None) -> None:
        """Keep the parts in these block formats from now on: the file's blocks where given, else weight_t
        quantized (round to nearest), as after every later write."""
        self.block_formats = list(formats)
        self._file_blocks = list(file_blocks) if file_blocks else [None] * len(formats)
        self._forget_packed()

    def linear_weights(self) -> kernels.LinearWeights:
        """The weights as the native product reads them (models/kernels/linear.h): float32 panels, or the
        quantized parts as segments of consecutive parts of one format. Built on first use; only where the
        native kernels run."""
        if self._linear is None:
            assert self._native_panels(self.weight_t), "the native kernels do not run on these weights"
            self._linear = kernels.LinearWeights()
            if not self.quantized:
                self._linear_storage = [self._pack()]
                self._linear.panels = self._linear_storage[0].data_ptr()
            else:
                self._linear_storage = self._quantized_segments(self._linear)
        return self._linear

    def streamed_bytes(self) -> int:
        """Bytes one product reads of the weights as the native kernels hold them."""
        self.linear_weights()
        return sum(t.numel() * t.element_size() for t in self._linear_storage)

    def _quantized_segments(self, linear: kernels.LinearWeights) -> list[torch.Tensor]:
        starts = [sum(self.out_features[:i]) for i in range(len(self.out_features))]
        runs: list[list[int]] = []
        for part, fmt in enumerate(self.block_formats):
            if runs and self.block_formats[runs[-1][-1]] == fmt:
                runs[-1].append(part)
            else:
                runs.append([part])
        assert len(runs) <= kernels.QUANT_MAX_SEGMENTS, runs
        storage = []
        for index, run in enumerate(runs):
            fmt = self.block_formats[run[0]]
            blocks = [self._file_blocks[part] or quantization.quantize(
                self.weight_t[:, starts[part]:starts[part] + self.out_features[part]].t(), fmt) for part in run]
            storage.append(on_weight_pages(quantization.pack(quantization.concatenate(blocks))))
            scale_bytes = 0 if fmt.kind == quantization.BF16 else fmt.scale_dtype.itemsize
            linear.segment[index] = kernels.QuantSegment(storage[-1].data_ptr(), fmt.kind, fmt.block, scale_bytes,
                                                         sum(self.out_features[part] for part in run))
        linear.segments = len(runs)
        return storage

    def _pack(self) -> torch.Tensor:
        """The packed copy for whichever CPU path runs (one of the two ever exists for a device); called
        after _native_panels has decided."""
        if self._packed is None:
            if self._native:
                self._packed = kernels.pack_panels(self.weight_t, out=self._stale_panels)
                self._stale_panels = None
            else:
                self._packed = _ONEDNN_PACK(self.weight_t.t().contiguous(), _PACK_FOR_ROWS)
        return self._packed

    def weights_changed(self, parts: list[int] | None = None) -> None:
        """Drop the packed copy after a write to weight_t (to `parts`, or all); the next product packs again,
        quantizing the written parts of a quantized matrix from their new values."""
        for part in range(len(self.out_features)) if parts is None else parts:
            self._file_blocks[part] = None
        self._forget_packed()

    def _forget_packed(self) -> None:
        if self._packed is not None and self._native:
            self._stale_panels = self._packed
        self._packed, self._linear, self._linear_storage = None, None, []
        for listener in self.on_change:
            listener()

    def slots(self, names: list[str], bias_names: list[str | None]) -> dict[str, ParamSlot]:
        """Map the HF names of the fused parts (weight [out, in], bias [out]) onto slices of this matrix."""
        return self.slots_by_width(names, bias_names, self.out_features)

    def slots_by_width(self, names: list[str], bias_names: list[str | None], widths: list[int],
                       in_out: bool = False) -> dict[str, ParamSlot]:
        """slots() for checkpoint tensors of the given widths, one of which may cover several fused parts
        (a checkpoint that stores [q; k; v] or [gate; up] as one tensor); `in_out`: the checkpoint stores
        them [in, out] already (GPT-2's Conv1D)."""
        assert sum(widths) == self.weight_t.shape[1], (widths, self.out_features)
        part_ends = [sum(self.out_features[: i + 1]) for i in range(len(self.out_features))]
        slots: dict[str, ParamSlot] = {}
        start = 0
        for name, bias_name, width in zip(names, bias_names, widths):
            view = self.weight_t[:, start : start + width]
            shape = (self.weight_t.shape[0], width) if in_out else (width, self.weight_t.shape[0])
            parts = [part for part, end in enumerate(part_ends) if start < end <= start + width]
            slots[name] = ParamSlot(view, shape, transpose=not in_out, on_write=partial(self.weights_changed, parts))
            self.checkpoint_parts[name] = (parts, slots[name])
            covered = [self._has_bias[part] for part in parts]
            if any(covered) and bias_name is not None:
                slots[bias_name] = ParamSlot(self.bias[start : start + width], (width,))
            start += width
        return slots


def spread_over_vocab(logits: torch.Tensor, token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits over a draft vocabulary [..., V'] (token_ids [V'], the model's id of each) -> logits over the
    model's vocabulary, -inf off the draft vocabulary (a distribution drawn from them is zero there)."""
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    return full.index_copy_(-1, token_ids.to(logits.device), logits)


def scale_logits(logits: torch.Tensor, multiplier: float | None = None, divisor: float | None = None,
                 softcap: float | None = None) -> torch.Tensor:
    """The transforms families' output heads apply after the product, in HF's order: Cohere's logit_scale
    (multiplier), Granite's logits_scaling (divisor), Gemma 2's final soft-capping."""
    if multiplier not in (None, 1.0):
        logits = logits * multiplier
    if divisor not in (None, 1.0):
        logits = logits / divisor
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed exactly as HF's Llama/Qwen2/Mistral (float32 statistics, weight after the cast)."""
    dtype = x.dtype
    if dtype == torch.float32:
        # Same arithmetic as below without the no-op casts; F.rms_norm is a slower composite on the CPU.
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps)) * weight
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RotaryEmbedding:
    """Rotary position embedding with HF's inverse frequencies and attention scaling."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float):
        self.inv_freq = inv_freq.to(torch.float32)
        self.attention_scaling = attention_scaling
        # cos and signed sin of positions [0, len), grown on demand (a step then only looks rows up).
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, signed sin [T, 1, head_dim], broadcast over heads.

        The first half of sin is negated so that rotate_half(x) * sin == roll(x, half) * signed_sin,
        which is exact (a sign flip) and saves three ops per layer.
        """
        key = (positions.device, dtype)
        cos, sin = self._tables.get(key, (None, None))
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if cos is None or cos.shape[0] < needed:
            length = max(1024, 1 << (needed - 1).bit_length())
            cos, sin = self._compute(torch.arange(length, device=positions.device), dtype)
            self._tables[key] = cos, sin
        return cos.index_select(0, positions).unsqueeze(1), sin.index_select(0, positions).unsqueeze(1)

    def tables(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [L >= length, head_dim] of positions [0, L) on the CPU, whole (a native call
        looks its rows up itself): the rows cos_sin selects, bit for bit."""
        self.cos_sin(torch.tensor([length - 1]), dtype)
        return self._tables[(torch.device("cpu"), dtype)]

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, head_dim] each, the same arithmetic as HF's rotary embedding in float32."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        half = sin.shape[-1] // 2
        sin[:, :half].neg_()
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; HF's rotate-half convention: x * cos + rotate_half(x) * sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def embedding_slots(embed_name: str, embed: torch.Tensor, lm_head: FusedLinear, tied: bool) -> dict[str, list[ParamSlot]]:
    """The input embedding and the output head: one checkpoint tensor feeding both when they are tied."""
    embed_slot = ParamSlot(embed, tuple(embed.shape))
    head_slot = lm_head.slots(["lm_head.weight"], [None])["lm_head.weight"]
    if tied:
        # A trainer's state_dict() also names the tied head; it is accepted and lands in the same place.
        return {embed_name: [embed_slot, head_slot], "lm_head.weight": [head_slot]}
    return {embed_name: [embed_slot], "lm_head.weight": [head_slot]}


def layer_slots(layers, prefix: str) -> dict[str, list[ParamSlot]]:
    """Every decoder layer's slots under `prefix.{i}`."""
    return {name: [slot] for i, layer in enumerate(layers) for name, slot in layer.param_slots(f"{prefix}.{i}").items()}
