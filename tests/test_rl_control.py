"""Generation control for RL trainers: caller request ids and aborts, pause modes (abort, wait, keep), weight
updates while paused with per-token versions, resuming a request by resending it, and the load route."""

import threading
import time

import httpx
import pytest
import torch

from client import GorgonClient
from decoding import Engine, SamplingParams
from live_server import start_server, stop_server

PROMPT = [1, 5, 9, 33, 70, 71, 72]
LONG = dict(max_tokens=200, min_tokens=200, temperature=1.0, seed=4)


@pytest.fixture
def live(llama_dir):
    live = start_server(llama_dir, admin_key="admin")
    # The tiny model writes 200 tokens in tens of milliseconds: each step slowed by a few (a model of
    # realistic size), a request is still in flight when a test's next call reaches the server.
    step = live.engine.step
    live.engine.step = lambda: time.sleep(0.003) or step()
    live.admin = {"Authorization": "Bearer admin"}
    live.rl = GorgonClient(live.url, admin_key="admin")
    yield live
    stop_server(live)


def _in_background(function) -> tuple[threading.Thread, dict]:
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", function()))
    thread.start()
    return thread, result


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def _tokens_generated(engine: Engine) -> int:
    return max((seq.num_output_tokens for r in engine.scheduler.running for seq in r.seqs), default=0)


def _completion(live, prompt=PROMPT, **body) -> dict:
    body = {"prompt": prompt, "return_token_ids": True, "logprobs": 0, **LONG, **body}
    return httpx.post(f"{live.url}/v1/completions", json=body, timeout=120).json()


# ---- resuming by resending: draws keyed by position ---------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_request_resent_with_its_partial_completion_continues_identically(llama_engine, temperature):
    params = dict(temperature=temperature, seed=11, ignore_eos=True)
    [whole] = llama_engine.generate([PROMPT], SamplingParams(max_tokens=30, **params))
    tokens = whole.outputs[0].token_ids
    for cut in (1, 9, 29):
        [rest] = llama_engine.generate([PROMPT + tokens[:cut]], SamplingParams(max_tokens=30 - cut, **params))
        assert rest.outputs[0].token_ids == tokens[cut:]


def test_seeded_draws_still_differ_between_positions_and_samples(llama_engine):
    [out] = llama_engine.generate([PROMPT], SamplingParams(n=4, max_tokens=20, temperature=1.0, seed=2, ignore_eos=True))
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    assert len(set(out.outputs[0].token_ids)) > 5


# ---- request ids and aborts ---------------------------------------------------------------------

def test_abort_by_a_callers_id_returns_each_requests_partial_output(live):
    thread, result = _in_background(lambda: _completion(live, [PROMPT, PROMPT[:4]], request_id="job-7"))
    _wait_until(lambda: _tokens_generated(live.engine) >= 5)
    answer = httpx.post(f"{live.url}/abort_requests", json={"request_ids": ["job-7", "nobody"]}, headers=live.admin)
    thread.join()
    assert answer.status_code == 200 and sorted(answer.json()["request_ids"]) == ["job-7-0", "job-7-1"]
    choices = result["out"]["choices"]
    assert [c["finish_reason"] for c in choices] == ["abort", "abort"]
    assert all(0 < len(c["token_ids"]) < 200 and len(c["logprobs"]["token_logprobs"]) == len(c["token_ids"])
               for c in choices)


def test_a_request_id_in_flight_cannot_be_reused_and_abort_all_ends_everything(live):
    thread, result = _in_background(lambda: _completion(live, request_id="only-once"))
    _wait_until(lambda: _tokens_generated(live.engine) >= 2)
    again = httpx.post(f"{live.url}/v1/completions", json={"prompt": PROMPT, "request_id": "only-once"})
    assert again.status_code == 400 and "already in flight" in again.json()["error"]["message"]
    assert httpx.post(f"{live.url}/abort_requests", json={}, headers=live.admin).json()["aborted"] == 1
    thread.join()
    assert result["out"]["choices"][0]["finish_reason"] == "abort"
    assert _completion(live, request_id="only-once", max_tokens=2, min_tokens=0)["choices"][0]["finish_reason"]


def test_control_routes_need_the_admin_key(live):
    for path in ("/pause", "/resume", "/abort_requests", "/pause_generation", "/continue_generation",
                 "/abort_request", "/update_weights_from_disk", "/reset_prefix_cache"):
        assert httpx.post(f"{live.url}{path}", json={}).status_code == 401, path
    assert httpx.get(f"{live.url}/flush_cache").status_code == 401
    assert httpx.get(f"{live.url}/is_paused").json() == {"is_paused": False}


