"""A real uvicorn server on localhost in a thread, for the tests that reach the server as users do."""

import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import uvicorn

from decoding import Engine
from server.app import ServerConfig, build_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: str, engine_options: dict | None = None, reference_dir: str | None = None,
                 **config) -> SimpleNamespace:
    options = {"num_kv_blocks": 1024, "block_size": 4, "max_num_seqs": 64, **(engine_options or {})}
    engine = Engine(model=model_dir, show_progress=False, **options)
    reference = None if reference_dir is None else Engine(model=reference_dir, show_progress=False, num_kv_blocks=256,
                                                          block_size=4)
    app = build_app(engine, ServerConfig(served_model_name="tiny", **config), reference)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    return SimpleNamespace(url=url, engine=engine, server=server, thread=thread,
                           client=openai.OpenAI(base_url=f"{url}/v1", api_key=config.get("api_key") or "none"))


def stop_server(live) -> None:
    live.server.should_exit = True
    live.thread.join(timeout=30)


def wait_for_health(url: str, timeout: float = 120) -> None:
    """Until a server (a subprocess, say) answers /health."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer /health within {timeout:.0f} s")
