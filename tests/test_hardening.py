"""The server against careless and hostile clients: bounded work, no 5xx from any input, admission
decided before any work, weights checked before they are used, a clean shutdown, and text that is the
decoding of its tokens. Each case here is one a client actually hit."""

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import save_file

from decoding import Engine, SamplingParams
from live_server import free_port, start_server, stop_server, wait_for_health

# Any JSON object, for the default model's 8,192-token vocabulary: seconds of CPU to compile with the
# outlines-core backend (which builds the whole token index ahead).
SLOW_SCHEMA = {"type": "object"}
SLOW_BACKEND = "outlines-core"
ADMIN = {"Authorization": "Bearer admin"}


@pytest.fixture(scope="module")
def live(llama_dir):
    live = start_server(llama_dir, {"grammar_cpu_budget_s": 1}, admin_key="admin", keepalive_s=0.2)
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def default_live():
    """The embedded model: its tokenizer is large enough for a grammar that takes seconds to compile."""
    live = start_server(None, {"grammar_cpu_budget_s": 1, "num_kv_blocks": 256, "block_size": 16})
    yield live
    stop_server(live)


def health_latencies(url: str, stop: threading.Event, into: list[float]) -> None:
    with httpx.Client() as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get(f"{url}/health", timeout=10)
            into.append(time.perf_counter() - started)
            time.sleep(0.01)


