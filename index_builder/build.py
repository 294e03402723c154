"""The build job: reader -> encoder -> shard writer -> index -> publish.

Each input is cut into spans of `shard_size` lines (image files); each span is encoded
into one shard of the work area (`index_builder.writer`), written atomically. The job
key hashes the inputs (paths, sizes, mtimes), the reader options and the model
fingerprint, so rerunning the same command after an interruption encodes only the
spans without a shard and ends with the same index as an uninterrupted run. Any change
of input or model starts afresh. The work area is removed after a successful publish.

With `engine="ray"`, actors on a Ray cluster encode the spans instead
(`index_builder.ray_engine`); everything else here is the same for both engines.

With `processes` > 1, spawned encoder processes each load the model (on the same
device) and encode whole spans, each reading its own span of the input by seeking to
it: no image crosses a process boundary. One Python process tops out at a few thousand
images/s of reading, tokenizing and bookkeeping, below what a GPU encodes.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from clipsearch.core.fsutil import read_list_file, sha256_file
from clipsearch.core.index_format import (
    Manifest,
    Modality,
    ModelRef,
    new_version_name,
    publish_version,
    staging_dir,
    write_version,
)
from clipsearch.core.model import ClipModel, load_model
from index_builder.encoder import Encoder, ItemError, ShardResult, concat_vectors, exit_with_parent
from index_builder.incremental import Part, dedup, load_base, merge
from index_builder.indexing import BuiltIndex, build_and_tune
from index_builder.readers import InputPath, Span, describe_inputs, plan_spans, read_span
from index_builder.writer import ShardStore, shard_info, shard_path, write_shard

log = logging.getLogger(__name__)


ENGINES = ("local", "ray")


class BuildError(RuntimeError):
    """The build cannot finish (too many bad records, nothing to index, ...)."""


@dataclass
class BuildOptions:
    inputs: list[InputPath]  # local paths or fsspec URLs (readers.input_path)
    output: Path
    model: str
    pretrained: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    index_type: str = "auto"
    fmt: str = "auto"
    schema: str | None = None
    batch_size: int = 256
    workers: int = 0  # decode worker processes beside the model (processes=1 only)
    processes: int = 1  # encoder processes, each with its own model, each encoding whole spans
    shard_size: int = 1024  # lines per span: the unit of resume, of work for --processes, of progress
    max_errors: int | None = None
    max_error_fraction: float = 0.5  # refuse to publish when more of the records than this were bad
    keep: int = 3
    recall_target: float = 0.95
    memory_budget: int = 4 << 30
    flat_max: int = 20_000
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    image_decode: str = "exact"  # exact | draft | torch, as the service's CLIPSEARCH_IMAGE_DECODE
    exif_orientation: bool = False  # turn images upright by their EXIF orientation, as CLIPSEARCH_EXIF_ORIENTATION
    progress: bool = True
    hash_inputs: bool = True
    thumbnails: bool = True  # a small JPEG per image item, for the search page
    base: bool = False  # extend the published version: reuse its vectors, encode only the inputs
    delete: Path | None = None  # with base: a file of ids to leave out of the new version
    dedup: bool = False  # leave out exact duplicate images (same bytes) and texts after their first
    engine: str = "local"  # local | ray (index_builder.ray_engine: the same shards, encoded on a Ray cluster)
    ray_address: str | None = None  # auto, ray://head:10001, host:6379; None starts a local Ray
    ray_actors: int = 0  # encoder actors; 0: one per GPU of the cluster, else one per two CPUs


@dataclass
class BuildSummary:
    version: str
    version_dir: Path
    records: int
    encoded: dict[str, int]
    skipped: int
    skip_reasons: dict[str, int]
    errors: list[dict[str, str]]
    seconds: float
    items_per_second: float
    indexes: dict[str, dict[str, Any]]
    resumed_shards: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        lines = [
            f"published version {self.version} -> {self.version_dir}",
            f"records read: {self.records}   encoded: "
            + ", ".join(f"{k} {v}" for k, v in self.encoded.items())
            + f"   skipped: {self.skipped}",
        ]
        for reason, n in sorted(self.skip_reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {n} x {reason}")
        for err in self.errors[:10]:
            lines.append(f"  e.g. {err['source']} ({err['field']}): {err['reason']}")
        lines.append(f"time: {self.seconds:.1f} s   {self.items_per_second:.1f} items/s"
                     + (f"   (resumed {self.resumed_shards} shards)" if self.resumed_shards else ""))
        for modality, info in self.indexes.items():
            recall = info.get("recall_at_10")
            lines.append(f"{modality} index: {info['count']} vectors, {info['factory']}, "
                         f"params {info['search_params']}, "
                         f"recall@10 {'exact' if info['index_type'] == 'flat' else f'{recall:.3f}'}")
        return "\n".join(lines)


def job_key(opts: BuildOptions, inputs: list[dict[str, Any]], fingerprint: str,
            base_version: str | None = None) -> str:
    desc = {
        "inputs": inputs, "format": opts.fmt, "schema": opts.schema, "model": fingerprint,
        "shard_size": opts.shard_size, "shards": "spans", "limits": [opts.max_image_bytes, opts.max_image_pixels],
        **({"image_decode": opts.image_decode} if opts.image_decode != "exact" else {}),  # old keys stay valid
        **({"exif_orientation": True} if opts.exif_orientation else {}),
        **({"thumbnails": True} if opts.thumbnails else {}),
        **({"base": base_version} if base_version else {}),
    }
    return hashlib.sha256(orjson.dumps(desc, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _reason_key(err: ItemError) -> str:
    # Group "image: cannot read image file (No such file...)" style reasons without their details.
    return f"{err.field}: {err.reason.split(' (')[0]}"


def run_build(opts: BuildOptions, model: ClipModel | None = None) -> BuildSummary:
    """Build and publish a new index version from `opts.inputs` into `opts.output`."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    if model is None:
        model = load_model(opts.model, opts.pretrained, opts.device, opts.dtype)
    if opts.engine not in ENGINES:
        raise BuildError(f"unknown engine {opts.engine!r}; expected one of {', '.join(ENGINES)}")
    if (opts.processes > 1 or opts.engine == "ray") and model.info.fingerprint == "in-training":
        raise BuildError("--processes > 1 and --engine ray need a model the encoders can load by its spec")
    inputs_desc = describe_inputs(opts.inputs)
    base = load_base(opts.output, model.info.fingerprint, model.dim) if opts.base else None
    deleted = set(read_list_file(opts.delete)) if opts.delete is not None else set()
    if opts.delete is not None and base is None:
        raise BuildError("--delete needs --base: ids are deleted from the published version")
    if not opts.inputs and base is None:
        raise BuildError("no --input given")
    key = job_key(opts, inputs_desc, model.info.fingerprint, base.version if base else None)
    opts.output.mkdir(parents=True, exist_ok=True)
    store = ShardStore(opts.output, key)
    shards = store.complete()
    done = len(shards)
    errors: list[ItemError] = [e for s in shards.values() for e in s.errors]
    spans = plan_spans(opts.inputs, opts.fmt, opts.shard_size)
    todo = [i for i in range(len(spans)) if i not in shards]
    if done:
        log.info("resuming: %d of %d shards already encoded", done, len(spans))
    # The manifest's sha256 of each input: one more pass over the files, in a thread
    # (hashlib releases the GIL) while the encoding runs.
    stop_hashing = threading.Event()
    hasher = ThreadPoolExecutor(1, thread_name_prefix="hash-inputs")
    hashes = hasher.submit(_hash_inputs, inputs_desc if opts.hash_inputs else [], stop_hashing)
    hasher.shutdown(wait=False)

    encoder = Encoder(model, workers=opts.workers if opts.processes == 1 else 0, batch_size=opts.batch_size,
                      max_image_bytes=opts.max_image_bytes, max_image_pixels=opts.max_image_pixels,
                      image_decode=opts.image_decode, exif_orientation=opts.exif_orientation,
                      thumbnails=opts.thumbnails)
    bar = tqdm(total=sum(s.count for s in spans), initial=sum(spans[i].count for i in shards), unit="line",
               desc="encoding", disable=not opts.progress, dynamic_ncols=True, smoothing=0.1)
    encoded_now = 0

    def finished(index: int, shard: ShardResult) -> None:
        nonlocal encoded_now
        shards[index] = shard_info(shard)  # the rest is read back from its file when the version is built
        errors.extend(shard.errors)
        encoded_now += len(shard.image_items) + len(shard.text_items)
        bar.update(spans[index].count)
        bar.set_postfix(skipped=len(errors))
        if opts.max_errors is not None and len(errors) > opts.max_errors:
            raise BuildError(f"{len(errors)} bad records, more than --max-errors {opts.max_errors}; "
                             f"first: {errors[0].source}: {errors[0].reason}")

    try:
        if opts.engine == "ray" and todo:
            from index_builder.ray_engine import encode_with_ray

            encode_with_ray(opts, spans, todo, store.dir, model.info.fingerprint, finished, store.read)
        elif opts.processes > 1 and len(todo) > 1:
            _encode_in_processes(opts, spans, todo, store.dir, model.info.fingerprint, finished, store.read)
        else:
            for i in todo:
                shard = encoder.encode(read_span(opts.inputs, spans[i], opts.fmt, opts.schema, opts.base))
                store.write(i, shard)
                finished(i, shard)
    except BaseException:
        stop_hashing.set()
        raise
    finally:
        bar.close()
        encoder.close()
    order = list(range(len(spans)))
    infos = [shards[i] for i in order]

    # The shards are read back from the work area one at a time: past the memory budget the
    # vectors are gathered into a file there and memory-mapped (the index build reads them
    # chunk by chunk, see `indexing`), and the items and thumbnails stream from the shard
    # files into the version. An incremental or deduplicating build reads them into memory.
    streamed = opts.base is False and not opts.dedup
    spill = store.dir if streamed else None
    n_image, n_text = sum(s.image for s in infos), sum(s.text for s in infos)
    image_vecs = _gather(store.vectors(order, "image"), n_image, model.dim, opts.memory_budget, spill, "image")
    text_vecs = _gather(store.vectors(order, "text"), n_text, model.dim, opts.memory_budget, spill, "text")
    image_items: Collection[dict[str, Any]] = store.column(order, "image_items", n_image)
    text_items: Collection[dict[str, Any]] = store.column(order, "text_items", n_text)
    thumbs: Collection[bytes] | None = store.column(order, "thumbnails", n_image) if opts.thumbnails else None
    changes: dict[str, dict[str, int]] = {}
    if base is not None:
        image, changes["image"] = merge(base.parts.get("image"), Part(image_vecs, list(image_items), _list(thumbs)),
                                        deleted)
        text, changes["text"] = merge(base.parts.get("text"), Part(text_vecs, list(text_items)), deleted)
        image_vecs, image_items, thumbs = image.vectors, image.items, image.thumbnails
        text_vecs, text_items = text.vectors, text.items
    dropped: dict[str, int] = {}
    if opts.dedup:
        image, dropped["image"] = dedup(Part(image_vecs, list(image_items), _list(thumbs)), "image")
        text, dropped["text"] = dedup(Part(text_vecs, list(text_items)), "text")
        image_vecs, image_items, thumbs = image.vectors, image.items, image.thumbnails
        text_vecs, text_items = text.vectors, text.items
    records = sum(s.records for s in infos)
    first = f"; first: {errors[0].source}: {errors[0].reason}" if errors else ""
    if not image_items and not text_items:
        stop_hashing.set()
        raise BuildError(f"nothing to index: all {records} records were skipped{first}")
    bad = len({e.source for e in errors})  # a record whose text and image both failed counts once
    if records and bad / records > opts.max_error_fraction:
        stop_hashing.set()
        raise BuildError(f"{bad} of {records} records were bad, more than --max-error-fraction "
                         f"{opts.max_error_fraction:g}; nothing was published{first}")

    built: dict[Modality, BuiltIndex] = {}
    jobs: tuple[tuple[Modality, np.ndarray, np.ndarray], ...] = (
        ("image", image_vecs, text_vecs), ("text", text_vecs, image_vecs))
    for modality, vecs, others in jobs:
        if len(vecs):
            log.info("building %s index over %d vectors", modality, len(vecs))
            built[modality] = build_and_tune(vecs, others if len(others) else None, index_type=opts.index_type,
                                             memory_budget=opts.memory_budget, recall_target=opts.recall_target,
                                             flat_max=opts.flat_max, scratch=store.dir / f"{modality}-lists")
    seconds = time.perf_counter() - t0
    n_records = sum(s.records for s in infos)
    reasons = Counter(_reason_key(e) for e in errors)
    digests = hashes.result()
    build_info = {
        "inputs": [{**d, **({"sha256": digests[d["path"]]} if d["path"] in digests else {})} for d in inputs_desc],
        "records": n_records,
        "image_decode": opts.image_decode,
        "jpegs_per_batch": encoder.jpegs_per_batch,
        "exif_orientation": opts.exif_orientation,
        "encoded": {"image": len(image_items), "text": len(text_items)},
        "skipped": len(errors),
        "skip_reasons": dict(reasons),
        "errors_sample": [e.__dict__ for e in errors[:100]],
        "seconds": round(seconds, 3),
        "items_per_second": round((len(image_items) + len(text_items)) / max(seconds, 1e-9), 2),
        "device": model.info.device,
        "processes": opts.processes,
        "resumed_shards": done,
        "job_key": key,
        **({"base": base.version, "changes": changes, "deleted_ids": len(deleted)} if base is not None else {}),
        **({"duplicates_dropped": dropped} if opts.dedup else {}),
    }
    name = new_version_name()
    staged = staging_dir(opts.output)
    try:
        manifest: Manifest = write_version(
            staged,
            model=ModelRef(spec=model.info.spec, pretrained=model.info.pretrained, fingerprint=model.info.fingerprint,
                           family=model.info.family),
            dim=model.dim,
            indexes={
                m: (b.index, image_items if m == "image" else text_items,
                    {"index_type": b.plan.index_type, "factory": b.plan.factory, "search_params": b.search_params,
                     "recall_at_10": b.recall_at_10})
                for m, b in built.items()
            },
            version=name,
            build=build_info,
            thumbnails=thumbs if thumbs is not None and image_items else None,
        )
        version_dir = publish_version(opts.output, staged, name, keep=opts.keep)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    store.remove()
    encoded_total = len(image_items) + len(text_items)
    return BuildSummary(
        version=name,
        version_dir=version_dir,
        records=n_records,
        encoded={"image": len(image_items), "text": len(text_items)},
        skipped=len(errors),
        skip_reasons=dict(reasons),
        errors=[e.__dict__ for e in errors[:100]],
        seconds=seconds,
        items_per_second=encoded_total / max(seconds, 1e-9),
        indexes={m: e.model_dump() for m, e in manifest.indexes.items()},
        resumed_shards=done,
        extra={"encoded_this_run": encoded_now},
    )


