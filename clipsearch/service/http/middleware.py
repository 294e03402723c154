"""Pure ASGI middleware: request body limit and Prometheus request metrics.

Pure ASGI (not BaseHTTPMiddleware) so that `receive` stays the server's own and a
route can still notice a client that went away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipsearch.service.http.errors import error_response, shape_for
from clipsearch.service.metrics import Metrics


class BodyLimitMiddleware:
    """Reads the whole request body first, answering 413 past its path's limit before any
    parsing: `max_bytes`, or `wide_bytes` on the `wide` paths (those that take many items)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 60.0, *,
                 wide: Callable[[str], bool] | None = None, wide_bytes: int = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.wide = wide
        self.wide_bytes = wide_bytes

    def limit(self, path: str) -> int:
        return self.wide_bytes if self.wide is not None and self.wide(path) else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await self._too_large(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                await error_response(408, "request_timeout", f"request body not received within {self.timeout_s:g} s",
                                     headers={"connection": "close"},
                                     shape=shape_for(scope["path"]))(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: http.disconnect when the client leaves

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than the limit of {self.limit(scope['path'])} bytes"
        await error_response(413, "payload_too_large", message, shape=shape_for(scope["path"]))(scope, receive, send)


class MetricsMiddleware:
    """Counts requests by route template and status, and observes their latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            status = 499  # the request was cancelled before it could answer: not a server error
            raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)