# ---- bounded work ------------------------------------------------------------------------------
def test_a_compile_past_its_cpu_budget_is_stopped_and_holds_up_no_other(default_live):
    url = default_live.url
    slow_result = {}
    others = len(compile_worker_pids())     # other engines' workers, in this test process


    def slow():
        body = {"prompt": "x", "max_tokens": 4, "structured_backend": SLOW_BACKEND, "response_format": {
            "type": "json_schema", "json_schema": {"name": "any", "schema": SLOW_SCHEMA}}}
        started = time.perf_counter()
        slow_result["response"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        slow_result["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)                      # the slow compile is under way
    started = time.perf_counter()
    quick = httpx.post(f"{url}/v1/completions", timeout=60, json={          # another worker of the same pool
        "prompt": "x", "max_tokens": 4, "structured_backend": SLOW_BACKEND, "structured_outputs": {"choice": ["yes", "no"]}})
    quick_seconds = time.perf_counter() - started
    thread.join()
    assert quick.status_code == 200 and quick.json()["choices"][0]["text"] in ("yes", "no")
    response = slow_result["response"]
    assert response.status_code == 400 and "CPU time" in response.json()["error"]["message"]
    assert quick_seconds < slow_result["seconds"]          # it did not wait for the slow one
    # The stopped worker is gone: no compile keeps burning CPU after its 400.
    assert len(compile_worker_pids()) - others <= default_live.engine.config.grammar_workers


def compile_worker_pids() -> list[str]:
    found = subprocess.run(["pgrep", "-f", "decoding.structured.compile_workers"], capture_output=True, text=True)
    return found.stdout.split()


def test_a_compile_past_its_memory_budget_is_refused():
    # A CPU budget well past the time the compile takes to fill 0.25 GB, so memory is what stops it
    # (at the default 5 s either limit may come first on a busy machine).
    engine = Engine(show_progress=False, grammar_memory_gb=0.25, grammar_cpu_budget_s=60, num_kv_blocks=16,
                    block_size=16)
    with pytest.raises(ValueError, match="memory"):
        engine.make_request("x", SamplingParams(max_tokens=4, json_schema=SLOW_SCHEMA, structured_backend=SLOW_BACKEND))


def test_a_large_body_is_refused_before_it_is_parsed_and_health_stays_fast(live):
    stop, latencies = threading.Event(), []
    poller = threading.Thread(target=health_latencies, args=(live.url, stop, latencies))
    poller.start()
    try:
        ten_mb = json.dumps({"prompt": "word " * (2 * 2**20)})
        response = httpx.post(f"{live.url}/v1/completions", content=ten_mb, timeout=60,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "max-body-mb" in response.json()["error"]["message"]

        def chunks():                        # no Content-Length: the limit applies as it streams in
            for _ in range(10):
                yield b" " * 2**20

        response = httpx.post(f"{live.url}/v1/completions", content=chunks(), timeout=60)
        assert response.status_code == 413
    finally:
        stop.set()
        poller.join()
    assert latencies and max(latencies) < 0.1


def test_prompts_are_tokenized_off_the_event_loop(live, monkeypatch):
    """Tokenizing, chat templates and grammar compiles run in worker threads; the event loop (the
    server's thread) only parses and routes. A prompt too long for the context whatever its tokens is
    refused before it is tokenized at all."""
    import server.responses
    threads = []
    make_request, chat_prompt_ids = live.engine.make_request, server.responses.chat_prompt_ids
    monkeypatch.setattr(live.engine, "make_request",
                        lambda *a, **k: threads.append(threading.get_ident()) or make_request(*a, **k))
    monkeypatch.setattr(server.responses, "chat_prompt_ids",
                        lambda *a, **k: threads.append(threading.get_ident()) or chat_prompt_ids(*a, **k))
    assert httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert httpx.post(f"{live.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                               "max_tokens": 2}).status_code == 200
    assert len(threads) == 3 and live.thread.ident not in threads
    started = time.perf_counter()
    response = httpx.post(f"{live.url}/v1/completions", timeout=120,
                          json={"prompt": "stray words and more " * 150_000, "max_tokens": 1})
    assert response.status_code == 400 and "characters long" in response.json()["error"]["message"]
    assert time.perf_counter() - started < 1.0


# ---- no 5xx from input -------------------------------------------------------------------------
@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "top_p": float("inf")}, "top_p"),
    ({"prompt": "x", "temperature": 1e300}, "temperature"),
    ({"prompt": "x", "repetition_penalty": 1e30}, "repetition_penalty"),
    ({"prompt": "x", "n": 2, "use_beam_search": True, "temperature": 0, "length_penalty": float("nan")},
     "length_penalty"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "stop": ["s" * 5000]}, "stop strings"),
])
def test_invalid_numbers_are_400s(live, body, fragment):
    response = httpx.post(f"{live.url}/v1/completions", content=json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and fragment in response.json()["error"]["message"]


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}),
    ("/v1/rollouts", {"prompts": ["x"], "max_tokens": 0}),
])
def test_max_tokens_zero_is_a_400_on_every_route(live, route, body):
    response = httpx.post(f"{live.url}{route}", json=body, timeout=30)
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    assert response.status_code == 400 and f"'{field}'" in response.json()["error"]["message"]


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\ud83d"]}'),
])
def test_unpaired_surrogates_are_400s(live, route, body):
    response = httpx.post(f"{live.url}{route}", content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "surrogate" in response.json()["error"]["message"]


def test_extreme_values_give_finite_json(live):
    """Tiny temperatures, strong penalties and truncated distributions: every reported number is finite
    (a token the processed distribution excludes reports OpenAI's floor, -9999)."""
    for extra in ({"temperature": 1e-30}, {"temperature": 1e-4}, {"temperature": 100},
                  {"repetition_penalty": 100, "frequency_penalty": 2, "presence_penalty": -2},
                  {"top_k": 1, "temperature": 0.5}, {"min_p": 1.0}):
        response = httpx.post(f"{live.url}/v1/completions", timeout=30,
                              json={"prompt": "abc abc abc", "max_tokens": 6, "logprobs": 5, **extra})
        assert response.status_code == 200, (extra, response.text)
        json.loads(response.text, parse_constant=lambda name: pytest.fail(f"{name} in a response for {extra}"))
        for value in response.json()["choices"][0]["logprobs"]["token_logprobs"]:
            assert -9999.0 <= value <= 0
    for temperature in (1e-30, 1e-6, 0.001):
        response = httpx.post(f"{live.url}/v1/score", timeout=30, json={
            "sequences": [[1, 5, 9, 33, 40, 41]], "prompt_lens": [2], "logprobs_mode": "processed",
            "temperature": temperature})
        assert response.status_code == 200
        json.loads(response.text, parse_constant=lambda name: pytest.fail(f"{name} in /v1/score"))


# ---- weights -----------------------------------------------------------------------------------
def _payload(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("header, fragment", [
    ([1, 2], "JSON object"),
    ({"w": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}}, "shape"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "shape"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, "data_offsets"),
    ({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, "dtype"),
    ({"w": "tensor"}, "malformed"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "offsets"),
])
def test_malformed_safetensors_payloads_are_400s(live, header, fragment):
    response = httpx.post(f"{live.url}/v1/weights/update", content=_payload(header, b"\0" * 4), headers=ADMIN)
    assert response.status_code == 400 and fragment in response.json()["error"]["message"]


def test_weight_files_are_checked_before_use(live, tmp_path):
    url, engine = live.url, live.engine
    name = "model.norm.weight"
    shape = engine.loaded.model.param_slots()[name][0].hf_shape
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({name: torch.ones(shape)}, outside / "model.safetensors")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {name: "../outside/model.safetensors"}}))
    response = httpx.post(f"{url}/v1/weights/load", json={"path": str(folder)}, headers=ADMIN)
    assert response.status_code == 400 and "outside the model folder" in response.json()["error"]["message"]
    (folder / "model.safetensors.index.json").write_text("{not json")
    response = httpx.post(f"{url}/v1/weights/load", json={"path": str(folder)}, headers=ADMIN)
    assert response.status_code == 400 and "not a valid index" in response.json()["error"]["message"]
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model.safetensors").write_bytes(_payload({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}))
    response = httpx.post(f"{url}/v1/weights/load", json={"path": str(folder)}, headers=ADMIN)
    assert response.status_code == 400 and "offsets" in response.json()["error"]["message"]


