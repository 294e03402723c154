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

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from clipsearch.core.errors import ClipsearchError, Forbidden, Unauthorized
from clipsearch.core.fsutil import read_list_file
from clipsearch.service.http.errors import error_response, shape_for, status_for
from clipsearch.service.settings import Settings

log = logging.getLogger(__name__)

# probes, which send no key: a kubelet's, Weaviate's (of its inference container), immich's
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/.well-known/live", "/.well-known/ready", "/ping"})
PAGE_PREFIX = "/ui"  # the search page's static files (no data: the page asks for a key, then sends it)
ADMIN_PREFIX = "/admin/"  # their own token (CLIPSEARCH_ADMIN_TOKEN)
ADMIN_METHODS = frozenset({"POST"})  # what the /admin routes take
PAGE_METHODS = frozenset({"GET", "HEAD"})  # what the page's routes take


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
        if not settings.has_api_keys:
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


def admin_refusal(authorization: str, token: SecretStr | None) -> ClipsearchError | None:
    """Why a request may not use the /admin routes (None: it may): they are off without a
    token (403), and need `Authorization: Bearer <token>` (401)."""
    if token is None or not token.get_secret_value():
        return Forbidden("admin routes are disabled: set CLIPSEARCH_ADMIN_TOKEN")
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        return Unauthorized("missing or wrong admin token (Authorization: Bearer <token>)")
    return None


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


class CredentialMiddleware:
    """Every credential is checked before a body is read (this runs outside the body limit):
    the API key on every route but the probes, the search page and /admin (when keys are
    configured), the admin token on /admin routes. The search page's routes take no body and
    refuse one at once."""

    def __init__(self, app: ASGIApp, keys: ApiKeys | None, admin_token: SecretStr | None) -> None:
        self.app = app
        self.keys = keys
        self.admin_token = admin_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"").decode("latin-1")
        page = path == PAGE_PREFIX or path.startswith(PAGE_PREFIX + "/")
        allowed = ADMIN_METHODS if path.startswith(ADMIN_PREFIX) else PAGE_METHODS if page else None
        if allowed is not None and scope["method"] not in allowed:
            await error_response(405, "method_not_allowed", f"{path} takes {', '.join(sorted(allowed))}", None,
                                 headers={"allow": ", ".join(sorted(allowed)), "connection": "close"}
                                 )(scope, receive, send)
            return
        if path.startswith(ADMIN_PREFIX):
            refused = admin_refusal(header, self.admin_token)
            if refused is not None:
                await error_response(status_for(refused), refused.code, refused.message, "authorization",
                                     headers={"connection": "close"})(scope, receive, send)
                return
        elif page:
            if _has_body(scope):
                await error_response(413, "payload_too_large", "the search page takes no request body", None,
                                     headers={"connection": "close"})(scope, receive, send)
                return
        elif self.keys is not None:
            scheme, _, given = header.partition(" ")
            if not (scheme.lower() == "bearer" and given.strip() and self.keys.accepts(given.strip())):
                message = ("invalid API key" if header else "missing API key") + ": send Authorization: Bearer <key>"
                await error_response(401, "invalid_api_key" if header else "missing_api_key", message,
                                     "authorization", headers={"www-authenticate": "Bearer", "connection": "close"},
                                     shape=shape_for(path))(scope, receive, send)
                return
        await self.app(scope, receive, send)
