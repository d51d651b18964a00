"""The KV-cache manager: the one owner of block tables and of the cache's slots.

Every change to a sequence's block table goes through here: the scheduler reserves room for a step's
tokens (and frees a preempted request's blocks), the update phase shares a group's prompt, re-points
beams at their parents', rolls back rejected draft tokens, compacts a tree's kept path and frees
finished sequences. `BlockManager` below it counts references to blocks (plain Python); the paged cache
holds the tensors. A draft model keeps a manager of its own over its own cache.

Blocks are held by a `step_plan.CachedTokens`: a `Sequence`, or a draft model's state for one.
"""

from __future__ import annotations

import hashlib
from array import array

import torch

from decoding.block_manager import BlockManager, CacheUsage
from decoding.step_plan import CachedTokens
from models.attention import PagedKVCache


class KVCacheManager:
    def __init__(self, blocks: BlockManager, cache: PagedKVCache | None = None,
                 device: torch.device = torch.device("cpu"), prefix_caching: bool = False):
        # No cache: block bookkeeping alone (the scheduler's tests); compact() then has nothing to move.
        self._blocks = blocks
        self.prefix_caching = prefix_caching
        self._keys_of: dict[int, list[bytes]] = {}      # seq_id -> the keys of its full computed blocks
        self.prefix_queries = 0                         # prompt tokens looked up, and found (vLLM's names)
        self.prefix_hits = 0
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

    def ref_count(self, block: int) -> int:
        return self._blocks.ref_count(block)

    def blocks_for(self, num_tokens: int) -> int:
        return self._blocks.blocks_for(num_tokens)

    def blocks_needed(self, holder: CachedTokens, num_new_tokens: int) -> int:
        """Free blocks that writing `num_new_tokens` after the computed ones would take."""
        return self._blocks.num_blocks_to_append(holder.block_table, holder.num_computed, num_new_tokens)

    def slots(self, holder: CachedTokens, positions: list[int]) -> torch.Tensor:
        """Flat cache slots of the holder's token positions."""
        return torch.tensor(self._blocks.slots(holder.block_table, positions), dtype=torch.long, device=self.device)

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
        self._keys_of.pop(holder.seq_id, None)

    # ---- prefix caching ----------------------------------------------------------------------
    # A full block is known by a key that chains its tokens to the key of the block before it, so a
    # key stands for every token up to the block's end (vLLM's hash chain: a lookup is one dictionary
    # probe per block, and blocks stay in the block manager's pool, not in a tree to rebalance).

    def match_prefix(self, holder: CachedTokens) -> int:
        """Before anything is computed: take the longest run of cached full blocks the holder's tokens
        start with (its last token is always computed, for its logits); the tokens matched."""
        if not self.prefix_caching or holder.num_computed or holder.block_table:
            return 0
        size, keys, blocks = self.block_size, [], []
        self.prefix_queries += len(holder.token_ids)
        for index in range((len(holder.token_ids) - 1) // size):
            keys.append(_chained(keys[-1] if keys else b"", holder.token_ids[index * size : (index + 1) * size]))
            block = self._blocks.cached_block(keys[-1])
            if block is None:
                keys.pop()
                break
            blocks.append(block)
        for block in blocks:
            self._blocks.reuse(block)
        holder.block_table, holder.num_computed = blocks, len(blocks) * size
        self._keys_of[holder.seq_id] = keys
        self.prefix_hits += holder.num_computed
        return holder.num_computed

    def remember(self, holder: CachedTokens, num_tokens: int | None = None) -> None:
        """Key the holder's full blocks computed since the last call (within its first `num_tokens`
        tokens, if given), so later requests can reuse them."""
        if not self.prefix_caching:
            return
        size, keys = self.block_size, self._keys_of.setdefault(holder.seq_id, [])
        computed = holder.num_computed if num_tokens is None else min(holder.num_computed, num_tokens)
        for index in range(len(keys), computed // size):
            keys.append(_chained(keys[-1] if keys else b"", holder.token_ids[index * size : (index + 1) * size]))
            self._blocks.remember(holder.block_table[index], keys[-1])

    def block_keys(self, holder: CachedTokens, first: int, end: int) -> list[bytes]:
        """The keys of the holder's full blocks first..end-1 (their tokens need not be computed yet)."""
        if not self.prefix_caching:
            return []
        size, keys = self.block_size, list(self._keys_of.get(holder.seq_id, []))[:first]
        for index in range(len(keys), min(end, len(holder.token_ids) // size)):
            keys.append(_chained(keys[-1] if keys else b"", holder.token_ids[index * size : (index + 1) * size]))
        return keys[first:end]

    def forget_prefixes(self) -> None:
        """No cached block is reused again (the weights changed: its keys and values are stale)."""
        self._blocks.forget_keys()
        self._keys_of.clear()

    def roll_back(self, holder: CachedTokens, num_tokens: int) -> None:
        """Keep only the first `num_tokens` computed tokens (rejected draft tokens are forgotten)."""
        holder.num_computed = num_tokens
        self._blocks.truncate(holder.block_table, num_tokens)

    def compact(self, holder: CachedTokens, from_positions: list[int], to_positions: list[int]) -> None:
        """Move the keys and values at `from_positions` to `to_positions` (a tree's kept path, stored at
        scattered slots, to the positions it now occupies)."""
        self.cache.move_slots(self.slots(holder, from_positions), self.slots(holder, to_positions))


def _chained(before: bytes, tokens: list[int]) -> bytes:
    """A block's key: a digest of the key before it and its tokens."""
    return hashlib.blake2b(before + array("q", tokens).tobytes(), digest_size=16).digest()
