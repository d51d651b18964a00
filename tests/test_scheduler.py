"""Scheduler behaviour on fake requests: no model, no tensors."""

from decoding.block_manager import BlockManager
from decoding.kv_cache_manager import KVCacheManager
from decoding.params import SamplingParams
from decoding.scheduler import Scheduler
from decoding.sequence import Request, RequestStatus, Sequence


def make_request(req_id: str, prompt_len: int, n: int = 1) -> Request:
    request = Request(req_id, None, list(range(3, 3 + prompt_len)), SamplingParams(n=n, max_tokens=8))
    for i in range(n):
        request.seqs.append(Sequence(hash((req_id, i)), i, request, 0, detokenizer=None))
    return request


def finish_step(out) -> None:
    """Pretend the model ran: mark tokens computed and append a sampled token where a chunk ended."""
    for item in out.scheduled:
        item.seq.num_computed += item.num_new_tokens
        if item.reaches_end:
            item.seq.token_ids.append(7)


def test_decodes_go_first_and_prefill_is_chunked_under_the_budget():
    scheduler = Scheduler(KVCacheManager(BlockManager(64, 4)), max_num_seqs=8, max_num_batched_tokens=16)
    short = make_request("short", 4)
    scheduler.add(short)
    finish_step(scheduler.schedule())                  # short is now decoding
    long = make_request("long", 40)
    scheduler.add(long)
    chunks = []
    for _ in range(3):
        out = scheduler.schedule()
        assert out.num_tokens <= 16
        assert out.scheduled[0].seq is short.leader and out.scheduled[0].num_new_tokens == 1
        chunks += [s.num_new_tokens for s in out.scheduled if s.seq is long.leader]
        finish_step(out)
    assert chunks == [15, 15, 10]                      # the budget left after the decode


def test_preemption_frees_blocks_and_recomputes_later():
    blocks = BlockManager(9, 4)                        # 8 usable blocks
    scheduler = Scheduler(KVCacheManager(blocks), max_num_seqs=8, max_num_batched_tokens=64)
    first, second = make_request("a", 16), make_request("b", 16)
    scheduler.add(first)
    scheduler.add(second)
    finish_step(scheduler.schedule())                  # both prefilled: 4 + 4 blocks
    assert blocks.num_free_blocks == 0
    out = scheduler.schedule()                         # "a" needs a 5th block: "b" is preempted
    assert out.preempted == [second] and second.status is RequestStatus.WAITING
    assert second.leader.num_computed == 0 and second.leader.block_table == []
    assert [s.seq for s in out.scheduled] == [first.leader]


def test_group_prefills_only_the_leader_until_it_forks():
    scheduler = Scheduler(KVCacheManager(BlockManager(64, 4)), max_num_seqs=8, max_num_batched_tokens=64)
    group = make_request("g", 10, n=3)
    scheduler.add(group)
    out = scheduler.schedule()
    assert [s.seq for s in out.scheduled] == [group.leader]
    assert out.scheduled[0].num_new_tokens == 10


def test_admission_respects_max_num_seqs():
    scheduler = Scheduler(KVCacheManager(BlockManager(64, 4)), max_num_seqs=2, max_num_batched_tokens=64)
    for name in "abc":
        scheduler.add(make_request(name, 4))
    out = scheduler.schedule()
    assert len(out.scheduled) == 2 and len(scheduler.waiting) == 1
