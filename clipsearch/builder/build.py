"""The build job: reader -> encoder -> shard writer -> index -> publish.

Each input is cut into spans of `shard_size` lines (image files); each span is encoded
into one shard of the work area (`clipsearch.builder.writer`), written atomically. The job
key hashes the inputs (paths, sizes, mtimes), the reader options and the model
fingerprint, so rerunning the same command after an interruption encodes only the
spans without a shard and ends with the same index as an uninterrupted run. Any change
of input or model starts afresh. The work area is removed after a successful publish.

With `engine="ray"`, actors on a Ray cluster encode the spans instead
(`clipsearch.builder.ray_engine`); everything else here is the same for both engines.

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

from clipsearch.builder.encoder import Encoder, ItemError, ShardResult, concat_vectors
from clipsearch.builder.incremental import Base, Part, dedup, load_base, merge
from clipsearch.builder.indexing import BuiltIndex, add_in_processes, build_and_tune
from clipsearch.builder.options import ENGINES, BuildError, BuildOptions, BuildSummary
from clipsearch.builder.writer import ShardInfo, ShardStore, shard_info, shard_path, write_shard
from clipsearch.core.fsutil import read_list_file, sha256_file
from clipsearch.core.orphans import init_after_watch, watched
from clipsearch.index.format import (
    Manifest,
    Modality,
    ModelRef,
    new_version_name,
    publish_version,
    staging_dir,
    write_version,
)
from clipsearch.inputs.readers import Span, describe_inputs, plan_spans, read_span
from clipsearch.model.base import Model
from clipsearch.model.load import load_model

log = logging.getLogger(__name__)


def job_key(opts: BuildOptions, inputs: list[dict[str, Any]], fingerprint: str,
            base_version: str | None = None) -> str:
    desc = {
        "inputs": inputs, "format": opts.fmt, "schema": opts.schema, "model": fingerprint,
        "shard_size": opts.shard_size, "shards": "spans", "limits": [opts.max_image_bytes, opts.max_image_pixels],
        **({"image_decode": opts.image_decode} if opts.image_decode != "exact" else {}),  # old keys stay valid
        **({"exif_orientation": True} if opts.exif_orientation else {}),
        **({"thumbnails": True} if opts.thumbnails else {}),
        **({"confine": True} if opts.confine else {}),
        **({"base": base_version} if base_version else {}),
    }
    return hashlib.sha256(orjson.dumps(desc, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _reason_key(err: ItemError) -> str:
    # Group "image: cannot read image file (No such file...)" style reasons without their details.
    return f"{err.field}: {err.reason.split(' (')[0]}"


@dataclass
class BuildPlan:
    """What a run will do: its job key and work area, the spans of the inputs, which are
    already encoded (resume), and the published version it extends (`--base`)."""

    key: str
    store: ShardStore
    spans: list[Span]
    shards: dict[int, ShardInfo]  # span number -> its encoded shard, filled as spans finish
    todo: list[int]
    inputs_desc: list[dict[str, Any]]
    base: Base | None
    deleted: set[str]
    resumed: int


@dataclass
class Corpus:
    """The encoded corpus, gathered from the shards (and merged with the base version)."""

    image_vecs: np.ndarray
    text_vecs: np.ndarray
    image_items: Collection[dict[str, Any]]
    text_items: Collection[dict[str, Any]]
    thumbs: Collection[bytes] | None
    records: int
    errors: list[ItemError]
    changes: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)


def run_build(opts: BuildOptions, model: Model | None = None) -> BuildSummary:
    """Build and publish a new index version from `opts.inputs` into `opts.output`:
    plan, encode, gather, index, publish."""
    t0 = time.perf_counter()
    if model is None:
        model = load_model(opts.model, opts.pretrained, opts.device, opts.dtype)
    plan = plan_build(opts, model)
    hashing = _InputHashes(plan.inputs_desc if opts.hash_inputs else [])
    try:
        errors, encoded_now, jpegs_per_batch = encode(opts, model, plan)
        corpus = gather(opts, model, plan, errors)
        built = build_indexes(opts, corpus, plan.store.dir)
    except BaseException:
        hashing.stop()
        raise
    seconds = time.perf_counter() - t0
    build_info = _build_info(opts, model, plan, corpus, hashing.result(), seconds, jpegs_per_batch)
    version_dir, manifest = publish(opts, model, corpus, built, build_info)
    plan.store.remove()
    encoded = {"image": len(corpus.image_items), "text": len(corpus.text_items)}
    return BuildSummary(
        version=manifest.version,
        version_dir=version_dir,
        records=corpus.records,
        encoded=encoded,
        skipped=len(corpus.errors),
        skip_reasons=build_info["skip_reasons"],
        errors=build_info["errors_sample"],
        seconds=seconds,
        items_per_second=sum(encoded.values()) / max(seconds, 1e-9),
        indexes={m: e.model_dump() for m, e in manifest.indexes.items()},
        resumed_shards=plan.resumed,
        extra={"encoded_this_run": encoded_now},
    )


def plan_build(opts: BuildOptions, model: Model) -> BuildPlan:
    """Check the options, key the job, cut the inputs into spans and find the spans a
    previous run of the same job already encoded."""
    if opts.engine not in ENGINES:
        raise BuildError(f"unknown engine {opts.engine!r}; expected one of {', '.join(ENGINES)}")
    if opts.refine not in ("auto", "always", "never"):
        raise BuildError(f"--refine {opts.refine!r}: auto, always or never")
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
    spans = plan_spans(opts.inputs, opts.fmt, opts.shard_size)
    if shards:
        log.info("resuming: %d of %d shards already encoded", len(shards), len(spans))
    return BuildPlan(key=key, store=store, spans=spans, shards=shards,
                     todo=[i for i in range(len(spans)) if i not in shards], inputs_desc=inputs_desc,
                     base=base, deleted=deleted, resumed=len(shards))


def encode(opts: BuildOptions, model: Model, plan: BuildPlan) -> tuple[list[ItemError], int, Any]:
    """Encode the spans still to do into shards of the work area, with the chosen engine.
    Returns the bad records of all shards, the items encoded by this run, and the
    decoder's JPEGs-per-batch figure."""
    from tqdm import tqdm

    spans, shards, store = plan.spans, plan.shards, plan.store
    errors: list[ItemError] = [e for s in shards.values() for e in s.errors]
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
        if opts.engine == "ray" and plan.todo:
            from clipsearch.builder.ray_engine import encode_with_ray

            encode_with_ray(opts, spans, plan.todo, store.dir, model.info.fingerprint, finished, store.read)
        elif opts.processes > 1 and len(plan.todo) > 1:
            _encode_in_processes(opts, spans, plan.todo, store.dir, model.info.fingerprint, finished, store.read)
        else:
            for i in plan.todo:
                shard = encoder.encode(read_span(opts.inputs, spans[i], opts.fmt, opts.schema, opts.base,
                                                     opts.confine))
                store.write(i, shard)
                finished(i, shard)
    finally:
        bar.close()
        encoder.close()
    return errors, encoded_now, encoder.jpegs_per_batch


