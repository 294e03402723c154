"""Index format and search backends against a brute-force numpy top-k."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from clipsearch.core.errors import IndexLoadError, IndexMismatch
from clipsearch.index.format import (
    CURRENT_NAME,
    ModelRef,
    current_version_dir,
    list_versions,
    read_manifest,
)
from clipsearch.index.items import write_items
from clipsearch.index.search import (
    FaissBackend,
    SearchParams,
    TorchExactBackend,
    choose_backend,
    load_index_set,
)
from clipsearch.service.holder import IndexHolder
from tests.tiny import write_index_from_vectors

MODEL = ModelRef(spec="local-dir:/m", fingerprint="sha256:abc")
DIM = 32


def unit_vectors(n: int, d: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ db.T
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, idx, axis=1), idx


def items(n: int, prefix: str, text: bool = False) -> list[dict]:
    return [{"id": f"{prefix}{i}", "metadata": {"row": i}, **({"text": f"caption {i}"} if text else {})}
            for i in range(n)]


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    img, txt = unit_vectors(500, seed=1), unit_vectors(300, seed=2)
    write_index_from_vectors(tmp_path, model=MODEL, image=(img, items(500, "img")), text=(txt, items(300, "t", True)))
    return tmp_path, img, txt


def _backends():
    out = ["faiss-cpu", "torch-cpu"]
    out.append(pytest.param("torch-cuda", marks=pytest.mark.gpu))
    out.append(pytest.param("faiss-gpu", marks=pytest.mark.gpu))
    return out


@pytest.mark.parametrize("backend", _backends())
def test_flat_search_equals_brute_force(published, backend: str) -> None:
    root, img, txt = published
    kind, _, device = backend.partition("-")
    if backend == "faiss-gpu":
        from clipsearch.index.search import faiss_gpu_available

        if not faiss_gpu_available():
            pytest.skip("faiss-gpu not installed")
        name, device = "faiss-gpu", "cuda"
    elif kind == "torch":
        name = "torch"
    else:
        name, device = "faiss-cpu", "cpu"
    loaded = load_index_set(current_version_dir(root), fingerprint=MODEL.fingerprint, dim=DIM, backend=name,
                            device=device)
    queries = unit_vectors(20, seed=9)
    for modality, db in (("image", img), ("text", txt)):
        index = loaded.get(modality)
        hits = index.search(queries, 10)
        ref_s, ref_i = brute_force(db, queries, 10)
        for row, (hs, rs, ri) in enumerate(zip(hits, ref_s, ref_i, strict=True)):
            got = [h.metadata["row"] for h in hs]
            if device == "cpu":  # float32: the exact ranking
                assert got == list(ri), (modality, row)
                np.testing.assert_allclose([h.score for h in hs], rs, atol=1e-5)
                continue
            # float16 on a GPU: scores within fp16 rounding of exact, so near-ties may swap
            # places; each hit must be a distinct row whose exact score is within that of the
            # true score at its rank, and the reported scores near the exact ones.
            exact = db[got] @ queries[row]
            assert len(set(got)) == len(got) == len(ri), (modality, row)
            np.testing.assert_allclose([h.score for h in hs], exact, atol=2e-3)
            assert np.all(exact >= rs - 2e-3), (modality, row, exact, rs)
    text_hit = loaded.get("text").search(queries[:1], 1)[0][0]
    assert text_hit.text == f"caption {text_hit.metadata['row']}"


def test_k_larger_than_index_drops_empty_slots(tmp_path: Path) -> None:
    db = unit_vectors(5)
    write_index_from_vectors(tmp_path, model=MODEL, image=(db, items(5, "i")))
    for backend in ("faiss-cpu", "torch"):
        loaded = load_index_set(current_version_dir(tmp_path), fingerprint=MODEL.fingerprint, dim=DIM,
                                backend=backend)
        hits = loaded.get("image").search(unit_vectors(2, seed=3), 50)
        assert [len(h) for h in hits] == [5, 5]
        assert all(h.id.startswith("i") for h in hits[0])


def test_backends_pad_with_minus_one() -> None:
    db = unit_vectors(3)
    t = TorchExactBackend(db, device="cpu")
    _, i = t.search(unit_vectors(1, seed=4), 5, SearchParams())
    assert list(i[0, 3:]) == [-1, -1]
    import faiss

    f = faiss.IndexFlatIP(DIM)
    f.add(db)
    _, fi = FaissBackend(f).search(unit_vectors(1, seed=4), 5, SearchParams())
    assert list(fi[0]) == list(i[0])


def test_ivf_params_are_per_call_and_never_mutate_the_index(tmp_path: Path) -> None:
    db = unit_vectors(4000, seed=5)
    write_index_from_vectors(tmp_path, model=MODEL, image=(db, items(4000, "i")), factory="IVF64,Flat",
                             search_params={"nprobe": 1})
    loaded = load_index_set(current_version_dir(tmp_path), fingerprint=MODEL.fingerprint, dim=DIM)
    index = loaded.get("image")
    queries = unit_vectors(50, seed=6)
    _, ref = brute_force(db, queries, 10)

    def recall(nprobe: int | None) -> float:
        hits = index.search(queries, 10, SearchParams(nprobe=nprobe))
        return np.mean([len({h.metadata["row"] for h in hs} & set(r)) / 10 for hs, r in zip(hits, ref, strict=True)])

    low, full = recall(None), recall(64)
    assert full == 1.0  # visiting every list is exact
    assert low < 0.9  # the manifest default nprobe=1 is honoured
    import faiss

    assert faiss.extract_index_ivf(index.backend.index).nprobe == 1  # untouched shared state
    assert recall(None) == low


def test_hnsw_ef_search_per_call(tmp_path: Path) -> None:
    db = unit_vectors(3000, seed=7)
    write_index_from_vectors(tmp_path, model=MODEL, image=(db, items(3000, "i")), factory="HNSW16")
    index = load_index_set(current_version_dir(tmp_path), fingerprint=MODEL.fingerprint, dim=DIM).get("image")
    queries = unit_vectors(50, seed=8)
    _, ref = brute_force(db, queries, 10)
    hits = index.search(queries, 10, SearchParams(ef_search=256))
    rec = np.mean([len({h.metadata["row"] for h in hs} & set(r)) / 10 for hs, r in zip(hits, ref, strict=True)])
    assert rec > 0.95


def test_manifest_and_versions(published) -> None:
    root, _, _ = published
    version_dir = current_version_dir(root)
    manifest = read_manifest(version_dir)
    assert manifest.dim == DIM and manifest.metric == "ip" and manifest.normalized
    assert manifest.indexes["image"].count == 500 and manifest.indexes["text"].count == 300
    assert manifest.model.fingerprint == MODEL.fingerprint and manifest.created_at
    assert (root / CURRENT_NAME).read_text().strip() == manifest.version
    # A second publish switches CURRENT; keep=1 prunes the older one.
    write_index_from_vectors(root, model=MODEL, image=(unit_vectors(3), items(3, "n")), keep=1)
    assert current_version_dir(root) != version_dir
    assert len(list_versions(root)) == 1
    assert not [p for p in (root / "versions").iterdir() if p.name.startswith(".")]


def test_mismatched_model_or_dim_is_refused(published) -> None:
    root, _, _ = published
    with pytest.raises(IndexMismatch, match="built with model"):
        load_index_set(current_version_dir(root), fingerprint="sha256:other", dim=DIM)
    with pytest.raises(IndexMismatch, match="dim"):
        load_index_set(current_version_dir(root), fingerprint=MODEL.fingerprint, dim=DIM * 2)


def test_corrupt_index_files_are_refused(published) -> None:
    root, _, _ = published
    version = current_version_dir(root)
    (version / "image.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexLoadError, match=r"image\.faiss"):
        load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM)


def test_items_count_must_match(published) -> None:
    root, _, _ = published
    version = current_version_dir(root)
    write_items(version / "text.items.arrow", items(299, "t", True))
    with pytest.raises(IndexLoadError, match=r"text\.items\.arrow: .* the manifest says"):  # its checksum first
        load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM)
    with pytest.raises(IndexLoadError, match="299 items for 300"):  # and the count, with checksums off
        load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM, verify="off")


def test_pointer_edge_cases(tmp_path: Path) -> None:
    assert current_version_dir(tmp_path) is None  # nothing published yet
    with pytest.raises(IndexLoadError, match="does not exist"):
        current_version_dir(tmp_path / "missing")
    (tmp_path / CURRENT_NAME).write_text("../../etc\n")
    with pytest.raises(IndexLoadError, match="invalid version name"):
        current_version_dir(tmp_path)
    (tmp_path / CURRENT_NAME).write_text("v-gone\n")
    with pytest.raises(IndexLoadError, match="does not exist"):
        current_version_dir(tmp_path)


def test_holder_keeps_old_index_when_new_one_is_bad(published) -> None:
    root, _, _ = published
    holder = IndexHolder(root)
    first = holder.load(fingerprint=MODEL.fingerprint, dim=DIM, backend="faiss-cpu", device="cpu")
    assert first is not None
    bad = ModelRef(spec="other", fingerprint="sha256:zzz")
    write_index_from_vectors(root, model=bad, image=(unit_vectors(3), items(3, "b")))
    with pytest.raises(IndexMismatch):
        holder.load(fingerprint=MODEL.fingerprint, dim=DIM, backend="faiss-cpu", device="cpu")
    assert holder.current is first


def test_choose_backend() -> None:
    assert choose_backend("auto", "cpu") == "faiss-cpu"
    assert choose_backend("torch", "cpu") == "torch"
    if torch.cuda.is_available():
        assert choose_backend("auto", "cuda") in {"faiss-gpu", "torch"}
    with pytest.raises(IndexLoadError):
        choose_backend("annoy", "cpu")


def test_no_temp_files_left_after_failed_publish(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_index_from_vectors(tmp_path, model=MODEL, image=(unit_vectors(3), items(2, "x")))
    assert current_version_dir(tmp_path) is None
    leftovers = [p for p in (tmp_path / "versions").iterdir()] if (tmp_path / "versions").exists() else []
    assert leftovers == [], os.listdir(tmp_path / "versions")


def _items(n: int) -> list[dict]:
    return [{"id": f"i{i}"} for i in range(n)]


def _publish(index_dir: Path, index, n: int) -> Path:
    """Publish `index` (any FAISS index) as a version's image index."""
    from clipsearch.index.format import new_version_name, publish_version, staging_dir, write_version

    name, staged = new_version_name(), staging_dir(index_dir)
    entry = {"index_type": "x", "factory": "x"}
    write_version(staged, model=MODEL, dim=DIM, indexes={"image": (index, _items(n), entry)}, version=name)
    return publish_version(index_dir, staged, name)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
