"""One engine replica: a whole Gorgon server (every route of the single server) in a Ray actor's process,
on a free port of its node. Ray restarts the actor when its process dies; the front then asks it for its
new address."""

from __future__ import annotations

import os
import socket
import threading
import time


class ReplicaServer:
    """The actor's body (wrapped with `ray.remote` by `replica_actor`)."""

    def __init__(self, model: str | None, engine_options: dict, server_options: dict, threads: int):
        # The thread count is read by torch and the kernels when the engine starts: set it first.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import uvicorn

        from decoding import Engine
        from server.app import ServerConfig, build_app

        self.engine = Engine(model=model, threads=threads, show_progress=False, **engine_options)
        app = build_app(self.engine, ServerConfig(**server_options))
        host = _node_address()
        self.port = _free_port(host)
        self.address = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        threading.Thread(target=self._server.run, name="gorgon-replica-http", daemon=True).start()
        deadline = time.monotonic() + 120
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the replica's HTTP server did not start within 120 s")
            time.sleep(0.05)

    def url(self) -> str:
        return self.address

    def pid(self) -> int:
        return os.getpid()


def replica_actor(threads: int, num_gpus: float = 0.0):
    """The Ray actor class for replicas of `threads` CPUs each, restarted without limit when they die."""
    import ray

    return ray.remote(num_cpus=threads, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0)(ReplicaServer)


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
