"""`gorgon serve --replicas 2`, as users start it: two replicas of the default model, one thread each, on a
local Ray cluster, behind one front. Everything goes through HTTP; /cluster/replicas tells the tests
where the replicas are and which process runs each engine."""

import json
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
    # A one-machine cluster listens on loopback only (the front on its --host).
    assert all(m["url"].startswith("http://127.0.0.1:") for m in replicas), replicas
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


def _workload(count: int) -> list[tuple[str, dict]]:
    """Long requests as users send them: completions and chat, streamed or not, greedy or seeded, one
    sample or two; token ids and logprobs asked, so that outcomes compare exactly."""
    calls = []
    for index in range(count):
        sampling = {"temperature": 0} if index % 3 == 0 else {"temperature": 0.9, "seed": 100 + index}
        common = {"max_tokens": 240, "min_tokens": 240, "stream": index % 4 != 1, "n": 2 if index % 5 == 2 else 1,
                  **sampling}
        if index % 6 == 5:                 # rollout calls: the front splits their prompts over the replicas
            calls.append(("/v1/rollouts", {"prompts": [f"Rollout {index}.{i}" for i in range(4)], "n": 2,
                                           "max_tokens": 200, "min_tokens": 200, "seed": index, "top_logprobs": 1}))
        elif index % 6 == 4:               # SGLang's /generate, a batch of two
            calls.append(("/generate", {"text": [f"Generate {index}", f"And {index}"], "return_logprob": True,
                                        "sampling_params": {"max_new_tokens": 200, "min_new_tokens": 200,
                                                            "temperature": 0.9, "sampling_seed": index}}))
        elif index % 4 == 3:
            calls.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Story {index}, please"}],
                                                   "logprobs": True, "return_token_ids": True, **common}))
        else:
            calls.append(("/v1/completions", {"prompt": f"Tell me a long story, number {index}", "logprobs": 1,
                                              "return_token_ids": True, **common}))
    return calls


def _outcome(url: str, path: str, body: dict) -> dict:
    """Per choice: (text, token ids, logprobs, finish reason); "error" if the caller saw any error."""
    choices: dict = {}

    def add(choice: dict) -> None:
        text, ids, logprobs, finish = choices.get(choice["index"], ("", [], [], None))
        part = choice.get("text") or (choice.get("delta") or choice.get("message") or {}).get("content") or ""
        found = choice.get("logprobs") or {}
        values = found.get("token_logprobs") or [entry["logprob"] for entry in found.get("content") or []]
        assert finish is None, f"choice {choice['index']} went on after it finished"
        choices[choice["index"]] = (text + part, ids + (choice.get("token_ids") or []), logprobs + values,
                                    choice.get("finish_reason"))

    if not body.get("stream"):
        answer = httpx.post(url + path, json=body, timeout=180)
        if answer.status_code != 200:
            return {"error": answer.text}
        found = answer.json()
        if path == "/v1/rollouts":
            return {"rollouts": (found["completion_ids"], found["logprobs"], found["finish_reasons"])}
        if path == "/generate":
            return {"generate": [(item["text"], item["output_ids"], item["meta_info"]["output_token_logprobs"])
                                 for item in found]}
        for choice in found["choices"]:
            add(choice)
        return choices
    with httpx.stream("POST", url + path, json=body, timeout=180) as response:
        if response.status_code != 200:
            return {"error": response.read().decode()}
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    if events.count("[DONE]") != 1 or events[-1] != "[DONE]":
        return {"error": f"the stream did not end once with [DONE]: {events[-3:]}"}
    for event in events[:-1]:
        payload = json.loads(event)
        if "error" in payload:
            return {"error": payload}
        for choice in payload["choices"]:
            add(choice)
    return choices


