"""The one place that maps errors to HTTP status codes and the one JSON error shape.

Every error response is ``{"error": {"type", "message", "field"}}``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from clipsearch.core.errors import (
    ClientGone,
    ClipsearchError,
    Forbidden,
    IndexLoadError,
    IndexRefused,
    InferenceError,
    InvalidInput,
    NotFound,
    NotReady,
    OutOfRange,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
)

log = logging.getLogger(__name__)

# Most specific first: the first matching class wins.
STATUS_BY_ERROR: tuple[tuple[type[ClipsearchError], int], ...] = (
    (PayloadTooLarge, 413),
    (OutOfRange, 422),
    (InvalidInput, 400),
    (Overloaded, 429),
    (RequestTimeout, 504),
    (ClientGone, 499),
    (NotReady, 503),
    (IndexLoadError, 503),
    (IndexRefused, 409),
    (NotFound, 404),
    (Unauthorized, 401),
    (Forbidden, 403),
    (InferenceError, 500),
)


OPENAI_PREFIX = "/v1/"  # routes that answer in OpenAI's shapes, errors included


MAX_MESSAGE = 1000  # characters of an error message; past it, what a client sent is not echoed back whole
MAX_FIELD = 200


def _capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def error_response(status: int, type_: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None, *, openai: bool = False) -> Response:
    """The one error body: `{"error": {"type", "message", "field"}}`, or on the OpenAI-compatible
    routes OpenAI's `{"error": {"message", "type", "param", "code"}}`. Messages and field names
    are capped: they may quote what the client sent."""
    message = _capped(message, MAX_MESSAGE)
    field = None if field is None else _capped(field, MAX_FIELD)
    if openai:
        body: dict[str, Any] = {"error": {"message": message, "type": type_, "param": field, "code": type_}}
    else:
        body = {"error": {"type": type_, "message": message, "field": field}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def status_for(exc: ClipsearchError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


async def _domain_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ClipsearchError):  # registered for this class only
        return await _internal_error(request, exc)
    status = status_for(exc)
    if isinstance(exc, ClientGone):  # nobody reads this answer; counted as 499 in the metrics
        log.info("%s %s: %s", request.method, request.url.path, exc.message)
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, Overloaded) else None
    if status == 500:
        # Internal: the client gets the kind of failure, never its internals. (503/504
        # messages are ours: not ready, shutting down, timed out.)
        return error_response(status, exc.code, "internal error while encoding; see the service log",
                              openai=_openai(request))
    return error_response(status, exc.code, exc.message, exc.field, headers, openai=_openai(request))


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


async def _validation_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestValidationError):
        return await _internal_error(request, exc)
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":  # the body is not JSON at all
        reason = errors[0].get("ctx", {}).get("error", "")
        return error_response(422, "validation_error", f"body: not valid JSON: {reason}", "body",
                              openai=_openai(request))
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = _field(tuple(first.get("loc", ())))
    message = "; ".join(
        f"{_field(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5]
    )
    return error_response(422, "validation_error", message, field or None, openai=_openai(request))


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, StarletteHTTPException):
        return await _internal_error(request, exc)
    names = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 401: "unauthorized",
             403: "forbidden"}
    return error_response(exc.status_code, names.get(exc.status_code, "http_error"), str(exc.detail),
                          headers=getattr(exc, "headers", None), openai=_openai(request))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error; see the service log",
                          openai=_openai(request))


def _openai(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PREFIX)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClipsearchError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