def gather(opts: BuildOptions, model: Model, plan: BuildPlan, errors: list[ItemError]) -> Corpus:
    """Read the shards back, one at a time, into the corpus to index; merge it with the base
    version and drop duplicates where asked; refuse a corpus with too many bad records.

    Past the memory budget the vectors are gathered into a file in the work area and
    memory-mapped (the index build reads them chunk by chunk, see `indexing`), and the
    items and thumbnails stream from the shard files into the version. An incremental or
    deduplicating build reads them into memory."""
    store = plan.store
    order = list(range(len(plan.spans)))
    infos = [plan.shards[i] for i in order]
    spill = store.dir if opts.base is False and not opts.dedup else None
    n_image, n_text = sum(s.image for s in infos), sum(s.text for s in infos)
    corpus = Corpus(
        image_vecs=_gather(store.vectors(order, "image"), n_image, model.dim, opts.memory_budget, spill, "image"),
        text_vecs=_gather(store.vectors(order, "text"), n_text, model.dim, opts.memory_budget, spill, "text"),
        image_items=store.column(order, "image_items", n_image),
        text_items=store.column(order, "text_items", n_text),
        thumbs=store.column(order, "thumbnails", n_image) if opts.thumbnails else None,
        records=sum(s.records for s in infos),
        errors=errors,
    )
    if plan.base is not None:
        image, corpus.changes["image"] = merge(plan.base.parts.get("image"), _image_part(corpus), plan.deleted)
        text, corpus.changes["text"] = merge(plan.base.parts.get("text"), _text_part(corpus), plan.deleted)
        _replace_parts(corpus, image, text)
    if opts.dedup:
        image, corpus.dropped["image"] = dedup(_image_part(corpus), "image")
        text, corpus.dropped["text"] = dedup(_text_part(corpus), "text")
        _replace_parts(corpus, image, text)
    _check_errors(opts, corpus)
    return corpus


def _image_part(corpus: Corpus) -> Part:
    return Part(corpus.image_vecs, list(corpus.image_items), _list(corpus.thumbs))


def _text_part(corpus: Corpus) -> Part:
    return Part(corpus.text_vecs, list(corpus.text_items))


def _replace_parts(corpus: Corpus, image: Part, text: Part) -> None:
    corpus.image_vecs, corpus.image_items, corpus.thumbs = image.vectors, image.items, image.thumbnails
    corpus.text_vecs, corpus.text_items = text.vectors, text.items


def _check_errors(opts: BuildOptions, corpus: Corpus) -> None:
    errors, records = corpus.errors, corpus.records
    first = f"; first: {errors[0].source}: {errors[0].reason}" if errors else ""
    if not corpus.image_items and not corpus.text_items:
        raise BuildError(f"nothing to index: all {records} records were skipped{first}")
    bad = len({e.source for e in errors})  # a record whose text and image both failed counts once
    if records and bad / records > opts.max_error_fraction:
        raise BuildError(f"{bad} of {records} records were bad, more than --max-error-fraction "
                         f"{opts.max_error_fraction:g}; nothing was published{first}")


