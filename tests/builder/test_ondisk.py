"""IVF-PQ with its inverted lists on disk: built chunk by chunk, served memory-mapped, equal
to the same index built in memory."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import clipsearch.builder.indexing as indexing
from clipsearch.builder.indexing import IndexPlan, build, exact_top_k, held_out_queries, plan_index, tune
from clipsearch.core.errors import IndexLoadError
from clipsearch.index.format import (
    ModelRef,
    new_version_name,
    ondisk_lists,
    publish_version,
    staging_dir,
    write_version,
)
from clipsearch.index.search import load_index_set, reconstruct_all


def _vectors(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_auto_chooses_disk_when_codes_exceed_the_budget() -> None:
    assert plan_index(10_000_000, 512, memory_budget=4 << 30).index_type == "ivfpq"
    assert plan_index(10_000_000, 512, memory_budget=512 << 20).index_type == "ivfpq-disk"


def test_exact_top_k_is_brute_force() -> None:
    x, q = _vectors(5000), _vectors(20, seed=1)
    want = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(exact_top_k(x, q, 7, block=999), want)


def test_ondisk_index_equals_in_memory_and_serves_mapped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(indexing, "ONDISK_CHUNK", 3000)  # several parts to merge
    x = _vectors(12000)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")  # the builder reads a memory-mapped file
    factory = "IVF64,PQ8x4"  # 4-bit codes: trains in a second (the layout is the same as PQ m x 8)
    disk = build(mapped, IndexPlan("ivfpq-disk", factory), scratch=tmp_path / "scratch")
    memory = build(x, IndexPlan("ivfpq", factory))
    assert ondisk_lists(disk) is not None and ondisk_lists(memory) is None
    q = _vectors(50, seed=2)
    for nprobe in (1, 8):
        params = indexing.faiss.SearchParametersIVF(nprobe=nprobe)
        d1, i1 = disk.search(q, 10, params=params)
        d2, i2 = memory.search(q, 10, params=params)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(d1, d2, atol=1e-5)
    search_params, recall_at_10 = tune(disk, IndexPlan("ivfpq-disk", factory), mapped, held_out_queries(x, None), 0.8)
    items = [{"id": f"v{i}"} for i in range(12000)]
    staged, name = staging_dir(tmp_path / "idx"), new_version_name()
    write_version(staged, model=ModelRef(spec="local-dir:/m", fingerprint="sha256:abc"), dim=32, version=name,
                  indexes={"image": (disk, items, {"index_type": "ivfpq-disk", "factory": factory,
                                                    "search_params": search_params})})
    version = publish_version(tmp_path / "idx", staged, name, keep=2)
    assert not list((tmp_path / "scratch").glob("*.ivfdata"))  # moved into the version
    # the version keeps its lists beside the index, and serves after being moved
    moved = tmp_path / "elsewhere"
    shutil.move(str(version), str(moved))
    assert sorted(p.name for p in moved.iterdir() if p.suffix in {".faiss", ".ivfdata"}) == \
        ["image.faiss", "image.ivfdata"]
    served = load_index_set(moved, fingerprint="sha256:abc", dim=32).get("image")
    assert served.entry.data == "image.ivfdata"
    _, ids = served.raw_search(q, 10)
    # the served index answers as the in-memory one at the tuned nprobe, and as recall says
    params = indexing.faiss.SearchParametersIVF(nprobe=search_params["nprobe"])
    np.testing.assert_array_equal(ids, memory.search(q, 10, params=params)[1])
    truth = exact_top_k(x, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert abs(recall - recall_at_10) < 0.1, (recall, recall_at_10)  # what the manifest says holds
    np.testing.assert_allclose(served.vectors_of(np.array([3, 9000])), reconstruct_all(memory)[[3, 9000]],
                               atol=1e-6)
    (moved / "image.ivfdata").unlink()
    with pytest.raises(IndexLoadError, match=r"image\.ivfdata: No such file .* the version is incomplete"):
        load_index_set(moved, fingerprint="sha256:abc", dim=32)  # its manifest lists the file
    with pytest.raises(IndexLoadError, match="on-disk lists are missing"):
        load_index_set(moved, fingerprint="sha256:abc", dim=32, verify="off")


@pytest.mark.slow
async def test_build_job_publishes_an_ondisk_index_the_service_serves(tmp_path: Path, tiny_spec, tiny_model,
                                                                      make_client) -> None:
    import base64

    from clipsearch.builder.build import BuildOptions, run_build
    from clipsearch.finetune.synth import synth_rows

    (tmp_path / "photos").mkdir()
    for i, (_, image, _) in enumerate(synth_rows(400, seed=3, image_size=64)):  # images only: one PQ to train
        (tmp_path / "photos" / f"{i:03d}.jpg").write_bytes(base64.urlsafe_b64decode(image))
    summary = run_build(BuildOptions(inputs=[tmp_path / "photos"], output=tmp_path / "idx", model=tiny_spec,
                                     device="cpu", index_type="ivfpq-disk", progress=False, workers=0,
                                     recall_target=0.5), model=tiny_model)
    assert summary.indexes["image"]["data"] == "image.ivfdata" and "text" not in summary.indexes
    assert (summary.version_dir / "image.ivfdata").is_file() and not list((tmp_path / "idx" / ".work").glob("*/*"))
    async with make_client(tiny_model, index_dir=tmp_path / "idx") as client:
        r = await client.post("/search/text", json={"text": "a red circle", "k": 5})
        assert r.status_code == 200 and len(r.json()["results"]) == 5, r.text
        r = await client.post("/search/text", json={"text": "a red circle", "k": 5, "return_vectors": True})
        assert r.status_code == 200 and len(r.json()["results"][0]["vector"]) == tiny_model.dim
