"""The on-disk index format, shared by the service (reader) and the index builder (writer).

An index directory (``--index-dir``) is either a single version directory or a
versioned root::

    DIR/
      CURRENT                      # one line: the name of the served version
      versions/
        20261122T233000Z-1a2b3c/   # one complete, immutable version
          manifest.json
          image.faiss              # image vectors (text -> image search)
          image.items.arrow        # row i describes FAISS id i: id, metadata (Arrow IPC, see `items`)
          text.faiss               # text vectors (image -> text search)
          text.items.arrow         # id, text, metadata
          image.thumbs             # optional: a small JPEG per image item (see `Thumbnails`)

A version is written under a temporary name in ``versions/`` and renamed into place
only when complete; ``CURRENT`` is then replaced atomically (temp file + rename), so a
reader always sees a whole version and a rebuild swaps versions in one step. A
directory that holds ``manifest.json`` itself is read as a single version.

Vectors are float32, L2-normalized, searched by inner product (= cosine).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Collection, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from clipsearch.core.errors import IndexLoadError, IndexMismatch
from clipsearch.core.fsutil import atomic_write_text
from clipsearch.index.items import open_items, read_jsonl_items, write_items
from clipsearch.index.lexical import write_lexical

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "CURRENT"
VERSIONS_DIR = "versions"
Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, ...] = ("image", "text")
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ModelRef(BaseModel):
    """Which weights produced the vectors. `fingerprint` decides compatibility."""

    spec: str
    pretrained: str | None = None
    fingerprint: str
    family: str = "open_clip"  # or the transformers model_type (clip, chinese_clip, siglip)


class IndexEntry(BaseModel):
    count: int = Field(ge=0)
    index_type: str  # flat | hnsw | ivf | ivfpq | a FAISS factory string
    factory: str
    file: str = Field(pattern=_FILE_NAME)  # plain names: a manifest cannot point outside its version
    items: str = Field(pattern=_FILE_NAME)
    search_params: dict[str, int] = Field(default_factory=dict)  # nprobe / efSearch defaults
    recall_at_10: float | None = None
    thumbnails: str | None = Field(None, pattern=_FILE_NAME)  # image indexes: the thumbnail file, if built
    thumbnail_count: int = Field(0, ge=0)  # items that have one (an unreadable image's is left empty)
    data: str | None = Field(None, pattern=_FILE_NAME)  # on-disk inverted lists (ivfpq-disk), beside `file`
    lexical: str | None = Field(None, pattern=_FILE_NAME)  # the items' texts for BM25 (index/lexical.py), if built
    lexical_count: int = Field(0, ge=0)  # items with a text in it
    refine: str | None = Field(None, pattern=_FILE_NAME)  # the full vectors (fp16 .npy) that re-rank candidates


class FileSum(BaseModel):
    """A version file's size and xxh3-128 checksum; `sampled` covers SAMPLE_BLOCKS blocks spread
    over a file larger than FULL_VERIFY_BYTES, which a reload checks instead of the whole file."""

    size: int = Field(ge=0)
    xxh3_128: str
    sampled: str | None = None


VerifyMode = Literal["auto", "full", "off"]
FULL_VERIFY_BYTES = 1 << 30  # larger files are checked by sample on load (`auto`): a reload stays seconds
SAMPLE_BLOCKS = 256
SAMPLE_BLOCK_BYTES = 256 << 10
_HASH_CHUNK = 8 << 20


def file_sum(path: Path) -> FileSum:
    """The checksum a manifest records for `path` (and its sample, for a large file)."""
    import xxhash

    whole = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            whole.update(chunk)
    size = path.stat().st_size
    return FileSum(size=size, xxh3_128=whole.hexdigest(),
                   sampled=_sampled_sum(path, size) if size > FULL_VERIFY_BYTES else None)


def _sampled_sum(path: Path, size: int) -> str:
    import xxhash

    digest = xxhash.xxh3_128(str(size).encode())
    step = max(SAMPLE_BLOCK_BYTES, size // SAMPLE_BLOCKS)
    with open(path, "rb") as f:
        for offset in range(0, size, step):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BLOCK_BYTES))
        f.seek(max(0, size - SAMPLE_BLOCK_BYTES))
        digest.update(f.read(SAMPLE_BLOCK_BYTES))
    return digest.hexdigest()


def verify_files(version_dir: Path, manifest: Manifest, mode: VerifyMode = "auto") -> None:
    """Check every file of a version against its manifest's checksums, or raise IndexLoadError
    naming the file. `auto` checks files up to FULL_VERIFY_BYTES whole and larger ones by their
    sample (with their size); `full` checks everything whole; `off` checks nothing. A version
    written before checksums were recorded has none to check."""
    if mode == "off":
        return
    for name, want in manifest.files.items():
        path = version_dir / name
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise IndexLoadError(f"{path}: {exc.strerror}; the version is incomplete") from None
        if size != want.size:
            raise IndexLoadError(f"{path}: {size} bytes, the manifest says {want.size}; the version is damaged")
        if mode == "auto" and want.sampled is not None:
            ok = _sampled_sum(path, size) == want.sampled
        else:
            ok = file_sum(path).xxh3_128 == want.xxh3_128
        if not ok:
            raise IndexLoadError(f"{path}: its checksum differs from the manifest's; the version is damaged "
                                 "(rebuild it, or publish another)")


def file_sums(version_dir: Path) -> dict[str, FileSum]:
    """Checksums of every file of a version directory but its manifest."""
    return {p.name: file_sum(p) for p in sorted(version_dir.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    version: str
    model: ModelRef
    dim: int
    metric: Literal["ip"] = "ip"
    normalized: bool = True
    indexes: dict[Modality, IndexEntry]
    created_at: str
    build: dict[str, Any] = Field(default_factory=dict)  # builder info: inputs, timings, errors
    files: dict[str, FileSum] = Field(default_factory=dict)  # every other file of the version, checked on load

    def check_compatible(self, fingerprint: str, dim: int) -> None:
        """Raise `IndexMismatch` unless this index was built by the served model."""
        if self.dim != dim:
            raise IndexMismatch(
                f"index version {self.version} has dim {self.dim}, the served model has dim {dim}"
            )
        if self.model.fingerprint != fingerprint:
            raise IndexMismatch(
                f"index version {self.version} was built with model {self.model.spec!r} "
                f"({self.model.family}, {self.model.fingerprint}), the service runs {fingerprint}"
            )


def new_version_name() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def read_manifest(version_dir: Path) -> Manifest:
    path = version_dir / MANIFEST_NAME
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise IndexLoadError(f"{path}: manifest not found") from None
    except (ValidationError, ValueError) as exc:
        raise IndexLoadError(f"{path}: invalid manifest: {exc}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise IndexLoadError(f"{path}: format_version {manifest.format_version}, expected {FORMAT_VERSION}")
    return manifest


def current_version_dir(index_dir: str | os.PathLike[str]) -> Path | None:
    """The version directory `index_dir` points at, or None when nothing is published yet.

    Raises `IndexLoadError` when `index_dir` does not exist or `CURRENT` names a
    version that is not there.
    """
    root = Path(index_dir)
    if not root.is_dir():
        raise IndexLoadError(f"index directory {root} does not exist")
    if (root / MANIFEST_NAME).is_file():
        return root
    pointer = root / CURRENT_NAME
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _VERSION_NAME.match(name):
        raise IndexLoadError(f"{pointer}: invalid version name {name!r}")
    version_dir = root / VERSIONS_DIR / name
    if not version_dir.is_dir():
        raise IndexLoadError(f"{pointer} names version {name!r}, which does not exist")
    return version_dir


def publish_version(index_dir: str | os.PathLike[str], staged: Path, name: str, keep: int | None = None) -> Path:
    """Move a complete staged version into `versions/` and point `CURRENT` at it.

    `staged` must be a directory on the same file system (use `staging_dir`). With
    `keep`, only the newest `keep` versions (the new one included) are retained; the
    version being replaced stays until the next publish so in-flight readers finish.
    """
    root = Path(index_dir)
    final = root / VERSIONS_DIR / name
    if final.exists():
        raise IndexLoadError(f"version {name} already exists in {root}")
    read_manifest(staged)  # never publish something unreadable
    os.replace(staged, final)
    atomic_write_text(root / CURRENT_NAME, name + "\n")
    if keep is not None and keep > 0:
        prune_versions(root, keep)
    return final


def staging_dir(index_dir: str | os.PathLike[str]) -> Path:
    """A fresh hidden directory under `versions/` for writing a version before publishing."""
    versions = Path(index_dir) / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    path = versions / f".staging-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def list_versions(index_dir: str | os.PathLike[str]) -> list[str]:
    versions = Path(index_dir) / VERSIONS_DIR
    if not versions.is_dir():
        return []
    return sorted(p.name for p in versions.iterdir() if p.is_dir() and not p.name.startswith("."))


def prune_versions(index_dir: str | os.PathLike[str], keep: int) -> list[str]:
    """Delete all but the newest `keep` versions, never the current one."""
    root = Path(index_dir)
    current = current_version_dir(root)
    names = list_versions(root)
    doomed = [n for n in names[: max(0, len(names) - keep)] if current is None or n != current.name]
    for name in doomed:
        shutil.rmtree(root / VERSIONS_DIR / name, ignore_errors=True)
    return doomed


# -- item metadata ---------------------------------------------------------------
def read_items(path: Path, expected: int) -> list[dict[str, Any]]:
    """A version's items as dicts, in row order (for builders; the service maps them, see `items`)."""
    return list(open_items(path, expected))


