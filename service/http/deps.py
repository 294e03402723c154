"""Dependencies routes use: the service state and a client-disconnect watcher."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from service.errors import Forbidden, NotReady, Unauthorized
from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None:
        raise NotReady("service is starting")
    return state


async def get_disconnect_watcher(request: Request) -> Callable[[], Awaitable[None]]:
    """An awaitable that returns when the client has gone away (after the body is read)."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait


async def require_admin(request: Request, state: Annotated[ServiceState, Depends(get_state)]) -> None:
    """Bearer-token check for /admin routes; disabled (403) when no admin token is configured."""
    token = state.settings.admin_token
    if token is None or not token.get_secret_value():
        raise Forbidden("admin routes are disabled: set CLIPSEARCH_ADMIN_TOKEN")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise Unauthorized("missing or wrong admin token (Authorization: Bearer <token>)")


State = Annotated[ServiceState, Depends(get_state)]
AdminAuth = Annotated[None, Depends(require_admin)]
Disconnected = Annotated[Callable[[], Awaitable[None]], Depends(get_disconnect_watcher)]
