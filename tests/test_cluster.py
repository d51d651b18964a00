"""Two replicas of a tiny model behind one front, on a local Ray cluster, one thread each."""

import os
import signal
import threading
import time

import httpx
import pytest
import torch

ray = pytest.importorskip("ray", reason="the cluster extra (ray[serve]) is not installed")

from cluster.launch import cluster_app, start_replicas  # noqa: E402
from live_server import free_port  # noqa: E402

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def front(llama_dir):
    import uvicorn
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    replicas = start_replicas(2, 1, llama_dir, {"num_kv_blocks": 512, "block_size": 4},
                              {"served_model_name": "tiny", "admin_key": "admin"})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(cluster_app(replicas), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", replicas
    server.should_exit = True
    thread.join(timeout=30)
    ray.shutdown()


ADMIN = {"Authorization": "Bearer admin"}


def test_completions_streams_and_rollouts_through_the_front(front):
    url, replicas = front
    body = {"prompt": [1, 5, 9, 33], "max_tokens": 6, "temperature": 0}
    direct = httpx.post(replicas.urls[0] + "/v1/completions", json=body).json()["choices"][0]["text"]
    assert httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"] == direct
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    prompts = [[1, 5, 9, 33 + i] for i in range(6)]
    out = httpx.post(url + "/v1/rollouts", json={"prompts": prompts, "n": 2, "max_tokens": 4, "seed": 3}).json()
    assert out["prompt_ids"] == [p for p in prompts for _ in range(2)] and len(out["completion_ids"]) == 12
    alone = httpx.post(replicas.urls[1] + "/v1/rollouts", json={"prompts": prompts, "n": 2, "max_tokens": 4,
                                                               "seed": 3}).json()
    assert alone["completion_ids"] == out["completion_ids"]       # spread over replicas, same samples


def test_metrics_show_every_replica_and_the_router(front):
    url, _ = front
    httpx.post(url + "/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 2})
    text = httpx.get(url + "/metrics").text
    for replica in (0, 1):
        assert f'gorgon:replica_up{{replica="{replica}"}} 1' in text
        assert f'gorgon:replica_in_flight{{replica="{replica}"}}' in text
        assert f'replica="{replica}"' in text.split("gorgon:replica_in_flight")[0]     # its own samples
    assert "gorgon:routed_requests_total" in text


def test_weight_pushes_reach_every_replica(front):
    url, replicas = front
    from safetensors.torch import save
    answer = httpx.post(url + "/v1/weights/update", content=save({"model.norm.weight": torch.ones(64) * 1.01}),
                        headers=ADMIN)
    assert answer.status_code == 200
    versions = {httpx.get(u + "/v1/weights/version").json()["weight_version"] for u in replicas.urls}
    assert versions == {answer.json()["weight_version"]}


def test_a_killed_replica_fails_its_requests_retriably_and_comes_back(front):
    """A request in flight on a replica whose process dies ends with a retriable 503, never a hang; the
    other replica keeps serving; Ray restarts the dead one and the front readmits it."""
    url, replicas = front
    result = {}
    body = {"prompt": [1, 5, 9, 33], "max_tokens": 240, "min_tokens": 240}
    thread = threading.Thread(target=lambda: result.setdefault("answer", httpx.post(url + "/v1/completions",
                                                                                      json=body, timeout=120)))
    thread.start()
    deadline = time.time() + 30
    while not any(replicas.in_flight):
        assert time.time() < deadline
        time.sleep(0.01)
    victim = replicas.in_flight.index(max(replicas.in_flight))
    os.kill(ray.get(replicas.actors[victim].pid.remote()), signal.SIGKILL)
    thread.join(timeout=60)
    answer = result["answer"]
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert "retry" in answer.json()["error"]["message"]
    short = {"prompt": [1, 5, 9], "max_tokens": 2}
    assert httpx.post(url + "/v1/completions", json=short).status_code == 200       # the other one serves
    deadline = time.time() + 120
    while replicas.urls[victim] is None:
        assert time.time() < deadline, "the replica did not come back"
        time.sleep(0.5)
    assert httpx.post(replicas.urls[victim] + "/v1/completions", json=short).status_code == 200
