"""Generation control for RL trainers, in vLLM's shape: pause and resume around weight updates, abort by
request id, and the server's load (SGLang's load routes answer from the same figures).

vLLM's routes: `POST /pause?mode=abort|wait|keep`, `POST /resume`, `GET /is_paused`,
`POST /abort_requests {"request_ids": [...]}` (none or empty: every request). What each pause mode
does is decoding/generation_control.py's to say.
"""

from __future__ import annotations

from fastapi import FastAPI

from decoding.generation_control import PAUSE_MODES
from server.errors import AUTH_ERRORS, APIError
from server.protocol import AbortRequestsRequest


async def load_figures(server) -> dict:
    """Running and waiting requests and the KV cache's use, read between two engine steps."""
    engine = server.engine

    def read() -> dict:
        stats, usage = engine.stats(), engine.cache_usage()
        return {"num_running_reqs": stats.num_running, "num_waiting_reqs": stats.num_waiting,
                "num_used_tokens": usage.num_used_blocks * usage.block_size,
                "num_total_tokens": usage.num_blocks * usage.block_size,
                "token_usage": round(usage.usage, 4),
                "is_paused": server.front.paused, "weight_version": engine.weights.version}

    return await server.front.call(read)


def add_control_routes(app: FastAPI, server) -> None:
    front = server.front

    @app.post("/pause", responses=AUTH_ERRORS)
    async def pause(mode: str = "abort", clear_cache: bool = True):
        """Pause generation. clear_cache (vLLM's): drop the prefix cache once paused (not in keep mode,
        whose requests go on from what they hold)."""
        if mode not in PAUSE_MODES:
            raise APIError(400, f"mode must be one of {', '.join(PAUSE_MODES)}; got {mode!r}", param="mode")
        await front.pause(mode)
        if clear_cache and mode != "keep":
            await front.reset_prefix_cache()
        return {"status": "paused"}

    @app.post("/resume", responses=AUTH_ERRORS)
    async def resume(recompute_kv: bool = False):
        """Resume; recompute_kv: requests kept across a weight update first recompute their cache under
        the new weights (otherwise they go on attending to keys and values of the old ones)."""
        await front.resume(recompute_kv)
        return {"status": "resumed"}

    @app.get("/is_paused", responses=AUTH_ERRORS)
    async def is_paused():
        return {"is_paused": front.paused}

    @app.post("/abort_requests", responses=AUTH_ERRORS)
    async def abort_requests(body: AbortRequestsRequest):
        """Abort the named requests (a caller's request_id covers all its prompts), or all of them; each
        caller gets its partial output with finish_reason "abort"."""
        aborted = await front.abort_requests(body.request_ids or None)
        return {"status": "aborted", "aborted": len(aborted), "request_ids": aborted}

    @app.get("/v1/load", responses=AUTH_ERRORS)
    async def load():
        return await load_figures(server)

    @app.get("/load", responses=AUTH_ERRORS)
    async def vllm_load():
        """vLLM's: the generation requests the server holds (admitted, not yet answered in full)."""
        return {"server_load": server.in_flight.count}
