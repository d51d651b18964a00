"""RL routes: group rollouts, logprob fidelity against a teacher-forced HF forward, scoring, weight sync."""

import os
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM

from client import GorgonClient
from client.http import GorgonError
from live_server import start_server, stop_server
from tiny_models import hf_logits

PROMPTS = [[1, 5, 9, 33, 70], [1, 40, 41, 42, 43, 44, 45, 46, 47]]


@pytest.fixture
def live(llama_dir):
    live = start_server(llama_dir, admin_key="admin")
    live.rl = GorgonClient(live.url, admin_key="admin")
    yield live
    stop_server(live)


def test_rollouts_are_grouped_and_share_the_prompt_prefill(live):
    before = live.engine.counters.num_prompt_tokens_computed
    out = live.rl.rollouts(PROMPTS, n=4, max_tokens=8, temperature=1.0, seed=3)
    assert len(out["completion_ids"]) == 8 and out["prompt_ids"][:4] == [PROMPTS[0]] * 4
    assert out["prompt_ids"][4:] == [PROMPTS[1]] * 4
    assert all(len(lp) == len(ids) for lp, ids in zip(out["logprobs"], out["completion_ids"]))
    assert out["weight_version"] == 0 and len(out["texts"]) == 8
    # Each group's prompt was computed once, not four times.
    assert live.engine.counters.num_prompt_tokens_computed - before == sum(len(p) for p in PROMPTS)
    again = live.rl.rollouts(PROMPTS, n=4, max_tokens=8, temperature=1.0, seed=3)
    assert again["completion_ids"] == out["completion_ids"]
    assert len({tuple(c) for c in out["completion_ids"][:4]}) > 1       # distinct seeds inside a group


@pytest.mark.parametrize("mode", ["processed", "raw"])
def test_rollout_logprobs_equal_a_teacher_forced_forward(live, llama_dir, mode):
    temperature = 0.8
    out = live.rl.rollouts([PROMPTS[1]], n=2, max_tokens=12, temperature=temperature, seed=5, logprobs_mode=mode)
    for prompt, completion, logprobs in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]):
        logits = hf_logits(llama_dir, prompt + completion)
        reference = torch.log_softmax(logits / temperature if mode == "processed" else logits, dim=-1)
        for i, (token, logprob) in enumerate(zip(completion, logprobs)):
            assert logprob == pytest.approx(reference[len(prompt) - 1 + i, token].item(), abs=1e-4)


def test_processed_logprobs_with_top_k_are_the_renormalised_truncated_distribution(live, llama_dir):
    out = live.rl.rollouts([PROMPTS[0]], n=3, max_tokens=6, temperature=1.0, top_k=5, seed=9)
    for prompt, completion, logprobs in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]):
        logits = hf_logits(llama_dir, prompt + completion)
        for i, (token, logprob) in enumerate(zip(completion, logprobs)):
            row = logits[len(prompt) - 1 + i]
            top = row.topk(5)
            assert token in top.indices.tolist()
            expected = torch.log_softmax(top.values, -1)[top.indices.tolist().index(token)]
            assert logprob == pytest.approx(expected.item(), abs=1e-4)


