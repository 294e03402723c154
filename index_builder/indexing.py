"""Choosing, training and tuning FAISS indexes (after autofaiss's rules of thumb).

`auto` picks by vector count and a memory budget:

* up to `flat_max` vectors (20k by default): ``Flat``, exact;
* while HNSW fits the budget (and up to 5M vectors): ``HNSW32``;
* while the raw vectors fit: ``IVF{nlist},Flat`` with nlist ~ 4·sqrt(n);
* otherwise ``IVF{nlist},PQ{m}x8``, compressing each vector to m bytes.

After building an approximate index its recall@10 is measured against exact search
on held-out queries, and nprobe / efSearch are raised until the target is reached.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import faiss as _faiss
import numpy as np

log = logging.getLogger(__name__)
faiss: Any = _faiss  # its bundled type hints lag the library (SearchParametersHNSW, kwargs)

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
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
        else:
            index_type = "ivfpq"
    factory = {
        "flat": "Flat",
        "hnsw": f"HNSW{HNSW_M}",
        "ivf": f"IVF{nlist},Flat",
        "ivfpq": f"IVF{nlist},PQ{_pq_m(d)}x8",
    }[index_type]
    return IndexPlan(index_type, factory)


def build(vectors: np.ndarray, plan: IndexPlan, *, train_size: int = 100_000, seed: int = 0) -> Any:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.index_type == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = 80
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors if n <= train_size else vectors[np.sort(rng.choice(n, train_size, replace=False))]
        index.train(sample)
    index.add(vectors)
    return index


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
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, truth = exact.search(queries, k)
    if plan.index_type == "flat":
        return {}, 1.0
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


def build_and_tune(vectors: np.ndarray, others: np.ndarray | None, *, index_type: str, memory_budget: int,
                   recall_target: float, flat_max: int = 20_000) -> BuiltIndex:
    plan = plan_index(len(vectors), vectors.shape[1], index_type, memory_budget, flat_max)
    if len(vectors) < 2 and plan.index_type != "flat":
        plan = IndexPlan("flat", "Flat")
    index = build(vectors, plan)
    if plan.index_type == "flat":
        return BuiltIndex(index, plan, {}, 1.0)
    queries = held_out_queries(vectors, others)
    params, recall = tune(index, plan, vectors, queries, recall_target)
    if recall < recall_target:
        log.warning("%s reached recall@10 %.3f < target %.2f at %s", plan.factory, recall, recall_target, params)
    return BuiltIndex(index, plan, params, recall)
