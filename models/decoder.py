"""The one native decoder of every served family (Llama, Qwen2/3, Mistral, Gemma, OLMo 2/3, Granite, ...),
shaped by the family's DecoderSpec (models/families.py), over the paged KV cache.

A step whose every token attends as a decode row (decodes, draft chains, Medusa trees) of a model whose
spec is the plain stack runs the whole stack in one native call (models/kernels/decoder.c): the same
kernels in the same order as the per-layer path, without a Python round trip between them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from models import kernels
from models.attention import AttentionMetadata, PagedKVCache
from models.decoder_layer import DecoderLayer
from models.families import DecoderSpec
from models.greedy_chain import greedy_chain_ints, packed_views
from models.layers import (FusedLinear, ParamSlot, RotaryEmbedding, embedding_slots, layer_slots, rms_norm,
                           scale_logits)


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


class DecoderForCausalLM(torch.nn.Module):
    def __init__(self, spec: DecoderSpec, rotaries: dict[str, RotaryEmbedding | None], dtype: torch.dtype, device,
                 max_positions: int = 0):
        """rotaries: the RoPE tables by the kinds spec.rope_kinds names (None where no layer rotates);
        max_positions: the learned position table's length, for a spec with one."""
        super().__init__()
        self.spec = spec
        self.dtype = dtype
        self.num_layers = spec.num_layers
        self.hidden_size = spec.hidden_size
        self.vocab_size = spec.vocab_size
        self.native_ops = kernels.native_ops_available(torch.device(device), dtype)
        # The one-call stack and the plain per-layer path it mirrors (DecoderSpec.is_plain_stack).
        self.plain_stack = self.native_ops and spec.is_plain_stack
        self.layers = torch.nn.ModuleList(
            DecoderLayer(spec, i, dtype, device, self.native_ops) for i in range(self.num_layers))
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.attention_windows = frozenset(spec.layer_windows)
        self.embed = torch.nn.Parameter(
            torch.empty(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.position_embed = None
        if spec.position_embedding_name is not None:
            self.position_embed = torch.nn.Parameter(
                torch.empty(max_positions, spec.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.final_norm = torch.nn.Parameter(torch.ones(spec.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.final_norm_bias = (torch.nn.Parameter(torch.zeros(spec.hidden_size, dtype=dtype, device=device),
                                                   requires_grad=False) if spec.norm_bias else None)
        self.lm_head = FusedLinear(spec.hidden_size, [spec.vocab_size], [spec.lm_head_bias], dtype, device)
        self.tied = spec.tied_embeddings
        self.optional_param_names = frozenset({"lm_head.weight"}) if self.tied else frozenset()
        self.rotaries = rotaries
        self.rotary = rotaries[spec.rope_kinds[0]]       # the one table of a plain stack
        self.eps = spec.eps
        # The one-call decoder stack's table, built on first use and again after a weight update repacks
        # a projection.
        self._decoder_table: _NativeStack | None = None
        for layer in self.layers:
            for linear in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
                if linear is not None:
                    linear.on_change.append(self._forget_decoder_table)

    def forward(self, input_ids, positions, cache, meta, output_rows=None):
        x = self.embed.index_select(0, input_ids)
        if self.spec.embedding_multiplier != 1.0:
            x = x * self.spec.embedding_multiplier
        if self.position_embed is not None:
            x = x + self.position_embed.index_select(0, positions)
        if self.plain_stack:
            cos, sin = self.rotary.cos_sin(positions, self.dtype)
            cos, sin = cos.squeeze(1), sin.squeeze(1)      # [T, head_dim], as the kernel reads them
            group = _only_decode_group(meta, x.shape[0])
            if group is not None:
                shape, layers = self._native_stack(cache)
                return kernels.decoder_forward(
                    shape, layers, x, cos, sin, meta.slot_mapping,
                    group.block_tables, group.context_lens, group.extra_positions, group.extra_counts,
                    self.final_norm, output_rows)
            tables = [(cos, sin)] * self.num_layers
        else:
            tables = self._rope_tables(positions)
        last = self.num_layers - 1
        for i, (layer, (cos, sin)) in enumerate(zip(self.layers, tables)):
            x = layer.forward(x, cos, sin, cache, meta, output_rows if i == last else None)
        return self._final_norm(x)

    def _rope_tables(self, positions: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per layer, the (cos, sin) of its RoPE table at these positions, each table computed once; (None,
        None) where the model rotates nothing (GPT-2)."""
        computed: dict[int, tuple] = {}
        tables = []
        for kind in self.spec.rope_kinds:
            rotary = self.rotaries[kind]
            if rotary is None:
                tables.append((None, None))
                continue
            if id(rotary) not in computed:
                computed[id(rotary)] = rotary.cos_sin(positions, self.dtype)
            tables.append(computed[id(rotary)])
        return tables

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.norm_kind == "layer":
            return F.layer_norm(x, self.final_norm.shape, self.final_norm, self.final_norm_bias, self.eps)
        if self.spec.norm_weight_offset:
            return rms_norm(x, self.final_norm + self.spec.norm_weight_offset, self.eps)
        return kernels.rms_norm(x, self.final_norm, self.eps) if self.native_ops else rms_norm(x, self.final_norm, self.eps)

    def _forget_decoder_table(self) -> None:
        self._decoder_table = None

    def _native_stack(self, cache: PagedKVCache) -> tuple[kernels.DecoderShape, object]:
        """The shape and layer table decoder_forward reads, for this cache and the current weights."""
        built = self._decoder_table
        if built is not None and built.cache is cache:
            return built.shape, built.table
        spec = self.spec
        shape = kernels.DecoderShape(spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads,
                                     spec.head_dim, cache.block_size, spec.eps, spec.attention_scale)
        layers = [layer.native_entry(cache) for layer in self.layers]
        self._decoder_table = _NativeStack(cache, shape, kernels.decoder_layers(layers), layers)
        return shape, self._decoder_table.table

    def greedy_chain_available(self) -> bool:
        """Whether greedy_chain runs for this model: a plain stack whose logits are the output head's own."""
        spec = self.spec
        return (self.plain_stack and spec.logits_divisor == 1.0 and spec.logits_multiplier == 1.0
                and spec.final_softcap is None)

    def greedy_chain(self, feed: list[list[int]], positions: list[int], block_tables: list[list[int]],
                     cache: PagedKVCache, stop_tokens: list[list[int]], banned_steps: list[int],
                     steps: int, draws: kernels.ChainDraws | None = None,
                     step_hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """Draft `steps` tokens greedily for each row in one native call: row r's cache lacks the tokens
        feed[r] (its newest token at least), the first at positions[r], and its slots for those and the
        drafts are reserved in block_tables[r]. Each step's argmax, with the row's stop_tokens at -inf in
        its first banned_steps[r] steps, is the next step's input (with `draws`, each row's draw as the sampler
        makes it, their logprobs written there; step_hidden [steps, R, hidden] receives every step's final hidden
        states). -> [steps, R]; None where the one-call stack does not run."""
        if not self.greedy_chain_available():
            return None
        rows = len(feed)
        parts, num_feed, width, banned_width = greedy_chain_ints(feed, positions, block_tables, cache.block_size,
                                                                 stop_tokens, banned_steps, steps)
        feed_tokens, last, slots, feed_context, context, banned, banned_steps, every_position, every_table = \
            packed_views(parts)
        every_table = every_table.view(-1, width)
        cos, sin = self.rotary.cos_sin(every_position, self.dtype)
        chain = kernels.GreedyChain(feed_tokens, last, slots[:num_feed], every_table[:num_feed], feed_context,
                                    slots[num_feed:].view(steps - 1, rows), every_table[num_feed:], context,
                                    cos.squeeze(1), sin.squeeze(1), banned.view(rows, banned_width), banned_steps)
        shape, layers = self._native_stack(cache)
        return kernels.decoder_greedy_chain(shape, layers, self.embed, self.final_norm, self.lm_head.linear_weights(),
                                            self.vocab_size, chain, draws, step_hidden)

    def speculating_sequence(self, token: int, position: int, block_table: list[int], stop_tokens: list[int],
                             banned_tokens: int, max_tokens: int, max_rounds: int, depth_room: int, max_depth: int,
                             draws: kernels.ChainDraws | None = None) -> kernels.SpeculatingSequence:
        """One sequence for a speculating chain (medusa_chain, eagle_chain): its newest token `token`, not in
        the cache yet, at `position`, its block table with slots reserved for max_tokens plus the tree's nodes
        past position; its stop_tokens at -inf while fewer than banned_tokens are emitted; rounds up to
        max_rounds while fewer than max_tokens are emitted, each tree trimmed to depth_room less the tokens
        emitted (a tree max_depth deep at most); with `draws` (one row's, uniforms per token from here) each
        row draws as the sampler does instead of taking the argmax (kernels.SpeculatingSequence)."""
        cos, sin = self.rotary.tables(position + max_tokens + max_depth + 1, self.dtype)
        return kernels.SpeculatingSequence(token, position, torch.tensor(block_table, dtype=torch.int64), cos, sin,
                                           torch.tensor(stop_tokens, dtype=torch.int64), banned_tokens, max_tokens,
                                           max_rounds, depth_room, draws)

    def medusa_chain(self, heads: kernels.MedusaChainHeads, sequence: kernels.SpeculatingSequence,
                     hidden: torch.Tensor, cache: PagedKVCache) -> kernels.MedusaChained | None:
        """Medusa's speculating rounds for one sequence in one native call (models/kernels/medusa_chain.c), the
        heads reading `hidden`, the final hidden state its newest token came from. None where the one-call
        stack does not run."""
        if not self.greedy_chain_available():
            return None
        shape, layers = self._native_stack(cache)
        return kernels.decoder_medusa_chain(shape, layers, self.embed, self.final_norm, self.lm_head.linear_weights(),
                                            self.vocab_size, heads, sequence, hidden)

    def eagle_chain(self, draft: kernels.EagleChainDraft, sequence: kernels.SpeculatingSequence, cache: PagedKVCache,
                    draft_cache: kernels.EagleDraftCache) -> kernels.EagleChained | None:
        """EAGLE's speculating rounds for one sequence in one native call (models/kernels/eagle_chain.c), the
        draft reading and writing its own cache (`draft_cache`: the rows it holds and lacks). None where the
        one-call stack does not run."""
        if not self.greedy_chain_available():
            return None
        shape, layers = self._native_stack(cache)
        return kernels.decoder_eagle_chain(shape, layers, self.embed, self.final_norm, self.lm_head.linear_weights(),
                                           self.vocab_size, draft, sequence, draft_cache)

    def compute_logits(self, hidden):
        spec = self.spec
        return scale_logits(self.lm_head(hidden), spec.logits_multiplier, spec.logits_divisor, spec.final_softcap)

    def param_slots(self) -> dict[str, list[ParamSlot]]:
        spec = self.spec
        slots = layer_slots(self.layers, spec.layer_prefix)
        slots |= embedding_slots(spec.embed_name, self.embed, self.lm_head, self.tied)
        slots[spec.final_norm_name] = [ParamSlot(self.final_norm, tuple(self.final_norm.shape))]
        if self.final_norm_bias is not None:
            slots[spec.final_norm_name.replace(".weight", ".bias")] = [ParamSlot(self.final_norm_bias,
                                                                                 tuple(self.final_norm_bias.shape))]
        if self.position_embed is not None:
            slots[spec.position_embedding_name] = [ParamSlot(self.position_embed, tuple(self.position_embed.shape))]
        if spec.lm_head_bias:
            slots["lm_head.bias"] = [ParamSlot(self.lm_head.bias, tuple(self.lm_head.bias.shape))]
        return slots
