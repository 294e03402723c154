"""Building from precomputed embeddings (clip-retrieval's and LAION's img_emb/ text_emb/
metadata/ folders): no model pass, the vectors indexed as given, rows across parts and spans in
order with their metadata, served like any index; vectors that are not L2-normalized or of
another dimension than the named model's are refused with a line that names them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsearch.builder.build import BuildOptions, run_build
from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.builder.test_build import load_vectors
from tests.conftest import live_server

ROOT = Path(__file__).resolve().parents[2]
PARTS = (30, 20)


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_folder(root: Path, dim: int = 64, parts: tuple[int, ...] = PARTS, text: bool = True) -> dict:
    """A folder as `clip-retrieval inference` writes it; returns what it holds, row by row."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    images, texts, captions, keys = [], [], [], []
    for i, rows in enumerate(parts):
        img, txt = _unit(rows, dim, 10 + i), _unit(rows, dim, 20 + i)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", img)
        if text:
            np.save(root / "text_emb" / f"text_emb_{i}.npy", txt)
        cap = [f"photo {i}-{r} of a {'red' if r % 3 == 0 else 'blue'} thing" for r in range(rows)]
        key = [f"{i:05d}{r:04d}" for r in range(rows)]
        table = pa.table({"key": key, "caption": cap, "url": [f"https://example.com/{k}.jpg" for k in key],
                          "similarity": [0.3] * rows})
        pq.write_table(table, root / "metadata" / f"metadata_{i}.parquet", row_group_size=7)
        images.append(img)
        texts.append(txt)
        captions += cap
        keys += key
    return {"image": np.concatenate(images), "text": np.concatenate(texts), "captions": captions, "keys": keys}


def test_a_folder_of_embeddings_builds_and_serves_as_given(tmp_path, tiny_model) -> None:
    given = write_folder(tmp_path / "emb")
    summary = run_build(BuildOptions(inputs=[tmp_path / "emb"], output=tmp_path / "idx", model=tiny_model.info.spec,
                                     device="cpu", progress=False, shard_size=16), model=tiny_model)
    assert summary.encoded == {"image": 50, "text": 50} and summary.skipped == 0
    vectors, items = load_vectors(summary.version_dir, "image")
    np.testing.assert_array_equal(vectors, given["image"])  # the vectors as given: no model pass
    assert [it["id"] for it in items] == given["keys"] and [it["text"] for it in items] == given["captions"]
    assert items[31]["metadata"]["url"] == "https://example.com/000010001.jpg"
    text_vectors, _ = load_vectors(summary.version_dir, "text")
    np.testing.assert_array_equal(text_vectors, given["text"])

    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False, index_dir=tmp_path / "idx")
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app) as port:
        query = given["image"][40] + 0.3 * _unit(1, 64, 99)[0]
        r = httpx.post(f"http://127.0.0.1:{port}/search/vector", json={"vector": query.tolist(), "k": 5}, timeout=30)
        expected = np.argsort(-(given["image"] @ (query / np.linalg.norm(query))), kind="stable")[:5]
        assert [h["id"] for h in r.json()["results"]] == [given["keys"][i] for i in expected]
        r = httpx.post(f"http://127.0.0.1:{port}/search/text", json={"text": "photo 1-7", "k": 1, "mode": "lexical"},
                       timeout=30)
        assert r.json()["results"][0]["id"] == given["keys"][30 + 7]  # the captions are searchable by words


def _build_cli(tmp_path: Path, folder: Path, model: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipsearch", "index", "build", "--input", str(folder), "--output",
                           str(tmp_path / "idx"), "--model", model, "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_vectors_that_are_not_unit_length_are_refused(tmp_path, tiny_spec) -> None:
    write_folder(tmp_path / "emb", text=False)
    bad = np.load(tmp_path / "emb/img_emb/img_emb_1.npy")
    bad[4] *= 3
    np.save(tmp_path / "emb/img_emb/img_emb_1.npy", bad)
    r = _build_cli(tmp_path, tmp_path / "emb", tiny_spec)
    assert r.returncode != 0 and "img_emb_1.npy: row 4 has norm 3.0000" in r.stderr
    assert not (tmp_path / "idx" / "CURRENT").exists()


@pytest.mark.parametrize("problem", ["dim", "parts"])
def test_a_wrong_dimension_or_uneven_parts_are_refused(tmp_path, tiny_spec, problem) -> None:
    if problem == "dim":
        write_folder(tmp_path / "emb", dim=32)
        expected = "vectors of dim 32, the model"
    else:
        write_folder(tmp_path / "emb")
        (tmp_path / "emb/text_emb/text_emb_1.npy").unlink()
        expected = "1 text_emb parts, but 2 of the vectors"
    r = _build_cli(tmp_path, tmp_path / "emb", tiny_spec)
    assert r.returncode != 0 and expected in r.stderr, r.stderr[-2000:]


def test_parquet_vector_columns_build_as_given(tmp_path, tiny_model, tiny_spec) -> None:
    image, text = _unit(40, 64, 1), _unit(40, 64, 2)
    table = pa.table({"key": [f"k{i}" for i in range(40)], "caption": [f"caption {i}" for i in range(40)],
                      "image_embedding": image.tolist(), "text_embedding": text.tolist()})
    pq.write_table(table, tmp_path / "vectors.parquet", row_group_size=16)
    summary = run_build(BuildOptions(inputs=[tmp_path / "vectors.parquet"], output=tmp_path / "idx",
                                     model=tiny_model.info.spec, device="cpu", progress=False, shard_size=16),
                        model=tiny_model)
    assert summary.encoded == {"image": 40, "text": 40} and summary.skipped == 0
    vectors, items = load_vectors(summary.version_dir, "image")
    np.testing.assert_allclose(vectors, image, atol=1e-7)
    assert [it["id"] for it in items] == [f"k{i}" for i in range(40)] and "image_embedding" not in items[0]["metadata"]
    np.testing.assert_allclose(load_vectors(summary.version_dir, "text")[0], text, atol=1e-7)
    bad = image.copy()
    bad[9] *= 2
    pq.write_table(table.set_column(2, "image_embedding", pa.array(bad.tolist())), tmp_path / "bad.parquet")
    r = _build_cli(tmp_path, tmp_path / "bad.parquet", tiny_spec)
    assert r.returncode != 0 and "bad.parquet:image_embedding: row 10 has norm 2.0000" in r.stderr, r.stderr[-2000:]


def test_a_bare_npy_of_vectors_builds(tmp_path, tiny_model) -> None:
    vectors = _unit(25, 64, 5)
    np.save(tmp_path / "vectors.npy", vectors)
    summary = run_build(BuildOptions(inputs=[tmp_path / "vectors.npy"], output=tmp_path / "idx",
                                     model=tiny_model.info.spec, device="cpu", progress=False, shard_size=10),
                        model=tiny_model)
    assert summary.encoded == {"image": 25, "text": 0}
    stored, items = load_vectors(summary.version_dir, "image")
    np.testing.assert_array_equal(stored, vectors)
    assert [it["id"] for it in items] == [str(i + 1) for i in range(25)]  # row numbers, as in a Parquet input
