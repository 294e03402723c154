"""Incremental builds: a new version made from the published one (its stored vectors, items
and thumbnails, reused as they are) plus newly encoded inputs, less deleted ids.

A new item whose id is already in the base replaces it (an update). The new inputs' ids
carry their file's stem (`new:17`), as in a build of several inputs, so that a base built
from several inputs and extended equals one build of all of them (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.index.format import (
    MODALITIES,
    Manifest,
    Modality,
    Thumbnails,
    current_version_dir,
    read_faiss_index,
    read_items,
    read_manifest,
)
from clipsearch.index.search import reconstruct_all


class BaseError(RuntimeError):
    """The base version cannot be extended (none published, another model, ...)."""


@dataclass
class Part:
    """One modality's vectors with their items (and, for images, thumbnails, or None)."""

    vectors: np.ndarray
    items: list[dict[str, Any]]
    thumbnails: list[bytes] | None = None


@dataclass
class Base:
    version: str
    manifest: Manifest
    parts: dict[Modality, Part] = field(default_factory=dict)


def load_base(output: Path, fingerprint: str, dim: int) -> Base:
    """The published version of `output`, read back whole."""
    version_dir = current_version_dir(output) if output.is_dir() else None
    if version_dir is None:
        raise BaseError(f"--base: {output} has no published version to build on")
    manifest = read_manifest(version_dir)
    if manifest.model.fingerprint != fingerprint or manifest.dim != dim:
        raise BaseError(f"--base: version {manifest.version} was built with {manifest.model.spec!r} "
                        f"({manifest.model.fingerprint}); this build's model differs: rebuild in full")
    base = Base(manifest.version, manifest)
    for modality in MODALITIES:
        entry = manifest.indexes.get(modality)
        if entry is None:
            continue
        index = read_faiss_index(version_dir / entry.file, ondisk=entry.data is not None)
        vectors = reconstruct_all(index) if index.ntotal else np.zeros((0, dim), np.float32)
        thumbnails = None
        if entry.thumbnails is not None:
            store = Thumbnails(version_dir / entry.thumbnails, entry.count)
            thumbnails = [store.get(i) for i in range(entry.count)]
            store.close()
        base.parts[modality] = Part(np.asarray(vectors, np.float32), read_items(version_dir / entry.items, entry.count),
                                    thumbnails)
    return base


def merge(base: Part | None, new: Part, deleted: set[str]) -> tuple[Part, dict[str, int]]:
    """Base rows (less deleted and replaced ids), then new rows (less deleted ids), in order."""
    new_ids = {str(item["id"]) for item in new.items}
    counts = {"kept": 0, "replaced": 0, "deleted": 0, "added": 0}
    parts: list[Part] = []
    if base is not None:
        keep = [i for i, item in enumerate(base.items) if str(item["id"]) not in deleted and
                str(item["id"]) not in new_ids]
        counts["kept"] = len(keep)
        counts["replaced"] = sum(str(item["id"]) in new_ids for item in base.items)
        counts["deleted"] = sum(str(item["id"]) in deleted for item in base.items)
        parts.append(_rows(base, keep))
    fresh = [i for i, item in enumerate(new.items) if str(item["id"]) not in deleted]
    counts["added"] = len(fresh)
    parts.append(_rows(new, fresh))
    thumbs: list[bytes] | None = None
    if any(p.thumbnails is not None for p in parts):
        thumbs = [t for p in parts for t in (p.thumbnails if p.thumbnails is not None else [b""] * len(p.items))]
    dim = new.vectors.shape[1] if new.vectors.ndim == 2 else base.vectors.shape[1]  # type: ignore[union-attr]
    vectors = np.concatenate([p.vectors for p in parts]) if parts else np.zeros((0, dim), np.float32)
    return Part(vectors.astype(np.float32, copy=False), [i for p in parts for i in p.items], thumbs), counts


def _rows(part: Part, rows: list[int]) -> Part:
    thumbs = None if part.thumbnails is None else [part.thumbnails[i] for i in rows]
    return Part(part.vectors[rows] if len(rows) else part.vectors[:0], [part.items[i] for i in rows], thumbs)


def dedup(part: Part, modality: Modality) -> tuple[Part, int]:
    """`part` with each exact duplicate after its first occurrence left out: images with the
    same bytes (their `sha256`), texts with the same text. Returns how many were dropped."""
    seen: set[str] = set()
    keep: list[int] = []
    for row, item in enumerate(part.items):
        key = item.get("sha256") if modality == "image" else item.get("text")
        if key is None or key not in seen:
            keep.append(row)
            if key is not None:
                seen.add(str(key))
    return (_rows(part, keep) if len(keep) < len(part.items) else part), len(part.items) - len(keep)
