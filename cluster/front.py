"""The one endpoint in front of the replicas: each generation request goes to the replica its prompt's
prefix favours (cluster/routing.py), streamed or not; a rollout call's prompts are spread over the
replicas, each group whole, and the answers merged in order; admin calls (weights, pause, resume, aborts,
cache resets) go to every replica. A replica that fails a request is marked down: that request ends with
a retriable 503 and the others go on; Ray restarts the replica and the front asks it for its new address.
"""

from __future__ import annotations

import asyncio
import json

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.metrics import front_lines, labelled
from cluster.routing import PrefixRouter

# Routes a single replica answers, chosen by the request's prompt.
ROUTED = ("/v1/completions", "/v1/chat/completions", "/v1/score", "/generate")
# Routes every replica must hear.
FAN_OUT = ("/v1/weights/update", "/v1/weights/load", "/pause", "/resume", "/abort_requests",
           "/v1/reset_prefix_cache", "/reset_prefix_cache", "/abort_request", "/pause_generation",
           "/continue_generation", "/flush_cache", "/update_weights_from_disk")
ROLLOUT_KEYS = ("prompt_ids", "completion_ids", "logprobs", "finish_reasons", "texts", "weight_versions",
                "token_weight_versions", "logprob_token_ids", "top_logprobs")


class Replicas:
    """The replicas' actors, their addresses and their requests in flight, as the front sees them."""

    def __init__(self, actors: list, urls: list[str]):
        self.actors = actors
        self.urls: list[str | None] = list(urls)
        self.in_flight = [0] * len(actors)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))

    def live(self) -> list[int]:
        return [index for index, url in enumerate(self.urls) if url is not None]

    def loads(self) -> list[int]:
        """Requests in flight, a down replica counted as full so that nothing is routed to it."""
        return [load if self.urls[index] else 10**9 for index, load in enumerate(self.in_flight)]

    def mark_down(self, index: int, router: PrefixRouter) -> None:
        if self.urls[index] is not None:
            self.urls[index] = None
            router.forget(index)
            asyncio.get_running_loop().create_task(self._rejoin(index))

    async def _rejoin(self, index: int) -> None:
        """Ask the restarted actor for its address until it answers."""
        while self.urls[index] is None:
            try:
                self.urls[index] = await asyncio.wait_for(self.actors[index].url.remote(), timeout=30)
            except Exception:           # still restarting
                await asyncio.sleep(1.0)


def _unavailable(index: int) -> JSONResponse:
    return JSONResponse({"error": {"message": f"replica {index} failed while serving this request and is being "
                                              "replaced; retry it", "type": "server_overloaded", "param": None,
                                   "code": "replica_unavailable"}}, status_code=503, headers={"retry-after": "2"})


def _routing_text(path: str, body: dict) -> str:
    """The part of a request whose prefix the replicas' caches share: its prompt or its messages."""
    if path == "/v1/chat/completions":
        return json.dumps(body.get("messages"), sort_keys=True)
    for key in ("prompt", "text", "input_ids", "sequences"):
        if key in body:
            value = body[key]
            return value if isinstance(value, str) else json.dumps(value)
    return ""


