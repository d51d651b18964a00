"""Fixed-size KV blocks with reference counts: plain Python, no tensors.

A sequence's block table lists the blocks that hold its tokens in order. `fork` lets another sequence
share a prefix (the n samples of one prompt, beams); the first write into a shared block copies it
(copy-on-write), so a shared prompt is stored once. `truncate` rolls a sequence back (rejected draft
tokens). The copies to perform are returned to the caller, which hands them to the model runner.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from models.attention import NULL_BLOCK


class NoFreeBlocksError(RuntimeError):
    pass


@dataclass(frozen=True)
class CacheUsage:
    num_blocks: int          # usable blocks (the null block excluded)
    num_free_blocks: int
    block_size: int

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        # A stack: the most recently freed block is reused first, so a small working set of blocks stays
        # warm in the CPU caches and TLB instead of the allocator sweeping the whole pre-allocated pool.
        self._free = [b for b in reversed(range(num_blocks)) if b != NULL_BLOCK]
        self.cached = CachedBlocks()

    # ---- observation -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self.cached)

    def usage(self) -> CacheUsage:
        return CacheUsage(self.num_blocks - 1, self.num_free_blocks, self.block_size)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- growth ------------------------------------------------------------------------------
    def num_blocks_to_append(self, block_table: list[int], num_computed: int, num_new_tokens: int) -> int:
        """Blocks that writing `num_new_tokens` after `num_computed` would take from the free pool."""
        needed = self.blocks_for(num_computed + num_new_tokens) - len(block_table)
        if self._writes_into_shared_block(block_table, num_computed):
            needed += 1
        return max(needed, 0)

    def append_slots(self, block_table: list[int], num_computed: int,
                     num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for new tokens in place; return the (src, dst) block copies to perform first."""
        if self.num_blocks_to_append(block_table, num_computed, num_new_tokens) > self.num_free_blocks:
            raise NoFreeBlocksError("not enough free KV blocks")
        copies = []
        if self._writes_into_shared_block(block_table, num_computed):
            index = num_computed // self.block_size
            shared = block_table[index]
            block_table[index] = self._take()
            self._release(shared)
            copies.append((shared, block_table[index]))
        while len(block_table) < self.blocks_for(num_computed + num_new_tokens):
            block_table.append(self._take())
        return copies

    def _writes_into_shared_block(self, block_table: list[int], num_computed: int) -> bool:
        index = num_computed // self.block_size
        return index < len(block_table) and self._ref_counts[block_table[index]] > 1

    # ---- sharing and release -----------------------------------------------------------------
    def fork(self, block_table: list[int], num_tokens: int) -> list[int]:
        """A new block table sharing the blocks that hold the first `num_tokens` tokens."""
        shared = block_table[: self.blocks_for(num_tokens)]
        for block in shared:
            self._ref_counts[block] += 1
        return list(shared)

    def free(self, block_table: list[int]) -> None:
        for block in block_table:
            self._release(block)
        block_table.clear()

    def truncate(self, block_table: list[int], num_tokens: int) -> None:
        """Drop the blocks past the first `num_tokens` tokens (rollback of rejected tokens)."""
        keep = self.blocks_for(num_tokens)
        for block in block_table[keep:]:
            self._release(block)
        del block_table[keep:]

    # ---- prefix caching ----------------------------------------------------------------------
    def reuse(self, block: int) -> None:
        """Hold a cached block once more (taking it back from the evictable ones if nobody held it)."""
        self.cached.take_back(block)
        self._ref_counts[block] += 1

    def forget_cached(self) -> None:
        """Drop every key (the weights changed): evictable blocks become free."""
        self._free += self.cached.forget()

    def _take(self) -> int:
        block = self._free.pop() if self._free else self.cached.evict()
        self._ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0 and not self.cached.keep(block):
            self._free.append(block)


class CachedBlocks:
    """Prefix caching's side of the pool: full blocks known by a key (their tokens and everything before
    them). One that no sequence holds stays reusable (evictable) until the free stack runs out; then the
    least recently released is taken first."""

    def __init__(self):
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._evictable)

    def lookup(self, key: bytes) -> int | None:
        return self._block_of.get(key)

    def remember(self, block: int, key: bytes) -> None:
        """Know a full block by its key (a block, and a key, are known once)."""
        if block not in self._key_of and key not in self._block_of:
            self._key_of[block], self._block_of[key] = key, block

    def keep(self, block: int) -> bool:
        """A block nobody holds any more: kept as evictable if it has a key."""
        if block in self._key_of:
            self._evictable[block] = None
            return True
        return False

    def take_back(self, block: int) -> None:
        self._evictable.pop(block, None)

    def evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block

    def forget(self) -> list[int]:
        """Drop every key; the blocks that were evictable (now simply free)."""
        blocks = list(self._evictable)
        self._evictable.clear()
        self._key_of.clear()
        self._block_of.clear()
        return blocks


def slots(block_table: list[int], positions, block_size: int) -> list[int]:
    """Flat cache slots (block * block_size + offset) of a sequence's token positions."""
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]
