"""The ints a greedy draft chain's native call reads (DecoderForCausalLM.greedy_chain), packed in the
kernel's order."""

from __future__ import annotations

import torch

from models.attention import NULL_BLOCK


def greedy_chain_ints(feed: list[list[int]], positions: list[int], block_tables: list[list[int]], block_size: int,
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


def packed_views(parts) -> list[torch.Tensor]:
    """The lists as views of one int64 tensor (one allocation, not twenty: this runs per drafted round,
    and each torch call costs as much as a layer of the draft)."""
    packed = torch.tensor([value for part in parts for value in part], dtype=torch.long)
    views, offset = [], 0
    for part in parts:
        views.append(packed[offset : offset + len(part)])
        offset += len(part)
    return views
