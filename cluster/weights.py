"""Weights across replicas: every update is all or nothing, and a replica that restarts is brought back to
what the others serve before it gets a request.

An update (a push, a load from disk, SGLang's update_weights_from_disk) runs in two phases on every live
replica. First a dry run: each replica checks the payload against its model and the version, changing
nothing; one refusal ends the update there, with that replica's answer. Then the update itself, each
replica keeping what it overwrote; if any replica fails it (an error, or its process dies), the ones that
applied it roll back to the previous values and version, and the caller gets the failure. Only when every
replica has applied it is it committed (the kept values dropped), and only then is it recorded in the
journal. An update with policy wait (generation not paused) first drains the whole cluster: every replica
pauses once its started requests have finished, the update applies, then they resume; so no replica
serves the new weights while requests started under the old ones still run anywhere (a replica that dies
meanwhile has its streams resumed on another under the weights they started with: cluster/failover.py).
A replica that dies during an update is left out of it. Updates are serialized, and none runs while a
replica is being re-synced.

The journal is the cluster's served state: the last full load (a checkpoint path and the version it set)
and every tensor pushed since, merged by name (at most one copy of the model, held by the front), the
served version, and whether generation is paused. A restarted replica replays it: the load, then one push
of the merged tensors at the served version, then the pause.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import torch
from fastapi.responses import Response

from cluster.answers import as_response, unavailable
from cluster.replicas import ReplicaDown, Replicas
from decoding.weights import DRAFT_PREFIX, ServedWeights     # the draft model's names, which a load keeps
from wire.safetensors import PayloadError, encode_payload, payload_header, read_payload

PUSH = "/v1/weights/update"
LOADS = ("/v1/weights/load", "/update_weights_from_disk")
WEIGHT_ROUTES = (PUSH, *LOADS)
PAUSES = {"/pause": True, "/pause_generation": True, "/resume": False, "/continue_generation": False}


class WeightJournal:
    def __init__(self):
        self.loaded: tuple[str, int] | None = None       # (checkpoint path, the version it set)
        self.pushed: dict[str, torch.Tensor] = {}
        self.version = 0
        self.paused = False
        self.non_finite = False        # an update was let through with NaN or infinities (allow_non_finite)
        self.policies: list[tuple[int, str]] = []      # (version set, policy) of each committed update
        self.pending_policy: str | None = None          # the policy of the update being applied now

    def keeps_since(self, version: int | None) -> bool:
        """Whether every update after `version` (the one in progress too) let requests keep running under
        the new weights (policy keep): a stream resumed from tokens of that version goes on under the
        served weights, as it would have on its own replica (cluster/failover.py)."""
        later = [policy for set_version, policy in self.policies if version is None or set_version > version]
        if self.pending_policy is not None:
            later.append(self.pending_policy)
        return all(policy == "keep" for policy in later)

    def record(self, path: str, params: dict, body: bytes, version: int, policy: str = "wait") -> None:
        """A committed update (its route, query and body, its policy) and the version every replica reported."""
        self.policies.append((version, policy))
        if path == PUSH:
            tensors = read_payload(bytearray(body))
            self.pushed.update({name: tensor.clone() for name, tensor in tensors.items()})
            allowed = params.get("allow_non_finite", "false").lower() == "true"
        else:
            fields = json.loads(body)
            self.loaded = (fields.get("path") or fields.get("model_path"), version)
            self.pushed = {name: t for name, t in self.pushed.items() if name.startswith(DRAFT_PREFIX)}
            allowed = bool(fields.get("allow_non_finite"))
        self.non_finite = self.non_finite or allowed
        self.version = version

    def replay(self) -> list[tuple[str, str, dict, bytes]]:
        """The calls (method, route, query, body) that bring a fresh replica to the served state."""
        calls = []
        if self.loaded is not None:
            path, version = self.loaded
            body = {"path": path, "weight_version": version, "allow_version_rollback": True,
                    "allow_non_finite": self.non_finite}
            calls.append(("POST", LOADS[0], {}, json.dumps(body).encode()))
        if self.pushed:
            served = any(not name.startswith(DRAFT_PREFIX) for name in self.pushed)
            query = {"weight_version": self.version, "allow_version_rollback": "true"} if served else {}
            query["allow_non_finite"] = str(self.non_finite).lower()
            calls.append(("POST", PUSH, query, encode_payload(self.pushed)))
        if self.paused:
            calls.append(("POST", "/pause", {"mode": "abort", "clear_cache": "false"}, b""))
        return calls


class WeightCoordinator:
    def __init__(self, replicas: Replicas, admin_key: str | None, api_key: str | None = None):
        self.replicas = replicas
        self.journal = WeightJournal()
        self.lock = asyncio.Lock()
        # The replicas' keys: the admin key for the replayed updates, the API key to read the version.
        self._admin = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._api = {"authorization": f"Bearer {api_key}"} if api_key else {}
        replicas.resync = self.resync

    async def update(self, path: str, params: dict, body: bytes, headers: dict) -> Response:
        async with self.lock:
            self.journal.pending_policy = policy = _policy(path, params, body)
            try:
                return await self._update(path, params, body, headers, policy)
            finally:
                self.journal.pending_policy = None

    async def _update(self, path: str, params: dict, body: bytes, headers: dict, policy: str) -> Response:
        """An update under the lock. A replica that dies during it is left out (it is re-synced from the
        journal before it serves again): losing a replica costs the update nothing while another applies it."""
        live = self.replicas.live()
        checked = await self._everywhere(live, path, _flagged(path, params, body, "dry_run"), headers)
        refusal = _first_failure(checked)
        if refusal is not None:
            return refusal
        live = [index for index, answer in zip(live, checked) if not isinstance(answer, ReplicaDown)]
        # A wait update that changes outputs, generation not paused, waits for the whole cluster's started
        # requests: each replica waiting for its own would let one apply it while the requests of a
        # replica that dies are about to resume there, under the weights they started with.
        drained = policy == "wait" and not self.journal.paused and _changes_outputs(path, body)
        if drained:
            live = await self._drain(live, headers)
        try:
            return await self._apply(live, path, params, body, headers, policy)
        finally:
            if drained:
                await self._everywhere(self.replicas.live(), "/resume", ({}, b""), headers)

    async def _drain(self, live: list[int], headers: dict) -> list[int]:
        """Every live replica paused once its started requests have finished (resumed ones included:
        they count as started); the replicas that are still up."""
        answers = await self._everywhere(live, "/pause", ({"mode": "wait", "clear_cache": "false"}, b""), headers)
        return [index for index, answer in zip(live, answers) if _succeeded(answer)]

    async def _apply(self, live: list[int], path: str, params: dict, body: bytes, headers: dict,
                     policy: str) -> Response:
        """Apply (keeping what it overwrote), then commit everywhere, or roll back where applied."""
        applied = await self._everywhere(live, path, _flagged(path, params, body, "keep_previous"), headers)
        failure = _first_failure(applied)
        if failure is not None:
            await self._roll_back([i for i, a in zip(live, applied) if _succeeded(a)], headers)
            return failure
        committed = await self._everywhere(live, "/v1/weights/commit", ({}, b""), headers)
        reported = [a.json()["weight_version"] if _succeeded(a) else None for a in committed]
        if all(seen is None for seen in reported):
            return unavailable("every replica failed right after the weight update; they restart with the "
                                "weights served before it; retry")
        version = max(set(reported) - {None}, key=reported.count)
        for index, seen in zip(live, reported):
            if seen != version:                   # re-synced from the journal before it serves again
                self.replicas.mark_down(index)
        self.journal.record(path, params, body, version, policy)
        return as_response(next(a for a in applied if _succeeded(a)))

    async def fan_out(self, path: str, method: str, params: dict, body: bytes, headers: dict) -> list:
        """A control call on every live replica (pause, resume, aborts, cache resets); a pause or resume
        that every live replica took is recorded, for replicas that restart."""
        async with self.lock:
            live = self.replicas.live()
            answers = await self._everywhere(live, path, (params, body), headers, method)
            if path in PAUSES and all(_succeeded(a) or isinstance(a, ReplicaDown) for a in answers):
                self.journal.paused = PAUSES[path]
            return answers

    async def resync(self, index: int, url: str) -> bool:
        """Bring a restarted replica (not routed to yet) to the journal's state; False to try again later."""
        async with self.lock:
            client = self.replicas.http
            try:
                for method, path, params, body in self.journal.replay():
                    answer = await client.request(method, url + path, params=params, content=body, headers=self._admin)
                    if answer.status_code >= 400:
                        print(f"gorgon: re-syncing replica {index}: {path} answered {answer.status_code}: "
                              f"{answer.text[:300]}", flush=True)
                        return False
                version = (await client.get(url + "/v1/weights/version", headers=self._api)).json()
            except (httpx.TransportError, ValueError):
                return False
            return version.get("weight_version") == self.journal.version

    async def _everywhere(self, live: list[int], path: str, call: tuple[dict, bytes], headers: dict,
                          method: str = "POST") -> list:
        params, body = call
        return await asyncio.gather(*(self.replicas.call(index, method, path, params=params, content=body,
                                                         headers=headers) for index in live),
                                    return_exceptions=True)

    async def _roll_back(self, indices: list[int], headers: dict) -> None:
        answers = await self._everywhere(indices, "/v1/weights/rollback", ({}, b""), headers)
        for index, answer in zip(indices, answers):
            if not _succeeded(answer):               # cannot undo it: re-sync it from the journal instead
                self.replicas.mark_down(index)


