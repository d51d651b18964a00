"""The one endpoint in front of the replicas: each generation request goes to the replica its prompt's
prefix favours (cluster/routing.py), streamed or not; a rollout call's prompts are spread over the
replicas, each group whole, and the answers merged in order; weight updates go to every replica, all or
nothing (cluster/weights.py); the other admin calls (pause, resume, aborts, cache resets) go to every
replica; the load routes and /metrics answer for all of them. A replica that fails a request is marked
down (cluster/replicas.py) and the request fails over to a live replica, a stream resumed where it was
(cluster/failover.py); the replica's engine is restarted and re-synced before it serves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json

from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.loads import MERGED_LOADS, merge_loads
from cluster.metrics import front_lines, labelled
from cluster.replicas import ReplicaDown, Replicas
from cluster.routing import PrefixRouter
from cluster import failover
from cluster.answers import as_response, error, unavailable
from cluster.weights import WEIGHT_ROUTES, WeightCoordinator
from wire import stream_checkpoints

# Routes a single replica answers, chosen by the request's prompt.
ROUTED = ("/v1/completions", "/v1/chat/completions", "/v1/score", "/generate")
# Routes every replica must hear.
# (The weight routes too, all or nothing: cluster/weights.py.)
FAN_OUT = ("/pause", "/resume", "/abort_requests", "/v1/reset_prefix_cache", "/reset_prefix_cache",
           "/abort_request", "/pause_generation", "/continue_generation", "/flush_cache")
DRAIN_BYTES = 64 * 2**20
ROLLOUT_KEYS = ("prompt_ids", "completion_ids", "logprobs", "finish_reasons", "texts", "weight_versions",
                "token_weight_versions", "logprob_token_ids", "top_logprobs")


async def _bounded_body(request: Request, limit: int | None) -> bytes | None:
    """The whole body, or None if it is larger than `limit` (the rest read and dropped, up to DRAIN_BYTES,
    so that the client can read the 413 instead of failing on its write)."""
    declared = request.headers.get("content-length", "")
    body, size = bytearray(), 0
    too_large = limit is not None and declared.isdigit() and int(declared) > limit
    async for chunk in request.stream():
        size += len(chunk)
        too_large = too_large or (limit is not None and size > limit)
        if too_large and size > DRAIN_BYTES:
            break
        if not too_large:
            body += chunk
    return None if too_large else bytes(body)


def _passed_headers(request: Request) -> dict:
    """What a replica needs of the caller's headers: the key it checks, and the body's type."""
    return {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}


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

    def __init__(self, replicas: Replicas, router: PrefixRouter, admin_key: str | None = None,
                 max_body_bytes: int = 4 * 2**20, api_key: str | None = None):
        self.max_body_bytes = max_body_bytes          # the replicas' --max-body-mb: the front buffers no more
        self.replicas = replicas
        self.router = router
        self.weights = WeightCoordinator(replicas, admin_key, api_key)
        self.admin_key = admin_key
        replicas.on_down = router.forget

    async def handle(self, request: Request, path: str) -> Response:
        body = await _bounded_body(request, None if path in WEIGHT_ROUTES else self.max_body_bytes)
        if body is None:
            return error(413, f"the request body is larger than this server accepts ({self.max_body_bytes} bytes; "
                         "see --max-body-mb)", "invalid_request_error")
        live = self.replicas.live()
        if path == "/health":
            return JSONResponse({"replicas_up": len(live)}, status_code=200 if live else 503)
        if not live:
            return unavailable("no replica is up; they are being restarted; retry")
        headers = _passed_headers(request)
        params = dict(request.query_params)
        if request.method == "POST" and path in WEIGHT_ROUTES:
            answer = await self.weights.update(path, params, body, headers)
            if answer.status_code < 400:
                self.router.forget_all()          # every cached prefix was computed by the old weights
            return answer
        if path in FAN_OUT:
            return await self.fan_out(request.method, path, params, body, headers)
        if path == "/metrics":
            return await self.metrics(headers)
        if path == "/cluster/replicas":
            return self.members(headers)
        if path in MERGED_LOADS:
            return await self.loads(path, headers)
        parsed = _json(body)
        if path == "/v1/rollouts" and request.method == "POST":
            return await self.rollouts(request, body, parsed)
        index = self.router.choose(_routing_text(path, parsed), self.replicas.loads()) if path in ROUTED else live[0]
        return await self.forward(index, request, body, parsed)

    async def forward(self, index: int, request: Request, body: bytes, parsed: dict) -> Response:
        """The call (`body`, and `parsed` its JSON) answered by replica `index`, or by another live one if it
        fails (cluster/failover.py)."""
        journal = self.weights.journal
        # The weights the call starts under, unless an update is being applied (then it may wait for it).
        started_under = journal.version if journal.pending_policy is None else None
        call = _Call.of(request, body, parsed, started_under)
        stream = call.stream
        sent = await self._send(index, call)
        if sent is None:
            return unavailable("no replica could serve this request; they are being restarted; retry it")
        index, response = sent
        served_by = {"x-gorgon-replica": str(index)}          # which replica answered, for operators
        if not stream or response.status_code >= 400:            # a refusal is a body, not a stream
            if stream:
                await response.aread()
                await response.aclose()
            self.replicas.finished(index)
            answer = as_response(response)
            answer.headers.update(served_by)
            return answer
        return StreamingResponse(self._relay(index, response, call), status_code=response.status_code,
                                 media_type=response.headers.get("content-type"), headers=served_by)

    async def _send(self, index: int, call: _Call, body: bytes | None = None) -> tuple[int, httpx.Response] | None:
        """Send the call to replica `index`, then to other live ones while they fail before answering;
        (replica, its answer), counted in flight until the caller calls finished; None if none answered.
        A call not streamed that is sent again says which weights it started under (the replica runs it
        under them while they are served, as the failed one would have), unless they are gone."""
        headers = call.headers
        for _ in range(failover.ATTEMPTS):
            self.replicas.started(index)
            try:
                response = await self.replicas.call(index, call.method, call.path, stream=call.stream,
                                                    content=call.body if body is None else body,
                                                    params=call.params, headers=headers)
            except ReplicaDown:
                self.replicas.finished(index)
                if not call.stream and call.started_under is not None:
                    headers = {**call.headers, stream_checkpoints.STARTED_UNDER: str(call.started_under)}
                if not await self.replicas.wait_live(failover.WAIT_FOR_REPLICA_S):
                    return None
                index = self.router.choose(call.routing_text, self.replicas.loads())
                continue
            if headers is not call.headers and failover.weights_changed(response):
                self.replicas.finished(index)         # its weights are gone: send it as a new call
                headers = call.headers
                continue
            return index, response
        return None

    async def _relay(self, index: int, response: httpx.Response, call: _Call):
        """The replica's stream, continued on another replica if it dies (cluster/failover.py)."""
        state = stream_checkpoints.StreamState.of(call.parsed.get("resume")) if call.resumable else None
        relayed = False                         # a stream without checkpoints has sent a chunk
        for _ in range(failover.ATTEMPTS):
            pending: list[bytes] = []           # chunks not yet covered by a checkpoint
            try:
                async for event in failover.events(response):
                    if state is not None and stream_checkpoints.is_checkpoint(event):
                        state.apply(stream_checkpoints.parse(event))
                        for chunk in pending:
                            yield chunk
                        pending.clear()
                    elif event.startswith(b":"):                      # keep-alive
                        yield event
                    elif state is not None and event != failover.DONE:
                        pending.append(event)
                    else:
                        for chunk in pending:
                            yield chunk
                        yield event
                        relayed = True
                        if event == failover.DONE:
                            return
            except httpx.TransportError:
                pass
            finally:
                self.replicas.finished(index)
                await response.aclose()
            self.replicas.mark_down(index)        # it ended without [DONE]: its engine died
            if state is not None and state.done:
                yield failover.DONE
                return
            if relayed:
                yield failover.error_event(f"replica {index} failed mid-stream; retry the request")
                return
            body = call.body
            if state is not None and state.started:
                keep = self.weights.journal.keeps_since(state.last_weight_version())
                body = json.dumps({**call.parsed, "resume": state.resume("keep" if keep else "error")}).encode()
            if not await self.replicas.wait_live(failover.WAIT_FOR_REPLICA_S):
                break
            sent = await self._send(self.router.choose(call.routing_text, self.replicas.loads()), call, body)
            if sent is None:
                break
            index, response = sent
            if response.status_code >= 400:           # e.g. weights_changed: the replica's error, as an event
                text = (await response.aread()).decode(errors="replace")
                self.replicas.finished(index)
                await response.aclose()
                yield f"data: {text}\n\n".encode() + failover.DONE
                return
        yield failover.error_event("no replica could continue this stream; retry the request")

    async def fan_out(self, method: str, path: str, params: dict, body: bytes, headers: dict) -> Response:
        """Every live replica hears the call. A replica that died meanwhile is left out: it restarts with
        nothing in flight and the journal's pause state. The answer is the first refusal, else the first
        replica's (aborts: every replica's aborted requests together)."""
        answers = await self.weights.fan_out(path, method, params, body, headers)
        if path in ("/v1/reset_prefix_cache", "/reset_prefix_cache", "/flush_cache"):
            self.router.forget_all()
        replied = [answer for answer in answers if isinstance(answer, httpx.Response)]
        if not replied:
            return unavailable("every replica failed during this call; retry")
        refused = next((answer for answer in replied if answer.status_code >= 400), None)
        if refused is not None or path != "/abort_requests":
            return as_response(refused or replied[0])
        bodies = [answer.json() for answer in replied]
        return JSONResponse({"status": "aborted", "aborted": sum(b["aborted"] for b in bodies),
                             "request_ids": [rid for b in bodies for rid in b["request_ids"]]})

    async def loads(self, path: str, headers: dict) -> Response:
        """The load routes over every live replica: SGLang's list one entry per replica (its dp_rank is the
        replica's index); counts are summed."""
        live = self.replicas.live()
        answers = await asyncio.gather(*(self.replicas.call(i, "GET", path, headers=headers) for i in live),
                                       return_exceptions=True)
        replied = [(i, a) for i, a in zip(live, answers) if isinstance(a, httpx.Response)]
        refused = next((a for _, a in replied if a.status_code >= 400), None)
        if refused is not None or not replied:
            return as_response(refused) if refused is not None else unavailable("no replica answered; retry")
        return JSONResponse(merge_loads(path, [(i, a.json()) for i, a in replied]))

    async def metrics(self, headers: dict) -> Response:
        """Every live replica's metrics, labelled with its index, and the front's own."""
        live = self.replicas.live()
        answers = await asyncio.gather(*(self.replicas.call(i, "GET", "/metrics", headers=headers) for i in live),
                                       return_exceptions=True)
        lines, seen = [], set()
        for index, answer in zip(live, answers):
            if isinstance(answer, httpx.Response):
                if answer.status_code != 200:
                    return as_response(answer)
                lines += labelled(answer.text, index, seen)
        up = [url is not None for url in self.replicas.urls]
        lines += front_lines(self.replicas.in_flight, up, self.replicas.times_down, self.router.routed,
                             self.router.routed_by_prefix)
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def members(self, headers: dict) -> Response:
        """Each replica's address, engine process, load and state (SGLang router's /list_workers); it names
        internal addresses, so it takes the admin key where one is set."""
        if self.admin_key and not hmac.compare_digest(headers.get("authorization", ""), f"Bearer {self.admin_key}"):
            return error(401, "this route needs the admin key: 'Authorization: Bearer KEY'", "authentication_error")
        r = self.replicas
        return JSONResponse({"replicas": [{"index": i, "url": r.urls[i], "pid": r.pids[i], "up": r.urls[i] is not None,
                                           "in_flight": r.in_flight[i], "times_down": r.times_down[i]}
                                          for i in range(len(r.actors))],
                             "weight_version": self.weights.journal.version, "paused": self.weights.journal.paused})

    async def rollouts(self, request: Request, body: bytes, parsed: dict) -> Response:
        prompts = parsed.get("prompts")
        if not isinstance(prompts, list) or not prompts:            # the replica says what is wrong
            return await self.forward(self.replicas.live()[0], request, body, parsed)
        texts = [p if isinstance(p, str) else json.dumps(p) for p in prompts]
        placed = self.router.spread(texts, self.replicas.loads())
        parts = {index: [i for i, chosen in enumerate(placed) if chosen == index] for index in sorted(set(placed))}
        shares = {index: {**parsed, "prompts": [prompts[i] for i in members]} for index, members in parts.items()}
        answers = await asyncio.gather(*(self.forward(index, request, json.dumps(share).encode(), share)
                                         for index, share in shares.items()))
        failed = next((answer for answer in answers if answer.status_code >= 400), None)
        if failed is not None:
            return failed
        return JSONResponse(_merge_rollouts(prompts, parts, [json.loads(a.body) for a in answers], parsed.get("n", 1)))


