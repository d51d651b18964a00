"""The answers the front makes itself: a replica's answer passed on, and the retriable 503 of a call that a
replica could not finish (it died, or none is up)."""

from __future__ import annotations

import httpx
from fastapi.responses import JSONResponse, Response

RETRY_AFTER_S = 2         # about how long a replica's engine takes to restart and re-sync


def as_response(answer: httpx.Response) -> Response:
    return Response(answer.content, status_code=answer.status_code, media_type=answer.headers.get("content-type"))


def error_body(message: str, type_: str, code: str | None = None) -> dict:
    """An error in the OpenAI shape the replicas answer with (a response body, or a stream's event)."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def error(status: int, message: str, type_: str, code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code), status_code=status, headers=headers)


def unavailable(message: str) -> JSONResponse:
    """OpenAI's overloaded error (clients retry it), with Retry-After."""
    return error(503, message, "server_overloaded", "replica_unavailable", {"retry-after": str(RETRY_AFTER_S)})
