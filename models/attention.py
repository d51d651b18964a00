"""Attention over the paged KV cache.

The engine packs the new tokens of every scheduled sequence into one flat batch of T tokens. Single-token
sequences (decodes) come first, sorted by context length. On the CPU in float32 they attend in one call
of the native kernel (models/kernels), which reads each sequence's blocks in place; so do the tokens of
short draft chains and the nodes of a Medusa tree, each as a row with its own context (and, for a tree
node, its ancestors). Elsewhere decodes attend in a few batched SDPA calls over their gathered blocks,
each call grouping similar lengths so little padding is gathered or attended. On the CPU in float32 the
prompt chunks attend in one call of the native prefill kernel, causally over their blocks in place. Every
other sequence (a prefill chunk off the kernel; chains and trees off the kernel) is a `Segment` with its
own mask. The metadata is built once per step by the runner and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.cpu_allocator import zeros_on_huge_pages
from models.kernels import paged_decode_attention, paged_prefill_attention

# Block 0 is never handed to a sequence: padded block-table entries point at it, and it stays zero so
# padding can never inject NaN/inf into a masked-out attention product.
NULL_BLOCK = 0


class PagedKVCache:
    """Pre-allocated keys and values: per layer [num_blocks, block_size, num_kv_heads, head_dim].

    A layer in `history_layers` (layer -> channels) keeps instead one vector per token, [num_blocks,
    block_size, 1, channels], as `keys[layer]` (and `values[layer]`, the same tensor): the inputs a
    short convolution (LFM2) reads back over its previous positions. Paged like keys, it is shared,
    forked, copied and rolled back with them."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 history_layers: dict[int, int] | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        history_layers = history_layers or {}

        def zeros(shape):
            if torch.device(device).type == "cpu":
                return zeros_on_huge_pages(shape, dtype)
            return torch.zeros(shape, dtype=dtype, device=device)

        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys, self.values = [], []
        for layer in range(num_layers):
            if layer in history_layers:
                history = zeros((num_blocks, block_size, 1, history_layers[layer]))
                self.keys.append(history)
                self.values.append(history)
            else:
                self.keys.append(zeros(shape))
                self.values.append(zeros(shape))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, history_layers: dict[int, int] | None = None) -> int:
        history_layers = history_layers or {}
        floats = sum(history_layers.get(layer, 2 * num_kv_heads * head_dim) for layer in range(num_layers))
        return block_size * floats * torch.tensor([], dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """slots [T] flat slot ids (block * block_size + offset); key/value [T, kv_heads, head_dim]."""
        self.keys[layer].view(-1, *key.shape[1:]).index_copy_(0, slots, key)
        self.values[layer].view(-1, *value.shape[1:]).index_copy_(0, slots, value)

    def _tensors(self) -> list[torch.Tensor]:
        """Every distinct cache tensor (a history layer's keys and values are one)."""
        return list({id(t): t for t in (*self.keys, *self.values)}.values())

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy-on-write: duplicate whole blocks src[i] -> dst[i] in every layer."""
        for cache in self._tensors():
            cache.index_copy_(0, dst, cache.index_select(0, src))

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move single token slots (the accepted path of a verified tree) in every layer."""
        for cache in self._tensors():
            flat = cache.view(-1, *cache.shape[2:])
            flat.index_copy_(0, dst, flat.index_select(0, src))


@dataclass
class DecodeGroup:
    """Single-token sequences of similar context length, attended in one batched call: rows
    [q_start, q_end) of the packed batch."""

    q_start: int
    q_end: int
    block_tables: torch.Tensor                 # [B, max_blocks], padded with NULL_BLOCK
    context_lens: torch.Tensor                 # [B] tokens visible to each query (including itself)
    # Set when B == 1 and the blocks are consecutive: the keys are then a view of the cache, no gather.
    first_block: int | None = None
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # window -> [B, 1, 1, C]
    native: bool = False                       # attend with the native kernel (no gather, no masks)
    # Native only: positions row b sees past its context (a tree node's ancestors and itself), the first
    # extra_counts[b] of extra_positions[b]; None when no row has any.
    extra_positions: torch.Tensor | None = None    # [B, max_extra]
    extra_counts: torch.Tensor | None = None       # [B]


@dataclass
class Segment:
    """A multi-token query of one sequence: rows [q_start, q_end) of the packed batch."""

    q_start: int
    q_end: int
    block_table: torch.Tensor                  # [num_blocks] of this sequence
    context_len: int                           # cached tokens + new tokens
    first_block: int | None                    # set when the blocks are consecutive (read as a view)
    # True when nothing is cached before the new tokens and they are plainly causal: attend to the
    # fresh keys directly with is_causal, no gather and no explicit mask.
    fresh_causal: bool
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # window -> [n, C]


@dataclass
class NativePrefill:
    """Causal prompt chunks attended in one call of the native prefill kernel, chunk s being rows
    [q_starts[s], q_starts[s] + counts[s]) of the packed batch with cached[s] tokens before it."""

    q_starts: torch.Tensor                     # [S]
    counts: torch.Tensor                       # [S]
    cached: torch.Tensor                       # [S]
    block_tables: torch.Tensor                 # [S, max_blocks], padded with NULL_BLOCK


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                 # [T] where each new token's key/value is written
    num_decode_tokens: int
    decode_groups: list[DecodeGroup]
    segments: list[Segment]
    prefill: NativePrefill | None = None       # the causal chunks, when the native kernels run
    # For a model whose layers read back their own inputs (a short convolution): per token, the cache
    # slots of its previous positions, nearest first, -1 before the sequence start. [T, history_length]
    history_slots: torch.Tensor | None = None


def decode_mask(context_lens: torch.Tensor, width: int, window: int | None) -> torch.Tensor | None:
    """[B, 1, 1, width] bool: key index j is visible to the query at position context_len - 1."""
    if window is None and bool((context_lens == width).all()):
        return None
    key_index = torch.arange(width, device=context_lens.device)[None, :]
    visible = key_index < context_lens[:, None]
    if window is not None:
        visible &= key_index > (context_lens[:, None] - 1 - window)
    return visible[:, None, None, :]


def segment_mask(num_cached: int, query_positions: torch.Tensor, new_visibility: torch.Tensor,
                 window: int | None) -> torch.Tensor:
    """[n, num_cached + n] bool.

    Every cached key is visible (subject to the window); among the new tokens, `new_visibility` [n, n]
    says who sees whom (lower-triangular for a chunk, ancestors-only for a tree).
    """
    n = query_positions.shape[0]
    device = query_positions.device
    cached = torch.ones(n, num_cached, dtype=torch.bool, device=device)
    mask = torch.cat((cached, new_visibility), dim=1)
    if window is not None:
        key_positions = torch.cat((torch.arange(num_cached, device=device), query_positions))
        mask &= (query_positions[:, None] - key_positions[None, :]) < window
    return mask


@dataclass(frozen=True, eq=False)
class ScoreOptions:
    """What a layer does to its attention scores beyond scaling and masking."""

    softcap: float | None = None               # scores -> softcap * tanh(score / softcap) (Gemma 2)
    sinks: torch.Tensor | None = None          # [heads] float32: a logit per head in every softmax's denominator

    @property
    def plain(self) -> bool:
        return self.softcap is None and self.sinks is None


PLAIN_SCORES = ScoreOptions()


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
                    cache: PagedKVCache, meta: AttentionMetadata, scale: float,
                    window: int | None = None, kv_written: bool = False,
                    scores: ScoreOptions = PLAIN_SCORES) -> torch.Tensor:
    """query [T, heads, d]; key/value [T, kv_heads, d] of the new tokens -> [T, heads * d].
    `kv_written`: the caller already wrote key/value to meta.slot_mapping (the fused native path)."""
    if not kv_written:
        cache.write(layer, meta.slot_mapping, key, value)
    num_tokens, num_heads, head_dim = query.shape
    groups = meta.decode_groups
    if len(groups) == 1 and not meta.segments and meta.prefill is None:
        return _decode_attention(query, layer, cache, groups[0], scale, window, scores).reshape(num_tokens, -1)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if meta.prefill is not None:
        chunks = meta.prefill
        paged_prefill_attention(query, cache.keys[layer], cache.values[layer], chunks.q_starts, chunks.counts,
                                chunks.cached, chunks.block_tables, scale, window, out, scores.softcap, scores.sinks)
    for group in groups:
        out[group.q_start : group.q_end] = _decode_attention(
            query[group.q_start : group.q_end], layer, cache, group, scale, window, scores)
    for seg in meta.segments:
        out[seg.q_start : seg.q_end] = _segment_attention(query, key, value, layer, cache, seg, scale, window, scores)
    return out.view(num_tokens, num_heads * head_dim)


