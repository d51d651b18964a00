"""The prefix cache, part of the KV-cache manager: full KV blocks outlive their request and serve later
requests whose tokens start the same way (multi-turn conversations, shared system prompts, RL prompts).

A full block is known by a key that chains its tokens to the key of the block before it, so a key
stands for every token up to the block's end. This is vLLM's hash chain rather than SGLang's radix
tree: a lookup is one dictionary probe per block, the blocks stay in the block manager's pool (counted,
copied on write and evicted like any other), and there is no tree to split or rebalance. Keys are
128-bit BLAKE2 digests, so two different prefixes do not meet by accident.
"""

from __future__ import annotations

import hashlib
from array import array

from decoding.block_manager import BlockManager
from decoding.step_plan import CachedTokens


class PrefixCache:
    def __init__(self, blocks: BlockManager, enabled: bool):
        self._blocks = blocks
        self.enabled = enabled
        self._keys_of: dict[int, list[bytes]] = {}      # seq_id -> the keys of its full blocks so far
        self._probes: dict[int, list[bytes]] = {}       # seq_id -> its prompt's keys, while it waits
        self.queries = 0                                # prompt tokens looked up, and found (vLLM's names)
        self.hits = 0

    def match(self, holder: CachedTokens, num_tokens: int | None = None) -> int:
        """Before anything is computed: take the longest run of cached full blocks the holder's tokens
        (its first `num_tokens`, if given) start with; the last of those tokens is always computed, for
        its logits. The tokens matched."""
        if not self.enabled or holder.num_computed or holder.block_table:
            return 0
        size, keys, blocks = self._blocks.block_size, [], []
        tokens = len(holder.token_ids) if num_tokens is None else min(num_tokens, len(holder.token_ids))
        self.queries += tokens
        for index in range((tokens - 1) // size):
            key = _chained(keys[-1] if keys else b"", holder.token_ids[index * size : (index + 1) * size])
            block = self._blocks.cached.lookup(key)
            if block is None:
                break
            keys.append(key)
            blocks.append(block)
        self._probes.pop(holder.seq_id, None)
        for block in blocks:
            self._blocks.reuse(block)
        holder.block_table, holder.num_computed = blocks, len(blocks) * size
        self._keys_of[holder.seq_id] = keys
        self.hits += holder.num_computed
        return holder.num_computed

    def remember(self, holder: CachedTokens, num_tokens: int | None = None) -> None:
        """Key the holder's full blocks computed since the last call (within its first `num_tokens`
        tokens, if given), so later requests can reuse them."""
        if not self.enabled:
            return
        computed = holder.num_computed if num_tokens is None else min(holder.num_computed, num_tokens)
        keys = self._keys_of.setdefault(holder.seq_id, [])
        known = len(keys)
        if computed // self._blocks.block_size <= known:      # the usual decode step: no block filled
            return
        _extend(keys, holder.token_ids, computed // self._blocks.block_size, self._blocks.block_size)
        for index in range(known, len(keys)):
            self._blocks.cached.remember(holder.block_table[index], keys[index])

    def keys(self, holder: CachedTokens, first: int, end: int) -> list[bytes]:
        """The keys of the holder's full blocks first..end-1 (their tokens need not be computed yet)."""
        if not self.enabled:
            return []
        keys = self._keys_of.get(holder.seq_id, [])[:first]
        _extend(keys, holder.token_ids, end, self._blocks.block_size)
        return keys[first:end]

    def cached_tokens(self, holder: CachedTokens) -> int:
        """How many of the holder's leading tokens `match` would find cached now (nothing taken)."""
        if not self.enabled:
            return 0
        probe = self._probes.get(holder.seq_id)
        if probe is None:
            probe = self._probes[holder.seq_id] = []
            _extend(probe, holder.token_ids, (len(holder.token_ids) - 1) // self._blocks.block_size,
                    self._blocks.block_size)
        found = 0
        while found < len(probe) and self._blocks.cached.lookup(probe[found]) is not None:
            found += 1
        return found * self._blocks.block_size

    def drop(self, holder: CachedTokens) -> None:
        """The holder let go of its blocks: what it cached stays, its own bookkeeping goes."""
        self._keys_of.pop(holder.seq_id, None)
        self._probes.pop(holder.seq_id, None)

    def forget(self) -> None:
        """No cached block is reused again (the weights changed: its keys and values are stale)."""
        self._blocks.forget_cached()
        self._keys_of.clear()
        self._probes.clear()


def _extend(keys: list[bytes], token_ids: list[int], num_blocks: int, size: int) -> None:
    """Chain keys on to the first `num_blocks` full blocks of `token_ids` (as many as are full)."""
    for index in range(len(keys), min(num_blocks, len(token_ids) // size)):
        keys.append(_chained(keys[-1] if keys else b"", token_ids[index * size : (index + 1) * size]))


def _chained(before: bytes, tokens: list[int]) -> bytes:
    """A block's key: a digest of the key before it and its tokens."""
    return hashlib.blake2b(before + array("q", tokens).tobytes(), digest_size=16).digest()
