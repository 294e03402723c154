"""What routes take from the request: the service state and a client-disconnect watcher.

The routes that reach the model (/embed, /search/*, /classify, /similarity) take the
`Request` and call `service_state` and `client_gone` directly instead of declaring them
as `Depends`: dependency solving per request is a noticeable share of a hot route's event
loop time (docs/benchmarks.md). The other routes use the `State` alias.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from clipsearch.core.errors import NotReady
from clipsearch.service.http.auth import admin_refusal
from clipsearch.service.state import ServiceState


def service_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None:
        raise NotReady("service is starting")
    return state


async def get_state(request: Request) -> ServiceState:
    return service_state(request)


def client_gone(request: Request) -> Callable[[], Awaitable[None]]:
    """An awaitable that returns when the client has gone away (after the body is read)."""
    receive = request.receive

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return wait


async def require_admin(request: Request, state: Annotated[ServiceState, Depends(get_state)]) -> None:
    """The /admin token check (CredentialMiddleware makes it first, before the body is read)."""
    refused = admin_refusal(request.headers.get("authorization", ""), state.settings.admin_token)
    if refused is not None:
        raise refused


State = Annotated[ServiceState, Depends(get_state)]
AdminAuth = Annotated[None, Depends(require_admin)]
