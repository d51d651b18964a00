"""How the server stops: on SIGTERM (or SIGINT) it stops accepting, lets running requests finish for up to
`shutdown_timeout_s`, then aborts what is left, so every open stream still ends well formed (a final chunk
with finish_reason "abort", then `data: [DONE]`) and a request that was not streamed gets its answer so
far. The process exits within the timeout plus about a second, inside an orchestrator's grace period
when the timeout is set below it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import uvicorn

# Time allowed, after the abort, for the last chunks to reach their clients.
FLUSH_S = 1.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, abort_all: Callable[[], None], shutdown_timeout_s: float):
        config.timeout_graceful_shutdown = shutdown_timeout_s + FLUSH_S
        super().__init__(config)
        self.abort_all = abort_all
        self.shutdown_timeout_s = shutdown_timeout_s

    async def shutdown(self, sockets=None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.shutdown_timeout_s, self.abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()
