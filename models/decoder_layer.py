"""One layer of the generic decoder, shaped by a DecoderSpec (models/families.py).

Numerics follow HF's modeling code op for op (RMSNorm in float32, rotate-half RoPE, SDPA attention);
only the matrix layout differs (see models/layers.py). On the CPU in float32 the small per-token ops
(RMSNorm, per-head q/k norms, RoPE with the cache write, SiLU-and-multiply) run as fused native kernels
(models/kernels): the same arithmetic in a few calls instead of some twenty torch ops per layer.

A layer whose spec is the plain stack (DecoderSpec.is_plain_stack) takes `_forward_plain`, the per-layer
twin of the one-call native stack (models/kernels/decoder.c), kernel for kernel; every other shape takes
`_forward_general`, which reads each option of the spec.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers.activations import ACT2CLS, ACT2FN

from models import kernels
from models.attention import AttentionMetadata, PagedKVCache, ScoreOptions, paged_attention
from models.families import DecoderSpec
from models.layers import FusedLinear, ParamSlot, apply_rotary, rms_norm
from models.moe import MoeMLP

# The four places a layer may normalize (DecoderSpec.names says which a family has and their HF names).
NORM_PLACES = ("attn_in_norm", "attn_out_norm", "mlp_in_norm", "mlp_out_norm")


class DecoderLayer(torch.nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int, dtype, device, native: bool):
        super().__init__()
        self.spec = spec
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.window = spec.layer_windows[layer_idx]
        self.use_rope = spec.rope_layers[layer_idx]
        self.eps = spec.eps
        self.scale = spec.attention_scale / (layer_idx + 1) if spec.inverse_layer_scale else spec.attention_scale
        self.intermediate_size = inter = spec.intermediate_size
        self.native = native
        self.plain = native and spec.is_plain_stack
        hidden = spec.hidden_size
        self.q_width, self.kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv = FusedLinear(hidden, [self.q_width, self.kv_width, self.kv_width], [spec.qkv_bias] * 3, dtype, device)
        self.o_proj = FusedLinear(self.q_width, [hidden], [spec.o_bias], dtype, device)
        self.experts = self.gate_up = self.down = None
        if spec.moe is not None and spec.moe.sparse_layers[layer_idx]:
            self.experts = MoeMLP(hidden, spec.moe, spec.activation, dtype, device)
        else:
            gate_up = [inter, inter] if spec.gated_mlp else [inter]
            self.gate_up = FusedLinear(hidden, gate_up, [spec.mlp_bias] * len(gate_up), dtype, device)
            self.down = FusedLinear(inter, [hidden], [spec.mlp_bias], dtype, device)
        ones = lambda size: torch.nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)  # noqa: E731
        self.norms = {place: ones(hidden) for place in NORM_PLACES if getattr(spec.names, place) is not None}
        zeros = lambda size: torch.nn.Parameter(torch.zeros(size, dtype=dtype, device=device), requires_grad=False)  # noqa: E731
        self.norm_biases = {place: zeros(hidden) for place in self.norms} if spec.norm_bias else {}
        self.rotary_dim = spec.rotary_dim or self.head_dim
        self.q_norm = self.k_norm = None
        if spec.qk_norm is not None:
            per_head = spec.qk_norm == "head"
            self.q_norm = ones(self.head_dim if per_head else self.q_width)
            self.k_norm = ones(self.head_dim if per_head else self.kv_width)
        # A learned activation (Apertus's xIELU) is a module with tensors of its own, in the layer's dtype.
        self.act = ACT2CLS["xielu"](dtype=dtype) if spec.activation == "xielu" else ACT2FN[spec.activation]
        self.sinks = zeros(self.num_heads) if spec.attention_sinks else None
        self.scores = ScoreOptions(softcap=spec.attn_softcap, sinks=self.sinks)

    def native_entry(self, cache: PagedKVCache) -> dict:
        """This plain layer as the one-call stack's layer table reads it (kernels.decoder_layers): its norms,
        projections, biases, its cache tensors in `cache` and its window."""
        i = self.layer_idx
        return dict(input_norm=self.norms["attn_in_norm"], post_norm=self.norms["mlp_in_norm"],
                    q_norm=self.q_norm, k_norm=self.k_norm,
                    qkv=self.qkv.linear_weights(), qkv_bias=self.qkv.bias,
                    o_proj=self.o_proj.linear_weights(), o_bias=self.o_proj.bias,
                    gate_up=self.gate_up.linear_weights(), gate_up_bias=self.gate_up.bias,
                    down=self.down.linear_weights(), down_bias=self.down.bias,
                    key_cache=cache.keys[i], value_cache=cache.values[i], window=self.window)

    def forward(self, x, cos, sin, cache: PagedKVCache, meta: AttentionMetadata, keep_rows: torch.Tensor | None = None):
        """`keep_rows`: only these rows go on past attention (the last layer of a step whose other rows
        are prompt tokens nobody reads the output of: they only had to write their keys and values)."""
        if self.plain:
            return self._forward_plain(x, cos, sin, cache, meta, keep_rows)
        return self._forward_general(x, cos, sin, cache, meta, keep_rows)

    def _forward_plain(self, x, cos, sin, cache: PagedKVCache, meta: AttentionMetadata, keep_rows):
        layer = self.layer_idx
        # Module calls skipped (.forward directly): nn.Module's hook dispatch costs more than these ops.
        qkv = self.qkv.forward(kernels.rms_norm(x, self.norms["attn_in_norm"], self.eps))
        if self.q_norm is not None:
            kernels.rms_norm_heads(qkv, self.q_norm, self.eps, self.num_heads)
            kernels.rms_norm_heads(qkv[:, self.q_width :], self.k_norm, self.eps, self.num_kv_heads)
        # Rotates q and k in place and writes k and v to their slots: paged_attention skips its write.
        kernels.rotary_write_kv(qkv, cos, sin, meta.slot_mapping, cache.keys[layer], cache.values[layer], self.num_heads)
        query, key, value = self._heads(qkv)
        attn = paged_attention(query, key, value, layer, cache, meta, self.scale, self.window, kv_written=True)
        if keep_rows is not None:
            x, attn = x[keep_rows], attn[keep_rows]
        x = self.o_proj.forward_residual(attn, x)
        mlp = kernels.silu_mul(self.gate_up.forward(kernels.rms_norm(x, self.norms["mlp_in_norm"], self.eps)))
        return self.down.forward_residual(mlp, x)

    def _forward_general(self, x, cos, sin, cache: PagedKVCache, meta: AttentionMetadata, keep_rows):
        normed = self._norm(x, "attn_in_norm")
        qkv = self.qkv(normed)
        if self.q_norm is not None and not self.spec.qk_norm_after_rope:
            qkv = self._qk_norm(qkv)
        if self.use_rope:
            qkv = self._rotate(qkv, cos, sin)
        if self.q_norm is not None and self.spec.qk_norm_after_rope:
            qkv = self._qk_norm(qkv)
        query, key, value = self._heads(qkv)
        attn = paged_attention(query, key, value, self.layer_idx, cache, meta, self.scale, self.window,
                               scores=self.scores)
        if keep_rows is not None:
            x, attn, normed = x[keep_rows], attn[keep_rows], normed[keep_rows]
        attn_out = self._norm(self.o_proj(attn), "attn_out_norm")
        if self.spec.parallel_block:     # attention and MLP both read the layer's input
            mlp_in = self._norm(x, "mlp_in_norm") if "mlp_in_norm" in self.norms else normed
            return x + attn_out + self._mlp(mlp_in)
        x = self._residual(x, attn_out)
        return self._residual(x, self._norm(self._mlp(self._norm(x, "mlp_in_norm")), "mlp_out_norm"))

    def _rotate(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the query and key heads (their first rotary_dim channels where the rotation is partial)."""
        qk_width = self.q_width + self.kv_width
        heads = qkv[:, :qk_width].view(qkv.shape[0], -1, self.head_dim)
        if self.rotary_dim == self.head_dim:
            rotated = apply_rotary(heads, cos, sin)
        else:
            rotated = torch.cat((apply_rotary(heads[..., : self.rotary_dim], cos, sin),
                                 heads[..., self.rotary_dim :]), dim=-1)
        return torch.cat((rotated.flatten(1), qkv[:, qk_width:]), dim=1)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.experts is not None:
            return self.experts(x)
        gate_up = self.gate_up(x)
        if self.spec.gated_mlp:
            return self.down(self.act(gate_up[:, : self.intermediate_size]) * gate_up[:, self.intermediate_size :])
        return self.down(self.act(gate_up))

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = qkv.view(qkv.shape[0], -1, self.head_dim)
        query = heads[:, : self.num_heads]
        key = heads[:, self.num_heads : self.num_heads + self.num_kv_heads]
        return query, key, heads[:, self.num_heads + self.num_kv_heads :]

    def _norm(self, x: torch.Tensor, place: str) -> torch.Tensor:
        weight = self.norms.get(place)
        if weight is None:
            return x
        if self.spec.norm_kind == "layer":
            return F.layer_norm(x, weight.shape, weight, self.norm_biases.get(place), self.eps)
        if self.spec.norm_weight_offset:
            return rms_norm(x, weight + self.spec.norm_weight_offset, self.eps)
        return kernels.rms_norm(x, weight, self.eps) if self.native else rms_norm(x, weight, self.eps)

    def _qk_norm(self, qkv: torch.Tensor) -> torch.Tensor:
        """q and k normalized (per head or over all heads, as the spec says); v as it was."""
        num_tokens, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.q_width, self.kv_width, self.kv_width], dim=1)
        offset = self.spec.norm_weight_offset
        q_weight, k_weight = (self.q_norm + offset, self.k_norm + offset) if offset else (self.q_norm, self.k_norm)
        if self.spec.qk_norm == "head":
            q = rms_norm(q.reshape(num_tokens, -1, d), q_weight, self.eps).flatten(1)
            k = rms_norm(k.reshape(num_tokens, -1, d), k_weight, self.eps).flatten(1)
        else:
            q, k = rms_norm(q, q_weight, self.eps), rms_norm(k, k_weight, self.eps)
        return torch.cat((q, k, v), dim=1)

    def _qkv_row_orders(self, num_parts: int) -> list[torch.Tensor | None]:
        """Per checkpoint tensor of the q/k/v matrix (3 apart, or 1 fused): its rows in the native order
        ([q heads; k heads; v heads], rotate-half channels), or None where they already are. A per-head
        fused tensor ([heads, 3, head_dim], GPT-NeoX) is regrouped; interleaved RoPE channels (2i, 2i + 1)
        become (i, i + half) in q and k alike, which leaves every q.k product unchanged (Cohere, GLM-4)."""
        spec, d = self.spec, self.head_dim
        if not (spec.rotary_interleaved or spec.qkv_per_head):
            return [None] * num_parts
        plain = torch.arange(d)
        rotated = plain
        if spec.rotary_interleaved:
            rot = self.rotary_dim
            rotated = torch.cat((torch.arange(0, rot, 2), torch.arange(1, rot, 2), torch.arange(rot, d)))
        heads = {"q": self.num_heads, "k": self.num_kv_heads, "v": self.num_kv_heads}
        channels = {"q": rotated, "k": rotated, "v": plain}
        if num_parts == 3:
            return [torch.cat([h * d + channels[kind] for h in range(heads[kind])]) if kind != "v" else None
                    for kind in "qkv"]
        if spec.qkv_per_head:
            first_row = lambda kind, h: (h * 3 + "qkv".index(kind)) * d      # noqa: E731
        else:
            offsets = {"q": 0, "k": self.q_width, "v": self.q_width + self.kv_width}
            first_row = lambda kind, h: offsets[kind] + h * d                # noqa: E731
        return [torch.cat([first_row(kind, h) + channels[kind] for kind in "qkv" for h in range(heads[kind])])]

    def _residual(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        multiplier = self.spec.residual_multiplier
        return x + update if multiplier == 1.0 else x + update * multiplier

    def param_slots(self, prefix: str) -> dict[str, ParamSlot]:
        names = self.spec.names
        qkv_parts = _parts(names.qkv, [self.q_width, self.kv_width, self.kv_width])
        in_out = self.spec.checkpoint_in_out
        slots = self.qkv.slots_by_width(*_weights_and_biases(prefix, qkv_parts), in_out)
        for (part, _), order in zip(qkv_parts, self._qkv_row_orders(len(qkv_parts))):
            for key in (f"{prefix}.{part}.weight", f"{prefix}.{part}.bias"):
                if order is not None and key in slots:
                    slots[key] = replace(slots[key], row_order=order)
        slots |= self.o_proj.slots_by_width(*_weights_and_biases(prefix, [(names.o_proj, self.spec.hidden_size)]),
                                            in_out)
        if self.experts is not None:
            slots |= self.experts.slots(f"{prefix}.mlp")
        else:
            gate_up_parts = _parts(names.gate_up, self.gate_up.out_features)
            slots |= self.gate_up.slots_by_width(*_weights_and_biases(prefix, gate_up_parts), in_out)
            slots |= self.down.slots_by_width(*_weights_and_biases(prefix, [(names.down, self.spec.hidden_size)]),
                                              in_out)
            if isinstance(self.act, torch.nn.Module):
                for name, tensor in self.act.state_dict(keep_vars=True).items():
                    slots[f"{prefix}.mlp.act_fn.{name}"] = ParamSlot(tensor.data, tuple(tensor.shape))
        for place, weight in self.norms.items():
            slots[f"{prefix}.{getattr(names, place)}.weight"] = ParamSlot(weight, tuple(weight.shape))
        for place, bias in self.norm_biases.items():
            slots[f"{prefix}.{getattr(names, place)}.bias"] = ParamSlot(bias, tuple(bias.shape))
        if self.sinks is not None:
            slots[f"{prefix}.self_attn.sinks"] = ParamSlot(self.sinks, tuple(self.sinks.shape))
        if self.q_norm is not None:
            slots[f"{prefix}.{names.q_norm}.weight"] = ParamSlot(self.q_norm, tuple(self.q_norm.shape))
            slots[f"{prefix}.{names.k_norm}.weight"] = ParamSlot(self.k_norm, tuple(self.k_norm.shape))
        return slots


def _parts(names: tuple[str, ...], widths: list[int]) -> list[tuple[str, int]]:
    """The checkpoint tensors of a fused matrix with their widths: one per part, or one for all of them
    where the checkpoint fused them already."""
    if len(names) == len(widths):
        return list(zip(names, widths))
    assert len(names) == 1, names
    return [(names[0], sum(widths))]


def _weights_and_biases(prefix: str, parts: list[tuple[str, int]]):
    return ([f"{prefix}.{name}.weight" for name, _ in parts], [f"{prefix}.{name}.bias" for name, _ in parts],
            [width for _, width in parts])
