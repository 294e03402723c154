"""Writer stage: encoded shards to a resumable work area.

``DIR/.work/<job key>/shard-NNNNNN.npz`` holds one shard's image and text vectors, its
items, its bad-record reports and how many input records it covers; NNNNNN is the
number of its input span (`clipsearch.inputs.readers.Span`). Each file is written
atomically, so after an interruption every shard on disk is complete, and a rerun with
the same job key encodes only the spans without one (with several encoder processes
the finished ones need not be a prefix).

After encoding, the builder keeps only each shard's counts and bad-record reports
(`ShardInfo`) and reads the vectors, items and thumbnails back shard by shard when it
builds the version, so its memory need not hold the corpus.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from clipsearch.builder.encoder import ItemError, ShardResult
from clipsearch.core.fsutil import atomic_write_bytes

WORK_DIR = ".work"


class ShardStore:
    def __init__(self, output: Path, job_key: str) -> None:
        self.root = output / WORK_DIR
        self.dir = self.root / job_key
        self.dir.mkdir(parents=True, exist_ok=True)
        # Work areas of other jobs are stale: their inputs or model changed since.
        for other in self.root.iterdir():
            if other != self.dir:
                shutil.rmtree(other, ignore_errors=True)

    def complete(self) -> dict[int, ShardInfo]:
        """The shards a previous run of this job finished, by span number."""
        return {int(p.stem.removeprefix("shard-")): read_info(p) for p in sorted(self.dir.glob("shard-*.npz"))}

    def write(self, index: int, shard: ShardResult) -> Path:
        path = shard_path(self.dir, index)
        write_shard(path, shard)
        return path

    def read(self, index: int) -> ShardResult:
        return read_shard(shard_path(self.dir, index))

    def vectors(self, indices: list[int], modality: str) -> Iterator[np.ndarray]:
        """The shards' vectors of `modality`, one array per shard, in the order of `indices`."""
        for i in indices:
            with np.load(shard_path(self.dir, i)) as z:
                yield z[modality]

    def column(self, indices: list[int], name: str, length: int) -> ShardColumn:
        return ShardColumn(self, indices, name, length)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class ShardInfo:
    """What the builder keeps of a shard while the others encode."""

    records: int
    errors: list[ItemError]
    image: int  # image items
    text: int  # text items


def shard_info(shard: ShardResult) -> ShardInfo:
    return ShardInfo(shard.records, shard.errors, len(shard.image_items), len(shard.text_items))


class ShardColumn(Collection[Any]):
    """One column (`image_items`, `text_items` or `thumbnails`) of several shards, read from
    their files each time it is iterated: a sized, re-iterable sequence that is never in
    memory whole (the index writer iterates items twice)."""

    def __init__(self, store: ShardStore, indices: list[int], name: str, length: int) -> None:
        self.store, self.indices, self.name, self.length = store, indices, name, length

    def __len__(self) -> int:
        return self.length

    def __contains__(self, value: object) -> bool:
        return any(x == value for x in self)

    def __iter__(self) -> Iterator[Any]:
        for i in self.indices:
            shard = read_shard(shard_path(self.store.dir, i), vectors=False, thumbnails=self.name == "thumbnails")
            yield from getattr(shard, self.name)


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:06d}.npz"


def write_shard(path: Path, shard: ShardResult) -> None:
    buf = io.BytesIO()
    meta = {
        "image_items": shard.image_items, "text_items": shard.text_items, "records": shard.records,
        "errors": [e.__dict__ for e in shard.errors],
    }
    sizes = np.fromiter((len(t) for t in shard.thumbnails), np.int64, len(shard.thumbnails))
    np.savez(buf, image=shard.image_vectors, text=shard.text_vectors,
             meta=np.frombuffer(orjson.dumps(meta), dtype=np.uint8),
             thumbs=np.frombuffer(b"".join(shard.thumbnails), dtype=np.uint8), thumb_sizes=sizes)
    atomic_write_bytes(path, buf.getvalue())


def read_info(path: Path) -> ShardInfo:
    with np.load(path) as z:
        meta = orjson.loads(z["meta"].tobytes())
    return ShardInfo(meta["records"], [ItemError(**e) for e in meta["errors"]], len(meta["image_items"]),
                     len(meta["text_items"]))


def read_shard(path: Path, vectors: bool = True, thumbnails: bool = True) -> ShardResult:
    with np.load(path) as z:
        meta = orjson.loads(z["meta"].tobytes())
        thumbs: list[bytes] = []
        empty = np.zeros((0, 0), np.float32)
        if thumbnails and "thumbs" in z.files and len(z["thumb_sizes"]):
            blob, ends = z["thumbs"].tobytes(), np.cumsum(z["thumb_sizes"]).tolist()
            thumbs = [blob[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        return ShardResult(
            image_vectors=z["image"] if vectors else empty, image_items=meta["image_items"],
            text_vectors=z["text"] if vectors else empty,
            text_items=meta["text_items"], errors=[ItemError(**e) for e in meta["errors"]], records=meta["records"],
            thumbnails=thumbs,
        )
