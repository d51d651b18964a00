"""`gorgon serve --replicas 2`, as users start it: two replicas of the default model, one thread each, on a
local Ray cluster, behind one front. Everything goes through HTTP; /cluster/replicas tells the tests
where the replicas are and which process runs each engine."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import save

pytest.importorskip("ray", reason="the cluster extra (ray[serve]) is not installed")
from live_server import free_port  # noqa: E402

pytestmark = pytest.mark.cluster
ADMIN = {"Authorization": "Bearer admin"}
NORM = "model.norm.weight"
HIDDEN = 320                   # the default model's hidden size


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("cluster") / "front.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--replicas", "2", "--threads", "1",
                                "--port", str(port), "--admin-key", "admin", "--kv-cache-memory-gb", "0.1",
                                "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        assert process.poll() is None and time.time() < deadline, _read(log)
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    yield url
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def _read(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


def members(url: str) -> list[dict]:
    return httpx.get(url + "/cluster/replicas", headers=ADMIN).json()["replicas"]


def wait_for_new_engine(url: str, index: int, old_pid: int, timeout: float = 120) -> list[dict]:
    """The replicas once `index` serves again from another engine process than `old_pid`."""
    deadline = time.time() + timeout
    while True:
        found = members(url)
        if all(m["up"] for m in found) and found[index]["pid"] != old_pid:
            return found
        assert time.time() < deadline, f"replica {index} did not come back: {found}"
        time.sleep(0.2)


def greedy(url: str, prompt: str = "The cat sat on") -> list[int]:
    body = {"prompts": [prompt], "max_tokens": 8, "min_tokens": 8, "temperature": 0}
    answer = httpx.post(url + "/v1/rollouts", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["completion_ids"][0]


def test_completions_streams_and_rollouts_through_the_front(front):
    replicas = members(front)
    assert [m["up"] for m in replicas] == [True, True] and replicas[0]["pid"] != replicas[1]["pid"]
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    direct = httpx.post(replicas[0]["url"] + "/v1/completions", json=body).json()["choices"][0]["text"]
    assert httpx.post(front + "/v1/completions", json=body).json()["choices"][0]["text"] == direct
    chat = httpx.post(front + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    with httpx.stream("POST", front + "/v1/completions", json={**body, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(6)]
    rollout = {"prompts": prompts, "n": 2, "max_tokens": 4, "seed": 3}
    out = httpx.post(front + "/v1/rollouts", json=rollout).json()
    assert len(out["completion_ids"]) == 12 and out["weight_version"] == 0
    alone = httpx.post(replicas[1]["url"] + "/v1/rollouts", json=rollout).json()
    assert alone["completion_ids"] == out["completion_ids"]       # spread over replicas, same samples
    assert out["prompt_ids"] == alone["prompt_ids"]
    score = httpx.post(front + "/v1/score", json={"sequences": [out["prompt_ids"][0] + out["completion_ids"][0]],
                                                  "prompt_lens": [len(out["prompt_ids"][0])]})
    assert score.status_code == 200
    assert httpx.post(front + "/v1/completions", json={"prompt": "x", "max_tokens": -1}).status_code == 400


def test_metrics_and_loads_cover_every_replica(front):
    httpx.post(front + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    text = httpx.get(front + "/metrics").text
    for replica in (0, 1):
        assert f'gorgon:replica_up{{replica="{replica}"}} 1' in text
        assert f'gorgon:replica_in_flight{{replica="{replica}"}}' in text
        assert f'replica="{replica}"' in text.split("gorgon:replica_in_flight")[0]     # its own samples
    assert "gorgon:routed_requests_total" in text
    loads = httpx.get(front + "/v1/loads", headers=ADMIN).json()["loads"]
    assert [entry["dp_rank"] for entry in loads] == [0, 1]
    assert httpx.get(front + "/cluster/replicas").status_code == 401


def test_weight_updates_are_all_or_nothing(front):
    replicas = members(front)
    before = greedy(front)
    # Replica 1 alone moves to version 5 (as if it had diverged): a push at version 3 through the front is
    # refused by it in the first phase, and replica 0 must not have applied it either.
    payload = save({NORM: torch.ones(HIDDEN) * 1.5})
    assert httpx.post(replicas[1]["url"] + "/v1/weights/update?weight_version=5", content=payload,
                      headers=ADMIN).status_code == 200
    refused = httpx.post(front + "/v1/weights/update?weight_version=3", content=payload, headers=ADMIN)
    assert refused.status_code == 400 and "lower than the served version 5" in refused.text
    assert httpx.get(replicas[0]["url"] + "/v1/weights/version").json()["weight_version"] == 0
    assert greedy(replicas[0]["url"]) == before
    # A push every replica takes: the same version everywhere, and the same outputs.
    pushed = httpx.post(front + "/v1/weights/update?weight_version=7", content=save({NORM: torch.ones(HIDDEN) * 3}),
                        headers=ADMIN)
    assert pushed.status_code == 200 and pushed.json()["weight_version"] == 7
    assert {httpx.get(m["url"] + "/v1/weights/version").json()["weight_version"] for m in replicas} == {7}
    assert greedy(replicas[0]["url"]) == greedy(replicas[1]["url"])
    assert httpx.post(front + "/v1/weights/update", content=b"junk", headers=ADMIN).status_code == 400
    assert httpx.get(front + "/v1/weights/version").json()["weight_version"] == 7


def test_a_restarted_replica_is_resynced_before_it_serves(front):
    """Its engine is killed while the cluster is paused at a pushed version: the new engine comes back at
    that version, paused, with the same outputs as the other replica, before the front routes to it."""
    pushed = httpx.post(front + "/v1/weights/update?weight_version=9", content=save({NORM: torch.ones(HIDDEN) * 2}),
                        headers=ADMIN)
    assert pushed.status_code == 200
    assert httpx.post(front + "/pause?mode=abort", headers=ADMIN).status_code == 200
    victim = members(front)[1]
    os.kill(victim["pid"], signal.SIGKILL)
    back = wait_for_new_engine(front, 1, victim["pid"])
    assert httpx.get(back[1]["url"] + "/v1/weights/version").json()["weight_version"] == 9
    assert httpx.get(back[1]["url"] + "/is_paused", headers=ADMIN).json() == {"is_paused": True}
    assert httpx.post(front + "/resume", headers=ADMIN).status_code == 200
    assert greedy(back[1]["url"]) == greedy(back[0]["url"])


def _call(front: str, index: int, results: dict) -> None:
    try:
        _long_completion(front, index, results)
    except Exception as err:            # noqa: BLE001 - the test reports it
        results[index] = repr(err)


def _long_completion(front: str, index: int, results: dict) -> None:
    """A long completion, streamed for odd indices: "ok", "retry" (a retriable failure) or what went wrong."""
    body = {"prompt": f"Tell me a long story, number {index}", "max_tokens": 400, "min_tokens": 400}
    if index % 2 == 0:
        answer = httpx.post(front + "/v1/completions", json=body, timeout=120)
        retriable = answer.status_code == 503 and answer.headers.get("retry-after") and "retry" in answer.text
        results[index] = "ok" if answer.status_code == 200 else "retry" if retriable else answer.text
        return
    with httpx.stream("POST", front + "/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        if response.status_code != 200:               # sent after the kill, before the front noticed it
            response.read()
            retriable = response.status_code == 503 and response.headers.get("retry-after")
            results[index] = "retry" if retriable else response.text
            return
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    failed = [e for e in events if '"replica_unavailable"' in e]
    results[index] = "retry" if failed and events[-1] == "data: [DONE]" else "ok" if events[-1] == "data: [DONE]" \
        else events[-3:]


def test_a_replica_killed_under_load_fails_its_requests_retriably_and_comes_back(front):
    """Eight long requests in flight over both replicas, half of them streamed; one replica's engine is
    killed. Its requests end with a retriable 503 (a stream with an error event), none hangs, the other
    replica's finish, and the dead replica is restarted and readmitted."""
    results = {}
    threads = [threading.Thread(target=_call, args=(front, i, results)) for i in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 30
    found = members(front)
    while not all(m["in_flight"] for m in found):
        assert time.time() < deadline, found
        time.sleep(0.01)
        found = members(front)
    victim = found[0]
    os.kill(victim["pid"], signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a request hung"
    assert len(results) == 8 and set(results.values()) <= {"ok", "retry"}, results
    assert "ok" in results.values() and "retry" in results.values(), results
    short = {"prompt": "Hello", "max_tokens": 2}
    assert httpx.post(front + "/v1/completions", json=short).status_code == 200       # the other one serves
    back = wait_for_new_engine(front, 0, victim["pid"])
    assert httpx.post(back[0]["url"] + "/v1/completions", json=short).status_code == 200


def test_bodies_over_the_limit_are_refused_at_the_front(front):
    answer = httpx.post(front + "/v1/completions", content=b"x" * (5 * 2**20),
                        headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "--max-body-mb" in answer.json()["error"]["message"]
