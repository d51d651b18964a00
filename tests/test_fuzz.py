"""Property-based fuzz of every route from the server's own OpenAPI schema: bodies drawn from each
route's request schema (valid and near-valid alike), random bytes for the weight push. Whatever
arrives, the answer is a 2xx or a 4xx in OpenAI's error shape, within 30 s. A fixed example budget,
derandomized, so CI runs the same cases every time."""

import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from live_server import start_server, stop_server

EXAMPLES_PER_ROUTE = 40
SLOWEST_S = 30.0
ADMIN = {"Authorization": "Bearer admin"}
FUZZ = settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live(llama_dir):
    live = start_server(llama_dir, {"grammar_cpu_budget_s": 1}, admin_key="admin")
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def schema(live):
    return httpx.get(f"{live.url}/openapi.json").json()


def json_routes(schema: dict) -> list[str]:
    return sorted(path for path, operations in schema["paths"].items()
                  if "requestBody" in operations.get("post", {})
                  and "application/json" in operations["post"]["requestBody"]["content"])


def body_strategy(schema: dict, path: str):
    """The route's request body schema, its references resolved against the whole document."""
    body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return from_schema({**body, "components": schema["components"]})


# A request each route accepts: the fuzz draws every other field from the schema on top of it, so that
# drawn values reach the engine instead of stopping at a missing required field.
VALID = {
    "/v1/completions": {"prompt": "hello there", "max_tokens": 8},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    "/v1/rollouts": {"prompts": ["hi", [1, 5, 9]], "max_tokens": 8},
    "/v1/score": {"sequences": [[1, 5, 9, 12]], "prompt_lens": [2]},
    "/v1/weights/load": {"path": "/nonexistent/checkpoint"},
    "/generate": {"input_ids": [1, 5, 9], "sampling_params": {"max_new_tokens": 8}},
    "/abort_requests": {"request_ids": ["nobody"]},
    "/abort_request": {"rid": "nobody"},
    "/update_weights_from_disk": {"model_path": "/nonexistent/checkpoint"},
}
# Admin routes (the pause routes are left out: a drawn pause would hold every later request).
ADMIN_ROUTES = {"/abort_requests", "/abort_request", "/update_weights_from_disk"}


def near_valid(schema: dict, path: str):
    """Schema-drawn fields over a valid request (the drawn model name dropped: it would only be a 404)."""
    return body_strategy(schema, path).map(
        lambda drawn: {**{k: v for k, v in drawn.items() if k != "model"}, **VALID[path]} if isinstance(drawn, dict)
        else drawn)


def check(response: httpx.Response, seconds: float, what) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:500])
    assert seconds < SLOWEST_S, (what, seconds)
    if response.status_code >= 400:
        body = response.json()         # OpenAI's error shape, or SGLang's {"success": false, "message"}
        message = body["error"]["message"] if "error" in body else body["message"]
        assert isinstance(message, str) and message, (what, response.text[:500])


def test_the_schema_covers_every_route(schema):
    assert set(json_routes(schema)) >= set(VALID)


@pytest.mark.parametrize("path", sorted(VALID))
def test_no_body_gets_a_5xx(live, schema, path):
    headers = ADMIN if path.startswith("/v1/weights/") or path in ADMIN_ROUTES else {}

    @FUZZ
    @given(body=st.one_of(near_valid(schema, path), body_strategy(schema, path),
                           st.dictionaries(st.text(max_size=20), st.integers() | st.text())))
    def run(body):
        started = time.perf_counter()
        response = httpx.post(f"{live.url}{path}", json=body, headers=headers, timeout=SLOWEST_S + 5)
        check(response, time.perf_counter() - started, body)

    run()


def test_no_weight_payload_gets_a_5xx(live):
    @FUZZ
    @given(payload=st.binary(max_size=4096), version=st.none() | st.integers(),
           policy=st.sampled_from(["wait", "abort", "keep", "x"]))
    def run(payload, version, policy):
        params = {"policy": policy, **({} if version is None else {"weight_version": version})}
        started = time.perf_counter()
        response = httpx.post(f"{live.url}/v1/weights/update", content=payload, params=params, headers=ADMIN,
                              timeout=SLOWEST_S + 5)
        check(response, time.perf_counter() - started, (payload[:64], params))

    run()


@pytest.mark.parametrize("path", ["/health", "/version", "/metrics", "/v1/models", "/v1/weights/version", "/v1/load",
                                  "/load", "/is_paused", "/get_weight_version", "/v1/loads", "/get_load",
                                  "/health_generate"])
def test_every_get_route_answers(live, path):
    assert httpx.get(f"{live.url}{path}").status_code == 200