def test_each_token_carries_the_support_it_was_sampled_from(live, llama_dir):
    """kept_mass: the log of the raw-distribution mass top-p / top-k kept for each token, so a trainer's
    raw logprob minus it is the renormalised (processed, T = 1) logprob; kept_token_ids: that support,
    which holds the token and is the top-p set of the teacher-forced distribution. On /v1/rollouts,
    completions, chat and SGLang's /generate."""
    common = dict(n=2, max_tokens=8, temperature=1.0, top_p=0.8, top_k=40, seed=4)
    raw = live.rl.rollouts([PROMPTS[1]], logprobs_mode="raw", kept_mass=True, kept_token_ids=True, **common)
    processed = live.rl.rollouts([PROMPTS[1]], logprobs_mode="processed", **common)
    assert raw["completion_ids"] == processed["completion_ids"]
    for prompt, completion, logprobs, kept, ids, renormalised in zip(
            raw["prompt_ids"], raw["completion_ids"], raw["logprobs"], raw["kept_logprobs"], raw["kept_token_ids"],
            processed["logprobs"]):
        logits = hf_logits(llama_dir, prompt + completion)
        for i, token in enumerate(completion):
            assert kept[i] < 0 and token in ids[i]
            assert logprobs[i] - kept[i] == pytest.approx(renormalised[i], abs=1e-5)
            probs = torch.softmax(logits[len(prompt) - 1 + i], -1)
            top = probs.topk(40)
            renormalised_top = top.values / top.values.sum()                 # top-p over top-k's survivors
            mass_before = renormalised_top.cumsum(0) - renormalised_top
            expected = sorted(top.indices[mass_before < 0.8].tolist())
            assert ids[i] == expected
            assert kept[i] == pytest.approx(torch.log(probs[expected].sum()).item(), abs=1e-4)
    whole = live.rl.rollouts([PROMPTS[1]], logprobs_mode="raw", kept_mass=True, max_tokens=4, seed=1)
    assert all(v == 0.0 for row in whole["kept_logprobs"] for v in row)         # nothing removed, nothing lost
    body = {"prompt": PROMPTS[1], "max_tokens": 4, "top_p": 0.8, "seed": 2, "logprobs": 0, "kept_mass": True}
    completion = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["logprobs"]
    assert len(completion["kept_logprobs"]) == 4 and all(v < 0 for v in completion["kept_logprobs"])
    chat = httpx.post(f"{live.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "top_p": 0.8, "logprobs": True,
        "kept_mass": True, "kept_token_ids": True}, timeout=30).json()["choices"][0]["logprobs"]["content"]
    assert all(entry["kept_logprob"] < 0 and entry["kept_token_ids"] for entry in chat)
    generated = httpx.post(f"{live.url}/generate", json={
        "input_ids": PROMPTS[1], "sampling_params": {"max_new_tokens": 3, "top_p": 0.8}, "return_logprob": True,
        "return_kept_mass": True}, timeout=30).json()["meta_info"]
    assert len(generated["output_token_kept_logprobs"]) == 3 and "output_token_kept_ids" not in generated
    refused = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "kept_mass": True}, timeout=30)
    assert refused.status_code == 400 and "ask for logprobs too" in refused.json()["error"]["message"]


def test_score_matches_a_teacher_forced_forward(live, llama_dir):
    sequences = [PROMPTS[0] + [7, 8, 9], PROMPTS[1] + [100, 101]]
    scores = live.rl.score(sequences, [len(PROMPTS[0]), len(PROMPTS[1])])
    for sequence, start, logprobs in zip(sequences, [len(PROMPTS[0]), len(PROMPTS[1])], scores):
        reference = torch.log_softmax(hf_logits(llama_dir, sequence), -1)
        assert len(logprobs) == len(sequence) - start
        for i, logprob in enumerate(logprobs):
            assert logprob == pytest.approx(reference[start - 1 + i, sequence[start + i]].item(), abs=1e-4)


