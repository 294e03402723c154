"""Choosing, training and tuning FAISS indexes (after autofaiss's rules of thumb).

`auto` picks by vector count and a memory budget:

* up to `flat_max` vectors (20k by default): ``Flat``, exact;
* while HNSW fits the budget (and up to 5M vectors): ``HNSW32``;
* while the raw vectors fit: ``IVF{nlist},Flat`` with nlist ~ 4·sqrt(n);
* while its codes fit: ``IVF{nlist},PQ{m}x8``, compressing each vector to m bytes;
* otherwise the same IVF-PQ with its inverted lists on disk (``ivfpq-disk``), as autofaiss
  builds LAION-5B: trained on a sample, filled chunk by chunk (one chunk's codes in RAM at
  a time, from a memory-mapped vector file), the chunks' lists merged into one
  ``OnDiskInvertedLists`` file that the service maps read-only, so its memory holds only
  the centroids and the pages searches touch.

After building an approximate index its recall@10 is measured against exact search
on held-out queries, and nprobe / efSearch are raised until the target is reached. Where
PQ codes cap recall below the target, the index gets a refine stage, as FAISS's
IndexRefine: the vectors stored as fp16 in a memory-mapped file, and refine x k candidates
re-ranked by them, the smallest factor (then nprobe) that reaches the target.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

log = logging.getLogger(__name__)
faiss: Any = _faiss  # its bundled type hints lag the library (SearchParametersHNSW, kwargs)

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq", "ivfpq-disk")
ONDISK_CHUNK = 1_000_000  # vectors per in-memory part of an on-disk build
HNSW_M = 32


@dataclass
class IndexPlan:
    index_type: str
    factory: str


@dataclass
class BuiltIndex:
    index: Any
    plan: IndexPlan
    search_params: dict[str, int]
    recall_at_10: float | None
    refine: bool = False  # its vectors go beside it (fp16) and re-rank the codes' candidates


def parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
             "t": 1 << 40, "tb": 1 << 40}
    s = text.strip().lower().replace("ib", "b")
    num = s.rstrip("kmgtb")
    unit = s[len(num):]
    if unit not in units:
        raise ValueError(f"bad size {text!r}: use e.g. 512MB, 4GB")
    return int(float(num) * units[unit])


def _nlist(n: int) -> int:
    target = 4 * math.sqrt(n)
    return int(min(65536, max(16, 2 ** round(math.log2(max(target, 1))))))


def _pq_m(d: int) -> int:
    """Sub-quantizers: about 4 dimensions each, dividing d."""
    for m in range(max(1, d // 4), 0, -1):
        if d % m == 0 and m <= 96:
            return m
    return 1


def plan_index(n: int, d: int, index_type: str = "auto", memory_budget: int = 4 << 30,
               flat_max: int = 20_000) -> IndexPlan:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; expected one of {', '.join(INDEX_TYPES)}")
    nlist = min(_nlist(n), max(1, n // 39))  # FAISS wants >= 39 training points per list
    if index_type == "auto":
        flat_bytes = n * d * 4
        hnsw_bytes = n * (d * 4 + HNSW_M * 2 * 4 + 16)
        if n <= flat_max:
            index_type = "flat"
        elif hnsw_bytes <= memory_budget and n <= 5_000_000:
            index_type = "hnsw"
        elif flat_bytes * 1.1 <= memory_budget:
            index_type = "ivf"
        elif n * (_pq_m(d) + 8) * 1.2 <= memory_budget:  # codes and ids in RAM
            index_type = "ivfpq"
        else:
            index_type = "ivfpq-disk"
    factory = {
        "flat": "Flat",
        "hnsw": f"HNSW{HNSW_M}",
        "ivf": f"IVF{nlist},Flat",
        "ivfpq": f"IVF{nlist},PQ{_pq_m(d)}x8",
        "ivfpq-disk": f"IVF{nlist},PQ{_pq_m(d)}x8",
    }[index_type]
    return IndexPlan(index_type, factory)


def build(vectors: np.ndarray, plan: IndexPlan, *, train_size: int = 100_000, seed: int = 0,
          scratch: Path | None = None, adder: PartAdder | None = None) -> Any:
    """Train and fill an index. `vectors` may be memory-mapped; an on-disk plan writes its
    lists under `scratch` (a temporary directory, by default), from where `write_version`
    moves them into the version."""
    n, d = vectors.shape
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.index_type == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = 80
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:  # FAISS wants 39 training points per list
            train_size = max(train_size, 39 * ivf.nlist)
        rng = np.random.default_rng(seed)
        pick = None if n <= train_size else np.sort(rng.choice(n, train_size, replace=False))
        index.train(np.ascontiguousarray(vectors if pick is None else vectors[pick], dtype=np.float32))
    if plan.index_type == "ivfpq-disk":
        return _fill_ondisk(index, vectors, Path(scratch or tempfile.mkdtemp(prefix="clipsearch-ivf-")), adder=adder)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


Part = tuple[int, int, str]  # rows start..stop of the vectors, added into the part file at this path
# Adds the parts' vectors: given the trained, empty index (FAISS-serialized), the vectors' .npy
# file and the parts; each part file is written whole (temp name, then rename).
PartAdder = Callable[[bytes, str, list[Part]], None]


def add_part(index_bytes: bytes, vectors_file: str, start: int, stop: int, out: str) -> str:
    """One part of an on-disk build: rows start..stop of the vectors, with their row numbers as
    ids, added to a copy of the trained index and written to `out`. Runs anywhere the vector
    file is readable: this process, a worker process, a Ray task."""
    index = faiss.deserialize_index(np.frombuffer(index_bytes, np.uint8))
    block = np.ascontiguousarray(np.load(vectors_file, mmap_mode="r")[start:stop], dtype=np.float32)
    index.add_with_ids(block, np.arange(start, stop, dtype=np.int64))
    tmp = f"{out}.{os.getpid()}.tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, out)
    return out


def add_here(index_bytes: bytes, vectors_file: str, parts: list[Part]) -> None:
    for start, stop, out in parts:
        add_part(index_bytes, vectors_file, start, stop, out)
        log.info("on-disk index: rows %d-%d added", start, stop)


def _fill_ondisk(index: Any, vectors: np.ndarray, scratch: Path, chunk: int | None = None,
                 adder: PartAdder | None = None) -> Any:
    """Add `vectors` to the trained, empty IVF `index` one chunk at a time, each chunk's lists
    written to a part file (by `adder`: here, one part at a time, by default; in worker
    processes or on Ray, several at once), then merge the parts' lists into one on-disk file.
    The parts are the same whoever adds them, so is the merged index."""
    from faiss.contrib.ondisk import merge_ondisk

    chunk = chunk or ONDISK_CHUNK
    scratch.mkdir(parents=True, exist_ok=True)
    if isinstance(vectors, np.memmap) and vectors.filename and Path(vectors.filename).suffix == ".npy":
        vectors_file = str(vectors.filename)
    else:  # the workers read the vectors from a file: write the in-memory ones once
        vectors_file = str(scratch / "vectors.npy")
        np.save(vectors_file, np.ascontiguousarray(vectors, dtype=np.float32))
    parts = [(start, min(start + chunk, len(vectors)), str(scratch / f"part-{i:05d}.faiss"))
             for i, start in enumerate(range(0, len(vectors), chunk))]
    (adder or add_here)(faiss.serialize_index(index).tobytes(), vectors_file, parts)
    data = scratch / f"lists-{os.getpid()}-{len(parts)}.ivfdata"
    merge_ondisk(index, [out for _, _, out in parts], str(data))
    for _, _, out in parts:
        os.unlink(out)
    if vectors_file == str(scratch / "vectors.npy"):
        os.unlink(vectors_file)
    return index


def add_in_processes(processes: int) -> PartAdder:
    """A `PartAdder` that adds up to `processes` parts at once, in spawned worker processes."""

    def adder(index_bytes: bytes, vectors_file: str, parts: list[Part]) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from clipsearch.core.orphans import exit_with_parent

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(processes, len(parts)), mp_context=context, initializer=exit_with_parent) as pool:
            futures = [pool.submit(add_part, index_bytes, vectors_file, a, b, out) for a, b, out in parts]
            for future in futures:
                log.info("on-disk index: part %s added", Path(future.result()).name)

    return adder


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 262_144) -> np.ndarray:
    """Ids of each query's k nearest vectors by inner product, block by block: no copy of
    `vectors` (which may be memory-mapped) is held beyond one block."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), block):
        sims = queries @ np.asarray(vectors[start : start + block], np.float32).T
        if sims.shape[1] > k:  # this block's k best per query, unordered
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            sims, ids = np.take_along_axis(sims, top, 1), top + start
        else:
            ids = np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)
        s = np.concatenate([best_s, sims], axis=1)
        i = np.concatenate([best_i, ids], axis=1)
        keep = np.lexsort((i, -s), axis=1)[:, :k]  # by score, ties to the lower id
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_i


