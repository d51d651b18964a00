"""The thread that owns the engine: it runs the async front's commands between two steps and steps while
there is work. Commands: add a request, abort one, pause, queue a weight update, or call a function.
Pause modes and weight-update policies are decoding/generation_control.py's."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable

from decoding.engine import Engine
from decoding.generation_control import GenerationControl
from decoding.sequence import Request


class EngineThread:
    def __init__(self, engine: Engine, streams: dict):
        self.engine = engine
        self._streams = streams                   # request id -> RequestStream, owned by the async front
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self.control = GenerationControl(engine, self._abort_started, self._abort_everything)
        self._wakeup = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="gorgon-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def send(self, kind: str, payload) -> None:
        self._commands.put((kind, payload))
        self._wakeup.set()

    async def call(self, function: Callable[[], object]) -> object:
        """Run `function` on the engine thread between two steps; its result."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.send("call", (function, loop, done))
        return await done

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    def abort(self, request_id: str) -> bool:
        """Abort one request (on the engine thread); its stream, if its caller still listens, gets the
        partial output."""
        output = self.engine.abort(request_id)
        stream = self._streams.get(request_id)
        if output is not None and stream is not None:   # aborted by the server, not by its client
            stream.put(output)
        return output is not None

    def _run(self) -> None:
        self.engine.use_threads()
        while not self._stopped:
            self._drain_commands()
            self.control.tick()
            if not self.engine.has_unfinished_requests() or self.control.holds_back():
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
                self.control.add_update(payload)
            elif kind == "pause":
                self.control.pause(*payload)
            elif kind == "call":
                self._call(*payload)
            else:
                self.abort(payload)

    @staticmethod
    def _call(function: Callable[[], object], loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        try:
            result = function()
        except Exception as err:
            loop.call_soon_threadsafe(done.set_exception, err)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    def _add(self, request: Request) -> None:
        try:
            self.engine.add(request)
        except ValueError as err:
            stream = self._streams.get(request.req_id)
            if stream is not None:
                stream.put(err)

    def _abort_started(self) -> None:
        for request_id in self.engine.weights.started_request_ids():
            self.abort(request_id)

    def _abort_everything(self) -> None:
        scheduler = self.engine.scheduler
        for request in [*scheduler.running, *scheduler.waiting]:
            self.abort(request.req_id)

    def _fail_all(self, err: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.put(RuntimeError(f"engine step failed: {err}"))