def upgrade_items(index_dir: str | os.PathLike[str], keep: int | None = None) -> Path | None:
    """Publish the served version again with its JSON-lines items (older versions) rewritten
    as memory-mapped Arrow files and its files' checksums recorded; its index, lists and
    thumbnails are hard-linked (copied where the file system cannot link), nothing is
    re-encoded. Returns the new version, or None when the served one needs nothing."""
    root = Path(index_dir)
    current = current_version_dir(root)
    if current is None:
        raise IndexLoadError(f"no index version published in {root}")
    if current == root:
        raise IndexLoadError(f"{root} is a single version directory; upgrade works on an index directory "
                             "(CURRENT + versions/), such as the builder writes")
    manifest = read_manifest(current)
    old = {m: e for m, e in manifest.indexes.items() if e.items.endswith(".jsonl")}
    if not old and manifest.files:
        return None
    name, staged = new_version_name(), staging_dir(root)
    try:
        for path in current.iterdir():
            if path.is_file() and path.name != MANIFEST_NAME and path.name not in {e.items for e in old.values()}:
                try:
                    os.link(path, staged / path.name)
                except OSError:
                    shutil.copy2(path, staged / path.name)
        entries = dict(manifest.indexes)
        for modality, entry in old.items():
            write_items(staged / f"{modality}.items.arrow", read_jsonl_items(current / entry.items, entry.count))
            entries[modality] = entry.model_copy(update={"items": f"{modality}.items.arrow"})
        upgraded = manifest.model_copy(update={
            "version": name, "indexes": entries, "build": {**manifest.build, "items_upgraded_from": manifest.version},
            "files": file_sums(staged)})
        atomic_write_text(staged / MANIFEST_NAME, upgraded.model_dump_json(indent=2))
        return publish_version(root, staged, name, keep=keep)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


