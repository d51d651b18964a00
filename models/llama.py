"""Native Llama-family decoder (Llama, Qwen2, Mistral) over the paged KV cache.

Numerics follow HF's modeling code op for op (RMSNorm in float32, rotate-half RoPE, SDPA attention);
only the matrix layout differs (see models/layers.py). On the CPU in float32 the small per-token ops
(RMSNorm, RoPE with the cache write, SiLU-and-multiply) run as fused native kernels (models/kernels):
the same arithmetic in a few calls instead of some twenty torch ops per layer. A step whose every token
attends as a decode row (decodes, draft chains, Medusa trees) runs the whole stack in one native call
(models/kernels/decoder.c): the same kernels in the same order, without a Python round trip between them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.activations import ACT2FN

from models import kernels
from models.attention import NULL_BLOCK, AttentionMetadata, PagedKVCache, paged_attention
from models.layers import FusedLinear, ParamSlot, RotaryEmbedding, apply_rotary, embedding_slots, layer_slots, rms_norm


class LlamaLayer(torch.nn.Module):
    def __init__(self, config, layer_idx: int, dtype, device, window: int | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.window = window
        self.eps = config.rms_norm_eps
        hidden, inter = config.hidden_size, config.intermediate_size
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        self.qkv = FusedLinear(hidden, [q_out, kv_out, kv_out], [qkv_bias] * 3, dtype, device)
        o_bias = bool(getattr(config, "attention_bias", False)) and config.model_type != "qwen2"
        self.o_proj = FusedLinear(q_out, [hidden], [o_bias], dtype, device)
        self.gate_up = FusedLinear(hidden, [inter, inter], [mlp_bias] * 2, dtype, device)
        self.down = FusedLinear(inter, [hidden], [mlp_bias], dtype, device)
        self.input_norm = torch.nn.Parameter(torch.ones(hidden, dtype=dtype, device=device), requires_grad=False)
        self.post_norm = torch.nn.Parameter(torch.ones(hidden, dtype=dtype, device=device), requires_grad=False)
        self.act = ACT2FN[config.hidden_act]
        self.scale = self.head_dim ** -0.5
        self.intermediate_size = inter

    def forward(self, x, cos, sin, cache: PagedKVCache, meta: AttentionMetadata, native: bool,
                keep_rows: torch.Tensor | None = None):
        """`keep_rows`: only these rows go on past attention (the last layer of a step whose other rows
        are prompt tokens nobody reads the output of: they only had to write their keys and values)."""
        if native:
            return self._forward_native(x, cos, sin, cache, meta, keep_rows)
        num_tokens = x.shape[0]
        qkv = self.qkv(rms_norm(x, self.input_norm, self.eps))
        qk_width = (self.num_heads + self.num_kv_heads) * self.head_dim
        # Rotate q and k in one call: they share cos/sin and sit side by side in the fused output.
        qk = apply_rotary(qkv[:, :qk_width].view(num_tokens, -1, self.head_dim), cos, sin)
        query, key = qk[:, : self.num_heads], qk[:, self.num_heads :]
        value = qkv[:, qk_width:].view(num_tokens, self.num_kv_heads, self.head_dim)
        attn = paged_attention(query, key, value, self.layer_idx, cache, meta, self.scale, self.window)
        if keep_rows is not None:
            x, attn = x[keep_rows], attn[keep_rows]
        x = self.o_proj.forward_residual(attn, x)
        gate_up = self.gate_up(rms_norm(x, self.post_norm, self.eps))
        mlp = self.act(gate_up[:, : self.intermediate_size]) * gate_up[:, self.intermediate_size :]
        return self.down.forward_residual(mlp, x)

    def _forward_native(self, x, cos, sin, cache: PagedKVCache, meta: AttentionMetadata, keep_rows: torch.Tensor | None):
        num_tokens, layer = x.shape[0], self.layer_idx
        # Module calls skipped (.forward directly): nn.Module's hook dispatch costs more than these ops.
        qkv = self.qkv.forward(kernels.rms_norm(x, self.input_norm, self.eps))
        # Rotates q and k in place and writes k and v to their slots: paged_attention skips its write.
        kernels.rotary_write_kv(qkv, cos, sin, meta.slot_mapping, cache.keys[layer], cache.values[layer], self.num_heads)
        heads = qkv.view(num_tokens, -1, self.head_dim)
        query = heads[:, : self.num_heads]
        key = heads[:, self.num_heads : self.num_heads + self.num_kv_heads]
        value = heads[:, self.num_heads + self.num_kv_heads :]
        attn = paged_attention(query, key, value, layer, cache, meta, self.scale, self.window, kv_written=True)
        if keep_rows is not None:
            x, attn = x[keep_rows], attn[keep_rows]
        x = self.o_proj.forward_residual(attn, x)
        mlp = kernels.silu_mul(self.gate_up.forward(kernels.rms_norm(x, self.post_norm, self.eps)))
        return self.down.forward_residual(mlp, x)

    def param_slots(self, prefix: str) -> dict[str, ParamSlot]:
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        slots = self.qkv.slots([f"{attn}.{p}_proj.weight" for p in "qkv"], [f"{attn}.{p}_proj.bias" for p in "qkv"])
        slots |= self.o_proj.slots([f"{attn}.o_proj.weight"], [f"{attn}.o_proj.bias"])
        slots |= self.gate_up.slots([f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"],
                                    [f"{mlp}.gate_proj.bias", f"{mlp}.up_proj.bias"])
        slots |= self.down.slots([f"{mlp}.down_proj.weight"], [f"{mlp}.down_proj.bias"])
        slots[f"{prefix}.input_layernorm.weight"] = ParamSlot(self.input_norm, tuple(self.input_norm.shape))
        slots[f"{prefix}.post_attention_layernorm.weight"] = ParamSlot(self.post_norm, tuple(self.post_norm.shape))
        return slots


class _NativeStack(NamedTuple):
    """What decoder_forward reads for one cache: the shapes and the layer table of raw pointers, with
    the tensors it points into (`layers`) kept referenced beside it."""

    cache: PagedKVCache
    shape: kernels.DecoderShape
    table: object
    layers: list[dict]


def _only_decode_group(meta: AttentionMetadata, num_tokens: int):
    """The native decode group when it holds every token of the step, else None."""
    if meta.segments or meta.prefill is not None or len(meta.decode_groups) != 1:
        return None
    group = meta.decode_groups[0]
    return group if group.native and group.q_start == 0 and group.q_end == num_tokens else None


def _layer_windows(config) -> list[int | None]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    return [window] * config.num_hidden_layers


class LlamaForCausalLM(torch.nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding, dtype: torch.dtype, device):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        windows = _layer_windows(config)
        self.layers = torch.nn.ModuleList(
            LlamaLayer(config, i, dtype, device, windows[i]) for i in range(self.num_layers))
        self.num_kv_heads = self.layers[0].num_kv_heads
        self.head_dim = self.layers[0].head_dim
        self.attention_windows = frozenset(windows)
        self.embed = torch.nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.final_norm = torch.nn.Parameter(torch.ones(config.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.lm_head = FusedLinear(config.hidden_size, [config.vocab_size], [False], dtype, device)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.optional_param_names = frozenset({"lm_head.weight"}) if self.tied else frozenset()
        self.rotary = rotary
        self.eps = config.rms_norm_eps
        # The fused native ops need SiLU (every Llama, Qwen2 and Mistral checkpoint we know of uses it).
        self.native_ops = kernels.native_ops_available(torch.device(device), dtype) and config.hidden_act == "silu"
        # The one-call decoder stack's table, built on first use and again after a weight update repacks
        # a projection.
        self._decoder_table: _NativeStack | None = None
        for layer in self.layers:
            for linear in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
                linear.on_change.append(self._forget_decoder_table)

    def forward(self, input_ids, positions, cache, meta, output_rows=None):
        x = self.embed.index_select(0, input_ids)
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        if self.native_ops:
            cos, sin = cos.squeeze(1), sin.squeeze(1)      # [T, head_dim], as the kernel reads them
            group = _only_decode_group(meta, x.shape[0])
            if group is not None:
                shape, layers = self._native_stack(cache)
                return kernels.decoder_forward(
                    shape, layers, x, cos, sin, meta.slot_mapping,
                    group.block_tables, group.context_lens, group.extra_positions, group.extra_counts,
                    self.final_norm, output_rows)
        last = self.num_layers - 1
        for i, layer in enumerate(self.layers):
            x = layer.forward(x, cos, sin, cache, meta, self.native_ops, output_rows if i == last else None)
        return kernels.rms_norm(x, self.final_norm, self.eps) if self.native_ops else rms_norm(x, self.final_norm, self.eps)

    def _forget_decoder_table(self) -> None:
        self._decoder_table = None

    def _native_stack(self, cache: PagedKVCache) -> tuple[kernels.DecoderShape, object]:
        """The shape and layer table decoder_forward reads, for this cache and the current weights."""
        built = self._decoder_table
        if built is not None and built.cache is cache:
            return built.shape, built.table
        first = self.layers[0]
        shape = kernels.DecoderShape(self.hidden_size, first.intermediate_size, first.num_heads, first.num_kv_heads,
                                     first.head_dim, cache.block_size, self.eps, first.scale)
        layers = [dict(input_norm=layer.input_norm, post_norm=layer.post_norm,
                       qkv=layer.qkv.packed_panels(), qkv_bias=layer.qkv.bias,
                       o_proj=layer.o_proj.packed_panels(), o_bias=layer.o_proj.bias,
                       gate_up=layer.gate_up.packed_panels(), gate_up_bias=layer.gate_up.bias,
                       down=layer.down.packed_panels(), down_bias=layer.down.bias,
                       key_cache=cache.keys[i], value_cache=cache.values[i], window=layer.window)
                  for i, layer in enumerate(self.layers)]
        self._decoder_table = _NativeStack(cache, shape, kernels.decoder_layers(layers), layers)
        return shape, self._decoder_table.table

    def greedy_chain(self, feed: list[list[int]], positions: list[int], block_tables: list[list[int]],
                     cache: PagedKVCache, stop_tokens: list[list[int]], banned_steps: list[int],
                     steps: int) -> torch.Tensor | None:
        """Draft `steps` tokens greedily for each row in one native call: row r's cache lacks the tokens
        feed[r] (its newest token at least), the first at positions[r], and its slots for those and the
        drafts are reserved in block_tables[r]. Each step's argmax, with the row's stop_tokens at -inf in
        its first banned_steps[r] steps, is the next step's input. -> [steps, R]; None where the one-call
        stack does not run."""
        if not self.native_ops:
            return None
        rows = len(feed)
        parts, num_feed, width, banned_width = _greedy_chain_ints(feed, positions, block_tables, cache.block_size,
                                                                  stop_tokens, banned_steps, steps)
        feed_tokens, last, slots, feed_context, context, banned, banned_steps, every_position, every_table = \
            _packed(parts)
        every_table = every_table.view(-1, width)
        cos, sin = self.rotary.cos_sin(every_position, self.dtype)
        chain = kernels.GreedyChain(feed_tokens, last, slots[:num_feed], every_table[:num_feed], feed_context,
                                    slots[num_feed:].view(steps - 1, rows), every_table[num_feed:], context,
                                    cos.squeeze(1), sin.squeeze(1), banned.view(rows, banned_width), banned_steps)
        shape, layers = self._native_stack(cache)
        return kernels.decoder_greedy_chain(shape, layers, self.embed, self.final_norm, self.lm_head.packed_panels(),
                                            self.vocab_size, chain)

    def compute_logits(self, hidden):
        return self.lm_head(hidden)

    def param_slots(self) -> dict[str, list[ParamSlot]]:
        slots = layer_slots(self.layers, "model.layers")
        slots |= embedding_slots("model.embed_tokens.weight", self.embed, self.lm_head, self.tied)
        slots["model.norm.weight"] = [ParamSlot(self.final_norm, tuple(self.final_norm.shape))]
        return slots


def _greedy_chain_ints(feed: list[list[int]], positions: list[int], block_tables: list[list[int]], block_size: int,
                       stop_tokens: list[list[int]], banned_steps: list[int], steps: int):
    """Every int greedy_chain's kernel reads, as lists in the kernel's order; with the number of fed
    tokens, the block tables' width and the banned lists' width."""
    rows = len(feed)
    feed_rows = [r for r, tokens in enumerate(feed) for _ in tokens]
    feed_positions = [p + j for p, tokens in zip(positions, feed) for j in range(len(tokens))]
    step_one = [p + len(tokens) for p, tokens in zip(positions, feed)]
    later_positions = [p + s for s in range(steps - 1) for p in step_one]
    every_row = feed_rows + list(range(rows)) * (steps - 1)
    every_position = feed_positions + later_positions
    slots = [block_tables[r][p // block_size] * block_size + p % block_size for r, p in zip(every_row, every_position)]
    last, total = [], 0
    for tokens in feed:
        total += len(tokens)
        last.append(total - 1)
    width = max(map(len, block_tables))
    tables = [table + [NULL_BLOCK] * (width - len(table)) for table in block_tables]
    banned_width = max(1, max(map(len, stop_tokens)))
    banned = [t for ids in stop_tokens for t in ids + [-1] * (banned_width - len(ids))]
    parts = ([t for tokens in feed for t in tokens], last, slots, [p + 1 for p in feed_positions],
             [p + 1 for p in step_one], banned, banned_steps, every_position,
             [t for r in feed_rows for t in tables[r]] + [t for table in tables for t in table])
    return parts, len(feed_rows), width, banned_width


def _packed(parts) -> list[torch.Tensor]:
    """The lists as views of one int64 tensor (one allocation, not twenty: this runs per drafted round,
    and each torch call costs as much as a layer of the draft)."""
    packed = torch.tensor([value for part in parts for value in part], dtype=torch.long)
    views, offset = [], 0
    for part in parts:
        views.append(packed[offset : offset + len(part)])
        offset += len(part)
    return views
