"""The one place that maps errors to HTTP status codes and to the JSON error shapes.

Native routes answer ``{"error": {"type", "message", "field"}}``. The routes that speak
another service's API answer in that service's shape (`SHAPES`): OpenAI's and infinity's
``{"error": {"message", "type", "param", "code"}}``, Weaviate's and clip-retrieval's
``{"error": "<message>"}``, immich's (FastAPI's) ``{"detail": "<message>"}``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

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


ErrorShape = Literal["native", "openai", "message", "detail"]
# Exact paths, then path prefixes, of the routes that answer errors in another API's shape.
SHAPES: dict[str, ErrorShape] = {
    "/embeddings": "openai", "/models": "openai", "/rerank": "openai",  # infinity
    "/vectorize": "message", "/meta": "message",  # Weaviate multi2vec-clip
    "/knn-service": "message", "/metadata": "message", "/indices-list": "message",  # clip-retrieval
    "/predict": "detail", "/ping": "detail",  # immich machine learning
}
SHAPE_PREFIXES: tuple[tuple[str, ErrorShape], ...] = (("/v1/", "openai"), ("/.well-known/", "message"))


def shape_for(path: str) -> ErrorShape:
    """The error shape of the route at `path`."""
    shape = SHAPES.get(path)
    if shape is not None:
        return shape
    for prefix, prefixed in SHAPE_PREFIXES:
        if path.startswith(prefix):
            return prefixed
    return "native"


MAX_MESSAGE = 1000  # characters of an error message; past it, what a client sent is not echoed back whole
MAX_FIELD = 200


def _capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def error_response(status: int, type_: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None, *, shape: ErrorShape = "native") -> Response:
    """An error body in `shape` (see the module's docstring). Messages and field names are
    capped: they may quote what the client sent. The flat shapes carry the message only,
    which names the field."""
    message = _capped(message, MAX_MESSAGE)
    field = None if field is None else _capped(field, MAX_FIELD)
    body: dict[str, Any]
    if shape == "openai":
        body = {"error": {"message": message, "type": type_, "param": field, "code": type_}}
    elif shape == "message":
        body = {"error": message}
    elif shape == "detail":
        body = {"detail": message}
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
                              shape=shape_for(request.url.path))
    return error_response(status, exc.code, exc.message, exc.field, headers, shape=shape_for(request.url.path))


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
                              shape=shape_for(request.url.path))
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = _field(tuple(first.get("loc", ())))
    message = "; ".join(
        f"{_field(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5]
    )
    return error_response(422, "validation_error", message, field or None, shape=shape_for(request.url.path))


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, StarletteHTTPException):
        return await _internal_error(request, exc)
    names = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 401: "unauthorized",
             403: "forbidden"}
    return error_response(exc.status_code, names.get(exc.status_code, "http_error"), str(exc.detail),
                          headers=getattr(exc, "headers", None), shape=shape_for(request.url.path))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error; see the service log",
                          shape=shape_for(request.url.path))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClipsearchError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
