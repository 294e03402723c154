"""The build job: reader -> encoder -> shard writer -> index -> publish.

Embeddings go to a work area (`index_builder.writer`), one shard per
`shard_size` input records, each written atomically. The job key hashes the inputs
(paths, sizes, mtimes), the reader options and the model fingerprint, so rerunning
the same command after an interruption skips the records of the complete shards
and ends with the same index as an uninterrupted run. Any change of input or model
starts afresh. The work area is removed after a successful publish.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from index_builder.encoder import Encoder, ItemError, ShardResult
from index_builder.indexing import BuiltIndex, build_and_tune
from index_builder.readers import Record, count_records, describe_inputs, read_inputs
from index_builder.writer import ShardStore
from service.fsutil import sha256_file
from service.index_format import (
    Manifest,
    Modality,
    ModelRef,
    new_version_name,
    publish_version,
    staging_dir,
    write_version,
)
from service.model import ClipModel, load_model

log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The build cannot finish (too many bad records, nothing to index, ...)."""


@dataclass
class BuildOptions:
    inputs: list[Path]
    output: Path
    model: str
    pretrained: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    index_type: str = "auto"
    fmt: str = "auto"
    schema: str | None = None
    batch_size: int = 256
    workers: int = 0
    shard_size: int = 4096
    max_errors: int | None = None
    keep: int = 3
    recall_target: float = 0.95
    memory_budget: int = 4 << 30
    flat_max: int = 20_000
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    image_decode: str = "exact"  # exact | draft | torch, as the service's CLIPSEARCH_IMAGE_DECODE
    exif_orientation: bool = False  # turn images upright by their EXIF orientation, as CLIPSEARCH_EXIF_ORIENTATION
    jpegs_on_device: bool | None = None  # torch: a batch of JPEGs per decoder call on the model's device; None: on GPU
    progress: bool = True
    hash_inputs: bool = True


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