@dataclass(frozen=True)
class _Call:
    """One call as the front sends it to replicas, again if one fails."""

    method: str
    path: str
    params: dict
    headers: dict
    body: bytes
    parsed: dict
    stream: bool
    routing_text: str
    started_under: int | None            # the weight version served when it was first sent

    @property
    def resumable(self) -> bool:
        """A stream that carries checkpoints (server/resumable.py)."""
        return self.stream and self.path in failover.RESUMABLE and not self.parsed.get("use_beam_search")

    @classmethod
    def of(cls, request: Request, body: bytes, parsed: dict, started_under: int | None) -> _Call:
        path = request.url.path
        call = cls(request.method, path, dict(request.query_params), _passed_headers(request), body, parsed,
                   bool(parsed.get("stream")), _routing_text(path, parsed), started_under)
        if call.resumable:
            call.headers[stream_checkpoints.HEADER] = "1"
        return call


def build_front(replicas: Replicas, router: PrefixRouter, admin_key: str | None = None,
                max_body_bytes: int = 4 * 2**20, api_key: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        monitor = asyncio.get_running_loop().create_task(replicas.monitor())
        yield
        monitor.cancel()
        await replicas.close()

    app = FastAPI(title="Gorgon cluster", lifespan=lifespan)
    front = Front(replicas, router, admin_key, max_body_bytes, api_key)
    app.state.front = front

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
