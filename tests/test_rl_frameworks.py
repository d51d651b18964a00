"""The routes trainers outside TRL's Gorgon client use, driven with their exact payloads: SGLang's native API
as slime and AReaL send it, and TRL's vLLM client (`trl.generation.vllm_client.VLLMClient`) as is."""

import json
import threading
import time

import httpx
import pytest
import torch

from live_server import start_server, stop_server
from tiny_models import hf_logits

PROMPT = [1, 5, 9, 33, 70, 71, 72]

# slime/rollout/sglang_rollout.py: the sampling_params and payload it posts to /generate.
SLIME_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 12, "stop": None,
                  "stop_token_ids": None, "skip_special_tokens": False, "no_stop_trim": True,
                  "spaces_between_special_tokens": False}
# areal/engine/sglang_remote.py: always these keys; AReaL's default top_k is 100,000,000.
AREAL_SAMPLING = {"top_p": 1.0, "top_k": 100000000, "max_new_tokens": 12, "temperature": 1.0,
                  "stop_token_ids": [], "ignore_eos": False, "skip_special_tokens": True, "frequency_penalty": 0.0}


@pytest.fixture
def live(llama_dir):
    # slime and AReaL send no key. One decode step per call: the tiny model's chained steps finish a
    # 240-token rollout before an abort or a pause sent after its third token reaches the engine.
    live = start_server(llama_dir, {"decode_steps": 1}, open_admin=True)
    yield live
    stop_server(live)


def _generate(live, body: dict):
    response = httpx.post(f"{live.url}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")     # AReaL checks it
    return response.json()


def _check_logprobs_against_teacher_forcing(llama_dir, prompt: list[int], item: dict) -> None:
    triples = item["meta_info"]["output_token_logprobs"]
    assert [t[1] for t in triples] == item["output_ids"] and all(t[2] is None for t in triples)
    reference = torch.log_softmax(hf_logits(llama_dir, prompt + item["output_ids"]), dim=-1)
    for i, (logprob, token, _) in enumerate(triples):
        assert logprob == pytest.approx(reference[len(prompt) - 1 + i, token].item(), abs=1e-4)


# ---- SGLang's /generate ---------------------------------------------------------------------------

def test_slimes_generate_payload_and_what_it_reads(live, llama_dir):
    item = _generate(live, {"sampling_params": SLIME_SAMPLING, "return_logprob": True, "input_ids": PROMPT})
    meta = item["meta_info"]
    assert isinstance(item["text"], str) and len(item["output_ids"]) == meta["completion_tokens"]
    assert meta["finish_reason"]["type"] in ("length", "stop") and meta["weight_version"] == "0"
    assert meta["prompt_tokens"] == len(PROMPT) and meta["cached_tokens"] == 0
    _check_logprobs_against_teacher_forcing(llama_dir, PROMPT, item)


def test_areals_generate_payload_and_its_partial_rollout_resume(live, llama_dir):
    body = {"input_ids": PROMPT, "image_data": None, "sampling_params": {**AREAL_SAMPLING, "temperature": 0.0},
            "return_logprob": True, "stream": False}
    whole = _generate(live, body)
    assert whole["meta_info"]["finish_reason"]["type"] == "length"
    _check_logprobs_against_teacher_forcing(llama_dir, PROMPT, whole)
    # AReaL resumes an interrupted call by appending what it got and asking for the rest.
    head = whole["output_ids"][:5]
    rest = _generate(live, {**body, "input_ids": PROMPT + head,
                            "sampling_params": {**body["sampling_params"], "max_new_tokens": 7}})
    assert head + rest["output_ids"] == whole["output_ids"]


def test_a_seeded_sampled_rollout_resumes_identically_when_resent(live):
    sampling = {**SLIME_SAMPLING, "sampling_seed": 1234, "max_new_tokens": 20}
    whole = _generate(live, {"input_ids": PROMPT, "sampling_params": sampling, "return_logprob": True})
    head = whole["output_ids"][:8]
    rest = _generate(live, {"input_ids": PROMPT + head, "return_logprob": True,
                            "sampling_params": {**sampling, "max_new_tokens": 12}})
    assert head + rest["output_ids"] == whole["output_ids"]