def _list(values: Collection[bytes] | None) -> list[bytes] | None:
    return list(values) if values is not None else None


def _gather(parts: Iterable[np.ndarray], n: int, dim: int, budget: int, spill: Path | None, name: str) -> np.ndarray:
    """The shards' `n` vectors as one array: in memory, or (past `budget`, with a `spill`
    directory) a memory-mapped file there, written shard by shard."""
    if spill is None or n * dim * 4 <= budget:
        return concat_vectors(list(parts), dim)
    out = np.lib.format.open_memmap(spill / f"{name}-vectors.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    start = 0
    for part in parts:
        out[start : start + len(part)] = part
        start += len(part)
    out.flush()
    return out


def _hash_inputs(inputs_desc: list[dict[str, Any]], stop: threading.Event) -> dict[str, str]:
    return {d["path"]: sha256_file(d["path"], stop=stop) for d in inputs_desc if d["kind"] == "file"}


def _encode_in_processes(opts: BuildOptions, spans: list[Span], todo: list[int], work_dir: Path, fingerprint: str,
                         finished: Callable[[int, ShardResult], None], read: Callable[[int], ShardResult]) -> None:
    """Encode spans `todo` in `opts.processes` spawned processes; `finished(i, shard)` on
    each, in the order they finish. A failure cancels the spans not yet started (the
    finished ones stay in the work area for a rerun)."""
    threads = max(1, (os.cpu_count() or 1) // opts.processes)
    # spawn, not fork: forking a process that already runs torch's thread pools can hang.
    pool = ProcessPoolExecutor(opts.processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_span_worker,
                               initargs=(replace(opts, progress=False), work_dir, fingerprint, threads))
    # Ctrl-C is the main process's to handle: the encoder processes are started (during
    # submit) with SIGINT blocked, a mask that survives spawn's exec, so none dies mid-import
    # with a traceback or keeps taking queued spans; on an interrupt or a failure the main
    # process stops them. Finished shards stay for a rerun; a span under way is redone.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        futures: dict[Future[None], int] = {pool.submit(_encode_span, i, spans[i]): i for i in todo}
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        for fut in as_completed(futures):
            try:
                fut.result()
            except BrokenProcessPool as exc:
                raise BuildError(f"an encoder process died ({exc}); out of memory? Finished shards are kept: "
                                 "rerun with fewer --processes or a smaller --batch-size") from None
            finished(futures[fut], read(futures[fut]))
    except BaseException:
        # No public way to stop a running call; shutdown() forgets the processes, so first.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_SPAN_WORKER: tuple[BuildOptions, Path, str, Encoder | None] | None = None


def _init_span_worker(opts: BuildOptions, work_dir: Path, fingerprint: str, threads: int) -> None:
    global _SPAN_WORKER
    import torch

    exit_with_parent()
    torch.set_num_threads(threads)
    _SPAN_WORKER = (opts, work_dir, fingerprint, None)


def _encode_span(index: int, span: Span) -> None:
    """In an encoder process: read one span, encode it, write its shard."""
    global _SPAN_WORKER
    if _SPAN_WORKER is None:
        raise BuildError("encoder process not initialised")
    opts, work_dir, fingerprint, encoder = _SPAN_WORKER
    if encoder is None:  # load here, not in the initializer: a failure then reaches the job with its message
        model = load_model(opts.model, opts.pretrained, opts.device, opts.dtype)
        if model.info.fingerprint != fingerprint:
            raise BuildError(f"an encoder process loaded {opts.model} as {model.info.fingerprint}, "
                             f"the job has {fingerprint}")
        encoder = Encoder(model, workers=0, batch_size=opts.batch_size, max_image_bytes=opts.max_image_bytes,
                          max_image_pixels=opts.max_image_pixels, image_decode=opts.image_decode,
                          exif_orientation=opts.exif_orientation, thumbnails=opts.thumbnails)
        _SPAN_WORKER = (opts, work_dir, fingerprint, encoder)
    shard = encoder.encode(read_span(opts.inputs, span, opts.fmt, opts.schema, opts.base))
    write_shard(shard_path(work_dir, index), shard)
