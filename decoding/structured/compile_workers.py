"""Grammar compiles in worker processes, each under a CPU-time and a memory budget that really stop it.

Turning a schema into a regex and the regex into a token index (outlines-core), or a schema into a
grammar whose token masks are precomputed (xgrammar), is CPU-bound native code that cannot be
interrupted from Python: a thread that runs too long keeps running, and a pathological schema can grow
the process by gigabytes. So each compile runs in a worker process (one backend and its view of the
vocabulary), which the kernel stops when it has used its CPU budget (RLIMIT_CPU: SIGXCPU) or
its address space (RLIMIT_AS). The budget is CPU time, not wall time, so whether a constraint compiles
does not depend on how busy the machine is. A stopped worker is replaced; the others go on, so a slow
constraint holds up nobody else's compile (up to `max_workers` run at once).

Run as `python -m decoding.structured.compile_workers FD MEMORY_BYTES` by CompileWorkers only.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from decoding.structured.constraint import Constraint, GrammarError, constraint_regex

# Seconds a worker may take in wall time beyond its CPU budget (a loaded machine, page faults) before
# it is killed anyway: the CPU budget is the real limit, this only keeps a stuck worker from hanging.
WALL_SLACK_S = 30.0
STARTUP_TIMEOUT_S = 60.0


class CompileWorkers:
    """Hands each compile to an idle worker process, starting one when none is idle (up to max_workers;
    beyond that a compile waits for a worker)."""

    def __init__(self, setup: WorkerSetup, cpu_budget_s: float, memory_gb: float, max_workers: int):
        if cpu_budget_s <= 0 or memory_gb <= 0 or max_workers < 1:
            raise ValueError("grammar compiles need a positive CPU budget, memory budget and worker count")
        self.cpu_budget_s = cpu_budget_s
        self.memory_bytes = int(memory_gb * 2**30)
        self.max_workers = max_workers
        self._setup = setup
        self._idle: list[_Worker] = []
        self._num_workers = 0
        self._available = threading.Condition()

    def compile(self, constraint: Constraint):
        """What the backend compiled `constraint` into (picklable); GrammarError saying what to fix when
        it cannot be compiled, is refused, or runs past its budget."""
        worker = self._acquire()
        try:
            return worker.compile(constraint, self.cpu_budget_s, self.memory_bytes)
        finally:
            self._release(worker)

    def close(self) -> None:
        with self._available:
            for worker in self._idle:
                worker.stop()
            self._idle.clear()

    def _acquire(self) -> _Worker:
        with self._available:
            while not self._idle and self._num_workers >= self.max_workers:
                self._available.wait()
            if self._idle:
                return self._idle.pop()
            self._num_workers += 1
        try:
            return _Worker(self._setup, self.memory_bytes)
        except BaseException:
            with self._available:
                self._num_workers -= 1
                self._available.notify()
            raise

    def _release(self, worker: _Worker) -> None:
        """Back to the idle list, unless it was stopped (a refusal leaves a worker usable)."""
        with self._available:
            if worker.alive:
                self._idle.append(worker)
            else:
                worker.stop()
                self._num_workers -= 1
            self._available.notify()


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs before its first compile: the backend, and the vocabulary in that backend's
    form (outlines-core: its Vocabulary; xgrammar: its TokenizerInfo as JSON)."""

    backend: str
    vocabulary: object


class _Worker:
    def __init__(self, setup: WorkerSetup, memory_bytes: int):
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._stderr = tempfile.TemporaryFile()       # read only when the worker fails; a pipe could fill
        self._process = subprocess.Popen(
            [sys.executable, "-m", "decoding.structured.compile_workers", str(theirs.fileno()), str(memory_bytes)],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self._stderr)
        theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send(setup)
            started = self._conn.poll(STARTUP_TIMEOUT_S) and self._conn.recv() == "ready"
        except (EOFError, OSError):
            started = False
        if not started:
            self.stop()
            raise RuntimeError(f"a grammar compile worker did not start: {self._error_output()}")

    @property
    def alive(self) -> bool:
        return not self._conn.closed and self._process.poll() is None

    def compile(self, constraint: Constraint, cpu_budget_s: float, memory_bytes: int):
        try:
            self._conn.send((constraint, cpu_budget_s))
            ready = self._conn.poll(cpu_budget_s + WALL_SLACK_S)
            reply = self._conn.recv() if ready else None
        except (EOFError, OSError):
            reply = None
        if reply is None:
            raise self._stopped_error(cpu_budget_s, memory_bytes)
        kind, value = reply
        if kind == "refused":
            raise GrammarError(value)
        return value

    def _stopped_error(self, cpu_budget_s: float, memory_bytes: int) -> Exception:
        self.stop()
        code = self._process.returncode
        if code == -signal.SIGXCPU:
            return GrammarError(f"the constraint needed more than {cpu_budget_s:g} s of CPU time to compile; "
                                "simplify the schema or regex")
        if code in (-signal.SIGABRT, -signal.SIGSEGV, -signal.SIGKILL, 1):
            return GrammarError(f"the constraint needed more than {memory_bytes / 2**30:g} GB of memory to compile; "
                                "simplify the schema or regex")
        if code is None or code == -signal.SIGTERM:
            return GrammarError(f"the constraint did not compile within {cpu_budget_s + WALL_SLACK_S:g} s; "
                                "simplify the schema or regex")
        return RuntimeError(f"a grammar compile worker failed (exit code {code}): {self._error_output()}")

    def _error_output(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-2000:].decode(errors="replace")

    def stop(self) -> None:
        self._conn.close()
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()


# ---- the worker process --------------------------------------------------------------------------
def _cpu_seconds() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _compiler(setup: WorkerSetup) -> Callable[[Constraint], object]:
    """The backend's compile, as the worker runs it: a constraint in, something picklable out."""
    if setup.backend == "outlines-core":
        from outlines_core import Index
        return lambda constraint: Index(constraint_regex(constraint), setup.vocabulary)
    if setup.backend == "xgrammar":
        from decoding.structured.xgrammar_backend import worker_compiler
        return worker_compiler(setup.vocabulary)
    raise ValueError(f"no compile worker for the {setup.backend!r} backend")


def _serve(fd: int, memory_bytes: int) -> None:
    import resource

    conn = Connection(fd)
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))
    compile_constraint = _compiler(conn.recv())
    conn.send("ready")
    while True:
        try:
            constraint, cpu_budget_s = conn.recv()
        except EOFError:              # the engine went away
            return
        # RLIMIT_CPU counts whole seconds of this process's CPU time: the kernel sends SIGXCPU, whose
        # default action ends the process, wherever the compile is (native code included).
        limit = math.ceil(_cpu_seconds() + cpu_budget_s)
        resource.setrlimit(resource.RLIMIT_CPU, (limit if cpu_hard == resource.RLIM_INFINITY else min(limit, cpu_hard),
                                                 cpu_hard))
        try:
            reply = ("ok", compile_constraint(constraint))
        except GrammarError as err:
            reply = ("refused", str(err))
        except MemoryError:
            reply = ("refused", f"the constraint needed more than {memory_bytes / 2**30:g} GB of memory to compile; "
                                "simplify the schema or regex")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - outlines-core's Rust panics derive from BaseException,
                                      # and xgrammar raises RuntimeError for a schema it cannot convert
            reply = ("refused", f"the constraint cannot be compiled for this tokenizer: {err}")
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_hard, cpu_hard))
        conn.send(reply)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