def test_the_load_route_counts_running_and_waiting_requests(live):
    httpx.post(f"{live.url}/pause", params={"mode": "keep"}, headers=live.admin)
    threads = [_in_background(lambda: _completion(live, max_tokens=4, min_tokens=0))[0] for _ in range(3)]
    _wait_until(lambda: len(live.engine.scheduler.waiting) == 3)
    load = httpx.get(f"{live.url}/v1/load").json()
    assert (load["num_running_reqs"], load["num_waiting_reqs"], load["is_paused"]) == (0, 3, True)
    httpx.post(f"{live.url}/resume", headers=live.admin)
    for thread in threads:
        thread.join()
    assert httpx.get(f"{live.url}/v1/load").json()["num_waiting_reqs"] == 0


# ---- pause modes ------------------------------------------------------------------------------

def test_pause_abort_ends_requests_in_flight_and_holds_new_ones_until_resume(live):
    thread, result = _in_background(lambda: _completion(live))
    _wait_until(lambda: _tokens_generated(live.engine) >= 3)
    assert httpx.post(f"{live.url}/pause", params={"mode": "abort"}, headers=live.admin).json() == {"status": "paused"}
    thread.join()
    assert result["out"]["choices"][0]["finish_reason"] == "abort"
    held, held_result = _in_background(lambda: _completion(live, max_tokens=3, min_tokens=3))
    time.sleep(0.5)
    assert held.is_alive() and httpx.get(f"{live.url}/is_paused").json() == {"is_paused": True}
    httpx.post(f"{live.url}/resume", headers=live.admin)
    held.join()
    assert held_result["out"]["choices"][0]["finish_reason"] == "length"


def test_pause_wait_returns_once_started_requests_finish(live):
    thread, result = _in_background(lambda: _completion(live, max_tokens=120, min_tokens=120))
    _wait_until(lambda: _tokens_generated(live.engine) >= 2)
    httpx.post(f"{live.url}/pause", params={"mode": "wait"}, headers=live.admin, timeout=120)
    assert not live.engine.has_unfinished_requests()
    thread.join()
    assert len(result["out"]["choices"][0]["token_ids"]) == 120
    httpx.post(f"{live.url}/resume", headers=live.admin)


def _keep_and_push(live, recompute_kv: bool) -> tuple[dict, int, dict]:
    """A long greedy request, paused in keep mode mid-way, new weights pushed, then resumed."""
    thread, result = _in_background(lambda: _completion(live, temperature=0.0))
    _wait_until(lambda: _tokens_generated(live.engine) >= 6)
    httpx.post(f"{live.url}/pause", params={"mode": "keep"}, headers=live.admin)
    kept_at = _tokens_generated(live.engine)
    assert 6 <= kept_at < 200
    time.sleep(0.3)
    assert _tokens_generated(live.engine) == kept_at                     # frozen
    new_weights = {"model.norm.weight": torch.linspace(0.5, 1.5, 64)}
    assert live.rl.push_weights(new_weights) == 1                        # applies at once while paused
    httpx.post(f"{live.url}/resume", params={"recompute_kv": recompute_kv}, headers=live.admin)
    thread.join()
    return result["out"]["choices"][0], kept_at, new_weights


def test_keep_mode_continues_requests_under_new_weights_with_per_token_versions(live, llama_dir):
    choice, kept_at, new_weights = _keep_and_push(live, recompute_kv=True)
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 200
    assert choice["weight_version"] == 0 and choice["weight_version_ranges"] == [[0, 0], [kept_at, 1]]
    # Recomputed under the new weights, the rest is what a fresh engine with them continues greedily.
    fresh = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
    fresh.weights.update(new_weights)
    [expected] = fresh.generate([PROMPT + choice["token_ids"][:kept_at]],
                                SamplingParams(temperature=0, max_tokens=200 - kept_at, ignore_eos=True))
    assert choice["token_ids"][kept_at:] == expected.outputs[0].token_ids


