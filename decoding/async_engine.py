"""An asyncio front for the engine, for the HTTP server: streaming results and abort.

The engine is single-threaded; it runs in a background thread that owns it. Coroutines hand it
requests and aborts through a command queue and receive per-step snapshots on an asyncio queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from decoding.engine import Engine, Prompt
from decoding.weights import WeightUpdateError, validate_update
from decoding.outputs import RequestOutput
from decoding.params import SamplingParams
from decoding.sequence import Request


@dataclass
class _PendingUpdate:
    tensors: dict                        # validated already (validate_update)
    version: int | None
    policy: str
    allow_version_rollback: bool
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future


class _WeightQueue:
    """Weight pushes waiting on the engine thread: each applies once no request started under the old
    weights is in flight (policy "wait" lets them finish, "abort" aborts them on arrival), and while any
    waits, admission of new requests is paused."""

    def __init__(self, engine: Engine, abort):
        self._engine = engine
        self._abort = abort                      # aborts a request and tells its stream
        self._updates: deque[_PendingUpdate] = deque()

    def add(self, update: _PendingUpdate) -> None:
        if update.policy == "abort":
            for request_id in self._engine.weights.started_request_ids():
                self._abort(request_id)
        self._updates.append(update)
        self._engine.pause_admission(True)

    def apply_ready(self) -> None:
        while self._updates and not self._engine.weights.has_started_requests():
            update = self._updates.popleft()
            try:
                version = self._engine.weights.apply_validated(update.tensors, update.version,
                                                               update.allow_version_rollback)
                update.loop.call_soon_threadsafe(update.done.set_result, version)
            except Exception as err:
                update.loop.call_soon_threadsafe(update.done.set_exception, err)
        self._engine.pause_admission(bool(self._updates))


class RequestStream:
    """The per-step snapshots of one request. Leaving the iteration early (a client that disconnects)
    aborts the request and frees its cache blocks."""

    def __init__(self, front: AsyncEngine, request: Request, loop: asyncio.AbstractEventLoop):
        self.request_id = request.req_id
        self.prompt_token_ids = request.prompt_token_ids
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
            self._front._streams.pop(self.request_id, None)
            if not finished:
                self._front.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._weights = _WeightQueue(engine, self._abort)
        self._wakeup = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="gorgon-engine", daemon=True)
        self._thread.start()

    async def submit(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None, stream: bool = True) -> RequestStream:
        """Queue a request and return its stream: a snapshot after every step that touched it, or with
        stream=False only the final one. Tokenizing and compiling a constraint run in a worker thread,
        never on the event loop; invalid requests raise ValueError here, before anything is queued."""
        request = await asyncio.to_thread(self.engine.make_request, prompt, params, request_id)
        return self.start(request, stream)

    def start(self, request: Request, stream: bool = True) -> RequestStream:
        """Queue a request made by Engine.make_request. Must be called from the running event loop."""
        request.stream = stream
        request_stream = RequestStream(self, request, asyncio.get_running_loop())
        self._streams[request.req_id] = request_stream
        self._submit(("add", request))
        return request_stream

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield a snapshot after every step that touched the request; the last one has finished=True."""
        async for output in await self.submit(prompt, params, request_id):
            yield output

    async def update_weights(self, tensors: dict, version: int | None = None, policy: str = "wait",
                             require_all: bool = False, allow_non_finite: bool = False,
                             allow_version_rollback: bool = False) -> int:
        """Swap weights between steps; returns the new weight version.

        policy "wait": requests already started finish under the old weights while new ones are held
        back, then the update applies. policy "abort": in-flight requests are aborted (finish_reason
        "abort") and the update applies at once. A bad payload (see ServedWeights.update) raises
        WeightUpdateError and changes nothing; it is checked in a worker thread, off the event loop.
        """
        if policy not in ("wait", "abort"):
            raise WeightUpdateError(f"policy must be 'wait' or 'abort', got {policy!r}")
        self.engine.weights.check_version(version, allow_version_rollback)
        await asyncio.to_thread(validate_update, self.engine.loaded.model, tensors, require_all, allow_non_finite)
        loop = asyncio.get_running_loop()
        update = _PendingUpdate(tensors, version, policy, allow_version_rollback, loop, loop.create_future())
        self._submit(("weights", update))
        return await update.done

    async def reset_prefix_cache(self) -> None:
        """Drop the prefix cache between two steps of the engine thread."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._submit(("call", (self.engine.reset_prefix_cache, loop, done)))
        await done

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every request with a stream; each stream then gets its final output (finish_reason
        "abort"). Call from the event loop that owns the streams."""
        for request_id in list(self._streams):
            self.abort(request_id)

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # ---- the engine thread -------------------------------------------------------------------
    def _submit(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _run(self) -> None:
        self.engine.use_threads()
        while not self._stopped:
            self._drain_commands()
            self._weights.apply_ready()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:   # never leave clients hanging on a dead engine
                self._fail_all(err)
                continue
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    stream.put(output)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(payload)
            elif kind == "weights":
                self._weights.add(payload)
            elif kind == "call":
                function, loop, done = payload
                function()
                loop.call_soon_threadsafe(done.set_result, None)
            else:
                self._abort(payload)

    def _abort(self, request_id: str) -> None:
        output = self.engine.abort(request_id)
        stream = self._streams.get(request_id)
        if output is not None and stream is not None:   # aborted by the server, not by its client
            stream.put(output)

    def _add(self, request: Request) -> None:
        try:
            self.engine.add(request)
        except ValueError as err:
            stream = self._streams.get(request.req_id)
            if stream is not None:
                stream.put(err)

    def _fail_all(self, err: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.put(RuntimeError(f"engine step failed: {err}"))
