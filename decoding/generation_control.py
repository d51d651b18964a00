"""Pause, resume and weight updates, as the engine thread applies them between two steps.

The pause modes are vLLM's (`POST /pause?mode=`), which SGLang's `/pause_generation` modes map onto:
- "abort": every request in flight finishes now with finish_reason "abort" (its partial tokens go to
  its caller);
- "wait": requests already started run to the end; the pause call returns once none is left;
- "keep": nothing steps; started requests keep their tokens and cache and go on after resume.
While paused, new requests queue but none starts. A weight update may apply while paused: requests kept
in "keep" then continue under the new weights, every token recording the version it was sampled under,
and `recompute_kv` (on resume, or on a "keep" update) recomputes their cache under the new weights first.

A weight update that arrives unpaused follows its own policy: "wait" holds back new requests until the
started ones finish, then applies; "abort" aborts them and applies; "keep" applies at once and lets them
go on as above.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from decoding.engine import Engine

PAUSE_MODES = ("abort", "wait", "keep")
UPDATE_POLICIES = ("wait", "abort", "keep")


@dataclass
class PendingUpdate:
    tensors: dict                        # validated already (validate_update)
    version: int | None
    policy: str                          # one of UPDATE_POLICIES
    allow_version_rollback: bool
    recompute_kv: bool                   # policy "keep": recompute the kept requests' cache first
    changes_outputs: bool                # False for draft weights alone, which apply at once
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    keep_previous: bool = False          # save what it overwrites, for a rollback (ServedWeights.previous)


def _resolve(loop: asyncio.AbstractEventLoop, done: asyncio.Future, result=None, error: BaseException | None = None):
    def settle():
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(result)
    loop.call_soon_threadsafe(settle)


class GenerationControl:
    """The pause state and the weight updates waiting to apply; called only on the engine thread."""

    def __init__(self, engine: Engine, abort_started: Callable[[], None], abort_all: Callable[[], None]):
        self._engine = engine
        self._abort_started = abort_started      # aborts the started requests and tells their callers
        self._abort_all = abort_all              # aborts every request in flight, started or not
        self.mode: str | None = None             # None while generating, else a PAUSE_MODES entry
        self._updates: deque[PendingUpdate] = deque()
        self._drain_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._recompute_on_resume = False          # SGLang's "retract": kept requests recompute on resume

    @property
    def frozen(self) -> bool:
        return self.mode == "keep"

    def holds_back(self) -> bool:
        """Nothing may step now: frozen, or held back with no started request left to finish."""
        if self.frozen:
            return True
        return (self.mode is not None or bool(self._updates)) and not self._engine.weights.has_started_requests()

    def pause(self, mode: str, recompute_on_resume: bool, loop: asyncio.AbstractEventLoop,
              done: asyncio.Future) -> None:
        if mode == "abort":
            self._abort_all()
        self.mode = mode
        self._recompute_on_resume = recompute_on_resume
        if mode == "wait":
            self._drain_waiters.append((loop, done))    # answered by tick() once nothing started is left
        else:
            _resolve(loop, done)
        self._sync_admission()

    def resume(self, recompute_kv: bool) -> None:
        self.mode = None
        if recompute_kv or self._recompute_on_resume:
            self._engine.recompute_started()
        self._recompute_on_resume = False
        for loop, done in self._drain_waiters:           # a resume ends a pause still draining
            _resolve(loop, done)
        self._drain_waiters.clear()
        self._sync_admission()

    def add_update(self, update: PendingUpdate) -> None:
        if update.policy == "abort" and not self.frozen and update.changes_outputs:
            self._abort_started()
        self._updates.append(update)
        self._sync_admission()

    def tick(self) -> None:
        """Apply the updates that may apply now, in order; answer the pauses that have drained."""
        while self._updates:
            update = self._updates[0]
            # A draft's weights alone never change an output: they apply at once whatever the policy.
            keep = self.frozen or update.policy == "keep" or not update.changes_outputs
            if not keep and self._engine.weights.has_started_requests():
                break
            self._updates.popleft()
            self._sync_admission()
            try:
                version = self._engine.weights.apply_validated(update.tensors, update.version,
                                                               update.allow_version_rollback, keep_started=keep,
                                                               keep_previous=update.keep_previous)
                if keep and update.recompute_kv:
                    self._engine.recompute_started()
                _resolve(update.loop, update.done, version)
            except Exception as err:
                _resolve(update.loop, update.done, error=err)
        if self._drain_waiters and not self._engine.weights.has_started_requests():
            for loop, done in self._drain_waiters:
                _resolve(loop, done)
            self._drain_waiters.clear()

    def _sync_admission(self) -> None:
        self._engine.pause_admission(self.mode is not None or bool(self._updates))
