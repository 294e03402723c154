"""Filtered search against a brute-force top-k over the filtered items, on flat, HNSW, IVF and
IVF-PQ indexes and the torch backend, for selective filters (searched exactly over the
selection) and unselective ones (searched inside the index): k results whenever k items
match."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.index import search as search_mod
from clipsearch.index.filters import InvalidFilter, compile_filter
from clipsearch.index.format import IndexEntry, faiss_module
from clipsearch.index.search import FaissBackend, LoadedIndex, SearchParams, TorchExactBackend

N, D, K = 3000, 32, 10
COLOURS = ["red", "green", "blue", "gold"]


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    items = []
    for i in range(N):
        meta = {"colour": COLOURS[i % 4], "year": 1990 + (i * 7) % 31}
        if i % 3 == 0:
            meta["licence"] = "cc-by" if i % 2 else "cc0"
        if i % 10 == 0:
            meta["year"] = str(meta["year"])  # a string is not a number to a range
        items.append({"id": f"item-{i}", "metadata": meta})
    queries = rng.normal(size=(5, D)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return x, items, queries


_BUILT: dict[str, LoadedIndex] = {}


def _index(kind: str, x: np.ndarray, items) -> LoadedIndex:
    if kind not in _BUILT:
        _BUILT[kind] = _build(kind, x, items)
    return _BUILT[kind]


def _build(kind: str, x: np.ndarray, items) -> LoadedIndex:
    faiss = faiss_module()
    factory = {"flat": "Flat", "hnsw": "HNSW32", "ivf": "IVF32,Flat", "ivfpq": "IVF32,PQ8x4"}.get(kind, "Flat")
    index = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    params = {"nprobe": 2} if kind.startswith("ivf") else {"efSearch": 16} if kind == "hnsw" else {}
    entry = IndexEntry(count=N, index_type=kind, factory=factory, file="x.faiss", items="x.arrow",
                       search_params=params)
    backend = TorchExactBackend(x, device="cpu") if kind == "torch" else FaissBackend(index)
    return LoadedIndex("image", entry, backend, items, source=index)


def _matches(item, spec) -> bool:  # the reference, written out plainly
    meta = item["metadata"]
    ok = True
    for key, cond in spec.items():
        if key == "$or":
            ok &= any(_matches(item, s) for s in cond)
        elif key == "$and":
            ok &= all(_matches(item, s) for s in cond)
        elif not isinstance(cond, dict):
            ok &= key in meta and meta[key] == cond and type(meta[key]) is type(cond)
        else:
            v = meta.get(key)
            num = isinstance(v, int)
            for op, bound in cond.items():
                if op == "$gte":
                    ok &= num and v >= bound
                elif op == "$lt":
                    ok &= num and v < bound
                elif op == "$in":
                    ok &= key in meta and v in bound
                elif op == "$nin":
                    ok &= key in meta and v not in bound
                elif op == "$exists":
                    ok &= (key in meta) == bound
                else:
                    ok &= key in meta and v != bound
    return ok


FILTERS = [
    {"colour": "red", "year": {"$gte": 2000, "$lt": 2002}},  # selective: a few dozen items
    {"year": {"$gte": 1995}},  # unselective: most items
    {"$or": [{"colour": "gold"}, {"licence": {"$exists": True}}]},
    {"colour": {"$nin": ["red", "blue"]}, "licence": {"$in": ["cc0"]}},
    {"licence": {"$ne": "cc0"}},
    {"colour": "purple"},  # nothing
]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq", "torch"])
@pytest.mark.parametrize("exact_below", [20_000, 50])  # every selection exact / large ones inside the index
def test_filtered_search_equals_brute_force(corpus, kind, exact_below, monkeypatch) -> None:
    monkeypatch.setattr(search_mod, "EXACT_SELECTION", exact_below)
    x, items, queries = corpus
    index = _index(kind, x, items)
    for spec in FILTERS:
        selection = index.select(compile_filter(spec))
        want_mask = np.array([_matches(it, spec) for it in items])
        np.testing.assert_array_equal(selection.mask, want_mask, err_msg=str(spec))
        exhaustive = SearchParams(nprobe=32, ef_search=4096)
        for params in (None, exhaustive):
            _, ids = index.raw_search(queries, K, params, selection)
            for q in range(len(queries)):
                got = [int(i) for i in ids[q] if i >= 0]
                assert len(got) == min(K, int(want_mask.sum())), (kind, spec)
                assert all(want_mask[g] for g in got)
                reference = np.flatnonzero(want_mask)[np.argsort(-(x[want_mask] @ queries[q]), kind="stable")][:K]
                approximate = kind in ("hnsw", "ivf", "ivfpq") and selection.count > exact_below
                if kind == "ivfpq" and selection.count <= exact_below:
                    reference_scores = index.vectors_of(selection.rows) @ queries[q]  # exact over PQ-decoded vectors
                    reference = selection.rows[np.argsort(-reference_scores, kind="stable")][:K]
                # an approximate index at its own settings finds what it finds (random data is its worst
                # case): k matching items, checked above; searched exhaustively, the brute-force ones
                if not approximate or (params is exhaustive and kind != "ivfpq"):
                    assert got == reference.tolist(), (kind, spec, params)


@pytest.mark.parametrize(("spec", "field"), [
    ([], "filter"), ({}, "filter"), ({"$xor": []}, "filter.$xor"), ({"a": {"$regex": "x"}}, "filter.a.$regex"),
    ({"a": {"$gt": "5"}}, "filter.a.$gt"), ({"a": {"$in": []}}, "filter.a.$in"), ({"a": [1, 2]}, "filter.a"),
    ({"$or": [{"a": 1}, 5]}, "filter.$or[1]"), ({"a": {"$exists": 1}}, "filter.a.$exists"),
])
def test_bad_filters_name_the_part_at_fault(spec, field) -> None:
    with pytest.raises(InvalidFilter) as err:
        compile_filter(spec)
    assert err.value.field == field