def build_indexes(opts: BuildOptions, corpus: Corpus, scratch: Path) -> dict[Modality, BuiltIndex]:
    """One index per modality that has vectors, its type picked and tuned against the
    other modality's vectors as queries."""
    built: dict[Modality, BuiltIndex] = {}
    adder = None  # an on-disk index's parts: added here, or as many at once as the encoding ran
    if opts.engine == "ray":
        from clipsearch.builder.ray_engine import add_on_ray

        adder = add_on_ray(opts.ray_address)
    elif opts.processes > 1:
        adder = add_in_processes(opts.processes)
    jobs: tuple[tuple[Modality, np.ndarray, np.ndarray], ...] = (
        ("image", corpus.image_vecs, corpus.text_vecs), ("text", corpus.text_vecs, corpus.image_vecs))
    for modality, vecs, others in jobs:
        if len(vecs):
            log.info("building %s index over %d vectors", modality, len(vecs))
            built[modality] = build_and_tune(vecs, others if len(others) else None, index_type=opts.index_type,
                                             memory_budget=opts.memory_budget, recall_target=opts.recall_target,
                                             flat_max=opts.flat_max, scratch=scratch / f"{modality}-lists",
                                             refine=opts.refine, adder=adder)
    return built


def _build_info(opts: BuildOptions, model: Model, plan: BuildPlan, corpus: Corpus, digests: dict[str, str],
                seconds: float, jpegs_per_batch: Any) -> dict[str, Any]:
    """The manifest's `build` section: inputs (with their sha256), counts, bad records, settings."""
    errors = corpus.errors
    encoded = len(corpus.image_items) + len(corpus.text_items)
    return {
        "inputs": [{**d, **({"sha256": digests[d["path"]]} if d["path"] in digests else {})}
                   for d in plan.inputs_desc],
        "records": corpus.records,
        "image_decode": opts.image_decode,
        "jpegs_per_batch": jpegs_per_batch,
        "exif_orientation": opts.exif_orientation,
        "encoded": {"image": len(corpus.image_items), "text": len(corpus.text_items)},
        "skipped": len(errors),
        "skip_reasons": dict(Counter(_reason_key(e) for e in errors)),
        "errors_sample": [e.__dict__ for e in errors[:100]],
        "seconds": round(seconds, 3),
        "items_per_second": round(encoded / max(seconds, 1e-9), 2),
        "device": model.info.device,
        "processes": opts.processes,
        "resumed_shards": plan.resumed,
        "job_key": plan.key,
        **({"base": plan.base.version, "changes": corpus.changes, "deleted_ids": len(plan.deleted)}
           if plan.base is not None else {}),
        **({"duplicates_dropped": corpus.dropped} if opts.dedup else {}),
    }


def publish(opts: BuildOptions, model: Model, corpus: Corpus, built: dict[Modality, BuiltIndex],
            build_info: dict[str, Any]) -> tuple[Path, Manifest]:
    """Write the version under a temporary name, then publish it atomically (CURRENT)."""
    name = new_version_name()
    staged = staging_dir(opts.output)
    try:
        manifest = write_version(
            staged,
            model=ModelRef(spec=model.info.spec, pretrained=model.info.pretrained, fingerprint=model.info.fingerprint,
                           family=model.info.family),
            dim=model.dim,
            indexes={
                m: (b.index, corpus.image_items if m == "image" else corpus.text_items,
                    {"index_type": b.plan.index_type, "factory": b.plan.factory, "search_params": b.search_params,
                     "recall_at_10": b.recall_at_10,
                     **({"refine_vectors": corpus.image_vecs if m == "image" else corpus.text_vecs}
                        if b.refine else {})})
                for m, b in built.items()
            },
            version=name,
            build=build_info,
            thumbnails=corpus.thumbs if corpus.thumbs is not None and corpus.image_items else None,
        )
        version_dir = publish_version(opts.output, staged, name, keep=opts.keep)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return version_dir, manifest


class _InputHashes:
    """The manifest's sha256 of each input: one more pass over the files, in a thread
    (hashlib releases the GIL) while the encoding runs; stopped when the build fails."""

    def __init__(self, inputs_desc: list[dict[str, Any]]) -> None:
        self._stop = threading.Event()
        pool = ThreadPoolExecutor(1, thread_name_prefix="hash-inputs")
        self._future = pool.submit(_hash_inputs, inputs_desc, self._stop)
        pool.shutdown(wait=False)

    def stop(self) -> None:
        self._stop.set()

    def result(self) -> dict[str, str]:
        return self._future.result()


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
                               initializer=init_after_watch,
                               initargs=watched(f"{__name__}:_init_span_worker", replace(opts, progress=False),
                                                work_dir, fingerprint, threads))
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
    os.environ["OMP_NUM_THREADS"] = str(threads)  # an export's runtime reads it (exported.default_threads)
    try:
        import torch
    except ImportError:  # a torch-free install, serving an export
        pass
    else:
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
    shard = encoder.encode(read_span(opts.inputs, span, opts.fmt, opts.schema, opts.base, opts.confine))
    write_shard(shard_path(work_dir, index), shard)