def test_slimes_prompt_scoring_with_no_new_tokens(live, llama_dir):
    """slime's on-policy distillation: max_new_tokens 0, logprob_start_len 0, reads input_token_logprobs[1:]."""
    sequence = PROMPT + [40, 41, 42]
    item = _generate(live, {"input_ids": sequence, "return_logprob": True, "logprob_start_len": 0,
                            "sampling_params": {**SLIME_SAMPLING, "max_new_tokens": 0}})
    assert item["output_ids"] == [] and item["meta_info"]["completion_tokens"] == 0
    triples = item["meta_info"]["input_token_logprobs"]
    assert triples[0][0] is None and [t[1] for t in triples] == sequence
    reference = torch.log_softmax(hf_logits(llama_dir, sequence), dim=-1)
    for position, (logprob, token, _) in enumerate(triples[1:], start=1):
        assert logprob == pytest.approx(reference[position - 1, token].item(), abs=1e-4)


def test_batches_and_n_follow_sglangs_order(live):
    prompts = [PROMPT, PROMPT[:4]]
    sampling = {**SLIME_SAMPLING, "n": 2, "sampling_seed": 5, "max_new_tokens": 4}
    items = _generate(live, {"input_ids": prompts, "sampling_params": sampling, "return_logprob": True})
    # The batch repeated n times: [p0 s0, p1 s0, p0 s1, p1 s1].
    assert [i["meta_info"]["prompt_tokens"] for i in items] == [7, 4, 7, 4]
    one = _generate(live, {"text": "hello there", "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert isinstance(one, dict) and one["meta_info"]["completion_tokens"] == 3


def test_streamed_generate_is_cumulative_and_ends_with_done(live):
    body = {"input_ids": PROMPT, "sampling_params": {**SLIME_SAMPLING, "max_new_tokens": 6}, "return_logprob": True,
            "stream": True}
    events = []
    with httpx.stream("POST", f"{live.url}/generate", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    items = [json.loads(e) for e in events[:-1]]
    lengths = [len(i["meta_info"]["output_token_logprobs"]) for i in items]
    assert lengths == sorted(lengths) and lengths[-1] == 6
    assert items[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(i["meta_info"]["finish_reason"] is None for i in items[:-1])


def test_fields_sglang_has_and_gorgon_cannot_honour_are_refused(live):
    for extra in ({"lora_path": "adapter"}, {"return_routed_experts": True}, {"image_data": ["x.png"]},
                  {"sampling_params": {"ebnf": "root ::= 'a'"}}, {"unknown_field": 1}):
        response = httpx.post(f"{live.url}/generate", json={"input_ids": PROMPT, **extra})
        assert response.status_code == 400, extra
    assert httpx.post(f"{live.url}/generate", json={"sampling_params": {}}).status_code == 400


# ---- SGLang's control routes, in slime's and AReaL's sequences -----------------------------------

def _long_generate(live, rid: str) -> tuple[threading.Thread, dict]:
    result = {}
    body = {"rid": rid, "input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {**SLIME_SAMPLING, "max_new_tokens": 240, "ignore_eos": True}}
    thread = threading.Thread(target=lambda: result.setdefault("out", _generate(live, body)))
    thread.start()
    deadline = time.time() + 30
    while not any(seq.num_output_tokens >= 3 for r in live.engine.scheduler.running for seq in r.seqs):
        assert time.time() < deadline
        time.sleep(0.01)
    return thread, result


def test_slimes_abort_all_then_load_poll(live):
    thread, result = _long_generate(live, "slime-1")
    assert httpx.post(f"{live.url}/abort_request", json={"abort_all": True}).status_code == 200
    thread.join()
    meta = result["out"]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert 0 < len(meta["output_token_logprobs"]) == meta["completion_tokens"] < 240   # partial, resumable
    loads = httpx.get(f"{live.url}/v1/loads", params={"include": "core"}).json()["loads"]
    assert loads[0]["num_running_reqs"] + loads[0]["num_waiting_reqs"] == 0
    assert httpx.get(f"{live.url}/get_load").json()[0]["num_reqs"] == 0


def test_abort_request_by_rid(live):
    thread, result = _long_generate(live, "rollout-42")
    httpx.post(f"{live.url}/abort_request", json={"rid": "rollout-42"})
    thread.join()
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert result["out"]["meta_info"]["id"] == "rollout-42"


def test_slimes_weight_update_sequence(live, llama_dir, tmp_path):
    """pause_generation -> GET flush_cache -> update_weights_from_disk -> get_weight_version ->
    continue_generation (slime/backends/sglang_utils/sglang_engine.py), with a rollout in flight."""
    thread, result = _long_generate(live, "in-flight")
    ok = {"message": "Generation paused successfully.", "status": "ok"}
    assert httpx.post(f"{live.url}/pause_generation", json={}).json() == ok
    thread.join()
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert httpx.get(f"{live.url}/flush_cache").status_code == 200
    update = httpx.post(f"{live.url}/update_weights_from_disk",
                        json={"model_path": llama_dir, "weight_version": "3", "load_format": None}, timeout=60)
    assert update.status_code == 200 and update.json()["success"] is True
    assert httpx.get(f"{live.url}/get_weight_version").json() == {"weight_version": "3"}
    assert httpx.post(f"{live.url}/continue_generation", json={}).json()["status"] == "ok"
    after = _generate(live, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}})
    assert after["meta_info"]["weight_version"] == "3"


def test_areals_update_with_abort_all_and_bad_updates(live, llama_dir, tmp_path):
    update = httpx.post(f"{live.url}/update_weights_from_disk",
                        json={"model_path": llama_dir, "abort_all_requests": True}, timeout=60)
    assert update.status_code == 200 and httpx.get(f"{live.url}/get_weight_version").json()["weight_version"] == "1"
    missing = httpx.post(f"{live.url}/update_weights_from_disk", json={"model_path": str(tmp_path / "none")})
    assert missing.status_code == 400 and missing.json()["success"] is False
    named = httpx.post(f"{live.url}/update_weights_from_disk", json={"model_path": llama_dir, "weight_version": "v2"})
    assert named.status_code == 400 and "integer" in named.json()["message"]


def test_retract_pause_recomputes_kept_requests_on_continue(live):
    thread, result = _long_generate(live, "kept")
    httpx.post(f"{live.url}/pause_generation", json={"mode": "retract"})
    before = live.engine.counters.num_preemptions
    httpx.post(f"{live.url}/continue_generation", json={})
    thread.join()
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "length"
    assert live.engine.counters.num_preemptions == before + 1
    assert httpx.get(f"{live.url}/health_generate").status_code == 200


# ---- TRL's vLLM client, unmodified -------------------------------------------------------------

def test_trls_vllm_client_generates_chats_and_scores(live, llama_dir, monkeypatch):
    from trl.generation import vllm_client
    # The client refuses to start without vLLM installed, which it needs only for its NCCL weight
    # transfer (Gorgon takes weights over HTTP); every request below is the client's own.
    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *args, **kwargs: True)
    client = vllm_client.VLLMClient(base_url=live.url)
    assert client.model == "tiny"
    out = client.generate([PROMPT, PROMPT[:3]], n=2, max_tokens=6, temperature=1.0, logprobs=2)
    assert out["prompt_ids"] == [PROMPT, PROMPT[:3]] and len(out["completion_ids"]) == 4
    for prompt, ids, logprobs, token_ids in zip([PROMPT] * 2 + [PROMPT[:3]] * 2, out["completion_ids"],
                                                out["logprobs"], out["logprob_token_ids"]):
        reference = torch.log_softmax(hf_logits(llama_dir, prompt + ids), dim=-1)
        for i, token in enumerate(ids):          # the sampled token, then the top 2, most likely first
            position = dict(zip(token_ids[i], logprobs[i]))
            assert position[token] == pytest.approx(reference[len(prompt) - 1 + i, token].item(), abs=1e-4)
            assert len(position) >= 2 and logprobs[i] == sorted(logprobs[i], reverse=True)
    chat = client.chat([[{"role": "user", "content": "hi"}]], n=2, max_tokens=5, logprobs=1)
    assert len(chat["completion_ids"]) == 2 and len(chat["prompt_ids"][0]) > 2
    assert all(len(lp) == len(ids) for lp, ids in zip(chat["logprobs"], chat["completion_ids"]))
    sequence = PROMPT + [40, 41, 42]
    scored = client.get_sequence_logprobs([sequence], [len(PROMPT)], top_logprobs=3)
    reference = torch.log_softmax(hf_logits(llama_dir, sequence), dim=-1)
    for i, (actual, tops) in enumerate(zip(scored["actual_logprobs"][0], scored["logprobs"][0])):
        row = reference[len(PROMPT) - 1 + i]
        assert actual[0] == pytest.approx(row[sequence[len(PROMPT) + i]].item(), abs=1e-4)
        assert tops == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    client.reset_prefix_cache()


def test_trls_async_grpo_pause_keep_and_resume(live):
    from trl.experimental.async_grpo.vllm_client import VLLMClient
    client = VLLMClient(live.url)
    client.pause()
    assert httpx.get(f"{live.url}/is_paused").json() == {"is_paused": True}
    client.resume()
    assert httpx.get(f"{live.url}/is_paused").json() == {"is_paused": False}