def _decode_attention(query, layer, cache, group: DecodeGroup, scale, window, scores: ScoreOptions):
    if group.native:
        return paged_decode_attention(query, cache.keys[layer], cache.values[layer], group.block_tables,
                                      group.context_lens, scale, window, group.extra_positions, group.extra_counts,
                                      scores.softcap, scores.sinks)
    batch, num_blocks = group.block_tables.shape
    width = num_blocks * cache.block_size
    keys = _gather_blocks(cache.keys[layer], group.block_tables, group.first_block).view(batch, width, -1, query.shape[-1])
    values = _gather_blocks(cache.values[layer], group.block_tables, group.first_block).view(batch, width, -1, query.shape[-1])
    out = _attend(query.unsqueeze(2),                                    # [B, heads, 1, d]
                  keys.transpose(1, 2), values.transpose(1, 2),          # [B, kv_heads, C, d]
                  group.masks[window], scale, scores)
    return out.squeeze(2)                                                # [B, heads, d]


def _segment_attention(query, key, value, layer, cache, seg: Segment, scale, window, scores: ScoreOptions):
    q = query[seg.q_start : seg.q_end].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
    mask = seg.masks[window]
    if seg.fresh_causal and mask is None:
        k = key[seg.q_start : seg.q_end].transpose(0, 1).unsqueeze(0)
        v = value[seg.q_start : seg.q_end].transpose(0, 1).unsqueeze(0)
        if scores.plain:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            n = q.shape[2]
            out = _attend(q, k, v, torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), scale, scores)
    else:
        kv_shape = cache.keys[layer].shape[2:]
        k = _gather_blocks(cache.keys[layer], seg.block_table, seg.first_block).view(-1, *kv_shape)[: seg.context_len]
        v = _gather_blocks(cache.values[layer], seg.block_table, seg.first_block).view(-1, *kv_shape)[: seg.context_len]
        out = _attend(q, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), mask, scale, scores)
    return out.squeeze(0).transpose(0, 1)                          # [n, heads, d]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
            scores: ScoreOptions) -> torch.Tensor:
    """q [B, heads, n, d], k/v [B, kv_heads, C, d], mask broadcast to [B, heads, n, C] -> [B, heads, n, d]:
    SDPA, or the same softmax written out where the scores are soft-capped or joined by sinks."""
    if scores.plain:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    logits = (q @ k.transpose(-1, -2)) * scale                      # [B, heads, n, C]
    if scores.softcap is not None:
        logits = torch.tanh(logits / scores.softcap) * scores.softcap
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if scores.sinks is None:
        return torch.softmax(logits, dim=-1) @ v
    sinks = scores.sinks.view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    probs = torch.softmax(torch.cat((logits, sinks), dim=-1), dim=-1)[..., :-1]
    return probs @ v


def _gather_blocks(layer_cache: torch.Tensor, block_table: torch.Tensor, first_block: int | None) -> torch.Tensor:
    """The blocks of a table, in order: a view when they are consecutive, else a gathered copy."""
    if first_block is not None:
        return layer_cache[first_block : first_block + block_table.numel()]
    # index_select over the flattened table is ~3x faster than advanced indexing on the CPU.
    return layer_cache.index_select(0, block_table.view(-1))
