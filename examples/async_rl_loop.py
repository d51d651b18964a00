"""An asynchronous RL loop over plain HTTP: rollouts keep running while the trainer pushes new weights.

Each round, long rollouts are in flight when the "trainer" (here: a random nudge to the final norm)
pauses the server in keep mode, pushes weights, and resumes. The frozen rollouts go on under the new
weights, and every token says which version sampled it, which is what an off-policy correction (or a
filter on staleness) needs. Run against a server started with an admin key:

    gorgon serve --admin-key secret &
    python -m examples.async_rl_loop --url http://127.0.0.1:8000 --admin-key secret [--model PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

ROUNDS = 3
PROMPTS = ["Write a function that sorts a list.", "Explain what a hash map is."]


def rollouts(http: httpx.Client, results: list) -> None:
    body = {"prompts": PROMPTS, "n": 2, "max_tokens": 96, "min_tokens": 96, "temperature": 1.0}
    results.append(http.post("/v1/rollouts", json=body).json())


def push(http: httpx.Client, admin: dict, hidden_size: int) -> int:
    """Stand-in for a trainer step: new values for one tensor, as a safetensors body."""
    norm = {"model.norm.weight": 1.0 + 0.01 * torch.randn(hidden_size)}
    buffer = io.BytesIO(save(norm))
    answer = http.post("/v1/weights/update", content=buffer.getvalue(), headers=admin)
    answer.raise_for_status()
    return answer.json()["weight_version"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--admin-key", required=True)
    parser.add_argument("--model", default=None, help="the served model's folder (default: the embedded model)")
    args = parser.parse_args()
    admin = {"Authorization": f"Bearer {args.admin_key}"}
    http = httpx.Client(base_url=args.url, timeout=600)
    hidden_size = _hidden_size(args.model)
    for round_index in range(ROUNDS):
        results: list = []
        worker = threading.Thread(target=rollouts, args=(http, results))
        worker.start()
        while http.get("/v1/load").json()["num_running_reqs"] == 0:   # rollouts under way
            time.sleep(0.05)
        time.sleep(0.3)
        http.post("/pause", params={"mode": "keep"}, headers=admin).raise_for_status()
        version = push(http, admin, hidden_size)
        http.post("/resume", headers=admin).raise_for_status()
        worker.join()
        print(f"round {round_index}: pushed version {version} while rollouts ran")
        for index, versions in enumerate(results[0]["token_weight_versions"]):
            changes = [(i, v) for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
            print(f"  completion {index}: {len(versions)} tokens; version from token index: {changes}")


def _hidden_size(model: str | None) -> int:
    from models.loader import DEFAULT_MODEL_DIR
    return json.loads((Path(model or DEFAULT_MODEL_DIR) / "config.json").read_text())["hidden_size"]


if __name__ == "__main__":
    main()
