"""The HTTP protocol `clipsearch serve` runs uvicorn with: httptools', plus a cap on open
connections and a deadline for each request's headers.

uvicorn times out idle keep-alive connections, but not a connection that never sends a
request, nor one that trickles its headers; and it accepts sockets until file descriptors
run out. Here a connection past `max_connections` gets a 503 and is closed at once, and one
whose request headers are not complete `header_timeout_s` after it opened (or after its
previous response) is closed. Limits are per process, set by `configure`.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

PROTOCOL = "clipsearch.service.http.protocol:GuardedProtocol"  # uvicorn's `http` setting: importable in every worker


class _Limits:
    max_connections = 0  # 0: no cap
    header_timeout_s = 0.0  # 0: no deadline
    on_refused: Callable[[], None] = staticmethod(lambda: None)


LIMITS = _Limits()
_BODY = orjson.dumps({"error": {"type": "overloaded", "message": "too many open connections; retry later",
                                "field": None}})
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


def default_max_connections() -> int:
    """What the open-file limit leaves room for (each connection holds one descriptor)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 8192
    return max(16, min(8192, soft - 128))


def configure(max_connections: int, header_timeout_s: float, on_refused: Callable[[], None] | None = None) -> None:
    LIMITS.max_connections = max_connections
    LIMITS.header_timeout_s = header_timeout_s
    LIMITS.on_refused = on_refused or (lambda: None)


class GuardedProtocol(HttpToolsProtocol):
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if LIMITS.max_connections and len(self.connections) > LIMITS.max_connections:
            transport.write(_REFUSED)
            transport.close()
            LIMITS.on_refused()
            return
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a keep-alive connection's next request has the same deadline for its headers

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if LIMITS.header_timeout_s > 0:
            self._deadline = self.loop.call_later(LIMITS.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
