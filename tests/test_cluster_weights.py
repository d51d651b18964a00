"""The weight coordinator's decisions, against fake replicas (no Ray): which calls each replica gets when
an update is refused, when one replica fails it after others applied it, and when all take it; and what a
restarted replica is sent to catch up."""

import asyncio
import json

import httpx
import pytest
import torch
from safetensors.torch import load, save

from cluster.replicas import Replicas
from cluster.weights import WeightCoordinator, WeightJournal

ADMIN = {"authorization": "Bearer admin"}


class FakeReplica:
    """A replica's weight routes: a version, and the calls it got."""

    def __init__(self, refuse_dry_run=False, fail_apply=False, die_on_apply=False):
        self.version, self.kept = 0, None
        self.refuse_dry_run, self.fail_apply, self.die_on_apply = refuse_dry_run, fail_apply, die_on_apply
        self.calls = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        path, query = request.url.path, dict(request.url.params)
        self.calls.append((path, query.get("dry_run") or query.get("keep_previous") and "keep"))
        if path == "/v1/weights/update":
            if query.get("dry_run"):
                return httpx.Response(400 if self.refuse_dry_run else 200, json={"weight_version": 1})
            if self.die_on_apply:
                raise httpx.ConnectError("the replica's process died")
            if self.fail_apply:
                return httpx.Response(400, json={"error": {"message": "boom"}})
            self.kept, self.version = self.version, int(query.get("weight_version", self.version + 1))
            return httpx.Response(200, json={"weight_version": self.version, "num_parameters": 1})
        if path == "/v1/weights/rollback":
            self.version, self.kept = self.kept, None
            return httpx.Response(200, json={"weight_version": self.version})
        if path == "/v1/weights/commit":
            self.kept = None
            return httpx.Response(200, json={"weight_version": self.version})
        if path == "/v1/weights/version":            # a replica serving with --api-key api
            if request.headers.get("authorization") != "Bearer api":
                return httpx.Response(401, json={"error": {"message": "missing or wrong API key"}})
            return httpx.Response(200, json={"weight_version": self.version})
        return httpx.Response(200, json={})


def coordinator(*fakes: FakeReplica, api_key: str | None = "api") -> tuple[WeightCoordinator, Replicas]:
    by_host = {f"r{i}": fake for i, fake in enumerate(fakes)}
    replicas = Replicas([None] * len(fakes), [(f"http://r{i}", i) for i in range(len(fakes))])
    replicas.http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: by_host[r.url.host].handle(r)))
    replicas.mark_down = lambda index: replicas.urls.__setitem__(index, None)      # no actor to rejoin
    return WeightCoordinator(replicas, "admin", api_key), replicas


PAYLOAD = save({"model.norm.weight": torch.ones(4)})


def push(coord: WeightCoordinator, query: dict | None = None):
    return asyncio.run(coord.update("/v1/weights/update", query or {}, PAYLOAD, ADMIN))


def test_a_refusal_in_the_dry_run_changes_no_replica():
    good, bad = FakeReplica(), FakeReplica(refuse_dry_run=True)
    coord, _ = coordinator(good, bad)
    assert push(coord).status_code == 400
    assert [c for c in good.calls if c[1] != "true"] == [] and good.version == 0
    assert coord.journal.version == 0 and not coord.journal.pushed


def test_a_replica_that_refuses_the_update_rolls_the_others_back():
    first, failing, third = FakeReplica(), FakeReplica(fail_apply=True), FakeReplica()
    coord, _ = coordinator(first, failing, third)
    answer = push(coord, {"weight_version": "4"})
    assert answer.status_code == 400
    for fake in (first, third):
        assert ("/v1/weights/rollback", None) in fake.calls and fake.version == 0
        assert ("/v1/weights/commit", None) not in fake.calls
    assert ("/v1/weights/rollback", None) not in failing.calls
    assert coord.journal.version == 0 and not coord.journal.pushed


