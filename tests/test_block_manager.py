import pytest

from decoding.block_manager import BlockManager, NoFreeBlocksError
from models.attention import NULL_BLOCK


def test_append_allocates_blocks_as_tokens_grow():
    blocks = BlockManager(num_blocks=10, block_size=4)
    table: list[int] = []
    assert blocks.append_slots(table, 0, 6) == []
    assert len(table) == 2 and NULL_BLOCK not in table
    assert blocks.append_slots(table, 6, 2) == []     # fills block 2, no new block
    assert len(table) == 2
    blocks.append_slots(table, 8, 1)
    assert len(table) == 3
    assert blocks.usage().num_used_blocks == 3


def test_fork_shares_and_copies_on_write_of_the_partial_block():
    blocks = BlockManager(num_blocks=10, block_size=4)
    parent: list[int] = []
    blocks.append_slots(parent, 0, 6)                  # blocks: [full, half]
    child = blocks.fork(parent, 6)
    assert child == parent and all(blocks.ref_count(b) == 2 for b in parent)
    used = blocks.usage().num_used_blocks
    copies = blocks.append_slots(child, 6, 1)          # writes into the shared half block
    assert copies == [(parent[1], child[1])]
    assert child[0] == parent[0] and child[1] != parent[1]
    assert blocks.usage().num_used_blocks == used + 1
    assert blocks.append_slots(parent, 6, 1) == []     # parent is the last owner: writes in place


def test_free_and_truncate_return_blocks():
    blocks = BlockManager(num_blocks=10, block_size=4)
    table: list[int] = []
    blocks.append_slots(table, 0, 12)
    shared = blocks.fork(table, 12)
    blocks.truncate(table, 5)                          # keep 2 blocks
    assert len(table) == 2
    blocks.free(table)
    assert blocks.usage().num_used_blocks == 3         # still held by the fork
    blocks.free(shared)
    assert blocks.usage().num_used_blocks == 0 and table == [] and shared == []


def test_running_out_raises_and_changes_nothing():
    blocks = BlockManager(num_blocks=3, block_size=4)  # 2 usable
    table: list[int] = []
    with pytest.raises(NoFreeBlocksError):
        blocks.append_slots(table, 0, 9)
    assert table == [] and blocks.num_free_blocks == 2