def test_weights_pushed_through_shared_memory_are_served(live, llama_dir):
    """A trainer on the server's machine pushes through a file in /dev/shm (no HTTP body): copied there,
    or living there (share_weights: the optimizer trains the parameters in place, a push copies nothing).
    A bad tensor is refused by name and changes nothing; a path outside shared memory is a 400; the file
    is gone once the client closes."""
    from pathlib import Path

    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = Path(f"/dev/shm/gorgon-weights-{dead.stdout.strip()}-orphan.safetensors")  # a trainer that died
    orphan.write_bytes(b"x")
    others = set(Path("/dev/shm").glob("gorgon-weights-*")) - {orphan}   # other trainers' files, left alone
    client = GorgonClient(live.url, admin_key="admin")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    assert client.push_weights(model, transport="shared_memory", weight_version=3) == 3
    assert not orphan.exists() and others <= set(Path("/dev/shm").glob("gorgon-weights-*"))
    greedy = dict(max_tokens=10, temperature=0, min_tokens=10)
    expected = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                              pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
    assert client.rollouts([PROMPTS[0]], **greedy)["completion_ids"][0] == expected

    client.share_weights(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.tensor([PROMPTS[1]])).logits.sum().backward()
    optimizer.step()
    assert client.push_weights(model) == 4                              # auto: shared memory on loopback
    served = live.engine.weights.current(["model.layers.0.mlp.up_proj.weight"])["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(served, model.model.layers[0].mlp.up_proj.weight.detach())

    with pytest.raises(GorgonError, match="model.layers.0.mlp.up_proj.weight"):
        client.push_weights({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, transport="shared_memory")
    assert client.weight_version() == 4
    for path, message in (("/etc/hostname", "must be a file under /dev/shm"),
                          ("/dev/shm/../etc/hostname", "must be a file under /dev/shm"),
                          ("/dev/shm/gorgon-nothing-here", "could not read shared weights")):
        answer = httpx.post(f"{live.url}/v1/weights/update_shared", json={"path": path},
                            headers={"Authorization": "Bearer admin"}, timeout=30)
        assert answer.status_code == 400 and message in answer.json()["error"]["message"]
    # A server that cannot read the file (another machine's /dev/shm): "auto" sends the body over HTTP.
    elsewhere = GorgonClient(live.url, admin_key="admin")
    elsewhere._shared_file.write = lambda tensors: Path("/dev/shm/gorgon-weights-on-another-machine")
    with pytest.raises(GorgonError, match="could not read shared weights"):
        elsewhere.push_weights(model, transport="shared_memory")
    assert elsewhere.push_weights(model) == 5 and elsewhere._shared_refused
    elsewhere.close()
    own = set(Path("/dev/shm").glob(f"gorgon-weights-{os.getpid()}-*")) - others
    assert own
    client.close()
    assert not own & set(Path("/dev/shm").glob("gorgon-weights-*"))


def test_a_sequence_filling_the_whole_context_is_scored(llama_dir):
    """Scoring generates nothing, so a sequence exactly as long as the context is scored (max_tokens 0),
    on /v1/score and as OpenAI's legacy echo scoring; one token longer is a 400 that says so."""
    live = start_server(llama_dir, engine_options={"max_model_len": 32}, admin_key="admin")
    try:
        sequence = [(7 * i) % 90 + 3 for i in range(32)]
        [logprobs] = GorgonClient(live.url, admin_key="admin").score([sequence], [4])
        reference = torch.log_softmax(hf_logits(llama_dir, sequence), -1)
        assert len(logprobs) == 28
        for i, logprob in enumerate(logprobs):
            assert logprob == pytest.approx(reference[3 + i, sequence[4 + i]].item(), abs=1e-4)
        echoed = httpx.post(f"{live.url}/v1/completions", json={"prompt": sequence, "max_tokens": 0, "echo": True,
                                                               "logprobs": 0}, timeout=30)
        assert echoed.status_code == 200, echoed.text
        choice = echoed.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
            [reference[i, sequence[i + 1]].item() for i in range(31)], abs=1e-4)
        too_long = httpx.post(f"{live.url}/v1/score", json={"sequences": [sequence + [5]], "prompt_lens": [4]},
                              timeout=30)
        assert too_long.status_code == 400 and "context length is 32" in too_long.json()["error"]["message"]
        unscored = httpx.post(f"{live.url}/v1/completions", json={"prompt": [5, 6], "max_tokens": 0}, timeout=30)
        assert unscored.status_code == 400 and "max_tokens 0 only scores" in unscored.json()["error"]["message"]
    finally:
        stop_server(live)


def test_pushed_weights_change_generation_and_bad_payloads_change_nothing(live, llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    greedy = dict(max_tokens=10, temperature=0, min_tokens=10)
    before = live.rl.rollouts([PROMPTS[0]], **greedy)["completion_ids"][0]
    bad = {"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(GorgonError, match="model.layers.0.mlp.up_proj.weight"):
        live.rl.push_weights(bad)
    with pytest.raises(GorgonError, match="unknown parameter 'nope'"):
        live.rl.push_weights({"nope": torch.zeros(2)})
    assert live.rl.weight_version() == 0
    assert live.rl.rollouts([PROMPTS[0]], **greedy)["completion_ids"][0] == before

    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    assert live.rl.push_weights(model, weight_version=7) == 7
    after = live.rl.rollouts([PROMPTS[0]], **greedy)
    assert after["weight_version"] == 7
    expected = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                              pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
    assert after["completion_ids"][0] == expected
    # Loading the original checkpoint from disk restores the original behaviour.
    assert live.rl.load_weights(llama_dir) == 8
    assert live.rl.rollouts([PROMPTS[0]], **greedy)["completion_ids"][0] == before


def test_weight_routes_need_the_admin_key(live, llama_dir):
    payload = save_safetensors({"model.norm.weight": torch.ones(64)})
    assert httpx.post(f"{live.url}/v1/weights/update", content=payload).status_code == 401
    assert httpx.post(f"{live.url}/v1/weights/load", json={"path": llama_dir}).status_code == 401
    assert httpx.post(f"{live.url}/v1/weights/update", content=b"junk",
                      headers={"Authorization": "Bearer admin"}).status_code == 400


def test_a_dry_run_changes_nothing_and_a_kept_update_rolls_back_exactly(live, llama_dir):
    """The two phases a cluster front runs on every replica: check first, then apply while keeping what was
    overwritten, so that a failure elsewhere can undo it (or a commit can make it final)."""
    url, admin = live.url, {"Authorization": "Bearer admin"}
    greedy = dict(max_tokens=10, temperature=0, min_tokens=10)
    before = live.rl.rollouts([PROMPTS[0]], **greedy)["completion_ids"][0]
    norm = live.engine.weights.current(["model.norm.weight"])["model.norm.weight"]
    payload = save_safetensors({"model.norm.weight": torch.randn(64), "model.layers.0.mlp.up_proj.weight":
                                torch.randn_like(live.engine.weights.current(["model.layers.0.mlp.up_proj.weight"])
                                                 ["model.layers.0.mlp.up_proj.weight"])})
    dry = httpx.post(f"{url}/v1/weights/update?dry_run=true&weight_version=5", content=payload, headers=admin)
    assert dry.json() == {"weight_version": 5, "num_parameters": 2, "dry_run": True}
    assert live.rl.weight_version() == 0 and live.engine.weights.previous is None
    bad = save_safetensors({"model.norm.weight": torch.randn(3)})
    assert httpx.post(f"{url}/v1/weights/update?dry_run=true", content=bad, headers=admin).status_code == 400
    assert httpx.post(f"{url}/v1/weights/load", json={"path": llama_dir, "dry_run": True, "weight_version": 9},
                      headers=admin).json()["weight_version"] == 9

    kept = httpx.post(f"{url}/v1/weights/update?weight_version=5&keep_previous=true", content=payload, headers=admin)
    assert kept.json()["weight_version"] == 5
    assert live.rl.rollouts([PROMPTS[0]], **greedy)["completion_ids"][0] != before
    assert httpx.post(f"{url}/v1/weights/rollback", headers=admin).json() == {"weight_version": 0}
    assert torch.equal(live.engine.weights.current(["model.norm.weight"])["model.norm.weight"], norm)
    assert live.rl.rollouts([PROMPTS[0]], **greedy)["completion_ids"][0] == before
    again = httpx.post(f"{url}/v1/weights/rollback", headers=admin)     # only one update is kept, once
    assert again.status_code == 409 and "no update to roll back" in again.json()["error"]["message"]

    httpx.post(f"{url}/v1/weights/update?weight_version=6&keep_previous=true", content=payload, headers=admin)
    assert httpx.post(f"{url}/v1/weights/commit", headers=admin).json() == {"weight_version": 6}
    assert httpx.post(f"{url}/v1/weights/rollback", headers=admin).status_code == 409
    assert httpx.post(f"{url}/v1/weights/commit").status_code == 401


@pytest.mark.parametrize("policy", ["wait", "abort"])
def test_updates_never_mix_versions_inside_a_rollout(live, policy):
    results = {}

    def long_rollout():
        results["out"] = live.rl.rollouts([PROMPTS[0]], n=2, max_tokens=150, ignore_eos=True, seed=1)

    thread = threading.Thread(target=long_rollout)
    thread.start()
    while not live.engine.weights.has_started_requests():
        time.sleep(0.01)
    version = live.rl.push_weights({"model.norm.weight": torch.ones(64) * 1.01}, policy=policy)
    thread.join()
    out = results["out"]
    assert version == 1 and out["weight_version"] == 0
    if policy == "wait":
        assert out["finish_reasons"] == ["length", "length"]
    else:
        assert out["finish_reasons"] == ["abort", "abort"]
    assert live.rl.rollouts([PROMPTS[0]], max_tokens=2)["weight_version"] == 1


def test_streamed_safetensors_encoding_round_trips_through_the_official_reader():
    from safetensors.torch import load

    from client.http import _chunks, safetensors_header
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16), "d": torch.randn(0)}
    header, ordered = safetensors_header(tensors)
    decoded = load(b"".join(_chunks(header, ordered)))
    assert decoded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor)


def test_the_server_reads_official_safetensors_payloads_and_rejects_malformed_ones():
    from safetensors.torch import save

    from decoding.weights import WeightUpdateError, read_payload
    tensors = {"w": torch.randn(4, 3), "b": torch.randn(0), "h": torch.randn(5).to(torch.float16)}
    decoded = read_payload(bytearray(save(tensors)))
    assert all(torch.equal(decoded[k], v) for k, v in tensors.items())
    for junk in (b"", b"\x08" + b"\x00" * 7 + b"not json", bytearray(save(tensors))[:-4]):
        with pytest.raises(WeightUpdateError):
            read_payload(bytearray(junk))