def _flagged(path: str, params: dict, body: bytes, flag: str) -> tuple[dict, bytes]:
    """The call with a dry_run or keep_previous flag: in the query for a push, in the JSON body for loads."""
    if path == PUSH:
        return {**params, flag: "true"}, body
    try:
        fields = json.loads(body)
    except ValueError:
        return params, body                   # the replica says what is wrong with it
    return params, json.dumps({**fields, flag: True} if isinstance(fields, dict) else fields).encode()


def _succeeded(answer) -> bool:
    return isinstance(answer, httpx.Response) and answer.status_code < 400


def _changes_outputs(path: str, body: bytes) -> bool:
    """Whether an update touches the served model (a push of draft weights alone does not: it applies at
    once, whatever its policy). Read from the payload's header; a malformed one was refused already."""
    if path != PUSH:
        return True
    try:
        return ServedWeights.changes_outputs(payload_header(body)[0])
    except PayloadError:
        return True


def _policy(path: str, params: dict, body: bytes) -> str:
    """An update's policy for the requests in flight (wait, abort or keep; a load's is in its body)."""
    if path == PUSH:
        return params.get("policy", "wait")
    try:
        fields = json.loads(body)
    except ValueError:
        return "wait"
    return fields.get("policy", "wait") if isinstance(fields, dict) else "wait"


def _first_failure(answers: list) -> Response | None:
    """The first refusal among the replicas' answers; one that died is not a refusal (it is re-synced),
    unless every replica did."""
    if answers and all(isinstance(answer, ReplicaDown) for answer in answers):
        return unavailable("every replica failed during the weight update; no replica changed its weights; "
                           "retry once they are back")
    for answer in answers:
        if isinstance(answer, ReplicaDown):
            continue
        if isinstance(answer, BaseException):
            raise answer
        if answer.status_code >= 400:
            return as_response(answer)
    return None
