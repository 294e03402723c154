"""Dependencies routes use: the service state and a client-disconnect watcher."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReady
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


State = Annotated[ServiceState, Depends(get_state)]
Disconnected = Annotated[Callable[[], Awaitable[None]], Depends(get_disconnect_watcher)]