@pytest.mark.parametrize("backend", ["faiss-cpu", "torch"])
def test_a_version_with_nan_vectors_is_refused(tmp_path, factory, backend) -> None:
    import faiss

    clean, vectors = unit_vectors(300), unit_vectors(300)
    vectors[[7, 250]] = np.nan
    for data, refused in ((vectors, True), (clean, False)):
        index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(clean)  # FAISS itself refuses to train on NaN; adding them goes through
        index.add(data)
        version = _publish(tmp_path, index, 300)
        if refused:
            with pytest.raises(IndexLoadError, match="NaN"):
                load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM, backend=backend)
        else:
            loaded = load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM, backend=backend)
            assert loaded.get("image").count == 300


@pytest.mark.parametrize("field", ["file", "items"])
@pytest.mark.parametrize("path", ["../other/image.faiss", "/etc/passwd", "sub/image.faiss"])
def test_manifest_paths_cannot_leave_their_version(tmp_path, field, path) -> None:
    import json

    version = write_index_from_vectors(tmp_path, model=MODEL, image=(unit_vectors(10), _items(10)))
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["indexes"]["image"][field] = path
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexLoadError, match="invalid manifest"):
        load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM)


def test_served_version_is_its_directory_and_must_match_the_manifest(tmp_path) -> None:
    import json

    version = write_index_from_vectors(tmp_path, model=MODEL, image=(unit_vectors(10), _items(10)))
    assert load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM).version == version.name
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["version"] = "someone-elses-name"
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexLoadError, match="someone-elses-name"):
        load_index_set(version, fingerprint=MODEL.fingerprint, dim=DIM)
