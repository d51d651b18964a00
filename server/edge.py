"""What the server decides about a request before reading its body: whether its key is right, whether
there is room for it, and whether its body is too large.

These decisions come first so that a full or flooded server answers at once: a 401 for a missing or
wrong key (compared in constant time), a 503 with Retry-After when
the generation requests in flight already fill every running slot and the queue (`max_queued`), a 413
when the body is larger than `max_body_bytes`; neither parses JSON, tokenizes or compiles a grammar.
A pure ASGI middleware (not Starlette's BaseHTTPMiddleware), so that a streamed response counts as in
flight until its last byte and the body is read at most once.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

# The routes that generate (and so hold a slot); only these are admitted or refused for capacity.
GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/rollouts", "/v1/score", "/generate"})
# Weight pushes carry whole checkpoints; they are guarded by the admin key, not by the body limit.
UNLIMITED_BODY_ROUTES = frozenset({"/v1/weights/update"})
# Guarded by the admin key like the weight routes (/v1/weights/*): what changes the generation of others.
ADMIN_ROUTES = frozenset({
    "/v1/reset_prefix_cache", "/reset_prefix_cache",                          # Gorgon's, vLLM's
    "/pause", "/resume", "/abort_requests",                                   # vLLM's RL routes
    "/abort_request", "/pause_generation", "/continue_generation", "/flush_cache",
    "/update_weights_from_disk",                                              # SGLang's
})
# A refused request's body is read and dropped up to this much before the answer.
DRAIN_BYTES = 64 * 2**20


@dataclass(frozen=True)
class EdgeConfig:
    max_in_flight: int           # generation requests admitted at once: running slots + max_queued
    max_body_bytes: int
    retry_after_s: int = 1


class InFlight:
    """Generation requests admitted and not yet answered in full (the last byte of a stream included)."""

    def __init__(self):
        self.count = 0


class EdgeLimits:
    def __init__(self, app, config: EdgeConfig, in_flight: InFlight):
        self.app = app
        self.config = config
        self.in_flight = in_flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"]
        generation = path in GENERATION_ROUTES
        if generation:
            if self.in_flight.count >= self.config.max_in_flight:
                return await _refuse(receive, send, 503, f"server is at capacity ({self.in_flight.count} requests "
                                     "in flight); retry later", "server_overloaded",
                                     {"retry-after": str(self.config.retry_after_s)})
            self.in_flight.count += 1        # counted before the first await: no burst slips past the check
        try:
            if path not in UNLIMITED_BODY_ROUTES:
                declared = _content_length(scope)
                body = None
                if declared is None or declared <= self.config.max_body_bytes:
                    body = await _read_body(receive, self.config.max_body_bytes)
                if body is None:
                    return await _refuse(receive, send, 413, self._too_large(), "invalid_request_error")
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            if generation:
                self.in_flight.count -= 1

    def _too_large(self) -> str:
        return (f"the request body is larger than this server accepts ({self.config.max_body_bytes} bytes; "
                "see --max-body-mb)")


def _content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None once it grows past `limit` (a chunked upload declares no length)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _drain(receive, limit: int) -> None:
    size = 0
    while size <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        size += len(message.get("body", b""))


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()                   # after the body: disconnect notices pass through
    return replayed


async def _refuse(receive, send, status: int, message: str, type_: str, headers: dict[str, str] | None = None,
                  code: str | None = None) -> None:
    """Answer without parsing anything. What the client is still sending is read and dropped first (up to
    DRAIN_BYTES: I/O, not work), so that it gets to read the answer instead of failing on its write; the
    connection closes after it."""
    await _drain(receive, DRAIN_BYTES)
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
    raw_headers += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class KeyCheck:
    """The API key on every route but /health; the admin key (which also enables them) on the admin
    routes: weight updates, pause and resume, aborts by id, cache resets. open_admin enables the admin
    routes with no key at all (a trainer on a private network that sends none)."""

    def __init__(self, app, api_key: str | None, admin_key: str | None, open_admin: bool = False):
        self.app = app
        self.api_key = api_key
        self.admin_key = admin_key
        self.open_admin = open_admin

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        token = bearer_token(_header(scope, b"authorization"))
        admin = path in ADMIN_ROUTES or (scope["method"] == "POST" and path.startswith("/v1/weights/"))
        if admin and self.open_admin:
            pass
        elif admin:
            if not self.admin_key:
                return await _refuse(receive, send, 403, "admin routes (weight updates, pause, abort, cache resets) "
                                     "are disabled; start the server with --admin-key (or --open-admin on a "
                                     "private network)", "permission_error")
            if not key_matches(token, self.admin_key):
                return await _refuse(receive, send, 401, "missing or wrong admin key: send 'Authorization: Bearer <admin key>'",
                                     "authentication_error", code="invalid_api_key")
        elif self.api_key and path != "/health" and not key_matches(token, self.api_key):
            return await _refuse(receive, send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 "authentication_error", code="invalid_api_key")
        return await self.app(scope, receive, send)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case, RFC 7235)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_matches(token: str | None, key: str) -> bool:
    """Constant-time comparison, so response timing does not reveal how much of a guess was right."""
    return token is not None and hmac.compare_digest(token.encode(), key.encode())
