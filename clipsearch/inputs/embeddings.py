"""Precomputed embeddings, in the folder layout clip-retrieval's `inference` step writes and
LAION publishes its embeddings in: `img_emb/img_emb_{i}.npy`, `text_emb/text_emb_{i}.npy` and
`metadata/metadata_{i}.parquet`, part i of each holding the same rows (either kind of vector
may be missing; so may the metadata). `clip-retrieval index` builds from such a folder;
`clipsearch index build --input FOLDER` does too, with no model pass: the records carry their
vectors, which must be L2-normalized (checked, per row).

Metadata columns read as in a Parquet corpus: `id`/`key` the item's id, `caption`/`text` its
text (indexed for lexical search, not encoded), the other scalar columns its metadata
(`url`, `similarity`, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

NORM_TOLERANCE = 1e-3
KINDS = {"image": ("img_emb", "img_emb"), "text": ("text_emb", "text_emb")}


class EmbeddingsError(ValueError):
    """An embeddings folder that cannot be read as one (the builder reports it as a bad input)."""


@dataclass(frozen=True)
class Parts:
    image: tuple[Path, ...]
    text: tuple[Path, ...]
    metadata: tuple[Path, ...]
    rows: tuple[int, ...]  # rows of each part


def is_embeddings_dir(path: Any) -> bool:
    """An embeddings folder, or a bare .npy file of vectors (image vectors; text vectors when
    its name starts with text_emb), on local disk."""
    if not isinstance(path, Path):
        return False
    if path.suffix.lower() == ".npy":
        return path.is_file()
    return path.is_dir() and any((path / sub).is_dir() for sub, _ in KINDS.values())


def _numbered(folder: Path, stem: str, suffix: str) -> tuple[Path, ...]:
    if not folder.is_dir():
        return ()
    pattern = re.compile(rf"{re.escape(stem)}_(\d+){re.escape(suffix)}$")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return tuple(p for _, p in sorted(found))


@lru_cache(maxsize=16)
def parts(path: Path) -> Parts:
    """The folder's parts, checked: as many of each kind, each part's vectors and metadata of
    one row count, one dimension throughout."""
    image: tuple[Path, ...]
    text: tuple[Path, ...]
    metadata: tuple[Path, ...] = ()
    if path.is_file():  # one .npy of vectors, no metadata
        image, text = ((), (path,)) if path.name.startswith("text_emb") else ((path,), ())
    else:
        image = _numbered(path / "img_emb", "img_emb", ".npy")
        text = _numbered(path / "text_emb", "text_emb", ".npy")
        metadata = _numbered(path / "metadata", "metadata", ".parquet")
    count = len(image) or len(text)
    if not count:
        raise EmbeddingsError(f"{path}: no img_emb/img_emb_N.npy or text_emb/text_emb_N.npy files")
    for name, files in (("img_emb", image), ("text_emb", text), ("metadata", metadata)):
        if files and len(files) != count:
            raise EmbeddingsError(f"{path}: {len(files)} {name} parts, but {count} of the vectors")
    rows: list[int] = []
    dims: set[int] = set()
    for i in range(count):
        sizes = set()
        for files in (image, text):
            if files:
                array = np.load(files[i], mmap_mode="r")
                if array.ndim != 2:
                    raise EmbeddingsError(f"{files[i]}: an array of shape {array.shape}, not (rows, dim)")
                sizes.add(array.shape[0])
                dims.add(array.shape[1])
        if metadata:
            import pyarrow.parquet as pq

            sizes.add(int(pq.ParquetFile(metadata[i]).metadata.num_rows))
        if len(sizes) != 1:
            raise EmbeddingsError(f"{path}: part {i} has {sorted(sizes)} rows in its files; they must agree")
        rows.append(sizes.pop())
    if len(dims) != 1:
        raise EmbeddingsError(f"{path}: vectors of dims {sorted(dims)}; one dimension throughout")
    return Parts(image, text, metadata, tuple(rows))


def dim(path: Path) -> int:
    p = parts(path)
    return int(np.load((p.image or p.text)[0], mmap_mode="r").shape[1])


def count(path: Path) -> int:
    return sum(parts(path).rows)


def unit_rows(vectors: np.ndarray, where: str, first: int = 0) -> np.ndarray:
    """`vectors` if every row is L2-normalized (and finite); else EmbeddingsError naming the
    first row that is not (numbered from `first`)."""
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1) <= NORM_TOLERANCE))
    if len(bad):
        row = int(bad[0])
        raise EmbeddingsError(f"{where}: row {first + row} has norm {norms[row]:.4f}; the vectors must be "
                              "L2-normalized (normalize them first, as clip-retrieval writes them)")
    return vectors


def _vectors(files: tuple[Path, ...], part: int, lo: int, hi: int) -> np.ndarray | None:
    if not files:
        return None
    return unit_rows(np.asarray(np.load(files[part], mmap_mode="r")[lo:hi], dtype=np.float32), files[part].name, lo)


def chunks(path: Path, first: int, number: int) -> Iterator[tuple[int, int, int, np.ndarray | None,
                                                                   np.ndarray | None]]:
    """Rows first .. first + number - 1 (0-based, over all parts), a part at a time: (part,
    its first row, its end row, the image vectors, the text vectors)."""
    p = parts(path)
    start, end = 0, first + number
    for part, rows in enumerate(p.rows):
        lo, hi = max(first, start) - start, min(end, start + rows) - start
        if lo < hi:
            yield part, lo, hi, _vectors(p.image, part, lo, hi), _vectors(p.text, part, lo, hi)
        start += rows
        if start >= end:
            break
