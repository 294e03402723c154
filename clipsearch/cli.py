"""The `clipsearch` command line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

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
    "or local-dir:/path (open_clip_config.json + weights). The default, clipsearch-tiny with random "
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


@app.command(help=_SERVE_HELP)
def serve(
    model: Annotated[str | None, typer.Option(help="open_clip model spec")] = None,
    pretrained: Annotated[str | None, typer.Option(help="pretrained tag, checkpoint path, or none")] = None,
    index_dir: Annotated[Path | None, typer.Option(help="index directory to serve")] = None,
    index_poll_s: Annotated[float | None, typer.Option(help="seconds between looks for a new index [5]")] = None,
    host: Annotated[str | None, typer.Option(help="bind address [0.0.0.0]")] = None,
    port: Annotated[int | None, typer.Option(help="bind port [8000]")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | fp32 | fp16 | bf16")] = None,
    search_backend: Annotated[str | None, typer.Option(help="auto | faiss-cpu | faiss-gpu | torch")] = None,
    text_search_on_device: Annotated[bool | None, typer.Option(
        help="with a torch index on the model's device, encode and search a query text in one step there [on]")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="most items per model call [64]")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="extra wait to fill a batch [0]")] = None,
    max_queue: Annotated[int | None, typer.Option(help="items waiting per modality before 429 [2048]")] = None,
    request_timeout_s: Annotated[float | None, typer.Option(help="request timeout in seconds [30]")] = None,
    warmup: Annotated[bool | None, typer.Option(help="run the model on dummy input before serving [on]")] = None,
    cuda_graphs: Annotated[bool | None, typer.Option(
        help="on a GPU, replay the model from CUDA graphs at bucketed batch sizes [on]")] = None,
    worker_cpus: Annotated[int | None, typer.Option(
        help="keep each server process's threads on this many cores of its own (Linux; for GPU servers) [0: off]"
    )] = None,
    cuda_wait: Annotated[str | None, typer.Option(
        help="on a GPU, how the model thread waits for a batch: sleep (blocking event) or spin [sleep]")] = None,
    max_items_per_request: Annotated[int | None, typer.Option(help="items per /embed request [64]")] = None,
    max_text_chars: Annotated[int | None, typer.Option(help="longest text [2000]")] = None,
    max_image_bytes: Annotated[int | None, typer.Option(help="largest image in bytes [10 MiB]")] = None,
    max_image_pixels: Annotated[int | None, typer.Option(help="largest image in pixels [40M]")] = None,
    max_k: Annotated[int | None, typer.Option(help="most search results [1000]")] = None,
    preprocess_workers: Annotated[int | None, typer.Option(help="decode/tokenize threads [cores]")] = None,
    torch_threads: Annotated[int | None, typer.Option(help="CPU threads for the model [cores - 1]")] = None,
    image_decode: Annotated[str | None, typer.Option(
        help="exact | draft (JPEG at reduced scale) | torch (JPEG decode + resize as tensor ops, nvJPEG on GPU) "
        "[exact]")] = None,
    exif_orientation: Annotated[bool | None, typer.Option(
        help="turn images upright by their EXIF orientation first (open_clip does not) [off]")] = None,
    image_decode_scope: Annotated[str | None, typer.Option(
        help="auto | request | batch: with --image-decode torch, decode JPEGs per request or per batch "
        "(one nvJPEG call) [auto: batch on GPU]")] = None,
    workers: Annotated[int | None, typer.Option(
        help="server processes sharing the port, each with its own model copy [1]")] = None,
    reuse_port: Annotated[bool | None, typer.Option(
        help="with --workers > 1 on Linux: a listening socket per worker (SO_REUSEPORT), connections spread "
        "evenly by the kernel; off: one shared socket [off]")] = None,
    access_log: Annotated[bool | None, typer.Option(help="log every request [off]")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug | info | warning | error")] = None,
) -> None:
    overrides: dict[str, Any] = {k: v for k, v in locals().items() if v is not None}
    from pydantic import ValidationError

    from service.errors import ClipsearchError
    from service.settings import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        typer.echo(f"clipsearch: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    _setup_logging(settings.log_level)

    import uvicorn

    from clipsearch.listen import reuse_port_available, run_workers
    from service.http.app import create_app
    from service.metrics import MULTIPROC_ENV
    from service.state import ServiceState

    common: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level.lower(),
        "access_log": settings.access_log, "timeout_graceful_shutdown": int(settings.request_timeout_s) + 5,
    }
    # With several workers the model is only checked here (on the CPU, with the index):
    # each worker loads its own copy.
    check = settings if settings.workers == 1 else settings.model_copy(update={
        "device": "cpu", "dtype": "fp32", "warmup": False, "cuda_graphs": False, "search_backend": "faiss-cpu",
        "worker_cpus": 0})  # the supervisor keeps all cores: each worker pins itself
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
        if settings.reuse_port and reuse_port_available():
            run_workers(uvicorn.Config(_WORKER_APP, factory=True, workers=settings.workers, **common))
        else:
            uvicorn.run(_WORKER_APP, factory=True, workers=settings.workers, **common)
    finally:
        if made:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


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
