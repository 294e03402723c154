"""Writer stage: encoded shards to a resumable work area.

``DIR/.work/<job key>/shard-NNNNNN.npz`` holds one shard's image and text vectors, its
items, its bad-record reports and how many input records it covers; NNNNNN is the
number of its input span (`index_builder.readers.Span`). Each file is written
atomically, so after an interruption every shard on disk is complete, and a rerun with
the same job key encodes only the spans without one (with several encoder processes
the finished ones need not be a prefix).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import orjson

from clipsearch.core.fsutil import atomic_write_bytes
from index_builder.encoder import ItemError, ShardResult

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

    def complete(self) -> dict[int, ShardResult]:
        """The shards a previous run of this job finished, by span number."""
        return {int(p.stem.removeprefix("shard-")): read_shard(p) for p in sorted(self.dir.glob("shard-*.npz"))}

    def write(self, index: int, shard: ShardResult) -> Path:
        path = shard_path(self.dir, index)
        write_shard(path, shard)
        return path

    def read(self, index: int) -> ShardResult:
        return read_shard(shard_path(self.dir, index))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


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


def read_shard(path: Path) -> ShardResult:
    with np.load(path) as z:
        meta = orjson.loads(z["meta"].tobytes())
        thumbnails: list[bytes] = []
        if "thumbs" in z.files and len(z["thumb_sizes"]):
            blob, ends = z["thumbs"].tobytes(), np.cumsum(z["thumb_sizes"]).tolist()
            thumbnails = [blob[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        return ShardResult(
            image_vectors=z["image"], image_items=meta["image_items"], text_vectors=z["text"],
            text_items=meta["text_items"], errors=[ItemError(**e) for e in meta["errors"]], records=meta["records"],
            thumbnails=thumbnails,
        )
