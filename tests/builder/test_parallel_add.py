"""The add step of an on-disk IVF-PQ build in parallel: the parts added in worker processes
(--processes) or in Ray tasks on a local cluster (--engine ray) give the same merged index as
adding them one after another here: the same inverted lists (sizes, ids, codes) and the same
search results."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.builder import indexing
from clipsearch.builder.indexing import IndexPlan, add_in_processes, build

FACTORY = "IVF32,PQ8x4"


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _lists(index) -> list[tuple[np.ndarray, bytes]]:
    invlists = indexing.faiss.extract_index_ivf(index).invlists
    out = []
    for i in range(invlists.nlist):
        n = invlists.list_size(i)
        ids = indexing.faiss.rev_swig_ptr(invlists.get_ids(i), n).copy() if n else np.zeros(0, np.int64)
        codes = indexing.faiss.rev_swig_ptr(invlists.get_codes(i), n * invlists.code_size).tobytes() if n else b""
        out.append((ids, codes))
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    np.save(root / "x.npy", _vectors(9000))
    return root, build(np.load(root / "x.npy", mmap_mode="r"), IndexPlan("ivfpq-disk", FACTORY),
                       scratch=root / "here")


def _equal(a, b) -> None:
    for (ids_a, codes_a), (ids_b, codes_b) in zip(_lists(a), _lists(b), strict=True):
        np.testing.assert_array_equal(ids_a, ids_b)
        assert codes_a == codes_b
    q = _vectors(40, seed=3)
    for nprobe in (1, 8):
        params = indexing.faiss.SearchParametersIVF(nprobe=nprobe)
        np.testing.assert_array_equal(a.search(q, 10, params=params)[1], b.search(q, 10, params=params)[1])


def test_parts_added_in_processes_equal_one_process(one_process, monkeypatch) -> None:
    root, here = one_process  # one part of all 9,000 rows
    monkeypatch.setattr(indexing, "ONDISK_CHUNK", 2000)  # five parts, two processes
    parallel = build(np.load(root / "x.npy", mmap_mode="r"), IndexPlan("ivfpq-disk", FACTORY),
                     scratch=root / "processes", adder=add_in_processes(2))
    _equal(here, parallel)
    assert not list((root / "processes").glob("part-*"))  # merged and removed


@pytest.mark.slow
def test_parts_added_on_a_local_ray_cluster_equal_one_process(one_process, monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    from clipsearch.builder.ray_engine import add_on_ray

    root, here = one_process
    monkeypatch.setattr(indexing, "ONDISK_CHUNK", 2000)  # five parts, five tasks
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        on_ray = build(np.load(root / "x.npy", mmap_mode="r"), IndexPlan("ivfpq-disk", FACTORY),
                       scratch=root / "ray", adder=add_on_ray(None))
    finally:
        ray.shutdown()
    chunked_here = build(np.load(root / "x.npy", mmap_mode="r"), IndexPlan("ivfpq-disk", FACTORY),
                         scratch=root / "here-2000")
    _equal(chunked_here, on_ray)
    _equal(here, on_ray)  # and the same as with parts of another size
