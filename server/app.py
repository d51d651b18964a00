"""The OpenAI-compatible HTTP server: routes, streaming, auth, admission control."""

from __future__ import annotations

import asyncio
from dataclasses import replace
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse

from decoding import Engine, RequestOutput, SamplingParams
from decoding.async_engine import AsyncEngine, RequestStream
from decoding.resume import WeightsChanged
from server import responses, resumable
from server.edge import EdgeConfig, EdgeLimits, InFlight, KeyCheck
from server.errors import AUTH_ERRORS, GENERATION_ERRORS, APIError, handle_api_error, handle_validation_error
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.rl import add_rl_routes
from server.rl_control import add_control_routes
from server.sglang import add_sglang_routes

VERSION = "0.1.0"


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    admin_key: str | None = None     # enables and guards the admin routes (weights, pause, abort, cache)
    # Admin routes enabled with no key, for trainers that send none (slime, AReaL) on a private network.
    open_admin: bool = False
    max_queued: int = 256            # requests waiting for a running slot before new ones get 503
    retry_after_s: int = 1
    max_body_bytes: int = 4 * 2**20  # larger bodies get 413 (weight pushes excepted)
    keepalive_s: float = 5.0         # a stream that has nothing to send for this long gets an SSE comment


class Server:
    """Shared state of the routes: the engine front, metrics, configuration."""

    def __init__(self, engine: Engine, config: ServerConfig, reference: Engine | None = None):
        self.engine = engine
        self.front = AsyncEngine(engine)
        # The frozen reference model's own engine thread, for /v1/score (None without --reference-model).
        self.reference_front = AsyncEngine(reference) if reference is not None else None
        self.metrics = Metrics(engine)
        self.config = config
        self.in_flight = InFlight()

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.config.served_model_name!r}", param="model", code="model_not_found")

    async def submit(self, prompts: list, params: SamplingParams | list[SamplingParams], stream: bool = True,
                     request_id: str | list[str] | None = None, front: AsyncEngine | None = None,
                     resumptions: list | None = None) -> list[RequestStream]:
        """Tokenize (and compile a constraint) in a worker thread, then queue every prompt; a bad one is a
        400 and queues none. stream=False: the engine reports each request only when it finishes
        (responses that are not streamed need nothing else, and the engine thread then never waits on
        the event loop). request_id: the caller's id for the call (its prompts take "<id>-<index>" when
        there are several), or one id per prompt. resumptions: per prompt, where another server left it
        (decoding/resume.py) or None; a resumed request that had finished is not queued (each stream's
        prompt_index says which prompt it is)."""
        front = front or self.front
        engine = front.engine
        ids, group = self._request_ids(request_id, len(prompts), front)
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        resumptions = resumptions or [None] * len(prompts)
        try:
            requests = await asyncio.to_thread(lambda: [engine.make_request(*made) for made in
                                                        zip(prompts, params_list, ids, resumptions)])
        except ValueError as err:
            raise APIError(400, str(err)) from err
        self._request_ids(request_id, len(prompts), front)      # a 400 if another call took an id meanwhile
        streams = []
        for prompt_index, request in enumerate(requests):
            self.metrics.prompt_tokens.inc(request.prompt_len)
            if not request.is_finished:
                streams.append(front.start(request, stream, group))
                streams[-1].prompt_index = prompt_index
        return streams

    @staticmethod
    def _request_ids(request_id: str | list[str] | None, num_prompts: int, front: AsyncEngine) -> tuple[list, str | None]:
        """The engine ids for a call's prompts (None: the engine numbers them) and the caller's id for
        the whole call; an id already in flight is a 400."""
        if request_id is None:
            return [None] * num_prompts, None
        if isinstance(request_id, list):
            if len(request_id) != num_prompts or len(set(request_id)) != num_prompts:
                raise APIError(400, f"give one distinct request id per prompt ({num_prompts}), "
                                    f"got {len(request_id)}", param="rid")
            ids, group = request_id, None
        else:
            ids = [request_id] if num_prompts == 1 else [f"{request_id}-{i}" for i in range(num_prompts)]
            group = request_id
        for candidate in {*ids, *([group] if group else [])}:
            if front.ids.in_use(candidate):
                raise APIError(400, f"request id {candidate!r} is already in flight; use a new id per call",
                               param="request_id")
        return ids, group

    async def follow(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Merge the snapshots of several requests, recording latency and token metrics on the way."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    await queue.put((index, output))
            except BaseException as err:   # surfaced to the consumer below
                await queue.put((index, err))

        started = time.monotonic()
        last_seen: dict[tuple[int, int], tuple[float, int]] = {}
        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(streams)
        try:
            while remaining:
                index, item = await queue.get()
                if isinstance(item, WeightsChanged):     # a resumed request (server/resumable.py)
                    raise APIError(409, str(item), "server_overloaded", code="weights_changed")
                if isinstance(item, BaseException):
                    raise APIError(500, f"generation failed: {item}", type_="server_error")
                self._observe(index, item, started, last_seen)
                remaining -= item.finished
                yield index, item
        finally:
            for task in tasks:
                task.cancel()

    def _observe(self, index, output: RequestOutput, started: float, last_seen: dict) -> None:
        now = time.monotonic()
        for completion in output.outputs:
            key = (index, completion.index)
            before_time, before_count = last_seen.get(key, (None, 0))
            new = len(completion.token_ids) - before_count
            if new > 0:
                if before_time is None:
                    first = output.first_token_time
                    self.metrics.time_to_first_token.observe(
                        first - output.arrival_time if first is not None and output.arrival_time is not None
                        else now - started)
                    if output.finished and new > 1 and first is not None and output.finish_time is not None:
                        # Not streamed: the whole completion arrives at once; record its mean gap.
                        self.metrics.inter_token_latency.observe((output.finish_time - first) / (new - 1))
                else:
                    self.metrics.inter_token_latency.observe((now - before_time) / new)
                self.metrics.generation_tokens.inc(new)
                last_seen[key] = (now, len(completion.token_ids))
            if output.finished:
                self.metrics.request_success.labels(completion.finish_reason or "abort").inc()


async def collect(server: Server, streams: list[RequestStream], request: Request) -> list[RequestOutput]:
    """Run requests to completion; a client that goes away aborts them (and frees their blocks)."""
    final: list[RequestOutput | None] = [None] * len(streams)

    async def consume() -> None:
        async for index, output in server.follow(streams):
            if output.finished:
                final[index] = output

    task = asyncio.create_task(consume())
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            raise APIError(499, "client disconnected")
    task.result()
    return final


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(engine: Engine, config: ServerConfig, reference: Engine | None = None) -> FastAPI:
    server = Server(engine, config, reference)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        server.front.shutdown()
        if server.reference_front is not None:
            server.reference_front.shutdown()

    app = FastAPI(title="Gorgon", version=VERSION, lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    # Outermost first: the key, then room and body size, all before the body is parsed.
    app.add_middleware(EdgeLimits, config=EdgeConfig(engine.config.max_num_seqs + config.max_queued,
                                                     config.max_body_bytes, config.retry_after_s),
                       in_flight=server.in_flight)
    app.add_middleware(KeyCheck, api_key=config.api_key, admin_key=config.admin_key, open_admin=config.open_admin)
    _add_info_routes(app, server)
    _add_openai_routes(app, server)
    add_rl_routes(app, server, collect)
    add_control_routes(app, server)
    add_sglang_routes(app, server, collect)
    _document_errors_as_400(app)
    return app


def _document_errors_as_400(app: FastAPI) -> None:
    """Invalid bodies get a 400 in OpenAI's error shape (errors.handle_validation_error), not FastAPI's
    422: the schema says so."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
        return app.openapi_schema

    app.openapi = openapi


def _add_info_routes(app: FastAPI, server: Server) -> None:
    config, engine = server.config, server.engine

    @app.get("/health")
    async def health():
        return {}

    @app.get("/version", responses=AUTH_ERRORS)
    async def version():
        return {"version": VERSION}

    @app.get("/metrics", responses=AUTH_ERRORS)
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=AUTH_ERRORS)
    async def models():
        return {"object": "list", "data": [{"id": config.served_model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "gorgon",
                                            "max_model_len": engine.max_model_len,
                                            "model_type": engine.loaded.config.model_type,
                                            "backend": engine.loaded.backend,
                                            "quantization": engine.loaded.quantization}]}


def _add_openai_routes(app: FastAPI, server: Server) -> None:
    config, engine = server.config, server.engine

    @app.post("/v1/completions", responses=GENERATION_ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        try:
            prompts = body.prompts()
            params = body.completion_params()
            resumptions = resumable.resumptions(body, request, len(prompts))
        except ValueError as err:
            raise APIError(400, str(err)) from err
        streams = await server.submit(prompts, params, stream=body.stream, request_id=body.request_id,
                                      resumptions=resumptions)
        view = responses.CompletionView(engine.tokenizer, config.served_model_name, body, streams)
        return await _respond(server, streams, view, body, request)

    @app.post("/v1/chat/completions", responses=GENERATION_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        try:           # the chat template is CPU work: off the event loop
            prompt_ids, params = await asyncio.to_thread(_chat_prompt_and_params, engine, body)
            resumptions = resumable.resumptions(body, request, 1)
        except ValueError as err:
            raise APIError(400, str(err)) from err
        streams = await server.submit([prompt_ids], params, stream=body.stream, request_id=body.request_id,
                                      resumptions=resumptions)
        view = responses.ChatView(engine.tokenizer, config.served_model_name, body, streams)
        return await _respond(server, streams, view, body, request)


def _chat_prompt_and_params(engine: Engine, body: ChatCompletionRequest) -> tuple[list[int], SamplingParams]:
    """The chat's prompt token ids (its template applied, tools included) and its sampling parameters
    (max_tokens defaults to the rest of the context; tools constrain the output)."""
    prompt_ids = responses.chat_prompt_ids(engine.tokenizer, body.messages, body.tools)
    max_tokens = next((value for value in (body.max_completion_tokens, body.max_tokens) if value is not None),
                      engine.max_model_len - len(prompt_ids))
    if body.top_logprobs is not None and not body.logprobs:
        raise ValueError("top_logprobs requires logprobs: true")
    params = body.sampling_params(max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    if tool_schema := body.tool_constraint():
        params = replace(params, **tool_schema)
    return prompt_ids, params


async def _respond(server: Server, streams: list[RequestStream], view, body, request: Request):
    """An SSE stream of the view's chunks, or its final body once every request has finished. A stream
    asked for checkpoints (server/resumable.py) carries them as SSE comments; a resumed one takes up
    where its checkpoints left it."""
    if not body.stream:
        return view.final(await collect(server, streams, request))
    checkpoints = None
    if request.headers.get(resumable.HEADER) and not getattr(body, "use_beam_search", False):
        checkpoints = resumable.Checkpoints(view, streams)
    if body.resume is not None:
        try:
            view.restore(body.resume.view, resumable.sent_tokens(body.resume, body.n))
        except ValueError as err:
            for item in streams:
                server.front.abort(item.request_id)
            raise APIError(400, str(err), param="resume") from err
    return StreamingResponse(stream_events(server, streams, view, checkpoints), media_type="text/event-stream")


async def stream_events(server: Server, streams: list[RequestStream], view,
                        checkpoints: resumable.Checkpoints | None = None) -> AsyncIterator[str]:
    """SSE in OpenAI's chunk format, ending with `data: [DONE]`. While a request waits for a slot or
    its next token, an SSE comment every keepalive_s keeps clients and proxies from timing out.
    Leaving early aborts the requests."""
    outputs = server.follow(streams).__aiter__()
    next_output = asyncio.ensure_future(outputs.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({next_output}, timeout=server.config.keepalive_s)
            if not done:
                yield ": keep-alive\n\n"
                continue
            try:
                index, output = next_output.result()
            except StopAsyncIteration:
                break
            prompt_index = streams[index].prompt_index
            for chunk in view.deltas(prompt_index, output):
                yield sse(chunk)
            if checkpoints is not None:
                yield checkpoints.after(prompt_index, output)
            next_output = asyncio.ensure_future(outputs.__anext__())
        if view.include_usage:
            yield sse(view.usage_chunk())
        if checkpoints is not None:
            yield checkpoints.done()
    except APIError as err:
        yield sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
    finally:
        if not next_output.done():
            next_output.cancel()
            await asyncio.wait({next_output})     # the generator is running until its cancellation lands
        await outputs.aclose()                    # aborts the requests when the client left early
    yield sse("[DONE]")
