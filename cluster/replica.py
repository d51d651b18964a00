"""One engine replica: a Ray actor that runs `gorgon serve` (every route and option of the single server)
as its child process on a free port of its node, and starts it again when it dies.

The actor is the replica's supervisor, not its engine: a crashed engine (killed, out of memory) is
restarted here in seconds, without Ray rescheduling anything, and the front sees a new process id and
re-syncs the new engine (weights, pause state) before routing to it. If the actor's own process dies, Ray
restarts the actor (max_restarts=-1), which starts a new engine the same way. The child is tied to the
actor (PR_SET_PDEATHSIG on Linux), so an engine never outlives its supervisor.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

READY_TIMEOUT_S = 600.0        # loading a large model from a cold disk can take minutes
RESTART_BACKOFF_S = 2.0


class ReplicaProcess:
    """The actor's body (wrapped with `ray.remote` by `replica_actor`). `serve_args`: the arguments of
    `gorgon serve` for this replica, without --host and --port: it listens on `host` (default: its node's
    address) at a free port."""

    def __init__(self, index: int, serve_args: list[str], threads: int, host: str | None = None):
        self.index = index
        self.serve_args = list(serve_args)
        self.threads = threads
        self.host = host or _node_address()
        self.log_path = os.path.join(tempfile.gettempdir(), f"gorgon-replica-{index}-{os.getpid()}.log")
        self.address: str | None = None
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self._ready = threading.Event()
        self._stopping = False
        self.start_error: str | None = None
        try:
            self._start()
        except RuntimeError as err:          # reported by endpoint(), as the replica's own error
            self.start_error = str(err)
            return
        threading.Thread(target=self._supervise, name="gorgon-replica-supervisor", daemon=True).start()

    def endpoint(self) -> tuple[str, int]:
        """(address, engine process id) once the engine answers; blocks while it (re)starts. Raises
        RuntimeError with the engine's error if it could not start the first time."""
        if self.start_error is not None:
            raise RuntimeError(self.start_error)
        while not self._ready.wait(timeout=1.0):
            if self._stopping:
                raise RuntimeError(f"replica {self.index} is stopping")
        return self.address, self.process.pid

    def state(self) -> tuple[str | None, int | None]:
        """(address, engine process id) now, or (None, None) while the engine is (re)starting."""
        if not self._ready.is_set():
            return None, None
        return self.address, self.process.pid

    def log_file(self) -> str:
        return self.log_path

    def stop(self) -> None:
        """Stop the engine gracefully (SIGTERM: it drains, then exits) and do not start it again."""
        self._stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def _start(self) -> None:
        self._ready.clear()
        port = _free_port(self.host)
        command = [sys.executable, "-m", "server.cli", "serve", *self.serve_args, "--host", self.host,
                   "--port", str(port), "--threads", str(self.threads)]
        # The thread count must be in the environment before torch starts in the child.
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=_die_with_parent)
        self.starts += 1
        self.address = f"http://{self.host}:{port}"
        self._wait_until_ready()
        self._ready.set()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica {self.index} exited with code {self.process.returncode} while starting:"
                                   f"\n{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(self.address + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.process.kill()
        raise RuntimeError(f"replica {self.index} did not answer within {READY_TIMEOUT_S:.0f} s:\n"
                           f"{_tail(self.log_path)}")

    def _supervise(self) -> None:
        while not self._stopping:
            self.process.wait()
            if self._stopping:
                return
            self._ready.clear()
            try:
                self._start()
            except RuntimeError as err:          # e.g. the node is out of memory: try again a bit later
                print(f"gorgon: {err}", file=sys.stderr, flush=True)
                time.sleep(RESTART_BACKOFF_S)


def replica_actor(threads: int, num_gpus: float = 0.0):
    """The Ray actor class for replicas of `threads` CPUs (and `num_gpus` GPUs) each, restarted without
    limit when their process dies. Several calls run at once: `endpoint` may block while `state` answers."""
    import ray

    return ray.remote(num_cpus=threads, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0,
                      max_concurrency=4)(ReplicaProcess)


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGKILL when the supervising actor's process dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)     # 1 = PR_SET_PDEATHSIG


def _tail(path: str, lines: int = 20) -> str:
    """The engine's own error if it printed one (`gorgon: error: ...`), else the end of its log."""
    try:
        with open(path, errors="replace") as log:
            text = log.read()
    except OSError:
        return "(no log)"
    errors = [line[line.index("gorgon: error:"):] for line in text.splitlines() if "gorgon: error:" in line]
    return "\n".join(errors) if errors else "\n".join(text.splitlines()[-lines:]) + f"\n(log: {path})"


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
