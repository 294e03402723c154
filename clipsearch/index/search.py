"""Search over a published index version, behind one interface with three backends.

* ``faiss-cpu``: FAISS on the CPU (memory-mapped, read-only where FAISS allows);
* ``faiss-gpu``: FAISS on the GPU when faiss-gpu is importable and CUDA is present
  (flat and IVF indexes; HNSW stays on the CPU);
* ``torch``: exact search in torch (matmul + top-k), on the GPU for machines without
  faiss-gpu; it also runs on the CPU, which is how its logic is tested without a GPU.

Search is stateless: nprobe / efSearch travel with each call as FAISS
``SearchParameters``; nothing is ever set on the shared index object.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipsearch.core.errors import IndexLoadError
from clipsearch.index.filters import Filter
from clipsearch.index.format import (
    MODALITIES,
    VERSIONS_DIR,
    IndexEntry,
    Manifest,
    Modality,
    Thumbnails,
    VerifyMode,
    faiss_module,
    read_faiss_index,
    read_manifest,
    verify_files,
)
from clipsearch.index.items import ItemTable, open_items
from clipsearch.index.lexical import LexicalIndex

log = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss-cpu", "faiss-gpu", "torch")


@dataclass(frozen=True)
class SearchParams:
    nprobe: int | None = None
    ef_search: int | None = None


EXACT_SELECTION = 20_000  # a filter selecting at most this many rows is searched exactly over them
_CACHED_FLOATS = 1 << 22  # the selected rows' vectors are kept with their selection up to this size


class Selection:
    """The rows of one index that a filter selects, as sorted ids and as a FAISS bitmap."""

    def __init__(self, mask: np.ndarray, key: str) -> None:
        self.key = key
        self.mask = mask
        self.count = int(mask.sum())
        self.bitmap = np.packbits(mask, bitorder="little")
        self.vectors: np.ndarray | None = None  # filled by exact searches of small selections
        self.device_masks: dict[Any, Any] = {}
        self._rows: np.ndarray | None = None

    @property
    def rows(self) -> np.ndarray:
        """The selected rows, sorted (made when an exact search needs them)."""
        if self._rows is None:
            self._rows = np.flatnonzero(self.mask).astype(np.int64)
        return self._rows


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata: dict[str, Any]
    text: str | None = None
    row: int = -1  # its position in the index (thumbnails, "more like this")
    vector: list[float] | None = None  # the stored vector, when asked for


class SearchBackend(Protocol):
    name: str
    ntotal: int
    # The torch device whose tensors `search` takes as they are (no host round trip), if any.
    tensor_device: Any

    def search(self, queries: Any, k: int, params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k); ids of -1 mark empty slots. `queries`: a float32
        array, or a tensor on `tensor_device`."""
        ...


_faiss = faiss_module


def faiss_gpu_available() -> bool:
    try:
        faiss = _faiss()
    except IndexLoadError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class FaissBackend:
    """FAISS on CPU or GPU with per-call search parameters."""

    def __init__(self, index: Any, *, gpu: bool = False) -> None:
        faiss = _faiss()
        self._faiss = faiss
        self.name = "faiss-cpu"
        self.tensor_device = None
        self._ivf = faiss.try_extract_index_ivf(index)
        self._hnsw = isinstance(index, faiss.IndexHNSW)
        if gpu and not self._hnsw:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
            self.name = "faiss-gpu"
        self.index = index
        self.ntotal = int(index.ntotal)

    @property
    def selects(self) -> bool:
        """Whether `search` takes a selection (FAISS on the GPU does not, for most indexes)."""
        return self.name == "faiss-cpu"

    def search(self, queries: np.ndarray, k: int, params: SearchParams,
               selection: Selection | None = None) -> tuple[np.ndarray, np.ndarray]:
        faiss = self._faiss
        extra: dict[str, Any] = {}
        selector = None
        if selection is not None:
            selector = faiss.IDSelectorBitmap(len(selection.mask), faiss.swig_ptr(selection.bitmap))
            extra["sel"] = selector
        sp = None
        if self._ivf is not None and (params.nprobe or extra):
            sp = faiss.SearchParametersIVF(**({"nprobe": int(params.nprobe)} if params.nprobe else {}), **extra)
        elif self._hnsw and (params.ef_search or extra):
            sp = faiss.SearchParametersHNSW(**({"efSearch": int(params.ef_search)} if params.ef_search else {}),
                                            **extra)
        elif extra:
            sp = faiss.SearchParameters(**extra)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores, ids = self.index.search(queries, k, params=sp)
        del selector  # kept alive until the search returned
        return scores, ids


