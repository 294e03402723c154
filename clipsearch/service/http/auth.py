"""API keys: with `CLIPSEARCH_API_KEYS` or `CLIPSEARCH_API_KEYS_FILE` set, every request but the
health probes and the search page's static files needs `Authorization: Bearer <key>` (what the
OpenAI SDK sends for `api_key`).

A pure ASGI middleware in front of the routes, so that a new route is covered without saying
so, and an unauthenticated body is refused before it is read. /admin routes check their own
token instead. Keys are compared as SHA-256 digests in constant time, against every key, and
never logged. A key file is read again when it changes (a rotated Kubernetes secret).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from clipsearch.core.fsutil import read_list_file
from clipsearch.service.http.errors import OPENAI_PREFIX, error_response
from clipsearch.service.settings import Settings

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})  # probes: a kubelet sends no key
PAGE_PREFIX = "/ui"  # the search page's static files (no data: the page asks for a key, then sends it)
ADMIN_PREFIX = "/admin/"  # their own token (CLIPSEARCH_ADMIN_TOKEN)


class ApiKeys:
    """The configured keys, as digests; the file's keys reloaded when its mtime or size changes
    (looked at once a second at most)."""

    def __init__(self, keys: list[str], path: Path | None = None) -> None:
        self._fixed = [_digest(k) for k in keys]
        self._path = path
        self._from_file: list[bytes] = []
        self._stamp: tuple[int, int] | None = None
        self._looked = 0.0
        self._refresh(force=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys | None:
        """None when no key is configured: the service is open."""
        keys = [] if settings.api_keys is None else \
            [k.strip() for k in settings.api_keys.get_secret_value().split(",") if k.strip()]
        if not keys and settings.api_keys_file is None:
            return None
        return cls(keys, settings.api_keys_file)

    def _refresh(self, *, force: bool = False) -> None:
        if self._path is None:
            return
        now = time.monotonic()
        if not force and now - self._looked < 1.0:
            return
        self._looked = now
        try:
            st = os.stat(self._path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            keys = read_list_file(self._path)
        except OSError as exc:
            log.error("API key file %s unreadable (%s); keeping the keys read before", self._path, exc.strerror)
            return
        if not keys:
            log.error("API key file %s holds no key; keeping the keys read before", self._path)
            return
        self._from_file = [_digest(k) for k in keys]
        self._stamp = stamp
        log.info("API keys: %d read from %s", len(keys), self._path)

    def accepts(self, given: str) -> bool:
        """Whether `given` is one of the keys: every key compared, each in constant time."""
        self._refresh()
        digest = _digest(given)
        found = False
        for key in (*self._fixed, *self._from_file):
            found |= hmac.compare_digest(digest, key)
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyMiddleware:
    """401 for a request without a valid `Authorization: Bearer <key>`, but for the health
    probes and /admin routes."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS or path.startswith(ADMIN_PREFIX) or \
                path == PAGE_PREFIX or path.startswith(PAGE_PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, given = header.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and given.strip() and self.keys.accepts(given.strip()):
            await self.app(scope, receive, send)
            return
        message = ("invalid API key" if header else "missing API key") + ": send Authorization: Bearer <key>"
        await error_response(401, "invalid_api_key" if header else "missing_api_key", message, "authorization",
                             headers={"www-authenticate": "Bearer"},
                             openai=path.startswith(OPENAI_PREFIX))(scope, receive, send)
