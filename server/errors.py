"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def handle_api_error(_: Request, err: APIError) -> JSONResponse:
    return error_response(err.status, err.message, err.type, err.param, err.code, err.headers)


async def handle_validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    """400 naming the first offending field: unknown fields are rejected, never ignored."""
    first = err.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or None
    if first.get("type") == "extra_forbidden":
        message = f"unknown field {field!r}: this server does not support it; remove it from the request"
    elif first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
    else:
        message = f"invalid value for {field!r}: {first.get('msg')}" if field else str(first.get("msg"))
    return error_response(400, message, param=field)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def _documented(status: int, meaning: str) -> dict:
    return {"model": ErrorBody, "description": meaning}


# The error responses each kind of route can give, for the OpenAPI schema.
AUTH_ERRORS = {401: _documented(401, "missing or wrong key (Authorization: Bearer <key>)")}
GENERATION_ERRORS = {
    400: _documented(400, "invalid input: the message names the field and what to fix"),
    **AUTH_ERRORS,
    404: _documented(404, "the model named is not the one this server serves"),
    413: _documented(413, "the request body is larger than --max-body-mb"),
    503: _documented(503, "every running slot and queue place is taken; retry after the Retry-After header's seconds"),
}
WEIGHT_PUSH_ERRORS = {       # a pushed payload is a whole checkpoint: no body limit
    400: _documented(400, "a malformed or mismatched checkpoint, non-finite values, or a lower weight_version"),
    401: _documented(401, "missing or wrong admin key"),
    403: _documented(403, "weight updates are disabled (start the server with --admin-key)"),
}
WEIGHT_ERRORS = {**WEIGHT_PUSH_ERRORS, 413: _documented(413, "the request body is larger than --max-body-mb")}