def _run_all(url: str, calls: list, during=None) -> list[dict]:
    """Every call at once, from threads; `during(url)` runs beside them once they are all sent."""
    results: list = [None] * len(calls)

    def one(index: int) -> None:
        try:
            results[index] = _outcome(url, *calls[index])
        except Exception as err:            # noqa: BLE001 - the test reports it
            results[index] = {"error": repr(err)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    if during is not None:
        during(url)
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive(), "a request hung"
    return results


def _kill_when_busy(url: str, index: int, min_in_flight: int = 2, others_up: bool = True) -> int:
    """SIGKILL replica `index`'s engine once it has requests in flight (and the others are up, if asked);
    its old process id."""
    deadline = time.time() + 60
    while True:
        found = members(url)
        if found[index]["up"] and found[index]["in_flight"] >= min_in_flight and \
                (all(m["up"] for m in found) or not others_up):
            break
        assert time.time() < deadline, found
        time.sleep(0.01)
    time.sleep(1.0)                          # let the streams deliver a good part of their tokens
    os.kill(found[index]["pid"], signal.SIGKILL)
    return found[index]["pid"]


def test_a_replica_killed_twice_in_a_row_under_load_costs_no_answer(front):
    """Long requests over both replicas, streamed and not; one replica's engine is killed, then, while it
    restarts, the other's, which holds every request by then: the streams it resumed are cut a second
    time and wait for an engine to come back. No caller sees an error and every output (text, token ids,
    logprobs) is that of an undisturbed run: requests not answered yet are sent again, streams resume
    where their client is."""
    calls = _workload(12)
    undisturbed = _run_all(front, calls)
    assert all("error" not in outcome for outcome in undisturbed), undisturbed
    killed = []

    def kill_twice(url: str) -> None:
        killed.append(_kill_when_busy(url, 0))
        killed.append(_kill_when_busy(url, 1, min_in_flight=4, others_up=False))

    disturbed = _run_all(front, calls, kill_twice)
    assert len(killed) == 2
    for index, (expected, seen) in enumerate(zip(undisturbed, disturbed)):
        assert seen == expected, (index, calls[index], seen.get("error"))
    back = wait_for_new_engine(front, 1, killed[1])
    assert back[0]["pid"] != killed[0]


def test_a_replica_killed_while_a_weight_update_waits_costs_no_answer(front):
    """A weight update (policy wait) arrives once requests run; one replica dies. The requests finish under
    the weights they started with, as undisturbed (those sent again run ahead of the waiting update); the
    update is then applied on the survivor and replayed on the restarted replica, and the caller of the
    update gets its answer."""
    calls = _workload(8)
    undisturbed = _run_all(front, calls)
    update: dict = {}

    def update_then_kill(url: str) -> None:
        deadline = time.time() + 60
        while sum(m["in_flight"] for m in members(url)) < len(calls):      # every call started first
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(0.5)

        def push() -> None:
            update["answer"] = httpx.post(url + "/v1/weights/update?weight_version=20&policy=wait",
                                          content=save({NORM: torch.ones(HIDDEN) * 1.25}), headers=ADMIN, timeout=300)
        pusher = threading.Thread(target=push)
        pusher.start()
        victim = _kill_when_busy(url, 1)
        pusher.join(timeout=300)
        update["victim"] = victim

    disturbed = _run_all(front, calls, update_then_kill)
    for index, (expected, seen) in enumerate(zip(undisturbed, disturbed)):
        assert seen == expected, (index, calls[index], seen.get("error"))
    assert update["answer"].status_code == 200 and update["answer"].json()["weight_version"] == 20, update["answer"].text
    back = wait_for_new_engine(front, 1, update["victim"])
    assert {httpx.get(m["url"] + "/v1/weights/version").json()["weight_version"] for m in back} == {20}
    assert greedy(back[0]["url"]) == greedy(back[1]["url"])


def test_bodies_over_the_limit_are_refused_at_the_front(front):
    answer = httpx.post(front + "/v1/completions", content=b"x" * (5 * 2**20),
                        headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "--max-body-mb" in answer.json()["error"]["message"]
