"""`clipsearch index build | info | upgrade`: the index builder's command line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="index",
    help="Build versioned FAISS indexes that a running service hot-reloads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text shows extras such as 'clipsearch[hf]' as written
)

_BUILD_HELP = (
    "Encode a corpus with the service's own model seam and publish a new index version.\n\n"
    "Inputs: EasyNLP TSV (text<TAB>base64image; single-column texts or images; other layouts via "
    "--input-schema), image directories (recursive, id = relative path) and JSONL "
    '({"id", "image": path or base64, "text", "metadata"}). Bad records are skipped and reported; '
    "--max-errors N makes more than N a failure.\n\n"
    "The version is written under DIR/versions/ and DIR/CURRENT is switched atomically only when it "
    "is complete; a running `clipsearch serve --index-dir DIR` picks it up. Interrupted? Rerun the "
    "same command: it encodes only the shards not yet in DIR/.work/ (also with another --processes or "
    "--engine).\n\n"
    "--engine ray spreads the shards over a Ray cluster (pip install 'clipsearch[ray]'): the same shards, "
    "resume and published version as the local engine."
)


@app.command(help=_BUILD_HELP)
def build(
    output: Annotated[Path, typer.Option("--output", "-o", help="index directory DIR (versions/ + CURRENT)")],
    input: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="TSV, JSONL, Parquet or WebDataset .tar file, or image directory: a path or an fsspec "
        "URL (s3://..., gs://..., with the filesystem's package installed); repeatable")] = None,
    model: Annotated[str, typer.Option(help="model spec, as for `serve`")] = "clipsearch-tiny",
    pretrained: Annotated[str | None, typer.Option(help="pretrained tag, checkpoint path, or none")] = None,
    index_type: Annotated[str, typer.Option(
        help="auto | flat | hnsw | ivf | ivfpq | ivfpq-disk (lists on disk, memory-mapped by the service)")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | fp32 | fp16 | bf16")] = "auto",
    format: Annotated[str, typer.Option("--format", help="auto | tsv | dir | jsonl | parquet | webdataset | "
                                                        "embeddings (img_emb/ text_emb/ metadata/, or .npy)")] = "auto",
    input_schema: Annotated[str | None, typer.Option(help="TSV columns, e.g. id,text,image (EasyNLP style ok)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="items per model call")] = 256,
    workers: Annotated[int, typer.Option(
        min=0, help="image decode processes [cores, max 8] (0: threads; unused where JPEGs decode a batch at a "
        "time on the GPU)")]
    = min(8, os.cpu_count() or 1),
    processes: Annotated[int, typer.Option(
        min=1, help="encoder processes, each loading the model (on the same device) and encoding whole shards, "
        "each reading its own part of the input; past one process's few thousand images/s of Python. "
        "With N > 1, --workers is unused (each process decodes in threads)")] = 1,
    shard_size: Annotated[int, typer.Option(
        min=1, help="input lines (or image files) per resumable shard, the unit of work")] = 1024,
    max_errors: Annotated[int | None, typer.Option(help="fail when more records than this are bad")] = None,
    max_error_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="publish nothing when more than this share of the records is bad")] = 0.5,
    keep: Annotated[int, typer.Option(min=1, help="index versions to keep, the new one included")] = 3,
    recall_target: Annotated[float, typer.Option(min=0.0, max=1.0, help="recall@10 to tune nprobe/efSearch to")] = 0.95,
    refine: Annotated[str, typer.Option(help="IVF-PQ: keep the vectors as fp16 beside the codes and re-rank "
                                             "candidates by them: auto (when the codes miss --recall-target), "
                                             "always, never")] = "auto",
    memory_budget: Annotated[str, typer.Option(help="index memory budget for auto, e.g. 4GB")] = "4GB",
    flat_max: Annotated[int, typer.Option(min=1, help="auto: exact flat index up to this many vectors")] = 20_000,
    image_decode: Annotated[str, typer.Option(
        help="exact | draft | torch: how JPEGs are decoded, as the service's --image-decode (recorded in the "
        "manifest)")] = "exact",
    exif_orientation: Annotated[bool, typer.Option(
        help="turn images upright by their EXIF orientation first, as the service's --exif-orientation (recorded "
        "in the manifest)")] = False,
    base: Annotated[bool, typer.Option(
        help="extend the published version of DIR: reuse its vectors and encode only --input; an id already "
        "there is replaced, and new line ids carry their file's name (new:17)")] = False,
    delete: Annotated[Path | None, typer.Option(
        help="with --base: a file of ids (one per line) to leave out of the new version")] = None,
    dedup: Annotated[bool, typer.Option(
        help="leave out exact duplicates after their first occurrence: images with the same bytes, equal texts")]
    = False,
    thumbnails: Annotated[bool, typer.Option(
        help="store a small JPEG of every image (longest side 256 px) for the search page")] = True,
    confine: Annotated[bool, typer.Option(
        help="refuse image paths in JSONL/Parquet inputs that lead outside the input's folder (absolute, ../, "
        "file:// or another URL, a symlink out), as bad records: for inputs you did not write yourself")] = False,
    engine: Annotated[str, typer.Option(
        help="local: this machine (--processes); ray: actors on a Ray cluster, one per GPU (or per two CPUs), "
        "each loading the model once; inputs and DIR must be on storage every node sees")] = "local",
    ray_address: Annotated[str | None, typer.Option(
        help="with --engine ray: auto (the cluster this node is in), ray://head:10001, or none to start a "
        "local Ray")] = None,
    ray_actors: Annotated[int, typer.Option(min=0, help="with --engine ray: encoder actors (0: from the "
                                                          "cluster's GPUs or CPUs)")] = 0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    quiet: Annotated[bool, typer.Option(help="only warnings and the summary")] = False,
) -> None:
    from clipsearch.core.errors import ClipsearchError
    from clipsearch.index.format import faiss_module

    try:
        faiss_module()
    except ClipsearchError as exc:
        typer.echo(f"clipsearch index build: {exc.message}", err=True)
        raise typer.Exit(1) from None
    from clipsearch.builder.build import BuildError, BuildOptions, run_build
    from clipsearch.builder.incremental import BaseError
    from clipsearch.builder.indexing import parse_bytes
    from clipsearch.inputs.readers import InputError, input_path

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipsearch.builder").setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        opts = BuildOptions(
            inputs=[input_path(i) for i in input or []], output=output, model=model, pretrained=pretrained,
            device=device, dtype=dtype,
            index_type=index_type, fmt=format, schema=input_schema, batch_size=batch_size, workers=workers,
            processes=processes,
            shard_size=shard_size, max_errors=max_errors, max_error_fraction=max_error_fraction, keep=keep,
            recall_target=recall_target, refine=refine,
            memory_budget=parse_bytes(memory_budget), flat_max=flat_max, progress=progress and not quiet,
            image_decode=image_decode, exif_orientation=exif_orientation, thumbnails=thumbnails,
            base=base, delete=delete, dedup=dedup, engine=engine, ray_address=ray_address, ray_actors=ray_actors,
            confine=confine,
        )
        summary = run_build(opts)
    except (BuildError, BaseError, InputError, ClipsearchError, ValueError, OSError) as exc:
        message = exc.message if isinstance(exc, ClipsearchError) else str(exc)
        typer.echo(f"clipsearch index build: {message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(summary.render())


@app.command(help="Print the manifest of the version DIR serves (DIR/CURRENT), or of a version directory.")
def info(directory: Annotated[Path, typer.Argument(help="index directory or version directory")]) -> None:
    from clipsearch.core.errors import IndexLoadError
    from clipsearch.index.format import current_version_dir, list_versions, read_manifest

    try:
        version_dir = current_version_dir(directory)
        if version_dir is None:
            typer.echo(f"{directory}: no version published yet", err=True)
            raise typer.Exit(1)
        manifest = read_manifest(version_dir)
    except IndexLoadError as exc:
        typer.echo(f"clipsearch index info: {exc.message}", err=True)
        raise typer.Exit(1) from None
    out = manifest.model_dump()
    out["path"] = str(version_dir)
    out["versions"] = list_versions(directory)
    typer.echo(json.dumps(out, indent=2, ensure_ascii=False))


@app.command(help="Check every file of the version DIR serves (or of a version directory) against the checksums "
             "its manifest recorded at publish time, reading every byte (a service checks large files by sample "
             "when it loads a version). Exits 1 naming the first damaged file.")
def verify(directory: Annotated[Path, typer.Argument(help="index directory or version directory")]) -> None:
    from clipsearch.core.errors import IndexLoadError
    from clipsearch.index.format import current_version_dir, read_manifest, verify_files

    try:
        version_dir = current_version_dir(directory)
        if version_dir is None:
            raise IndexLoadError(f"{directory}: no version published yet")
        manifest = read_manifest(version_dir)
        if not manifest.files:
            raise IndexLoadError(f"{version_dir}: no checksums recorded (an older version): "
                                 "`clipsearch index upgrade` records them")
        verify_files(version_dir, manifest, "full")
    except IndexLoadError as exc:
        typer.echo(f"clipsearch index verify: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{version_dir}: {len(manifest.files)} files match their checksums")


@app.command(help="Publish the served version again with its items rewritten as a memory-mapped Arrow file and "
             "its files' checksums recorded, for versions written before those (items.jsonl, read into memory "
             "by the service; no checksums). The index, "
             "its lists and thumbnails are hard-linked into the new version; nothing is re-encoded. A running "
             "service swaps to it as to any new version.")
def upgrade(
    directory: Annotated[Path, typer.Argument(help="index directory (CURRENT + versions/)")],
    keep: Annotated[int, typer.Option(min=1, help="versions to keep, the new one included")] = 3,
) -> None:
    from clipsearch.core.errors import IndexLoadError
    from clipsearch.index.format import upgrade_items

    try:
        version = upgrade_items(directory, keep=keep)
    except (IndexLoadError, OSError) as exc:
        typer.echo(f"clipsearch index upgrade: {getattr(exc, 'message', None) or exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"published version {version.name} -> {version}" if version is not None
               else f"{directory}: the served version is up to date")
