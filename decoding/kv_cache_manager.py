"""The KV-cache manager: the one owner of block tables and of the cache's slots.

Every change to a sequence's block table goes through here: the scheduler reserves room for a step's
tokens (and frees a preempted request's blocks), the update phase shares a group's prompt, re-points
beams at their parents', rolls back rejected draft tokens, compacts a tree's kept path and frees
finished sequences. `BlockManager` below it counts references to blocks (plain Python); the paged cache
holds the tensors. A draft model keeps a manager of its own over its own cache.

Blocks are held by a `step_plan.CachedTokens`: a `Sequence`, or a draft model's state for one. The
prefix cache (`prefix_cache.py`) is the manager's too: it hands a request the cached blocks its tokens
start with, and keys the full blocks computed.
"""

from __future__ import annotations

import torch

from decoding.block_manager import BlockManager, CacheUsage, slots
from decoding.prefix_cache import PrefixCache
from decoding.step_plan import CachedTokens
from models.attention import PagedKVCache


class KVCacheManager:
    def __init__(self, blocks: BlockManager, cache: PagedKVCache | None = None,
                 device: torch.device = torch.device("cpu"), prefix_caching: bool = False):
        # No cache: block bookkeeping alone (the scheduler's tests); compact() then has nothing to move.
        self._blocks = blocks
        # Full blocks outlive their holder and serve later requests that start with the same tokens.
        self.prefixes = PrefixCache(blocks, enabled=prefix_caching)
        self.cache = cache
        self.device = device
        self.block_size = blocks.block_size
        self.num_blocks = blocks.num_blocks

    # ---- observation -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self._blocks.num_free_blocks

    def usage(self) -> CacheUsage:
        return self._blocks.usage()

    def blocks_for(self, num_tokens: int) -> int:
        return self._blocks.blocks_for(num_tokens)

    def blocks_needed(self, holder: CachedTokens, num_new_tokens: int) -> int:
        """Free blocks that writing `num_new_tokens` after the computed ones would take."""
        return self._blocks.num_blocks_to_append(holder.block_table, holder.num_computed, num_new_tokens)

    def slots(self, holder: CachedTokens, positions: list[int]) -> torch.Tensor:
        """Flat cache slots of the holder's token positions."""
        return torch.tensor(slots(holder.block_table, positions, self.block_size), dtype=torch.long, device=self.device)

    # ---- changes -----------------------------------------------------------------------------
    def reserve(self, holder: CachedTokens, num_new_tokens: int) -> list[tuple[int, int]]:
        """Room for `num_new_tokens` after the computed ones; the (src, dst) block copies to make first
        (copy-on-write of a shared block). Raises NoFreeBlocksError when they do not fit."""
        return self._blocks.append_slots(holder.block_table, holder.num_computed, num_new_tokens)

    def share(self, child: CachedTokens, parent: CachedTokens, num_tokens: int) -> None:
        """`child` takes the blocks holding the parent's first `num_tokens` tokens, shared (a group's
        prompt, a beam's history), dropping whatever it held."""
        table = self._blocks.fork(parent.block_table, num_tokens)
        self._blocks.free(child.block_table)
        child.block_table, child.num_computed = table, num_tokens

    def reassign(self, holders: list[CachedTokens], parents: list[CachedTokens], num_tokens: list[int]) -> None:
        """Holder i takes the blocks of parents[i]'s first num_tokens[i] tokens, all at once: a parent may
        be a holder too (beams re-pointed at the beams they continue), so every new table is taken
        before any old one is let go."""
        tables = [self._blocks.fork(parent.block_table, count) for parent, count in zip(parents, num_tokens)]
        for holder in holders:
            self._blocks.free(holder.block_table)
        for holder, table, count in zip(holders, tables, num_tokens):
            holder.block_table, holder.num_computed = table, count

    def free(self, holder: CachedTokens) -> None:
        self._blocks.free(holder.block_table)
        self.prefixes.drop(holder)

    def roll_back(self, holder: CachedTokens, num_tokens: int) -> None:
        """Keep only the first `num_tokens` computed tokens (rejected draft tokens are forgotten)."""
        holder.num_computed = num_tokens
        self._blocks.truncate(holder.block_table, num_tokens)

    def compact(self, holder: CachedTokens, from_positions: list[int], to_positions: list[int]) -> None:
        """Move the keys and values at `from_positions` to `to_positions` (a tree's kept path, stored at
        scattered slots, to the positions it now occupies)."""
        self.cache.move_slots(self.slots(holder, from_positions), self.slots(holder, to_positions))