def test_keep_mode_without_recompute_never_shares_its_stale_cache(live, llama_dir):
    choice, kept_at, new_weights = _keep_and_push(live, recompute_kv=False)
    assert choice["weight_version_ranges"] == [[0, 0], [kept_at, 1]]
    # The kept request's blocks hold keys and values of the old weights: a new request with the same
    # tokens must not reuse them.
    tokens = PROMPT + choice["token_ids"]
    again = _completion(live, tokens[:-1], temperature=0.0, max_tokens=1, min_tokens=1)
    fresh = Engine(model=llama_dir, show_progress=False, num_kv_blocks=256, block_size=4)
    fresh.weights.update(new_weights)
    [expected] = fresh.generate([tokens[:-1]], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    assert again["choices"][0]["token_ids"] == expected.outputs[0].token_ids


def test_a_weight_update_with_policy_keep_applies_without_waiting(live):
    thread, result = _in_background(lambda: _completion(live))
    _wait_until(lambda: _tokens_generated(live.engine) >= 4)
    started = time.monotonic()
    assert live.rl.push_weights({"model.norm.weight": torch.ones(64) * 1.01}, policy="keep") == 1
    assert live.engine.has_unfinished_requests()                         # it did not wait for the request
    thread.join()
    versions = result["out"]["choices"][0]["weight_version_ranges"]
    assert versions[0] == [0, 0] and versions[1][1] == 1 and 4 <= versions[1][0] < 200
    assert time.monotonic() - started < 60


# ---- scoring: top-k and a frozen reference model ------------------------------------------------

def test_score_gives_top_k_and_scores_under_the_frozen_reference(llama_dir):
    from tiny_models import hf_logits
    live = start_server(llama_dir, reference_dir=llama_dir, admin_key="admin")
    try:
        client = GorgonClient(live.url, admin_key="admin")
        sequence, start = PROMPT + [40, 41, 42], len(PROMPT)
        top = client.score_top([sequence], [start], 4)
        reference = torch.log_softmax(hf_logits(llama_dir, sequence), dim=-1)
        for i, (ids, values) in enumerate(zip(top["top_logprob_token_ids"][0], top["top_logprobs"][0])):
            expected = reference[start - 1 + i].topk(4)
            assert ids == expected.indices.tolist() and values == pytest.approx(expected.values.tolist(), abs=1e-4)
        client.push_weights({"model.norm.weight": torch.linspace(0.5, 1.5, 64)})
        policy = client.score([sequence], [start])[0]
        frozen = client.score([sequence], [start], reference=True)[0]
        assert frozen == pytest.approx(top["logprobs"][0], abs=1e-6)            # the reference never moved
        assert max(abs(a - b) for a, b in zip(policy, frozen)) > 1e-3
    finally:
        stop_server(live)


def test_scoring_under_a_reference_needs_one(live):
    answer = httpx.post(f"{live.url}/v1/score", json={"sequences": [PROMPT], "prompt_lens": [3], "reference": True})
    assert answer.status_code == 400 and "--reference-model" in answer.json()["error"]["message"]


# ---- the draft model's weights ------------------------------------------------------------------

def test_draft_weights_pushed_under_their_prefix_change_no_output(llama_dir):
    live = start_server(llama_dir, engine_options={"speculative": "draft", "draft_model": llama_dir},
                        admin_key="admin")
    try:
        client = GorgonClient(live.url, admin_key="admin")
        greedy = dict(max_tokens=24, min_tokens=24, temperature=0)
        before = client.rollouts([PROMPT], **greedy)["completion_ids"]
        draft = live.engine.weights.draft.model
        new_norm = torch.linspace(0.2, 3.0, 64)
        assert client.push_weights({"draft.model.norm.weight": new_norm}) == 0      # the served version stays
        assert torch.equal(draft.param_slots()["model.norm.weight"][0].target, new_norm)
        assert client.rollouts([PROMPT], **greedy)["completion_ids"] == before      # lossless either way
        with pytest.raises(Exception, match="keeps the served version"):
            client.push_weights({"draft.model.norm.weight": new_norm}, weight_version=3)
        with pytest.raises(Exception, match="draft model: unknown parameter 'nope'"):
            client.push_weights({"draft.nope": new_norm})
    finally:
        stop_server(live)


def test_draft_names_need_a_draft_model(live):
    with pytest.raises(Exception, match="need a draft model"):
        live.rl.push_weights({"draft.model.norm.weight": torch.ones(64)})


def test_the_trl_callback_pushes_before_the_first_step():
    """Step 0's rollouts must come from the policy the trainer holds, not from what the server loaded."""
    from types import SimpleNamespace

    from client.trl import PushWeightsCallback

    pushes = []
    client = SimpleNamespace(push_weights=lambda model, **options: pushes.append(options))
    callback = PushWeightsCallback(client, policy="keep")
    model = torch.nn.Linear(2, 2)
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None, model=model)
    assert pushes == [{"weight_version": 0, "policy": "keep", "allow_version_rollback": True}]
    callback.on_step_end(None, SimpleNamespace(global_step=1), None, model=model)
    assert pushes[-1] == {"weight_version": 1, "policy": "keep"}
