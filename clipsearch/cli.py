"""The `clipsearch` command line."""

from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

app = typer.Typer(
    name="clipsearch",
    help="CLIP embeddings and text<->image search as a service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_SERVE_HELP = (
    "Start the HTTP service.\n\n"
    "Loads the model (and the index, if --index-dir is given) before binding the port, and exits with "
    "status 2 and a one-line reason if either cannot be loaded. Every option can also be set as an "
    "environment variable CLIPSEARCH_<OPTION> (e.g. CLIPSEARCH_MODEL); flags win over the environment.\n\n"
    "Model specs: a built-in open_clip name (ViT-B-32) with --pretrained TAG|PATH|none, hf-hub:org/repo, "
    "or local-dir:/path (open_clip_config.json + weights); transformers CLIP, Chinese-CLIP and SigLIP "
    "checkpoints as hf:org/repo or hf:/path (pip install 'clipsearch[hf]'). The default, clipsearch-tiny with random "
    "weights, needs no download and is only for trying things out."
)


@app.callback()
def _root() -> None:
    """CLIP embeddings and text<->image search as a service."""


def _register_subcommands() -> None:
    from finetune.cli import register
    from index_builder.cli import app as index_app

    app.add_typer(index_app, name="index")
    register(app)


_register_subcommands()


def _setup_logging(level: str) -> None:
    # open_clip logs chatty INFO lines on the root logger: keep the root at WARNING and
    # give our own packages the requested level.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("service", "index_builder", "clipsearch"):
        logging.getLogger(name).setLevel(level.upper())


def _serve_parameters() -> list[inspect.Parameter]:
    """One `--flag` per setting (`service/settings.py` is the one source): its description
    and default are the flag's help; unset flags leave the environment's value."""
    from service.settings import CLI_ONLY_ENV, Settings, _default

    params = []
    for name, f in Settings.model_fields.items():
        if name in CLI_ONLY_ENV:
            continue
        kind = next((a for a in getattr(f.annotation, "__args__", ()) if a is not type(None)), f.annotation)
        if getattr(kind, "__origin__", None) is Literal or kind not in (bool, int, float, str, Path):
            kind = str
        default = _default(name)
        help_ = (f.description or name) + (f" [{default}]" if default is not None else "")
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[Optional[kind], typer.Option(help=help_)]))  # noqa: UP045
    return params


def serve(**overrides: Any) -> None:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    from pydantic import ValidationError

    from clipsearch.core.errors import ClipsearchError
    from service.settings import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        typer.echo(f"clipsearch: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    _setup_logging(settings.log_level)

    import uvicorn

    from service.http.app import create_app
    from service.http.protocol import PROTOCOL
    from service.metrics import MULTIPROC_ENV
    from service.state import ServiceState

    common: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level.lower(),
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
        state = ServiceState.build(check)
    except ClipsearchError as exc:
        typer.echo(f"clipsearch: cannot start: {exc.message}", err=True)
        raise typer.Exit(2) from None
    if settings.workers == 1:
        uvicorn.run(create_app(settings, state=state), **common)
        return
    del state
    made, path = _metrics_dir(given)
    _export_settings(overrides)
    try:
        uvicorn.run(_WORKER_APP, factory=True, workers=settings.workers, **common)
    finally:
        if made:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


serve.__signature__ = inspect.Signature(_serve_parameters())  # type: ignore[attr-defined]
app.command(help=_SERVE_HELP)(serve)

_WORKER_APP = "service.http.app:app_from_env"  # each worker builds its app from CLIPSEARCH_* variables


def _metrics_dir(given: str | None) -> tuple[bool, Path]:
    """An empty directory for the workers' multiprocess metrics: the PROMETHEUS_MULTIPROC_DIR
    `given`, emptied (prometheus_client needs that), or a temporary one (True: removed at exit)."""
    import tempfile

    from service.metrics import MULTIPROC_ENV

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


def main() -> None:  # pragma: no cover - console entry point wrapper
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