class TorchExactBackend:
    """Exact inner-product search as one matmul + top-k, on any torch device."""

    def __init__(self, vectors: np.ndarray, *, device: str = "cuda", dtype: str = "auto") -> None:
        import torch

        from clipsearch.model.cuda_wait import to_numpy_all

        self._torch = torch
        self._to_numpy_all = to_numpy_all
        self.device = torch.device(device)
        if dtype == "auto":
            tdtype = torch.float16 if self.device.type == "cuda" else torch.float32
        else:
            tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device, tdtype)
        self.ntotal = int(self.vectors.shape[0])
        self.name = f"torch-{self.device.type}"
        self.tensor_device = self.device

    selects = True

    def search(self, queries: Any, k: int, params: SearchParams,
               selection: Selection | None = None) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            if not isinstance(queries, torch.Tensor):
                queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
            q = queries.to(self.device, self.vectors.dtype)
            scores = (q @ self.vectors.T).float()
            if selection is not None:
                keep = selection.device_masks.get(self.device)
                if keep is None:
                    keep = selection.device_masks[self.device] = torch.from_numpy(selection.mask).to(self.device)
                scores.masked_fill_(~keep, -torch.inf)
            kk = min(k, self.ntotal)
            top = torch.topk(scores, kk, dim=1)
            s, i = self._to_numpy_all(top.values, top.indices)  # one wait for the GPU
            i = i.astype(np.int64)
            i[np.isneginf(s)] = -1  # rows the selection left out
        if kk < k:  # pad like FAISS does, so callers see one convention
            s = np.pad(s, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            i = np.pad(i, ((0, 0), (0, k - kk)), constant_values=-1)
        return s, i


def _rerank(refine: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top `k` of each query's candidates by their stored full vectors (the refine file,
    memory-mapped: only the candidates' rows are read), as FAISS's IndexRefine does."""
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for r, (query, rows) in enumerate(zip(queries, candidates, strict=True)):
        rows = rows[rows >= 0]
        if not len(rows):
            continue
        order = np.argsort(rows)  # ascending rows: sequential reads of the file
        sims = np.empty(len(rows), np.float32)
        sims[order] = np.asarray(refine[rows[order]], np.float32) @ query
        best = np.lexsort((rows, -sims))[:k]  # ties: lower id first
        scores[r, : len(best)], ids[r, : len(best)] = sims[best], rows[best]
    return scores, ids


def _host(queries: Any) -> np.ndarray:
    """Query rows as float32 on the host (from a device tensor, if need be)."""
    if hasattr(queries, "detach"):
        queries = queries.detach().float().cpu().numpy()
    return np.ascontiguousarray(queries, dtype=np.float32)


def _read_faiss(path: Path, data: str | None = None) -> Any:
    if not path.is_file():
        raise IndexLoadError(f"{path}: index file not found")
    if data is not None and not (path.parent / data).is_file():
        raise IndexLoadError(f"{path.parent / data}: the index's on-disk lists are missing")
    try:
        return read_faiss_index(path, ondisk=data is not None)
    except RuntimeError as exc:
        raise IndexLoadError(f"{path}: unreadable FAISS index: {str(exc).splitlines()[0]}") from None


def _check_finite(vectors: np.ndarray, path: Path) -> None:
    """Refuse an index holding NaN or infinite vectors: they sort anywhere and drop hits."""
    for start in range(0, len(vectors), 1 << 16):  # in blocks: a memory-mapped index stays unread
        if not np.isfinite(vectors[start : start + (1 << 16)]).all():
            raise IndexLoadError(f"{path}: holds NaN or infinite vectors; rebuild the index")


def _stored_vectors(index: Any) -> list[np.ndarray]:
    """What of an index's vectors can be read as floats without a copy: a flat store (also
    HNSW's), an IVF's centroids and, for IVF-Flat, its inverted lists. PQ codes are not
    floats; their index's centroids are checked."""
    faiss = _faiss()

    def floats(ptr: Any, n: int, d: int) -> np.ndarray:
        return faiss.rev_swig_ptr(ptr, n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)

    store = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    if isinstance(store, faiss.IndexFlat):
        return [floats(store.get_xb(), store.ntotal, store.d)]
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return []
    quantizer = faiss.downcast_index(ivf.quantizer)
    out = [floats(quantizer.get_xb(), quantizer.ntotal, quantizer.d)] if isinstance(quantizer, faiss.IndexFlat) else []
    if isinstance(ivf, faiss.IndexIVFFlat):
        lists = ivf.invlists
        for i in range(ivf.nlist):
            n = lists.list_size(i)
            if n:
                codes = faiss.rev_swig_ptr(lists.get_codes(i), n * ivf.code_size)
                out.append(codes.view(np.float32).reshape(n, ivf.d))
    return out


def reconstruct_all(index: Any) -> np.ndarray:
    """Every stored vector of a FAISS index (decoded from its codes, for PQ), float32."""
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def choose_backend(requested: str, device: str) -> str:
    """`auto`: faiss-gpu if usable, else torch on a CUDA device, else faiss-cpu."""
    if requested not in BACKENDS:
        raise IndexLoadError(f"unknown search backend {requested!r}; expected one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "faiss-gpu" if faiss_gpu_available() else "torch"
    return "faiss-cpu"


class LoadedIndex:
    """One modality's index with its items; thread-safe for concurrent searches."""

    def __init__(self, modality: Modality, entry: IndexEntry, backend: SearchBackend,
                 items: ItemTable | Sequence[Mapping[str, Any]], *, source: Any = None,
                 thumbnails: Thumbnails | None = None, lexical: LexicalIndex | None = None,
                 refine: np.ndarray | None = None):
        self.modality = modality
        self.entry = entry
        self.backend = backend
        self.items = items if isinstance(items, ItemTable) else ItemTable.from_items(items)
        self.thumbnails = thumbnails
        self.lexical = lexical  # BM25 over the items' texts, when the build wrote it
        # full vectors (fp16), memory-mapped: a FAISS search's candidates are re-ranked by them
        self.refine = refine if not isinstance(backend, TorchExactBackend) else None
        self.refine_factor = int(entry.search_params.get("refine", 1))
        self._source = source  # the FAISS index as read (on the CPU): stored vectors come from it
        self._lock = threading.Lock()
        self._selections: OrderedDict[str, Selection] = OrderedDict()

    def row_of(self, item_id: str) -> int | None:
        """The row of the item with this id (the first, if ids repeat), or None."""
        return self.items.row_of(item_id)

    def vector(self, row: int) -> np.ndarray:
        """The stored vector of a row, float32 (1, dim) (decoded from its codes, for PQ)."""
        return self.vectors_of(np.asarray([row], np.int64))

    def has_thumbnail(self, row: int) -> bool:
        return self.thumbnails is not None and self.thumbnails.size(row) > 0

    def thumbnail(self, row: int) -> bytes:
        """The row's thumbnail, or b"" (none built, or its image could not be read)."""
        if self.thumbnails is None or not 0 <= row < len(self.thumbnails):
            return b""
        return self.thumbnails.get(row)

    @property
    def count(self) -> int:
        return self.backend.ntotal


    def searches_on(self, device: Any) -> bool:
        """Whether this index takes query tensors on `device` as they are (torch search there)."""
        return self.backend.tensor_device == device  # None for FAISS: never equal

    def search(self, queries: np.ndarray, k: int, params: SearchParams | None = None) -> list[list[Hit]]:
        return self.to_hits(*self.raw_search(queries, k, params))

    def raw_search(
        self, queries: Any, k: int, params: SearchParams | None = None, selection: Selection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top `k` (at most the index size), with this index's default
        search parameters filling in what `params` leaves unset; with a `selection`, of its
        rows only, and `min(k, selected)` of them whenever that many are selected: a small
        selection is searched exactly, a large one inside the index (FAISS's IDSelector), and a
        query the index answers with too few (an approximate index) exactly after all."""
        defaults = self.entry.search_params
        params = params or SearchParams()
        params = SearchParams(
            nprobe=params.nprobe or defaults.get("nprobe"),
            ef_search=params.ef_search or defaults.get("efSearch"),
        )
        k = max(1, min(k, self.count))
        if selection is not None and (selection.count <= EXACT_SELECTION or not getattr(self.backend, "selects",
                                                                                          False)):
            return self._exact(queries, k, selection)
        wide = k if self.refine is None else min(self.count, k * self.refine_factor)
        if selection is None:
            scores, ids = self.backend.search(queries, wide, params)
        else:
            scores, ids = self.backend.search(queries, wide, params, selection)  # type: ignore[call-arg]
        if self.refine is not None:
            scores, ids = _rerank(self.refine, _host(queries), ids, k)
        if selection is not None:
            short = (ids >= 0).sum(axis=1) < min(k, selection.count)
            if short.any():
                rows = np.flatnonzero(short)
                scores[rows], ids[rows] = self._exact(_host(queries)[rows], k, selection)
        return scores, ids

    def _exact(self, queries: Any, k: int, selection: Selection) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the selected rows' stored vectors."""
        queries = _host(queries)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        if selection.count == 0:
            return scores, ids
        vectors = selection.vectors if selection.vectors is not None else self.vectors_of(selection.rows)
        if selection.vectors is None and vectors.size <= _CACHED_FLOATS:
            selection.vectors = vectors
        sims = queries @ vectors.T
        kk = min(k, selection.count)
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        for r in range(len(queries)):
            order = top[r][np.lexsort((selection.rows[top[r]], -sims[r, top[r]]))]  # ties: lower id first
            scores[r, :kk] = sims[r, order]
            ids[r, :kk] = selection.rows[order]
        return scores, ids

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of `rows`, float32 (len(rows), dim): from the refine file when the
        index has one (closer than a PQ code's decoding)."""
        if len(rows) == 0:
            return np.zeros((0, int(self._source.d)), np.float32)
        if self.refine is not None:
            return np.asarray(self.refine[rows], np.float32)
        if isinstance(self.backend, TorchExactBackend):
            import torch

            return self.backend.vectors[torch.from_numpy(rows).to(self.backend.device)].float().cpu().numpy()
        with self._lock:
            ivf = _faiss().try_extract_index_ivf(self._source)
            if ivf is not None and ivf.direct_map.type == _faiss().DirectMap.NoMap:
                ivf.make_direct_map()
        return np.asarray(self._source.reconstruct_batch(rows), np.float32).reshape(len(rows), -1)

    def select(self, flt: Filter) -> Selection:
        """The rows `flt` selects, cached per filter (the last 32: about 1.1 bytes per item each)."""
        with self._lock:
            hit = self._selections.get(flt.key)
            if hit is not None:
                self._selections.move_to_end(flt.key)
                return hit
        selection = Selection(flt.mask(self.items), flt.key)
        with self._lock:
            self._selections[flt.key] = selection
            while len(self._selections) > 32:
                self._selections.popitem(last=False)
        return selection

    def to_hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        out: list[list[Hit]] = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = []
            for score, idx in zip(row_scores, row_ids, strict=True):
                if idx < 0:  # FAISS pads with -1 when fewer than k results exist
                    continue
                item = self.items.get(int(idx))
                hits.append(Hit(id=str(item["id"]), score=float(score), metadata=item.get("metadata") or {},
                                text=item.get("text"), row=int(idx)))
            out.append(hits)
        return out


class IndexSet:
    """The indexes of one published version. Immutable once loaded: a reload builds a new one."""

    def __init__(self, manifest: Manifest, path: Path, indexes: dict[Modality, LoadedIndex]):
        self.manifest = manifest
        self.path = path
        self.indexes = indexes

    @property
    def version(self) -> str:
        return self.manifest.version

    def get(self, modality: Modality) -> LoadedIndex | None:
        return self.indexes.get(modality)


def load_index_set(
    version_dir: Path,
    *,
    fingerprint: str,
    dim: int,
    backend: str = "faiss-cpu",
    device: str = "cpu",
    verify: VerifyMode = "auto",
) -> IndexSet:
    """Load and check one version directory: its manifest, the model it was built with, and
    its files' checksums (`verify`). Raises IndexLoadError / IndexMismatch."""
    manifest = read_manifest(version_dir)
    if version_dir.parent.name == VERSIONS_DIR and manifest.version != version_dir.name:
        raise IndexLoadError(f"{version_dir}: its manifest says version {manifest.version!r}; a published "
                             "version's directory and manifest name it alike")
    manifest.check_compatible(fingerprint, dim)
    if not manifest.files and verify != "off":
        log.warning("index version %s has no checksums (written by an older clipsearch): its files are not "
                    "verified; `clipsearch index upgrade` or a rebuild records them", manifest.version)
    verify_files(version_dir, manifest, verify)
    indexes: dict[Modality, LoadedIndex] = {}
    for modality in MODALITIES:
        entry = manifest.indexes.get(modality)
        if entry is None:
            continue
        index = _read_faiss(version_dir / entry.file, entry.data)
        if index.d != manifest.dim or index.ntotal != entry.count:
            raise IndexLoadError(
                f"{version_dir / entry.file}: {index.ntotal} vectors of dim {index.d}, "
                f"manifest says {entry.count} of dim {manifest.dim}"
            )
        items = open_items(version_dir / entry.items, entry.count)
        impl: SearchBackend
        if backend == "torch":
            vectors = reconstruct_all(index)
            _check_finite(vectors, version_dir / entry.file)
            impl = TorchExactBackend(vectors, device=device)
        elif backend == "faiss-gpu":
            impl = FaissBackend(index, gpu=True)
        else:
            impl = FaissBackend(index)
        if backend != "torch":
            for vectors in _stored_vectors(index):
                _check_finite(vectors, version_dir / entry.file)
        ivf = faiss_module().try_extract_index_ivf(index)
        listed = ivf.invlists.compute_ntotal() if ivf is not None else index.ntotal
        if listed != index.ntotal:  # FAISS files a NaN vector under no list: it could never be found
            raise IndexLoadError(f"{version_dir / entry.file}: {index.ntotal - listed} of {index.ntotal} vectors "
                                 "are in no inverted list (NaN or infinite vectors); rebuild the index")
        thumbnails = None
        if entry.thumbnails is not None:
            try:
                thumbnails = Thumbnails(version_dir / entry.thumbnails, entry.count)
            except OSError as exc:
                raise IndexLoadError(f"{version_dir / entry.thumbnails}: {exc.strerror}") from None
        lexical = None
        if entry.lexical is not None:
            try:
                lexical = LexicalIndex(version_dir / entry.lexical)
            except sqlite3.Error as exc:
                raise IndexLoadError(f"{version_dir / entry.lexical}: {exc}") from None
        refine = None
        if entry.refine is not None:
            refine = np.load(version_dir / entry.refine, mmap_mode="r")
            if refine.shape != (entry.count, manifest.dim):
                raise IndexLoadError(f"{version_dir / entry.refine}: shape {refine.shape}, the index has "
                                     f"{entry.count} vectors of dim {manifest.dim}")
        indexes[modality] = LoadedIndex(modality, entry, impl, items, source=index, thumbnails=thumbnails,
                                        lexical=lexical, refine=refine)
        log.info("loaded %s index %s: %d vectors via %s", modality, manifest.version, entry.count, impl.name)
    return IndexSet(manifest, version_dir, indexes)
