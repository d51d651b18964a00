"""The HTTP server, tested as users reach it: a real uvicorn server on localhost, the official `openai`
client and raw httpx."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from live_server import free_port, start_server, stop_server, wait_for_health


@pytest.fixture(scope="module")
def live(llama_dir):
    live = start_server(llama_dir)
    yield live
    stop_server(live)


def wait_until_idle(engine, timeout=10.0):
    deadline = time.time() + timeout
    while (engine.has_unfinished_requests() or engine.cache_usage().num_used_blocks) and time.time() < deadline:
        time.sleep(0.05)


def test_completions_through_the_openai_client(live):
    out = live.client.completions.create(model="tiny", prompt="def fibonacci(n):", max_tokens=12, temperature=0,
                                         logprobs=2, n=2, extra_body={"min_tokens": 12, "return_token_ids": True})
    assert len(out.choices) == 2 and out.choices[0].text == out.choices[1].text   # greedy: both the same
    choice = out.choices[0]
    assert choice.finish_reason == "length" and len(choice.logprobs.tokens) == 12
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens > 0
    assert len(choice.model_extra["token_ids"]) == 12


def test_token_id_prompts_and_lists_of_prompts(live):
    out = live.client.completions.create(model="tiny", prompt=[[1, 5, 9], [1, 40, 41, 42]], max_tokens=4,
                                         temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.prompt_tokens == 7


def test_seeded_sampling_reproduces(live):
    def sample():
        return live.client.completions.create(model="tiny", prompt="import os", max_tokens=16, temperature=1.0,
                                              seed=1234, n=3)
    first, second = sample(), sample()
    assert [c.text for c in first.choices] == [c.text for c in second.choices]


def test_chat_and_chat_streaming(live):
    messages = [{"role": "user", "content": "Write a function."}]
    out = live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=2)
    assert out.choices[0].message.role == "assistant"
    assert len(out.choices[0].logprobs.content) == out.usage.completion_tokens
    stream = live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason


def test_streamed_completion_equals_the_plain_one_and_ends_with_done(live):
    body = {"model": "tiny", "prompt": "class Stack:", "max_tokens": 20, "temperature": 0, "stream": True,
            "stop": ["self"], "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in events if c["choices"])
    plain = live.client.completions.create(model="tiny", prompt="class Stack:", max_tokens=20, temperature=0,
                                           stop=["self"])
    assert text == plain.choices[0].text
    assert "self" not in text
    assert events[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": "x", "guided_json": {}}, 400, "unknown field 'guided_json'"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "'n'"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "lower max_tokens"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": [1, 99999]}, 400, "outside the vocabulary"),
])
def test_errors_have_openai_shape(live, body, status, fragment):
    response = httpx.post(f"{live.url}/v1/completions", json={"model": "tiny", **body} if "model" not in body else body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_openai_client_sees_bad_requests(live):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        live.client.completions.create(model="tiny", prompt="x", temperature=-2)
    with pytest.raises(openai.NotFoundError):
        live.client.completions.create(model="other", prompt="x")


def test_models_health_version_metrics(live):
    assert live.client.models.list().data[0].id == "tiny"
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert httpx.get(f"{live.url}/version").json()["version"]
    live.client.completions.create(model="tiny", prompt="x", max_tokens=3)
    metrics = httpx.get(f"{live.url}/metrics").text
    for name in ("gorgon:num_requests_running", "gorgon:num_requests_waiting", "gorgon:kv_cache_usage_perc",
                 "gorgon:time_to_first_token_seconds_bucket", "gorgon:inter_token_latency_seconds_bucket",
                 "gorgon:prompt_tokens_total", "gorgon:generation_tokens_total",
                 'gorgon:request_success_total{finished_reason="length"}'):
        assert name in metrics


def test_a_disconnect_aborts_and_frees_blocks(live):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 3:
                break
    wait_until_idle(live.engine)
    assert live.engine.cache_usage().num_used_blocks == 0


def test_200_concurrent_streams_finish_without_error_and_free_every_block(live):
    async def one(client, i):
        body = {"model": "tiny", "prompt": f"def f{i}(x):", "max_tokens": 8, "stream": True, "seed": i}
        async with client.stream("POST", f"{live.url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert not any('"error"' in line for line in lines)

    async def all_of_them():
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            await asyncio.gather(*(one(client, i) for i in range(200)))

    asyncio.run(all_of_them())
    wait_until_idle(live.engine)
    assert live.engine.cache_usage().num_used_blocks == 0


def test_api_key_and_backpressure(llama_dir):
    # One decode step per call keeps the tiny model's 200-token stream running while the next request comes.
    guarded = start_server(llama_dir, {"max_num_seqs": 1, "decode_steps": 1}, api_key="secret", max_queued=0)
    key = {"Authorization": "Bearer secret"}
    try:
        assert httpx.get(f"{guarded.url}/health").status_code == 200
        assert httpx.get(f"{guarded.url}/v1/models").status_code == 401
        assert httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": "bearer secret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong").models.list()
        # The one running slot is taken by a stream; with no queue, the next request is refused at once.
        with httpx.stream("POST", f"{guarded.url}/v1/completions", headers=key, timeout=60,
                          json={"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}) as running:
            assert running.status_code == 200
            response = httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "x"}, headers=key)
            assert response.status_code == 503 and response.headers["retry-after"]
        assert httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "x"}, headers=key).status_code == 200
    finally:
        stop_server(guarded)


def test_sigterm_stops_the_server_cleanly(llama_dir):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", llama_dir, "--port", str(port),
                                "--kv-cache-memory-gb", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)


def test_beam_search_over_http_uses_n_as_the_width(live):
    out = live.client.completions.create(model="tiny", prompt=[1, 5, 9, 33], max_tokens=8, n=3,
                                         extra_body={"use_beam_search": True, "length_penalty": 0.5,
                                                     "early_stopping": "never"})
    scores = [c.model_extra["score"] for c in out.choices]
    assert len(out.choices) == 3 and scores == sorted(scores, reverse=True)
    response = httpx.post(f"{live.url}/v1/completions", json={"model": "tiny", "prompt": "x", "n": 2,
                                                               "use_beam_search": True, "temperature": 0.5})
    assert response.status_code == 400 and "temperature" in response.json()["error"]["message"]