# -- writing a version from in-memory vectors -------------------------------------
def faiss_module() -> Any:
    """The `faiss` module, or an error saying which extra installs it."""
    try:
        import faiss
    except ImportError:
        raise IndexLoadError("FAISS is not installed: pip install 'clipsearch[cpu]' (or [gpu] for faiss-gpu)") from None
    return faiss


def build_faiss_index(vectors: np.ndarray, factory: str = "Flat") -> Any:
    """A trained, filled FAISS inner-product index for L2-normalized `vectors`."""
    faiss = faiss_module()

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    return index


class Thumbnails:
    """One version's thumbnails, in one file: `count + 1` little-endian int64 offsets into the
    data that follows them, then the data (thumbnail i is bytes offsets[i]:offsets[i+1]; an
    empty one means none). Read with one `pread` per thumbnail; thread-safe."""

    MEDIA_TYPE = "image/jpeg"

    def __init__(self, path: Path, count: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        header = os.pread(self._fd, 8 * (count + 1), 0)
        if len(header) != 8 * (count + 1):
            os.close(self._fd)
            raise IndexLoadError(f"{path}: truncated thumbnail file")
        self._offsets = np.frombuffer(header, dtype="<i8")
        self._base = 8 * (count + 1)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def size(self, row: int) -> int:
        return int(self._offsets[row + 1] - self._offsets[row]) if 0 <= row < len(self) else 0

    def get(self, row: int) -> bytes:
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        return os.pread(self._fd, end - start, self._base + start) if end > start else b""

    def close(self) -> None:
        os.close(self._fd)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self._fd)

    @staticmethod
    def write(path: Path, thumbnails: Collection[bytes]) -> int:
        """Write the file; returns how many thumbnails are not empty."""
        sizes = np.fromiter((len(t) for t in thumbnails), np.int64, len(thumbnails))
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype("<i8")
        with open(path, "wb") as f:
            f.write(offsets.tobytes())
            for t in thumbnails:
                f.write(t)
        return int((sizes > 0).sum())


