"""`clipsearch export`: a model as ONNX (or OpenVINO) graphs that `--model onnx:DIR` serves."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

import typer


def export(
    model: Annotated[str, typer.Option(help="the model to export: any spec `serve` takes (ViT-B-32, hf-hub:..., "
                                            "local-dir:..., hf:...)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="the export directory (replaced whole)")],
    pretrained: Annotated[str | None, typer.Option(help="for open_clip names: a pretrained tag, a checkpoint "
                                                        "path, or none (random weights)")] = None,
    format: Annotated[Literal["onnx", "openvino"], typer.Option(
        "--format", help="onnx: ONNX graphs (serve with --model onnx:DIR); openvino: OpenVINO IR as well "
                         "(serve with --model openvino:DIR; pip install 'clipsearch[openvino]')")] = "onnx",
    quantize: Annotated[Literal["none", "int8"], typer.Option(
        help="int8: the linear layers' weights quantized to int8 (dynamic quantization): smaller and faster on "
             "CPUs, vectors within ~0.99 cosine of fp32")] = "none",
) -> None:
    """Export a model to ONNX (or OpenVINO): both towers with any batch size, the tokenizer, the
    preprocessing and a manifest (export.json: family, dimension, logit scale, the source's fingerprint and
    each file's checksum), written atomically. `clipsearch serve --model onnx:DIR` and `clipsearch index build
    --model onnx:DIR` then run it on ONNX Runtime, with the same vectors as the source model (fp32), so
    indexes built with either serve with the other."""
    from clipsearch.core.errors import ModelLoadError
    from clipsearch.model.export import export as run

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipsearch").setLevel(logging.INFO)
    try:
        directory = run(model, output, pretrained=pretrained, fmt=format, quantize=quantize)
    except ModelLoadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    runtime = "openvino" if format == "openvino" else "onnx"
    typer.echo(f"exported {model} to {directory}; serve it with: clipsearch serve --model {runtime}:{directory}")
