"""An asyncio front for the engine, for the HTTP server: streaming results, abort, pause and resume.

The engine is single-threaded; it runs in a background thread that owns it (decoding/engine_thread.py).
Coroutines hand it requests, aborts and control calls through a command queue and receive per-step
snapshots on an asyncio queue. Pause modes and weight-update policies: decoding/generation_control.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from decoding.engine import Engine, Prompt
from decoding.engine_thread import EngineThread
from decoding.generation_control import PAUSE_MODES, UPDATE_POLICIES, PendingUpdate
from decoding.weights import NothingToRollBack, WeightUpdateError
from decoding.outputs import RequestOutput
from decoding.params import SamplingParams
from decoding.sequence import Request


class RequestStream:
    """The per-step snapshots of one request. Leaving the iteration early (a client that disconnects)
    aborts the request and frees its cache blocks."""

    def __init__(self, front: AsyncEngine, request: Request, loop: asyncio.AbstractEventLoop):
        self.request_id = request.req_id
        self.prompt_token_ids = request.prompt_token_ids
        self.prompt_index = 0                     # which of its call's prompts (server.app.Server.submit)
        self.seeds = [seq.seed for seq in request.seqs]     # each sample's, for a resumable stream
        self.group: str | None = None             # the caller's id for the call, when it has several
        self._front = front
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._front.ids.forget(self.request_id, self.group)
            if not finished:
                self._front.abort(self.request_id)


class RequestIds:
    """The requests that have a stream, by engine id, and a caller's id for a call with several prompts
    -> the engine ids of its requests. Event-loop side only."""

    def __init__(self):
        self.streams: dict[str, RequestStream] = {}
        self._groups: dict[str, list[str]] = {}

    def in_use(self, request_id: str) -> bool:
        return request_id in self.streams or request_id in self._groups

    def add(self, stream: RequestStream, group: str | None) -> None:
        if self.in_use(stream.request_id):
            raise ValueError(f"request id {stream.request_id!r} is already in use")
        self.streams[stream.request_id] = stream
        if group is not None and group != stream.request_id:
            self._groups.setdefault(group, []).append(stream.request_id)
            stream.group = group

    def forget(self, request_id: str, group: str | None) -> None:
        self.streams.pop(request_id, None)
        members = self._groups.get(group, [])
        if request_id in members:
            members.remove(request_id)
            if not members:
                del self._groups[group]

    def engine_ids(self, request_ids: list[str] | None) -> list[str]:
        """The engine ids the given ids name (a caller's id names all its requests); all when None."""
        if request_ids is None:
            return list(self.streams)
        return [engine_id for request_id in request_ids for engine_id in self._groups.get(request_id, [request_id])]


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.ids = RequestIds()
        self.thread = EngineThread(engine, self.ids.streams)

    async def submit(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None, stream: bool = True) -> RequestStream:
        """Queue a request and return its stream: a snapshot after every step that touched it, or with
        stream=False only the final one. Tokenizing and compiling a constraint run in a worker thread,
        never on the event loop; invalid requests raise ValueError here, before anything is queued."""
        request = await asyncio.to_thread(self.engine.make_request, prompt, params, request_id)
        return self.start(request, stream)

    def start(self, request: Request, stream: bool = True, group: str | None = None) -> RequestStream:
        """Queue a request made by Engine.make_request. Must be called from the running event loop.
        `group`: the caller's id for the call this request is part of, which abort_requests accepts too."""
        request.stream = stream
        request_stream = RequestStream(self, request, asyncio.get_running_loop())
        self.ids.add(request_stream, group)
        self.thread.send("add", request)
        return request_stream

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield a snapshot after every step that touched the request; the last one has finished=True."""
        async for output in await self.submit(prompt, params, request_id):
            yield output

    async def update_weights(self, tensors: dict, version: int | None = None, policy: str = "wait",
                             require_all: bool = False, allow_non_finite: bool = False,
                             allow_version_rollback: bool = False, recompute_kv: bool = False,
                             dry_run: bool = False, keep_previous: bool = False) -> int:
        """Swap weights between steps; returns the new weight version. While paused it applies at once;
        otherwise `policy` (wait, abort or keep; see generation_control) says what happens to the requests
        in flight. A bad payload (see ServedWeights.update) raises WeightUpdateError and changes nothing;
        it is checked in a worker thread, off the event loop. dry_run: only check it, and return the version
        it would set. keep_previous: save what it overwrites, for rollback_weights."""
        if policy not in UPDATE_POLICIES:
            raise WeightUpdateError(f"policy must be one of {', '.join(UPDATE_POLICIES)}; got {policy!r}",
                                    param="policy")
        weights = self.engine.weights
        changes_outputs = weights.changes_outputs(tensors)
        if changes_outputs:
            weights.check_version(version, allow_version_rollback)
        elif version is not None:
            raise WeightUpdateError("a push of draft weights alone keeps the served version; drop weight_version",
                                    param="weight_version")
        await asyncio.to_thread(weights.validate, tensors, require_all, allow_non_finite)
        if dry_run:                  # the version it would set (a draft alone keeps the served one)
            if not changes_outputs:
                return weights.version
            return weights.version + 1 if version is None else version
        loop = asyncio.get_running_loop()
        update = PendingUpdate(tensors, version, policy, allow_version_rollback, recompute_kv, changes_outputs, loop,
                               loop.create_future(), keep_previous)
        self.thread.send("weights", update)
        return await update.done

    async def rollback_weights(self, policy: str = "wait") -> int:
        """Undo the last update made with keep_previous: its overwritten values and version come back
        (applied like an update, under `policy`). Raises WeightUpdateError when there is none to undo."""
        weights = self.engine.weights
        previous = weights.previous
        if previous is None:
            raise NothingToRollBack("there is no update to roll back: only the last update made with keep_previous "
                                    "can be, until it is committed")
        version = previous.version if weights.changes_outputs(previous.tensors) else None
        restored = await self.update_weights(previous.tensors, version, policy, allow_version_rollback=True)
        if weights.previous is previous:
            weights.forget_previous()
        return restored

    async def pause(self, mode: str = "abort", recompute_on_resume: bool = False) -> None:
        """Pause generation (modes: generation_control); returns once the mode's work is done: aborted
        requests answered, started ones finished ("wait"), or the current step over ("keep").
        recompute_on_resume: kept requests recompute their cache when generation resumes."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {', '.join(PAUSE_MODES)}; got {mode!r}")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.thread.send("pause", (mode, recompute_on_resume, loop, done))
        await done

    async def resume(self, recompute_kv: bool = False) -> None:
        """Resume after a pause; recompute_kv: kept requests first recompute their cache under the
        current weights."""
        await self.thread.call(lambda: self.thread.control.resume(recompute_kv))

    @property
    def paused(self) -> bool:
        return self.thread.control.mode is not None

    async def abort_requests(self, request_ids: list[str] | None = None) -> list[str]:
        """Abort the named requests (engine ids, or a caller's id for several), or every request in
        flight when None; each caller gets its request's partial output with finish_reason "abort".
        Returns the engine ids aborted; unknown or finished ids are skipped."""
        targets = self.ids.engine_ids(request_ids)
        return await self.thread.call(lambda: [request_id for request_id in targets if self.thread.abort(request_id)])

    async def reset_prefix_cache(self) -> None:
        """Drop the prefix cache between two steps of the engine thread."""
        await self.thread.call(self.engine.reset_prefix_cache)

    async def call(self, function: Callable[[], object]) -> object:
        return await self.thread.call(function)

    def abort(self, request_id: str) -> None:
        self.thread.send("abort", request_id)

    def abort_all(self) -> None:
        """Abort every request with a stream; each stream then gets its final output (finish_reason
        "abort"). Call from the event loop that owns the streams."""
        for request_id in list(self.ids.streams):
            self.abort(request_id)

    def shutdown(self) -> None:
        self.thread.shutdown()
