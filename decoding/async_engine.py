"""An asyncio front for the engine, for the HTTP server: streaming results and abort.

The engine is single-threaded; it runs in a background thread that owns it. Coroutines hand it
requests and aborts through a command queue and receive per-step snapshots on an asyncio queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator

from decoding.engine import Engine, Prompt
from decoding.outputs import RequestOutput
from decoding.params import SamplingParams
from decoding.sequence import Request


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
        # Each counter is written by one thread only (submitting loop / engine thread), so no lock.
        self._num_submitted = 0
        self._num_drained = 0
        self._wakeup = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="gorgon-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: Prompt, params: SamplingParams | None = None,
               request_id: str | None = None) -> RequestStream:
        """Queue a request and return its stream. Invalid requests raise ValueError here, before
        anything is queued. Must be called from a running event loop."""
        request = self.engine.make_request(prompt, params, request_id)
        stream = RequestStream(self, request, asyncio.get_running_loop())
        self._streams[request.req_id] = stream
        self._submit(("add", request))
        return stream

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield a snapshot after every step that touched the request; the last one has finished=True."""
        async for output in self.submit(prompt, params, request_id):
            yield output

    @property
    def num_pending(self) -> int:
        """Requests submitted but not yet admitted to a running batch."""
        return self._num_submitted - self._num_drained + len(self.engine.scheduler.waiting)

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # ---- the engine thread -------------------------------------------------------------------
    def _submit(self, command: tuple) -> None:
        if command[0] == "add":
            self._num_submitted += 1
        self._commands.put(command)
        self._wakeup.set()

    def _run(self) -> None:
        while not self._stopped:
            self._drain_commands()
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
                self._num_drained += 1
                self._add(payload)
            else:
                self.engine.abort(payload)

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