def job_key(opts: BuildOptions, inputs: list[dict[str, Any]], fingerprint: str) -> str:
    desc = {
        "inputs": inputs, "format": opts.fmt, "schema": opts.schema, "model": fingerprint,
        "shard_size": opts.shard_size, "limits": [opts.max_image_bytes, opts.max_image_pixels],
        **({"image_decode": opts.image_decode} if opts.image_decode != "exact" else {}),  # old keys stay valid
        **({"exif_orientation": True} if opts.exif_orientation else {}),
    }
    return hashlib.sha256(orjson.dumps(desc, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while chunk := list(itertools.islice(records, size)):
        yield chunk


def _reason_key(err: ItemError) -> str:
    # Group "image: cannot read image file (No such file...)" style reasons without their details.
    return f"{err.field}: {err.reason.split(' (')[0]}"


def run_build(opts: BuildOptions, model: ClipModel | None = None) -> BuildSummary:
    """Build and publish a new index version from `opts.inputs` into `opts.output`."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    if model is None:
        model = load_model(opts.model, opts.pretrained, opts.device, opts.dtype)
    inputs_desc = describe_inputs(opts.inputs)
    key = job_key(opts, inputs_desc, model.info.fingerprint)
    opts.output.mkdir(parents=True, exist_ok=True)
    store = ShardStore(opts.output, key)
    shards: list[ShardResult] = store.complete()
    done = list(shards)
    skip_records = sum(s.records for s in shards)
    errors: list[ItemError] = [e for s in shards for e in s.errors]
    total = count_records(opts.inputs, opts.fmt)
    records = read_inputs(opts.inputs, opts.fmt, opts.schema)
    for _ in itertools.islice(records, skip_records):
        pass
    if skip_records:
        log.info("resuming: %d complete shards, %d records already encoded", len(done), skip_records)

    encoder = Encoder(model, workers=opts.workers, batch_size=opts.batch_size, max_image_bytes=opts.max_image_bytes,
                      max_image_pixels=opts.max_image_pixels, image_decode=opts.image_decode,
                      exif_orientation=opts.exif_orientation, jpegs_on_device=opts.jpegs_on_device)
    bar = tqdm(total=total, initial=skip_records, unit="rec", desc="encoding", disable=not opts.progress,
               dynamic_ncols=True, smoothing=0.1)
    encoded_now = 0
    try:
        chunks = _chunks(records, opts.shard_size)
        pending = None
        index = len(done)
        for chunk in itertools.chain(chunks, [None]):
            nxt = encoder.start(chunk) if chunk is not None else None  # decode ahead
            if pending is not None:
                shard = encoder.finish(pending)
                store.write(index, shard)
                index += 1
                shards.append(shard)
                errors.extend(shard.errors)
                encoded_now += len(shard.image_items) + len(shard.text_items)
                bar.update(shard.records)
                bar.set_postfix(skipped=len(errors))
                if opts.max_errors is not None and len(errors) > opts.max_errors:
                    raise BuildError(f"{len(errors)} bad records, more than --max-errors {opts.max_errors}; "
                                     f"first: {errors[0].source}: {errors[0].reason}")
            pending = nxt
    finally:
        bar.close()
        encoder.close()

    image_vecs = _concat([s.image_vectors for s in shards], model.dim)
    text_vecs = _concat([s.text_vectors for s in shards], model.dim)
    image_items = [i for s in shards for i in s.image_items]
    text_items = [i for s in shards for i in s.text_items]
    if not image_items and not text_items:
        raise BuildError(f"nothing to index: all {sum(s.records for s in shards)} records were skipped"
                         + (f"; first: {errors[0].source}: {errors[0].reason}" if errors else ""))

    built: dict[Modality, BuiltIndex] = {}
    jobs: tuple[tuple[Modality, np.ndarray, np.ndarray], ...] = (
        ("image", image_vecs, text_vecs), ("text", text_vecs, image_vecs))
    for modality, vecs, others in jobs:
        if len(vecs):
            log.info("building %s index over %d vectors", modality, len(vecs))
            built[modality] = build_and_tune(vecs, others if len(others) else None, index_type=opts.index_type,
                                             memory_budget=opts.memory_budget, recall_target=opts.recall_target,
                                             flat_max=opts.flat_max)
    seconds = time.perf_counter() - t0
    n_records = sum(s.records for s in shards)
    reasons = Counter(_reason_key(e) for e in errors)
    build_info = {
        "inputs": [
            {**d, **({"sha256": sha256_file(d["path"])} if d["kind"] == "file" and opts.hash_inputs else {})}
            for d in inputs_desc
        ],
        "records": n_records,
        "image_decode": opts.image_decode,
        "jpegs_on_device": encoder.jpegs_on_device,
        "exif_orientation": opts.exif_orientation,
        "encoded": {"image": len(image_items), "text": len(text_items)},
        "skipped": len(errors),
        "skip_reasons": dict(reasons),
        "errors_sample": [e.__dict__ for e in errors[:100]],
        "seconds": round(seconds, 3),
        "items_per_second": round((len(image_items) + len(text_items)) / max(seconds, 1e-9), 2),
        "device": model.info.device,
        "resumed_shards": len(done),
        "job_key": key,
    }
    name = new_version_name()
    staged = staging_dir(opts.output)
    try:
        manifest: Manifest = write_version(
            staged,
            model=ModelRef(spec=model.info.spec, pretrained=model.info.pretrained, fingerprint=model.info.fingerprint),
            dim=model.dim,
            indexes={
                m: (b.index, image_items if m == "image" else text_items,
                    {"index_type": b.plan.index_type, "factory": b.plan.factory, "search_params": b.search_params,
                     "recall_at_10": b.recall_at_10})
                for m, b in built.items()
            },
            version=name,
            build=build_info,
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
        resumed_shards=len(done),
        extra={"encoded_this_run": encoded_now},
    )


def _concat(parts: list[np.ndarray], dim: int) -> np.ndarray:
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0, dim), np.float32)
