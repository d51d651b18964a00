"""An asyncio front for the engine, for the HTTP server: streaming results and abort.

The engine is single-threaded; it runs in a background thread that owns it. Coroutines hand it
requests and aborts through a command queue and receive per-step snapshots on an asyncio queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from decoding.engine import Engine, Prompt
from decoding.outputs import RequestOutput
from decoding.params import SamplingParams
from decoding.sequence import Request


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="gorgon-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield a snapshot after every step that touched the request; the last one has finished=True.

        Invalid requests raise ValueError before anything is queued. Cancelling the consumer (a client
        that disconnects) aborts the request and frees its cache blocks.
        """
        request = self.engine.make_request(prompt, params, request_id)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request.req_id] = stream
        self._submit(("add", request))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request.req_id, None)
            if not finished:
                self._submit(("abort", request.req_id))

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # ---- the engine thread -------------------------------------------------------------------
    def _submit(self, command: tuple) -> None:
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