class Front:
    """The front's handling of one call: route it, spread it, or fan it out."""

    def __init__(self, replicas: Replicas, router: PrefixRouter):
        self.replicas = replicas
        self.router = router

    async def handle(self, request: Request, path: str) -> Response:
        body = await request.body()
        if not self.replicas.live():
            return _unavailable(0)
        if path in FAN_OUT:
            return await self.fan_out(request, body)
        if path == "/metrics":
            return await self.metrics(request)
        if path == "/v1/rollouts" and request.method == "POST":
            return await self.rollouts(request, body)
        parsed = _json(body)
        live = self.replicas.live()
        index = self.router.choose(_routing_text(path, parsed), self.replicas.loads()) if path in ROUTED else live[0]
        return await self.forward(index, request, body, stream=bool(parsed.get("stream")))

    async def forward(self, index: int, request: Request, body: bytes, stream: bool) -> Response:
        replicas = self.replicas
        replicas.in_flight[index] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        upstream = replicas.http.build_request(request.method, replicas.urls[index] + request.url.path,
                                               params=request.query_params, content=body, headers=headers)
        try:
            response = await replicas.http.send(upstream, stream=stream)
        except httpx.TransportError:
            replicas.in_flight[index] -= 1
            replicas.mark_down(index, self.router)
            return _unavailable(index)
        if not stream:
            replicas.in_flight[index] -= 1
            return Response(response.content, status_code=response.status_code,
                            media_type=response.headers.get("content-type"))
        return StreamingResponse(self._relay(index, response), status_code=response.status_code,
                                 media_type=response.headers.get("content-type"))

    async def _relay(self, index: int, response: httpx.Response):
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.TransportError:
            self.replicas.mark_down(index, self.router)
            message = {"error": {"message": f"replica {index} failed mid-stream; retry the request",
                                 "type": "server_overloaded", "code": "replica_unavailable"}}
            yield f"data: {json.dumps(message)}\n\ndata: [DONE]\n\n".encode()
        finally:
            self.replicas.in_flight[index] -= 1
            await response.aclose()

    async def fan_out(self, request: Request, body: bytes) -> Response:
        """Every live replica hears the call; the answer is the first failure's, else the first replica's."""
        answers = await asyncio.gather(*(self.forward(index, request, body, stream=False)
                                         for index in self.replicas.live()))
        return next((answer for answer in answers if answer.status_code >= 400), answers[0])

    async def metrics(self, request: Request) -> Response:
        """Every live replica's metrics, labelled with its index, and the front's own."""
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        live = self.replicas.live()
        answers = await asyncio.gather(*(self.replicas.http.get(self.replicas.urls[i] + "/metrics", headers=headers)
                                         for i in live), return_exceptions=True)
        lines, seen = [], set()
        for index, answer in zip(live, answers):
            if isinstance(answer, httpx.Response):
                if answer.status_code != 200:
                    return Response(answer.content, status_code=answer.status_code,
                                    media_type=answer.headers.get("content-type"))
                lines += labelled(answer.text, index, seen)
        up = [url is not None for url in self.replicas.urls]
        lines += front_lines(self.replicas.in_flight, up, self.router.routed, self.router.routed_by_prefix)
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def rollouts(self, request: Request, body: bytes) -> Response:
        parsed = _json(body)
        prompts = parsed.get("prompts")
        if not isinstance(prompts, list) or not prompts:            # the replica says what is wrong
            return await self.forward(self.replicas.live()[0], request, body, stream=False)
        texts = [p if isinstance(p, str) else json.dumps(p) for p in prompts]
        placed = self.router.spread(texts, self.replicas.loads())
        parts = {index: [i for i, chosen in enumerate(placed) if chosen == index] for index in sorted(set(placed))}
        answers = await asyncio.gather(*(
            self.forward(index, request, json.dumps({**parsed, "prompts": [prompts[i] for i in members]}).encode(),
                         stream=False) for index, members in parts.items()))
        failed = next((answer for answer in answers if answer.status_code >= 400), None)
        if failed is not None:
            return failed
        return JSONResponse(_merge_rollouts(prompts, parts, [json.loads(a.body) for a in answers], parsed.get("n", 1)))


def build_front(replicas: Replicas, router: PrefixRouter) -> FastAPI:
    app = FastAPI(title="Gorgon cluster")
    front = Front(replicas, router)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT"])
    async def proxy(request: Request, path: str):
        return await front.handle(request, "/" + path)

    return app


def _merge_rollouts(prompts: list, parts: dict[int, list[int]], bodies: list[dict], n: int) -> dict:
    """The replicas' answers back in the call's prompt order, n entries per prompt."""
    by_prompt: dict[int, dict] = {}
    for members, body in zip(parts.values(), bodies):
        for position, prompt_index in enumerate(members):
            by_prompt[prompt_index] = {key: body[key][position * n : (position + 1) * n]
                                       for key in ROLLOUT_KEYS if key in body}
    merged = {key: [item for i in range(len(prompts)) for item in by_prompt[i].get(key, [])]
              for key in ROLLOUT_KEYS if key in bodies[0]}
    versions = set(merged.get("weight_versions", []))
    merged["weight_version"] = versions.pop() if len(versions) == 1 else None
    return merged


def _json(body: bytes) -> dict:
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
