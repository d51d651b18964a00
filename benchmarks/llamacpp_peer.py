"""llama.cpp as a peer: the `xllamacpp` wheel (a prebuilt CPU build of llama.cpp with its server in-process:
`xllamacpp.Server(CommonParams)`, `handle_completions(body)`), driven in a process of its own.

xllamacpp pins nothing of ours but is kept out of Gorgon's environment like vLLM's CPU build: install it
into a virtual environment of its own (`python -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install
xllamacpp`) and name that interpreter with `--llamacpp-python` or `GORGON_LLAMACPP_PYTHON`. This file is
both sides: imported by the benchmark (LlamaCppProcess), and run by that interpreter as the server
(`python llamacpp_peer.py MODEL.gguf THREADS`), which reads one JSON call per line on stdin and answers
one JSON line on stdout, timing each call itself. It imports only the standard library and xllamacpp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MAX_PARALLEL = 16    # server slots: the benchmark's largest group (n = 16) decodes as one batch


def find_llamacpp(named: str | None) -> tuple[str | None, str]:
    """(interpreter that imports xllamacpp, its version), or (None, why the peer is skipped)."""
    python = named or os.environ.get("GORGON_LLAMACPP_PYTHON") or sys.executable
    if not Path(python).exists():
        return None, f"{python} does not exist"
    found = subprocess.run([python, "-c", "import importlib.metadata as m, sys; "
                            "sys.stdout.write(m.version('xllamacpp'))"], capture_output=True, text=True, timeout=120)
    if found.returncode == 0:
        return python, found.stdout
    return None, (f"xllamacpp is not importable by {python} (pip install xllamacpp into a virtual environment of "
                  "its own and name its python with --llamacpp-python)")


class LlamaCppProcess:
    """The parent's handle: the same calls as the benchmark's other sides, each timed in the child."""

    def __init__(self, python: str, gguf: str, threads: int, version: str):
        self.version = version
        self._process = subprocess.Popen([python, __file__, gguf, str(threads)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._read()     # the child answers once the model has loaded

    def _read(self):
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the llama.cpp peer exited")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"the llama.cpp peer failed: {answer['error']}")
        return answer

    def timed(self, method: str, *args) -> tuple[object, float]:
        self._process.stdin.write(json.dumps({"method": method, "args": args}) + "\n")
        self._process.stdin.flush()
        answer = self._read()
        return answer["result"], answer["seconds"]

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=60)


# ---- the child ------------------------------------------------------------------------------------

class LlamaCppServer:
    def __init__(self, gguf: str, threads: int):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = gguf
        params.n_parallel = MAX_PARALLEL
        params.n_ctx = MAX_PARALLEL * 2304       # every slot holds a 2,048-token prompt and its tokens
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.verbosity = -1
        self.server = xllamacpp.Server(params)

    def _complete(self, prompt: list[int], new_tokens: int, temperature: float, seed: int, **extra) -> dict:
        # cache_prompt off: each call computes its prompt, as each of Gorgon's does with fresh prompts
        return self.server.handle_completions({"prompt": prompt, "n_predict": new_tokens, "temperature": temperature,
                                               "seed": seed, "ignore_eos": True, "cache_prompt": False,
                                               "top_k": 0, "top_p": 1.0, "min_p": 0.0, **extra})

    def first_token(self, prompt: list[int]) -> None:
        self._complete(prompt, 1, 0.0, 0)

    def greedy(self, prompt: list[int], new_tokens: int) -> str:
        """The text of new_tokens greedy tokens (what the timed runs ask for)."""
        return self._complete(prompt, new_tokens, 0.0, 0)["choices"][0]["text"]

    def greedy_ids(self, prompt: list[int], new_tokens: int) -> list[int]:
        """The token ids of new_tokens greedy tokens, read from the answer's logprobs (text re-encoded is
        not always the same tokens), for the agreement check only: asking for logprobs costs time."""
        answer = self._complete(prompt, new_tokens, 0.0, 0, n_probs=1)
        return [entry["id"] for entry in answer["choices"][0]["logprobs"]["content"]]

    def sample(self, prompts: list[list[int]], new_tokens: int, n: int, seed: int) -> int:
        """n samples of every prompt, all in flight together (the server batches its slots)."""
        calls = [(prompt, seed * 1000 + i) for prompt in prompts for i in range(n)]
        with ThreadPoolExecutor(MAX_PARALLEL) as pool:
            answers = list(pool.map(lambda call: self._complete(call[0], new_tokens, 1.0, call[1]), calls))
        return sum(answer["usage"]["completion_tokens"] for answer in answers)


def _serve(gguf: str, threads: int) -> None:
    server = LlamaCppServer(gguf, threads)
    print(json.dumps({"ok": True}), flush=True)
    for line in sys.stdin:
        call = json.loads(line)
        try:
            start = time.perf_counter()
            result = getattr(server, call["method"])(*call["args"])
            answer = {"ok": True, "result": result, "seconds": time.perf_counter() - start}
        except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
            answer = {"ok": False, "error": f"{err.__class__.__name__}: {err}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
