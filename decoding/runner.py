"""The model runner owns every tensor of a step: it packs the scheduled tokens, builds the attention
metadata once, runs the native model over the paged cache and returns the logits the engine asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from decoding.step_plan import ScheduledSeq, SchedulerOutput
from models.attention import (NULL_BLOCK, AttentionMetadata, DecodeGroup, NativePrefill, PagedKVCache, Segment,
                              decode_mask, segment_mask)
from models.base import NativeCausalLM
from models.cpu_allocator import keep_freed_memory
from models.kernels import native_decode_available


# Chains up to this long attend as decode rows on the native kernel.
SHORT_CHAIN = 8


@dataclass
class StepLogits:
    """Logits of one step, float32.

    `last` [num_reaching_end, vocab]: one row per scheduled sequence whose chunk reaches its last token,
    in scheduling order. `chunk` maps a seq_id to [num_new_tokens, vocab] for sequences that asked
    for prompt logprobs.
    """

    last: torch.Tensor
    last_seq_ids: list[int]
    chunk: dict[int, torch.Tensor]
    # Final hidden states of the same rows, kept when the runner is asked to (Medusa reads them).
    last_hidden: torch.Tensor | None = None
    chunk_hidden: dict[int, torch.Tensor] | None = None


@dataclass
class PackedBatch:
    input_ids: torch.Tensor          # [T]
    positions: torch.Tensor          # [T]
    meta: AttentionMetadata
    last_rows: torch.Tensor          # [N] rows whose logits pick the next token
    first_row: dict[int, int]        # seq_id -> its first row in the packed batch
    last_seq_ids: list[int]          # the sequence of each row of last_rows


class ModelRunner:
    def __init__(self, model: NativeCausalLM, cache: PagedKVCache, device: torch.device):
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size
        self.native_decode = native_decode_available(device, model.dtype)
        # Tree nodes attend on the kernel unless a layer has a sliding window (the kernel's window is
        # over the context only, not a node's scattered ancestors).
        self._native_trees = model.attention_windows == frozenset({None})
        # Layers that read back their own earlier inputs (models/base.py) need each token's previous slots.
        self.history_length = getattr(model, "history_length", 0)
        if device.type == "cpu":
            keep_freed_memory()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepLogits:
        """Logits of each sequence's last row and of the chunks in `sched.chunk_logits_for`; with
        `sched.wants_hidden` the final hidden states of those rows too."""
        self.copy_blocks(sched)
        batch = self.pack(sched.scheduled)
        # The rows whose hidden states are read: each sequence's last row, then whole chunks that want
        # logits (prompt logprobs, verification). In a step of prompt chunks that is a few rows of
        # hundreds, and the model skips the last layer's projection and MLP for the others.
        chunks = [(item.seq.seq_id, batch.first_row[item.seq.seq_id], item.num_new_tokens)
                  for item in sched.scheduled if item.seq.seq_id in sched.chunk_logits_for]
        wanted = torch.cat([batch.last_rows, *(torch.arange(start, start + n, device=self.device) for _, start, n in chunks)])
        skip = wanted.numel() < batch.input_ids.numel()
        hidden = self.model.forward(batch.input_ids, batch.positions, self.cache, batch.meta,
                                    wanted if skip else None)
        if not skip:
            hidden = hidden[wanted]                                                          # [R, hidden]
        num_last = batch.last_rows.numel()
        last_hidden = hidden[:num_last]
        last = self.model.compute_logits(last_hidden).float()                               # [N, vocab]
        keep_hidden = sched.wants_hidden
        out = StepLogits(last, batch.last_seq_ids, {}, last_hidden if keep_hidden else None,
                         {} if keep_hidden else None)
        offset = num_last
        for seq_id, _, n in chunks:
            rows = hidden[offset : offset + n]
            offset += n
            out.chunk[seq_id] = self.model.compute_logits(rows).float()
            if keep_hidden:
                out.chunk_hidden[seq_id] = rows
        return out

    def copy_blocks(self, sched: SchedulerOutput) -> None:
        """The step's copies-on-write of shared blocks, made before anything writes to them."""
        if sched.block_copies:
            src, dst = zip(*sched.block_copies)
            self.cache.copy_blocks(self._long(src), self._long(dst))

    # ---- input preparation -------------------------------------------------------------------
    def pack(self, scheduled: list[ScheduledSeq]) -> PackedBatch:
        """The scheduled tokens as one batch of rows: ids, positions and how each row attends."""
        decode_like, order = self._row_order(scheduled)
        rows = _Rows()
        for i in order:
            self._pack(scheduled[i], decode_like[i], rows)
        positions = self._long(rows.positions)
        last_seq_ids = [scheduled[i].seq.seq_id for i in order if scheduled[i].reaches_end]
        return PackedBatch(self._long(rows.input_ids), positions, self._attention_metadata(rows, positions),
                           self._long(rows.last_rows), rows.first_row, last_seq_ids)

    def _row_order(self, scheduled: list[ScheduledSeq]) -> tuple[list[bool], list[int]]:
        """Which sequences attend like decodes, and the order their rows are packed in. Decode-like rows
        come first, shortest context first: single tokens, and with the native kernel also each token of
        a short chain (a draft chain to verify, a draft model's catch-up), each with its own context
        length over the same blocks. Prefill chunks attend in blocks of queries (the native prefill
        kernel, else SDPA); trees off the decode kernel and chains without it are masked segments."""
        decode_like = [self._attends_like_decodes(s) for s in scheduled]
        order = sorted(range(len(scheduled)), key=lambda i: (not decode_like[i], scheduled[i].start if decode_like[i] else 0))
        return decode_like, order

    def _attends_like_decodes(self, item: ScheduledSeq) -> bool:
        if item.tree is not None and (item.tree.computed or item.num_new_tokens > 1):
            # Nodes whose ancestors are scattered over the cache: the native kernel's extra positions.
            return self.native_decode and self._native_trees
        return item.num_new_tokens == 1 or (self.native_decode and (bool(item.draft_token_ids)
                                                                    or item.num_new_tokens <= SHORT_CHAIN))

    def _pack(self, item: ScheduledSeq, decode_like: bool, rows: _Rows) -> None:
        """One scheduled sequence's tokens as rows: ids, positions, cache slots, and how they attend."""
        seq, start, count = item.seq, item.start, item.num_new_tokens
        rows.first_row[seq.seq_id] = len(rows.input_ids)
        drafts = list(item.draft_token_ids)
        rows.input_ids += seq.token_ids[start : start + count - len(drafts)] + drafts
        if item.tree is None:
            rows.positions += range(start, start + count)
        else:
            base = start - item.tree.computed
            rows.positions += [base + depth for depth in item.tree.depths()[item.tree.computed:]]
        table = seq.block_table
        rows.slots += [table[p // self.block_size] * self.block_size + p % self.block_size
                       for p in range(start, start + count)]   # BlockManager.slots, inlined: the hot path
        if self.history_length:
            rows.history += self._history_slots(item, table)
        if item.reaches_end:
            rows.last_rows.append(len(rows.input_ids) - 1)
        if decode_like and item.tree is not None and self.native_decode:
            # Node j sees the cache before the tree, then its ancestors and itself (off the native kernel
            # a tree is decode-like only as one first-level node, which is a one-token chain).
            base = start - item.tree.computed
            rows.decode_rows += [(table, base, [base + a for a in ancestors])
                                 for ancestors in item.tree.ancestry()[item.tree.computed:]]
        elif decode_like:
            rows.decode_rows += [(table, start + j + 1, []) for j in range(count)]
        else:
            rows.chunks.append(item)

    def _history_slots(self, item: ScheduledSeq, table: list[int]) -> list[list[int]]:
        """Per new token, the slots of its previous history_length tokens, nearest first (-1 before the
        sequence): the positions before it, or for a tree node its ancestors, then the cache."""
        start, count, length, size = item.start, item.num_new_tokens, self.history_length, self.block_size
        if item.tree is None:
            before = [[p - j for j in range(1, length + 1)] for p in range(start, start + count)]
        else:
            base = start - item.tree.computed
            before = [[base + a for a in reversed(chain[:-1])][:length]
                      for chain in item.tree.ancestry()[item.tree.computed:]]
            before = [b + [base - 1 - j for j in range(length - len(b))] for b in before]
        return [[table[q // size] * size + q % size if q >= 0 else -1 for q in b] for b in before]

    def _attention_metadata(self, rows: _Rows, positions: torch.Tensor) -> AttentionMetadata:
        # Causal prompt chunks go to the native prefill kernel in one call; trees keep their masks.
        on_kernel = [self.native_decode and item.tree is None for item in rows.chunks]
        native_chunks = [item for item, native in zip(rows.chunks, on_kernel) if native]
        return AttentionMetadata(
            slot_mapping=self._long(rows.slots),
            num_decode_tokens=len(rows.decode_rows),
            decode_groups=self._decode_groups(rows.decode_rows),
            segments=[self._segment(item, rows.first_row[item.seq.seq_id], positions)
                      for item, native in zip(rows.chunks, on_kernel) if not native],
            prefill=self._native_prefill(native_chunks, rows.first_row) if native_chunks else None,
            history_slots=self._long(rows.history) if self.history_length else None,
        )

    def _decode_groups(self, rows: list[tuple[list[int], int, list[int]]]) -> list[DecodeGroup]:
        """The native kernel takes every decode row in one call (it reads only each row's own length).
        Otherwise split the rows (sorted by context length) where padding to the group's longest would
        waste more than about a third of the gathered keys."""
        if not rows:
            return []
        if self.native_decode:
            return [self._decode_group(rows, 0)]
        groups, start = [], 0
        for end in range(1, len(rows) + 1):
            if end == len(rows) or len(rows[end][0]) > 1.5 * len(rows[start][0]) + 1:
                groups.append(self._decode_group(rows[start:end], start))
                start = end
        return groups

    def _decode_group(self, rows: list[tuple[list[int], int, list[int]]], first: int) -> DecodeGroup:
        tables = [table for table, _, _ in rows]
        width = max(len(t) for t in tables)
        padded = [t + [NULL_BLOCK] * (width - len(t)) for t in tables]
        context_lens = self._long([context for _, context, _ in rows])
        if self.native_decode:
            group = DecodeGroup(first, first + len(rows), self._long(padded), context_lens, native=True)
            most = max(len(extra) for _, _, extra in rows)
            if most:
                group.extra_positions = self._long([extra + [0] * (most - len(extra)) for _, _, extra in rows])
                group.extra_counts = self._long([len(extra) for _, _, extra in rows])
            return group
        first_block = _first_of_run(tables[0]) if len(tables) == 1 else None
        group = DecodeGroup(first, first + len(rows), self._long(padded), context_lens, first_block)
        for window in self.model.attention_windows:
            group.masks[window] = decode_mask(context_lens, width * self.block_size, window)
        return group

    def _native_prefill(self, chunks: list[ScheduledSeq], first_row: dict[int, int]) -> NativePrefill:
        tables = [item.seq.block_table for item in chunks]
        width = max(len(table) for table in tables)
        return NativePrefill(q_starts=self._long([first_row[item.seq.seq_id] for item in chunks]),
                             counts=self._long([item.num_new_tokens for item in chunks]),
                             cached=self._long([item.start for item in chunks]),
                             block_tables=self._long([table + [NULL_BLOCK] * (width - len(table)) for table in tables]))

    def _segment(self, item: ScheduledSeq, row: int, positions: torch.Tensor) -> Segment:
        start, count = item.start, item.num_new_tokens
        computed = item.tree.computed if item.tree is not None else 0
        if computed and self.model.attention_windows != frozenset({None}):
            # The window below counts keys by query position; a tree's earlier nodes are not queries here.
            raise ValueError("a tree grown a level at a time needs a model without sliding windows")
        seg = Segment(q_start=row, q_end=row + count, block_table=self._long(item.seq.block_table),
                      context_len=start + count, first_block=_first_of_run(item.seq.block_table),
                      fresh_causal=start == 0 and item.tree is None)
        visibility = None
        for window in self.model.attention_windows:
            if seg.fresh_causal and window is None:
                seg.masks[window] = None
                continue
            if visibility is None:
                visibility = (torch.ones(count, count, dtype=torch.bool, device=self.device).tril_()
                              if item.tree is None else
                              torch.tensor(item.tree.visibility()[computed:], dtype=torch.bool, device=self.device))
            seg.masks[window] = segment_mask(start - computed, positions[row : row + count], visibility, window)
        return seg

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


@dataclass
class _Rows:
    """A step's rows as pack() lays them out."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    last_rows: list[int] = field(default_factory=list)
    first_row: dict[int, int] = field(default_factory=dict)
    # (block table, context length, extra positions) per decode-like row
    decode_rows: list[tuple[list[int], int, list[int]]] = field(default_factory=list)
    chunks: list[ScheduledSeq] = field(default_factory=list)   # prefill chunks and masked segments
    history: list[list[int]] = field(default_factory=list)     # per row, its previous slots (history_length)


def _first_of_run(block_table: list[int]) -> int | None:
    """The first block when the table is a run of consecutive blocks (the common case for a lone sequence)."""
    first = block_table[0]
    if block_table[-1] - first == len(block_table) - 1 and block_table == list(range(first, first + len(block_table))):
        return first
    return None