def held_out_queries(vectors: np.ndarray, others: np.ndarray | None, count: int = 1000, seed: int = 0) -> np.ndarray:
    """Queries like real traffic: the other modality's vectors when there are any, else
    perturbed copies of indexed vectors (so the answer is not trivially the vector itself)."""
    rng = np.random.default_rng(seed)
    if others is not None and len(others) >= 10:
        pick = rng.choice(len(others), min(count, len(others)), replace=False)
        return np.ascontiguousarray(others[pick], dtype=np.float32)
    pick = rng.choice(len(vectors), min(count, len(vectors)), replace=False)
    noisy = vectors[pick] + rng.standard_normal((len(pick), vectors.shape[1])).astype(np.float32) * (
        0.5 / math.sqrt(vectors.shape[1]))
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def recall_at_k(index: Any, queries: np.ndarray, truth: np.ndarray, k: int, params: Any) -> float:
    _, ids = index.search(queries, k, params=params)
    hits = sum(len(set(row[row >= 0]) & set(t)) for row, t in zip(ids, truth, strict=True))
    return hits / truth.size


def tune(index: Any, plan: IndexPlan, vectors: np.ndarray, queries: np.ndarray, target: float = 0.95,
         k: int = 10) -> tuple[dict[str, int], float]:
    """Smallest nprobe / efSearch whose recall@k reaches `target` (per-call parameters)."""
    k = min(k, len(vectors))
    if plan.index_type == "flat":
        return {}, 1.0
    truth = exact_top_k(vectors, queries, k)
    if plan.index_type == "hnsw":
        name, values = "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]

        def make(v: int) -> Any:
            return faiss.SearchParametersHNSW(efSearch=v)
    else:
        nlist = faiss.extract_index_ivf(index).nlist
        name, values = "nprobe", sorted({min(nlist, 2**i) for i in range(0, int(math.log2(nlist)) + 2)})

        def make(v: int) -> Any:
            return faiss.SearchParametersIVF(nprobe=v)

    best = (values[-1], 0.0)
    for v in values:
        r = recall_at_k(index, queries, truth, k, make(v))
        log.info("%s=%d recall@%d=%.4f", name, v, k, r)
        best = (v, r)
        if r >= target:
            break
    return {name: best[0]}, best[1]


