"""Running the service under uvicorn: one process, or several workers on one port.

Everything that can fail cheaply is checked before the model loads: the settings, the
index directory, and the address (a busy port is a one-line error; port 0 picks a free
one). With one worker the checked socket is the one uvicorn serves on, so nothing can
take the port while the model loads.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch.core.errors import PortInUse
from clipsearch.index.format import current_version_dir
from clipsearch.service.metrics import MULTIPROC_ENV
from clipsearch.service.settings import Settings

if TYPE_CHECKING:
    from clipsearch.model.base import Model


WORKER_APP = "clipsearch.service.http.app:app_from_env"  # each worker builds its app from CLIPSEARCH_* variables


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` as uvicorn binds it (port 0: a free one), or PortInUse."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} on {host} is in use (another server?): pick another with --port, "
                            "or --port 0 for a free one") from None
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def preflight(settings: Settings) -> socket.socket:
    """The cheap checks, before anything loads: the index directory (IndexLoadError) and the
    address (PortInUse). Returns the bound socket."""
    if settings.index_dir is not None:
        current_version_dir(settings.index_dir)  # a missing directory or a dangling CURRENT
    return bind(settings.host, settings.port)


def run(settings: Settings, overrides: dict[str, Any], say: Callable[[str], None], *,
        sock: socket.socket | None = None, model: Model | None = None) -> None:
    """Serve until stopped. `overrides` are the flags given (handed to worker processes);
    `say` prints the address, so a caller of `--port 0` learns the port. A caller that
    already bound the address (`sock`) or loaded the model (`model`, one worker) passes them."""
    import uvicorn

    from clipsearch.service.http.app import create_app
    from clipsearch.service.http.protocol import PROTOCOL
    from clipsearch.service.state import ServiceState

    if sock is None:
        sock = preflight(settings)
    host, port = sock.getsockname()[:2]
    common: dict[str, Any] = {
        "host": settings.host, "port": port, "log_level": settings.log_level.lower(),
        "access_log": settings.access_log, "timeout_graceful_shutdown": int(settings.request_timeout_s) + 5,
        "http": PROTOCOL, "timeout_keep_alive": settings.keep_alive_s,
    }
    # With several workers the model is only checked here (on the CPU, with the index):
    # each worker loads its own copy.
    check = settings if settings.workers == 1 else settings.model_copy(update={
        "device": "cpu", "dtype": "fp32", "warmup": False, "cuda_graphs": False, "search_backend": "faiss-cpu"})
    given = os.environ.get(MULTIPROC_ENV)
    if given:  # this process writes its metrics there too (prometheus_client saw the variable at import)
        Path(given).mkdir(parents=True, exist_ok=True)
    try:
        state = ServiceState.build(check, model=model if settings.workers == 1 else None)
    except BaseException:
        sock.close()
        raise
    shown = f"[{host}]" if ":" in str(host) else host
    say(f"clipsearch: serving {settings.model} on http://{shown}:{port} (search page: /ui)")
    if settings.workers == 1:
        server = uvicorn.Server(uvicorn.Config(create_app(settings, state=state), **common))
        server.run(sockets=[sock])
        return
    del state
    sock.close()  # uvicorn's supervisor binds the port again for its workers
    made, path = _metrics_dir(given)
    _export_settings({**overrides, "port": port})
    try:
        uvicorn.run(WORKER_APP, factory=True, workers=settings.workers, **common)
    finally:
        if made:
            shutil.rmtree(path, ignore_errors=True)


def _metrics_dir(given: str | None) -> tuple[bool, Path]:
    """An empty directory for the workers' multiprocess metrics: the PROMETHEUS_MULTIPROC_DIR
    `given`, emptied (prometheus_client needs that), or a temporary one (True: removed at exit)."""
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="clipsearch-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    return not given, path


def _export_settings(overrides: dict[str, Any]) -> None:
    """Hand the flags to the worker processes, which build their app from CLIPSEARCH_* variables."""
    for key, value in overrides.items():
        os.environ[f"CLIPSEARCH_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