def test_a_replica_that_dies_during_the_update_is_left_out_of_it():
    """Losing a replica costs the update nothing: the others commit it, and the dead one (marked down)
    is re-synced from the journal before it serves again."""
    first, dying, third = FakeReplica(), FakeReplica(die_on_apply=True), FakeReplica()
    coord, replicas = coordinator(first, dying, third)
    answer = push(coord, {"weight_version": "4"})
    assert answer.status_code == 200 and json.loads(answer.body)["weight_version"] == 4
    assert first.version == third.version == 4 and ("/v1/weights/rollback", None) not in first.calls
    assert replicas.urls[1] is None and coord.journal.version == 4
    everyone_dies, _ = coordinator(FakeReplica(die_on_apply=True), FakeReplica(die_on_apply=True))
    assert push(everyone_dies).status_code == 503


def test_an_update_every_replica_takes_is_committed_and_journalled():
    """Policy wait (the default) drains the whole cluster around the update; keep does not."""
    fakes = [FakeReplica(), FakeReplica()]
    coord, _ = coordinator(*fakes)
    answer = push(coord, {"weight_version": "6"})
    assert answer.status_code == 200 and json.loads(answer.body)["weight_version"] == 6
    for fake in fakes:
        assert [c for c in fake.calls] == [("/v1/weights/update", "true"), ("/pause", None),
                                           ("/v1/weights/update", "keep"), ("/v1/weights/commit", None),
                                           ("/resume", None)]
    assert coord.journal.version == 6 and list(coord.journal.pushed) == ["model.norm.weight"]
    for fake in fakes:
        fake.calls = []
    assert push(coord, {"weight_version": "7", "policy": "keep"}).status_code == 200
    assert [path for path, _ in fakes[0].calls] == ["/v1/weights/update", "/v1/weights/update", "/v1/weights/commit"]
    assert coord.journal.keeps_since(6) and not coord.journal.keeps_since(5)


def test_the_journal_replays_a_load_then_the_merged_pushes_then_the_pause():
    journal = WeightJournal()
    journal.record("/v1/weights/update", {}, save({"a": torch.zeros(2), "draft.b": torch.zeros(1)}), 1)
    journal.record("/v1/weights/load", {}, json.dumps({"path": "/ckpt/step2"}).encode(), 2)
    journal.record("/v1/weights/update", {}, save({"a": torch.ones(2)}), 3)
    journal.record("/v1/weights/update", {"allow_non_finite": "true"}, save({"c": torch.full((3,), float("nan"))}), 4)
    journal.paused = True
    calls = journal.replay()
    assert [(path, query) for _, path, query, _ in calls] == [
        ("/v1/weights/load", {}),
        ("/v1/weights/update", {"weight_version": 4, "allow_version_rollback": "true", "allow_non_finite": "true"}),
        ("/pause", {"mode": "abort", "clear_cache": "false"})]
    assert json.loads(calls[0][3]) == {"path": "/ckpt/step2", "weight_version": 2, "allow_version_rollback": True,
                                       "allow_non_finite": True}     # a push let NaN through: so does the replay
    merged = load(calls[1][3])
    assert sorted(merged) == ["a", "c", "draft.b"]            # the load kept the draft's, replaced the rest
    assert torch.equal(merged["a"], torch.ones(2)) and torch.isnan(merged["c"]).all()


def test_a_restarted_replica_is_resynced_with_the_keys_each_route_needs():
    """The replayed push takes the admin key; reading the version back takes the API key (a replica with
    --api-key refuses the admin key there), and only a replica at the served version is readmitted."""
    serving, fresh = FakeReplica(), FakeReplica()
    coord, _ = coordinator(serving, fresh)
    assert push(coord, {"weight_version": "3"}).status_code == 200
    fresh.version, fresh.calls = 0, []
    assert asyncio.run(coord.resync(1, "http://r1")) is True
    assert fresh.version == 3 and [path for path, _ in fresh.calls] == ["/v1/weights/update", "/v1/weights/version"]
    without_api_key, _ = coordinator(FakeReplica(), FakeReplica(), api_key=None)
    assert asyncio.run(without_api_key.resync(1, "http://r1")) is False