def test_non_finite_weights_and_stale_versions_need_an_explicit_flag(live):
    url, engine = live.url, live.engine
    name = "model.norm.weight"
    original = engine.loaded.model.param_slots()[name][0]
    shape = original.hf_shape
    good = torch.ones(shape)
    poisoned = good.clone()
    poisoned[0] = float("nan")

    def push(tensor, **params):
        from safetensors.torch import save
        return httpx.post(f"{url}/v1/weights/update", content=save({name: tensor}), headers=ADMIN, params=params)

    current = httpx.get(f"{url}/v1/weights/version").json()["weight_version"]
    response = push(poisoned)
    assert response.status_code == 400 and "NaN or infinite" in response.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/weights/version").json()["weight_version"] == current
    assert push(good, weight_version=current + 10).status_code == 200
    response = push(good, weight_version=current + 5)
    assert response.status_code == 400 and "lower than the served version" in response.json()["error"]["message"]
    assert push(good, weight_version=current + 5, allow_version_rollback="true").json()["weight_version"] == current + 5
    assert push(poisoned, allow_non_finite="true").status_code == 200
    assert push(good).status_code == 200         # healthy again for the other tests
    version = httpx.get(f"{url}/v1/weights/version").json()["weight_version"]
    # Every response that carries tokens says which weights made them, streamed chunks too.
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks and all(c["choices"][0]["weight_version"] == version for c in chunks)
    body = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "max_tokens": 2}).json()
    assert body["choices"][0]["weight_version"] == version


# ---- admission ---------------------------------------------------------------------------------
def test_a_full_server_refuses_before_any_work_and_queued_streams_hear_at_once(default_live):
    """One running slot, one queue place: a third request is refused at once, even one whose grammar
    would take seconds to compile; the queued stream gets its headers and keep-alive comments."""
    live = start_server(None, {"max_num_seqs": 1, "num_kv_blocks": 256, "block_size": 16}, max_queued=1,
                        keepalive_s=0.1)
    url = live.url
    long_stream = {"prompt": "def f(x):", "max_tokens": 600, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=long_stream, timeout=60) as running:
            assert running.status_code == 200
            with httpx.stream("POST", f"{url}/v1/completions", json=long_stream, timeout=60) as queued:
                assert queued.status_code == 200
                lines = queued.iter_lines()          # held: dropping it would close the stream
                assert next(line for line in lines if line) == ": keep-alive"
                started = time.perf_counter()
                refused = httpx.post(f"{url}/v1/completions", timeout=60, json={
                    "prompt": "x", "structured_backend": SLOW_BACKEND,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "any", "schema": SLOW_SCHEMA}}})
                assert refused.status_code == 503 and refused.headers["retry-after"]
                assert time.perf_counter() - started < 0.5
    finally:
        stop_server(live)


def test_a_burst_that_fits_the_free_slots_is_admitted_whole(llama_dir):
    """A short queue bounds waiting requests, not the ones that have a free slot to run in."""
    live = start_server(llama_dir, max_queued=4)
    slots = live.engine.config.max_num_seqs

    async def burst():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=slots)) as client:
            return await asyncio.gather(*(client.post(f"{live.url}/v1/completions",
                                                      json={"prompt": [1, 5, i % 50 + 1], "max_tokens": 8})
                                          for i in range(slots)))

    try:
        assert [r.status_code for r in asyncio.run(burst())] == [200] * slots
    finally:
        stop_server(live)


# ---- keys --------------------------------------------------------------------------------------
def test_keys_compare_in_constant_time_and_bearer_in_any_case(llama_dir, monkeypatch):
    import hmac
    calls = []
    compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or compare(a, b))
    guarded = start_server(llama_dir, api_key="secret")
    try:
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": f"{scheme} secret"}).status_code == 200
        for header in ("Bearer secre", "Bearer secrets", "Basic secret", "secret", "Bearer"):
            assert httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": header}).status_code == 401
        assert calls
    finally:
        stop_server(guarded)


# ---- shutdown ----------------------------------------------------------------------------------
def test_sigterm_ends_running_streams_with_abort_and_done_in_time():
    port, timeout = free_port(), 1.0
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                                "--shutdown-timeout", str(timeout), "--kv-cache-memory-gb", "0.1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_health(f"http://127.0.0.1:{port}")
        body = {"prompt": "def f(x):", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - signalled < timeout + 2
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)


# ---- text --------------------------------------------------------------------------------------
def test_a_finished_text_is_the_decoding_of_its_tokens(default_live):
    """Length limits that cut a multi-byte character in half: the text still ends with what the
    tokenizer decodes (U+FFFD for the missing bytes), and the streamed pieces add up to it."""
    tokenizer = default_live.engine.tokenizer
    target = "price: 5€ and 🐍"
    cut_mid_character = 0
    for cut in range(1, len(tokenizer(target, add_special_tokens=False).input_ids) + 1):
        body = {"prompt": "x", "max_tokens": cut, "temperature": 0, "structured_outputs": {"choice": [target]},
                "return_token_ids": True}
        final = httpx.post(f"{default_live.url}/v1/completions", json=body, timeout=30).json()["choices"][0]
        assert final["text"] == tokenizer.decode(final["token_ids"], skip_special_tokens=True)
        with httpx.stream("POST", f"{default_live.url}/v1/completions", json={**body, "stream": True}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == final["text"]
        cut_mid_character += final["text"].endswith("\ufffd")
    assert cut_mid_character > 0
