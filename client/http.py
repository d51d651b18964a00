"""`GorgonClient`: rollouts, scoring and weight pushes over HTTP."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping

import httpx
import torch

from wire.safetensors import safetensors_header
from wire.shared_weights import SharedWeightsFile, shared_memory_available

CHUNK_BYTES = 1 << 20
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class GorgonError(RuntimeError):
    """An error answered by the server, with its message, HTTP status and the parameter at fault (if named)."""

    def __init__(self, message: str, status: int | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


class GorgonClient:
    def __init__(self, base_url: str, api_key: str | None = None, admin_key: str | None = None,
                 timeout: float = 600.0):
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self._api_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._admin_headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._shared_file = SharedWeightsFile()      # weight pushes to a server on this machine
        self._shared_refused = False
        weakref.finalize(self, self._shared_file.close)

    def rollouts(self, prompts: list, n: int = 1, **sampling) -> dict:
        """`n` completions per prompt (strings, token-id lists or chat message lists), grouped by prompt:
        prompt_ids, completion_ids, logprobs, finish_reasons, texts, weight_versions, weight_version."""
        return self._post("/v1/rollouts", json={"prompts": prompts, "n": n, **sampling})

    def score(self, sequences: list[list[int]], prompt_lens: list[int], logprobs_mode: str = "raw",
              temperature: float = 1.0, reference: bool = False) -> list[list[float]]:
        """Teacher-forced logprobs of each sequence's tokens after its prompt (under the server's frozen
        reference model with reference=True)."""
        return self.score_top(sequences, prompt_lens, 0, logprobs_mode, temperature, reference)["logprobs"]

    def score_top(self, sequences: list[list[int]], prompt_lens: list[int], top_logprobs: int,
                  logprobs_mode: str = "raw", temperature: float = 1.0, reference: bool = False) -> dict:
        """As score, with the `top_logprobs` most likely tokens per position: logprobs, top_logprobs,
        top_logprob_token_ids."""
        body = {"sequences": sequences, "prompt_lens": prompt_lens, "logprobs_mode": logprobs_mode,
                "temperature": temperature, "top_logprobs": top_logprobs or None, "reference": reference}
        return self._post("/v1/score", json=body)

    def pause(self, mode: str = "keep") -> None:
        """Pause generation: abort, wait (for started requests) or keep (freeze them until resume)."""
        self._post("/pause", params={"mode": mode}, admin=True)

    def resume(self, recompute_kv: bool = False) -> None:
        """Resume; recompute_kv: requests kept across a weight update first recompute their cache."""
        self._post("/resume", params={"recompute_kv": recompute_kv}, admin=True)

    def abort(self, request_ids: list[str] | None = None) -> list[str]:
        """Abort requests by their callers' ids (all when None); the ids aborted."""
        return self._post("/abort_requests", json={"request_ids": request_ids}, admin=True)["request_ids"]

    def load(self) -> dict:
        """Running and waiting requests, KV cache use, pause state and weight version."""
        return self._get("/v1/load")

    def weight_version(self) -> int:
        return self._get("/v1/weights/version")["weight_version"]

    def load_weights(self, path: str, weight_version: int | None = None, policy: str = "wait") -> int:
        """Have the server load an HF folder or .safetensors file from its own disk."""
        body = {"path": path, "weight_version": weight_version, "policy": policy}
        return self._post("/v1/weights/load", json=body, admin=True)["weight_version"]

    def push_weights(self, weights: torch.nn.Module | Mapping[str, torch.Tensor], weight_version: int | None = None,
                     policy: str = "wait", allow_version_rollback: bool = False, recompute_kv: bool = False,
                     transport: str = "auto") -> int:
        """Send all (or some) named parameters; returns the new weight version. policy: what requests in
        flight do (wait, abort, keep; ignored while the server is paused). transport: "http" (one
        safetensors body), "shared_memory" (a file in /dev/shm the server reads in place: the trainer on
        the server's machine), or "auto": shared memory to a server on loopback that takes it, else HTTP."""
        if transport not in ("auto", "http", "shared_memory"):
            raise ValueError(f"transport must be 'auto', 'http' or 'shared_memory', got {transport!r}")
        state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        params = {"policy": policy, "allow_version_rollback": allow_version_rollback, "recompute_kv": recompute_kv}
        if weight_version is not None:
            params["weight_version"] = weight_version
        tensors = _without_aliases(state)
        shared = transport == "shared_memory" or (transport == "auto" and self._shared_push_possible())
        if shared:
            try:
                path = self._shared_file.write(tensors)
                return self._post("/v1/weights/update_shared", json={"path": str(path), **params},
                                  admin=True)["weight_version"]
            except GorgonError as err:
                if transport == "shared_memory" or not _shared_file_refused(err):
                    raise
                self._shared_refused = True           # another machine, or a server without the route
        return self._push_body(tensors, params)

    def share_weights(self, model: torch.nn.Module) -> None:
        """Place the model's parameters in the shared-memory file pushes go through (each becomes a view of
        it, values unchanged): the optimizer then trains them there, and a push of the model to a server on
        this machine copies nothing on the trainer's side."""
        state = model.state_dict(keep_vars=True)          # the parameters themselves, in push order
        self._shared_file.adopt({name: state[name] for name in _without_aliases(state)})

    def _shared_push_possible(self) -> bool:
        return (not self._shared_refused and self._http.base_url.host in LOOPBACK_HOSTS
                and shared_memory_available())

    def _push_body(self, tensors: dict[str, torch.Tensor], params: dict) -> int:
        header, tensors = safetensors_header(tensors)
        size = len(header) + sum(t.numel() * t.element_size() for t in tensors)
        # Streamed in 1 MiB pieces straight from the tensors' memory: httpx sends one large bytes body
        # ~5x slower than this over loopback, and no serialized copy of the whole model is made.
        return self._post("/v1/weights/update", content=_chunks(header, tensors), params=params, admin=True,
                          headers={"Content-Type": "application/octet-stream",
                                   "Content-Length": str(size)})["weight_version"]

    def close(self) -> None:
        self._shared_file.close()
        self._http.close()

    # ---- plumbing ----------------------------------------------------------------------------
    def _get(self, path: str) -> dict:
        return self._check(self._http.get(path, headers=self._api_headers))

    def _post(self, path: str, admin: bool = False, headers: dict | None = None, **kwargs) -> dict:
        merged = {**(self._admin_headers if admin else self._api_headers), **(headers or {})}
        return self._check(self._http.post(path, headers=merged, **kwargs))

    @staticmethod
    def _check(response: httpx.Response) -> dict:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message, param = error["message"], error.get("param")
            except (ValueError, KeyError, TypeError, AttributeError):
                message, param = response.text[:500], None
            raise GorgonError(f"HTTP {response.status_code}: {message}", response.status_code, param)
        return response.json()


def _shared_file_refused(err: GorgonError) -> bool:
    """The server could not take a shared-memory push (no such route, or it cannot reach the file: another
    machine): not an error in the weights, so the body goes over HTTP instead."""
    return err.status == 404 or (err.status == 400 and err.param == "path")


def _without_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies, one per storage: tied parameters (an embedding shared with the head) appear once."""
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


def _chunks(header: bytes, tensors: list[torch.Tensor]) -> Iterator[bytes]:
    yield header
    for tensor in tensors:
        raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        for start in range(0, len(raw), CHUNK_BYTES):
            yield raw[start : start + CHUNK_BYTES]