REFINE_FACTORS = (2, 4, 8, 16, 32)  # candidates per result re-ranked by the full vectors


def refined_recall(index: Any, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, nprobe: int,
                   factor: int) -> float:
    """recall@k when k x `factor` candidates from the codes are re-ranked by the fp16 vectors,
    as the service does with the refine file."""
    _, cand = index.search(queries, min(len(vectors), k * factor), params=faiss.SearchParametersIVF(nprobe=nprobe))
    hits = 0
    for query, rows, t in zip(queries, cand, truth, strict=True):
        rows = rows[rows >= 0]
        sims = np.asarray(vectors[np.sort(rows)], np.float16).astype(np.float32) @ query
        top = np.sort(rows)[np.lexsort((np.sort(rows), -sims))[:k]]
        hits += len(set(top) & set(t))
    return hits / truth.size


def tune_refine(index: Any, vectors: np.ndarray, queries: np.ndarray, target: float, k: int = 10
                ) -> tuple[dict[str, int], float]:
    """The cheapest (refine factor, then nprobe) whose re-ranked recall@k reaches `target`:
    PQ codes cap recall however many lists are visited (at 64 bytes for 512 dims, near 0.57),
    and re-ranking a few times k candidates by the stored vectors lifts that cap."""
    truth = exact_top_k(vectors, queries, k)
    nlist = faiss.extract_index_ivf(index).nlist
    probes = sorted({min(nlist, 2**i) for i in range(0, int(math.log2(nlist)) + 2)})
    best: tuple[dict[str, int], float] = ({"nprobe": probes[-1], "refine": REFINE_FACTORS[-1]}, 0.0)
    for factor in REFINE_FACTORS:
        for nprobe in probes:
            r = refined_recall(index, vectors, queries, truth, k, nprobe, factor)
            log.info("refine=%d nprobe=%d recall@%d=%.4f", factor, nprobe, k, r)
            if r >= target:
                return {"nprobe": nprobe, "refine": factor}, r
            if r > best[1]:
                best = ({"nprobe": nprobe, "refine": factor}, r)
    return best


def build_and_tune(vectors: np.ndarray, others: np.ndarray | None, *, index_type: str, memory_budget: int,
                   recall_target: float, flat_max: int = 20_000, scratch: Path | None = None,
                   refine: str = "auto", adder: PartAdder | None = None) -> BuiltIndex:
    """Build the planned index and tune it to `recall_target`. An IVF-PQ index whose codes
    cannot reach the target gets a refine stage (`refine`: auto; `always`; `never`): its
    vectors are kept as fp16 beside it and re-rank refine x k candidates per query."""
    plan = plan_index(len(vectors), vectors.shape[1], index_type, memory_budget, flat_max)
    if len(vectors) < 2 and plan.index_type != "flat":
        plan = IndexPlan("flat", "Flat")
    index = build(vectors, plan, scratch=scratch, adder=adder)
    if plan.index_type == "flat":
        return BuiltIndex(index, plan, {}, 1.0)
    queries = held_out_queries(vectors, others)
    params, recall = tune(index, plan, vectors, queries, recall_target)
    pq = plan.index_type in ("ivfpq", "ivfpq-disk")
    refined = pq and (refine == "always" or (refine == "auto" and recall < recall_target))
    if refined:
        params, recall = tune_refine(index, vectors, queries, recall_target)
    if recall < recall_target:
        log.warning("%s reached recall@10 %.3f < target %.2f at %s", plan.factory, recall, recall_target, params)
    return BuiltIndex(index, plan, params, recall, refined)
