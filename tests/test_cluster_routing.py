"""The cluster's routing policy (cluster/routing.py): prefix-aware, load-balanced, groups whole."""

import random

import pytest

from cluster.routing import CHUNK_CHARS, PrefixRouter, RoutingPolicy, prefix_keys

SYSTEM = "You are a careful assistant with these tools: " * 20          # ~900 characters, shared


def conversation(index: int, turns: int) -> str:
    rng = random.Random(index)
    return SYSTEM + "".join(f"user: question {rng.random()} assistant: answer {rng.random()}\n" for _ in range(turns))


def test_keys_are_a_chain_over_full_chunks():
    text = "x" * (3 * CHUNK_CHARS + 5)
    keys = prefix_keys(text)
    assert len(keys) == 3 and len(set(keys)) == 3                    # the same chunk, keyed by what precedes it
    assert prefix_keys(text[: 2 * CHUNK_CHARS]) == keys[:2]
    assert prefix_keys("y" + text[1:])[0] != keys[0] and prefix_keys("short") == []


def test_conversations_spread_under_load_and_return_to_the_replica_that_holds_their_history():
    """32 conversations in flight at once, sharing a long system prompt: the first turns spread over both
    replicas once one of them is busier, and later turns go back to where their history is."""
    router = PrefixRouter(2)
    homes, returned, later = {}, 0, 0
    for turn in range(1, 5):
        loads = [0, 0]                                   # each turn's requests are in flight together
        for index in range(32):
            replica = router.choose(conversation(index, turn), loads)
            loads[replica] += 1
            if index in homes:
                later += 1
                returned += replica == homes[index]
            homes[index] = replica
    assert min(list(homes.values()).count(r) for r in (0, 1)) >= 8
    assert returned >= 0.9 * later


def test_a_busy_replica_is_bypassed():
    router = PrefixRouter(2, RoutingPolicy(balance_abs=4, balance_rel=1.5))
    first = router.choose(conversation(0, 1), loads=[0, 0])
    other = 1 - first
    loads = [0, 0]
    loads[first] = 20
    assert router.choose(conversation(0, 2), loads) == other           # out of balance: load wins
    loads[first] = 3
    # In balance the cache wins: the second turn, the longest history, now lives on the other replica.
    assert router.choose(conversation(0, 3), loads) == other


def test_a_rollout_call_spreads_its_prompts_and_keeps_each_group_whole():
    router = PrefixRouter(3)
    prompts = [f"Task {i}: " + "solve the following problem carefully. " * 4 for i in range(12)]
    placed = router.spread(prompts, loads=[0, 0, 0])
    assert len(placed) == 12 and sorted(placed.count(r) for r in range(3)) == [4, 4, 4]


def test_forgetting_a_replica_and_bad_loads():
    router = PrefixRouter(2)
    text = "a prompt of its own, " * 20
    home = router.choose(text, [0, 0])
    assert router.choose(text, [1, 0] if home == 0 else [0, 1]) == home     # held: the cache wins
    router.forget(home)
    loads = [1, 1]
    loads[home] += 1
    assert router.choose(text, loads) == 1 - home                       # nothing held: load decides
    with pytest.raises(ValueError):
        router.choose(text, [0])
    with pytest.raises(ValueError):
        PrefixRouter(0)


def test_a_few_conversations_sharing_a_system_prompt_use_both_replicas():
    """With SGLang's all-or-nothing balance, six conversations in flight all matched the replica that saw
    the system prompt first and the other one idled; here they split, and each stays where it started."""
    router = PrefixRouter(2)
    homes = {}
    for turn in range(1, 4):
        loads = [0, 0]
        for index in range(6):
            replica = router.choose(conversation(index, turn), loads)
            loads[replica] += 1
            assert homes.setdefault(index, replica) == replica
        assert sorted(loads) == [3, 3]
