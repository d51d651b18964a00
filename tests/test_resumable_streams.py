"""A stream cut after any of its checkpoints and sent again with the state they give (`resume`) goes on
exactly as the uninterrupted stream: the delivered chunks followed by the resumed ones are, byte for
byte, the uninterrupted stream's chunks (server/resumable.py, wire/stream_checkpoints.py)."""

import json

import httpx
import pytest

from live_server import start_server, stop_server
from wire.stream_checkpoints import HEADER, STARTED_UNDER, StreamState, is_checkpoint, parse

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}}
CHAT = [{"role": "user", "content": "weather in Paris?"}]


@pytest.fixture(scope="module")
def live(llama_dir):
    live = start_server(llama_dir, engine_options={"max_num_batched_tokens": 64})
    yield live
    stop_server(live)


def _events(url: str, path: str, body: dict, checkpoints: bool = True) -> list[bytes]:
    events = []
    with httpx.stream("POST", url + path, json=body, headers={HEADER: "1"} if checkpoints else {},
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        buffered = b""
        for chunk in response.iter_raw():
            buffered += chunk
            *whole, buffered = buffered.split(b"\n\n")
            events += [event + b"\n\n" for event in whole if not event.startswith(b": keep-alive")]
    return events


def _data(events: list[bytes]) -> list[bytes]:
    return [event for event in events if not event.startswith(b":")]


def _by_choice(events: list[bytes]) -> dict:
    """Each choice's chunks in order (the snapshots of a call's several prompts interleave in whatever
    order they finish their steps, resumed or not), and the chunks of no choice (usage, [DONE])."""
    grouped: dict = {}
    for event in _data(events):
        payload = json.loads(event[6:]) if event != b"data: [DONE]\n\n" else {}
        choices = payload.get("choices") or [{"index": None}]
        grouped.setdefault(choices[0]["index"], []).append(event)
    return grouped


BODIES = {
    "greedy-logprobs": ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
                                            "logprobs": 2}),
    "seeded-n2-stops-usage-echo": ("/v1/completions", {
        "prompt": "The cat sat on", "max_tokens": 30, "n": 2, "seed": 4, "stop": ["e", "at "], "echo": True,
        "stream_options": {"include_usage": True}, "prompt_logprobs": 1, "return_token_ids": True}),
    "two-prompts-n2": ("/v1/completions", {"prompt": ["Hello there", "A long story about a dragon"],
                                           "max_tokens": 20, "n": 2, "seed": 9, "temperature": 0.9,
                                           "presence_penalty": 0.5}),
    "unseeded": ("/v1/completions", {"prompt": "Tell me", "max_tokens": 20}),
    "chat-logprobs": ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 24, "seed": 2, "logprobs": True,
                                               "top_logprobs": 2, "stream_options": {"include_usage": True}}),
    "chat-tool-calls": ("/v1/chat/completions", {"messages": CHAT, "tools": [WEATHER], "tool_choice": "required",
                                                 "max_tokens": 60, "seed": 1, "n": 2}),
}


@pytest.mark.parametrize("name", list(BODIES))
def test_a_stream_resumed_after_any_checkpoint_is_the_uninterrupted_stream(live, name):
    path, body = BODIES[name]
    body = {**body, "stream": True}
    whole = _events(live.url, path, body)
    marks = [i for i, event in enumerate(whole) if is_checkpoint(event)]
    assert len(marks) >= 3 and whole[-1] == b"data: [DONE]\n\n"
    state = StreamState()
    for mark in marks:
        state.apply(parse(whole[mark]))
        if state.done:
            break
        delivered = whole[: mark + 1]
        resumed = _events(live.url, path, {**body, "resume": state.resume()})
        assert _by_choice(delivered + resumed) == _by_choice(whole), f"cut after event {mark}"


def test_checkpoints_leave_the_chunks_alone(live):
    """The same seeded stream with and without checkpoints: the same chunks, ids aside."""
    body = {"prompt": "The cat sat on", "max_tokens": 12, "n": 2, "seed": 4, "stream": True}

    def without_ids(events):
        return [{k: v for k, v in json.loads(e[6:]).items() if k not in ("id", "created")} for e in _data(events)[:-1]]

    assert without_ids(_events(live.url, "/v1/completions", body)) == \
        without_ids(_events(live.url, "/v1/completions", body, checkpoints=False))


def test_bad_resume_state_is_a_400(live):
    body = {"prompt": "Hello", "max_tokens": 8, "stream": True}
    state = StreamState()
    whole = _events(live.url, "/v1/completions", body)
    state.apply(parse(next(e for e in whole if is_checkpoint(e))))
    resume = state.resume()
    cases = [
        ({**body, "stream": False, "resume": resume}, "set stream: true"),
        ({**body, "resume": {**resume, "view": {"id": "x"}}}, "resume.view"),
        ({**body, "resume": {**resume, "requests": {"3": resume["requests"]["0"]}}}, "prompt index"),
        ({**body, "resume": {**resume, "requests": {"0": {"samples": [{"index": 0, "seed": 1,
                                                                     "token_ids": [10**7]}]}}}}, "vocabulary"),
    ]
    for sent, message in cases:
        answer = httpx.post(live.url + "/v1/completions", json=sent)
        assert answer.status_code == 400 and message in answer.json()["error"]["message"], (message, answer.text)


def test_a_call_sent_again_runs_under_the_weights_it_started_under_or_is_refused(live):
    """The cluster's front sends a call whose replica died again with the weights it started under: while
    they are served it runs as usual; once they are gone it is a 409 weights_changed (the front then sends
    it as a new call)."""
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0}
    plain = httpx.post(live.url + "/v1/completions", json=body).json()["choices"][0]["text"]
    served = live.engine.weights.version
    again = httpx.post(live.url + "/v1/completions", json=body, headers={STARTED_UNDER: str(served)})
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == plain
    gone = httpx.post(live.url + "/v1/rollouts", json={"prompts": ["Hello"], "max_tokens": 4},
                      headers={STARTED_UNDER: str(served + 3)})
    assert gone.status_code == 409 and gone.json()["error"]["code"] == "weights_changed", gone.text
    bad = httpx.post(live.url + "/v1/completions", json=body, headers={STARTED_UNDER: "soon"})
    assert bad.status_code == 400 and STARTED_UNDER in bad.text