def ondisk_lists(index: Any) -> Any:
    """The `OnDiskInvertedLists` of an IVF index stored on disk, or None."""
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def read_faiss_index(path: Path, *, ondisk: bool) -> Any:
    """Read an index for serving: memory-mapped and read-only. An on-disk IVF keeps its lists
    in a `.ivfdata` file beside it, which it maps itself (found in the same directory, so a
    version can be moved or renamed)."""
    faiss = faiss_module()
    if ondisk:
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        pass  # some index types cannot be memory-mapped; read them into memory
    return faiss.read_index(str(path))


def write_refine(path: Path, vectors: np.ndarray, chunk: int = 1 << 18) -> str:
    """`vectors` as fp16 rows in an .npy file, a chunk at a time (they may be a memory map
    larger than RAM); returns the file's name."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=vectors.shape)
    for lo in range(0, len(vectors), chunk):
        out[lo : lo + chunk] = np.asarray(vectors[lo : lo + chunk], np.float32)
    out.flush()
    del out
    return path.name


def write_version(
    out_dir: Path,
    *,
    model: ModelRef,
    dim: int,
    indexes: Mapping[Modality, tuple[Any, Collection[Mapping[str, Any]], dict[str, Any]]],
    version: str,
    build: dict[str, Any] | None = None,
    thumbnails: Collection[bytes] | None = None,
    lexical: bool = True,
) -> Manifest:
    """Write FAISS indexes, their items and the manifest into `out_dir` (not yet published).

    `indexes` maps a modality to (faiss index, items, entry fields) where entry fields
    hold at least `index_type` and `factory`, optionally `search_params` and
    `recall_at_10`. `thumbnails`, if given, has one per image item. `lexical`: the items'
    texts also go into a BM25 table (`index.lexical`) for lexical and hybrid search.
    """
    faiss = faiss_module()
    entries: dict[Modality, IndexEntry] = {}
    for modality, (index, items, fields) in indexes.items():
        if index.d != dim:
            raise ValueError(f"{modality} index has dim {index.d}, expected {dim}")
        if index.ntotal != len(items):
            raise ValueError(f"{modality} index has {index.ntotal} vectors but {len(items)} items")
        ondisk = ondisk_lists(index)
        if ondisk is not None:  # its lists live in a file of their own: move it in beside the index
            data = out_dir / f"{modality}.ivfdata"
            os.replace(ondisk.filename, data)  # the open mapping follows the file
            ondisk.filename = str(data)
            fields = {**fields, "data": data.name}
        faiss.write_index(index, str(out_dir / f"{modality}.faiss"))
        write_items(out_dir / f"{modality}.items.arrow", items)
        refine = fields.get("refine_vectors")
        if refine is not None:  # the vectors themselves, for the refine stage (builder/indexing.py)
            fields = {**{k: v for k, v in fields.items() if k != "refine_vectors"},
                      "refine": write_refine(out_dir / f"{modality}.refine.npy", refine)}
        if lexical:
            texts = [item.get("text") for item in items]
            if any(texts):
                fields = {**fields, "lexical": f"{modality}.lexical.sqlite",
                          "lexical_count": write_lexical(out_dir / f"{modality}.lexical.sqlite", texts)}
        if modality == "image" and thumbnails is not None:
            if len(thumbnails) != len(items):
                raise ValueError(f"{len(thumbnails)} thumbnails for {len(items)} image items")
            fields = {**fields, "thumbnails": "image.thumbs",
                      "thumbnail_count": Thumbnails.write(out_dir / "image.thumbs", thumbnails)}
        entries[modality] = IndexEntry(
            count=int(index.ntotal), file=f"{modality}.faiss", items=f"{modality}.items.arrow", **fields
        )
    manifest = Manifest(
        version=version,
        model=model,
        dim=dim,
        indexes=entries,
        created_at=datetime.now(timezone.utc).isoformat(),
        build=build or {},
        files=file_sums(out_dir),
    )
    # The manifest goes last: a version directory with a manifest is complete.
    atomic_write_text(out_dir / MANIFEST_NAME, manifest.model_dump_json(indent=2))
    return manifest
