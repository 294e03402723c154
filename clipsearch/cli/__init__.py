"""The `clipsearch` command line."""

from __future__ import annotations

import inspect
import logging
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
    rich_markup_mode=None,  # help text shows extras such as 'clipsearch[hf]' as written
)

_SERVE_HELP = (
    "Start the HTTP service.\n\n"
    "Checks the index directory and the port first (a busy port is an error; --port 0 picks a free one and "
    "prints it), then loads the model and the index, and exits with status 2 and a one-line reason if any of "
    "these fails. Every option can also be set as an "
    "environment variable CLIPSEARCH_<OPTION> (e.g. CLIPSEARCH_MODEL); flags win over the environment.\n\n"
    "Model specs: a built-in open_clip name (ViT-B-32) with --pretrained TAG|PATH|none, hf-hub:org/repo, "
    "or local-dir:/path (open_clip_config.json + weights); transformers CLIP, Chinese-CLIP and SigLIP "
    "checkpoints as hf:org/repo or hf:/path (pip install 'clipsearch[hf]'); an export (clipsearch export) as "
    "onnx:DIR or openvino:DIR. The default, clipsearch-tiny with random "
    "weights, needs no download and is only for trying things out."
)


@app.callback()
def _root() -> None:
    """CLIP embeddings and text<->image search as a service."""


def _register_subcommands() -> None:
    from clipsearch.cli.export import export
    from clipsearch.cli.finetune import register
    from clipsearch.cli.index import app as index_app

    app.add_typer(index_app, name="index")
    register(app)
    app.command(help=export.__doc__)(export)
    from clipsearch.cli.easynlp import HELP, easynlp

    app.command(help=HELP, add_help_option=False,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(easynlp)


_register_subcommands()


def _setup_logging(level: str) -> None:
    # open_clip logs chatty INFO lines on the root logger: keep the root at WARNING and
    # give our own packages the requested level.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("clipsearch",):
        logging.getLogger(name).setLevel(level.upper())


def _serve_parameters() -> list[inspect.Parameter]:
    """One `--flag` per setting (`clipsearch/service/settings.py` is the one source): its description
    and default are the flag's help; unset flags leave the environment's value."""
    from clipsearch.service.settings import CLI_ONLY_ENV, Settings, default_of

    params = []
    for name, f in Settings.model_fields.items():
        if name in CLI_ONLY_ENV:
            continue
        kind = next((a for a in getattr(f.annotation, "__args__", ()) if a is not type(None)), f.annotation)
        if getattr(kind, "__origin__", None) is Literal or kind not in (bool, int, float, str, Path):
            kind = str
        default = default_of(name)
        help_ = (f.description or name) + (f" [{default}]" if default is not None else "")
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[Optional[kind], typer.Option(help=help_)]))  # noqa: UP045
    return params


def serve(**overrides: Any) -> None:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    from pydantic import ValidationError

    from clipsearch.core.errors import ClipsearchError
    from clipsearch.service import server
    from clipsearch.service.settings import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        typer.echo(f"clipsearch: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    _setup_logging(settings.log_level)
    try:
        server.run(settings, overrides, say=typer.echo)
    except ClipsearchError as exc:
        typer.echo(f"clipsearch: cannot start: {exc.message}", err=True)
        raise typer.Exit(2) from None


serve.__signature__ = inspect.Signature(_serve_parameters())  # type: ignore[attr-defined]
app.command(help=_SERVE_HELP)(serve)


TORCH_MODULES = {"torch", "torchvision", "open_clip", "safetensors"}


def main() -> None:
    """The console entry point: `app`, with a torch-free install's missing torch told in one line."""
    try:
        app()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TORCH_MODULES:
            raise
        typer.echo(f"clipsearch: this command needs torch ({exc.name} is not installed): pip install "
                   "'clipsearch[cpu]' (or [gpu]; [cpu,export] for clipsearch export). Without torch, serve "
                   "and index build run an export: --model onnx:DIR (docs/runtimes.md)", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
