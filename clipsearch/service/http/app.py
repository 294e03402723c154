"""`create_app(settings)`: the FastAPI application, with no import-time singletons."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.middleware.cors import CORSMiddleware

from clipsearch.model.base import Model
from clipsearch.service.http import compat, protocol
from clipsearch.service.http.auth import ApiKeys, CredentialMiddleware
from clipsearch.service.http.errors import install_error_handlers
from clipsearch.service.http.middleware import BodyLimitMiddleware, MetricsMiddleware
from clipsearch.service.http.routes import router
from clipsearch.service.http.schemas import apply_limits
from clipsearch.service.http.ui import router as ui_router
from clipsearch.service.metrics import Metrics
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState

log = logging.getLogger(__name__)


async def _poll_index(svc: ServiceState, interval: float) -> None:
    """Swap to a newly published index version; a bad one is logged, counted and skipped."""
    import anyio.to_thread

    while True:
        await asyncio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(lambda: svc.load_index(fatal=False))
        except Exception:  # never let the poller die: the next tick tries again
            log.exception("index poll failed")


def create_app(settings: Settings, *, state: ServiceState | None = None, model: Model | None = None) -> FastAPI:
    """Build the app. The lifespan loads the model and index (unless `state` or `model`
    is given, e.g. by the CLI that loaded them before binding the port, or by tests)
    and starts the batchers."""
    metrics = state.metrics if state is not None else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = state
        if svc is None:
            import anyio.to_thread

            svc = await anyio.to_thread.run_sync(lambda: ServiceState.build(settings, model, metrics))
        await svc.engine.start()
        # The model, torch and open_clip leave millions of long-lived objects; without
        # this, every full collection walks them all and stalls the event loop for
        # ~100-300 ms under load.
        gc.collect()
        gc.freeze()
        svc.started = True
        app.state.service = svc
        poller = None
        if settings.index_dir is not None and settings.index_poll_s > 0:
            poller = asyncio.create_task(_poll_index(svc, settings.index_poll_s), name="index-poller")
        try:
            yield
        finally:
            svc.started = False
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            await svc.engine.stop()
            svc.metrics.process_exit()

    app = FastAPIOffline(  # /docs and /redoc from assets in a package: they work with no network
        title="clipsearch",
        summary="CLIP embeddings and text<->image search",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    for compat_router in compat.routers(settings):
        app.include_router(compat_router)
    app.include_router(ui_router)
    generate = app.openapi

    def openapi() -> dict[str, Any]:  # the generated document, with this deployment's limits in it
        if app.openapi_schema is None:
            apply_limits(generate(), settings)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.body_limit, timeout_s=settings.body_timeout_s,
                       wide=compat.many_items(settings), wide_bytes=settings.wide_body_limit)
    # outside the body limit: a request without its credential is refused before its body is read
    app.add_middleware(CredentialMiddleware, keys=ApiKeys.from_settings(settings), admin_token=settings.admin_token)
    protocol.configure(settings.max_connections or protocol.default_max_connections(), settings.header_timeout_s,
                       metrics.connections_refused.inc)
    if settings.cors_origins:
        # outside the credential check: a browser's preflight carries no key, and gets its
        # answer here; the request that follows still needs one
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], max_age=600)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def app_from_env() -> FastAPI:
    """For ASGI servers run directly: `uvicorn --factory clipsearch.service.http.app:app_from_env`.

    Settings come from CLIPSEARCH_* variables; the model and index load in the lifespan.
    `clipsearch serve` is preferred: it loads them before binding the port and exits
    with a one-line reason when it cannot.
    """
    return create_app(Settings())
