"""The refine stage: an IVF-PQ index whose codes cap recall keeps its vectors as fp16 and
re-ranks candidates by them, tuned to the recall target, and the service searches it so: on
the tuner's held-out queries its recall@10 against brute force is the manifest's (at least
the target), and each hit's score is its fp16 vector's dot product with the query."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from clipsearch.builder.build import BuildOptions, run_build
from clipsearch.builder.indexing import held_out_queries
from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import live_server

N, DIM = 30_000, 64


def clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 300 centres: near neighbours that PQ codes confuse."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((300, DIM)).astype(np.float32)
    v = centres[rng.integers(0, 300, n)] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    (root / "emb" / "img_emb").mkdir(parents=True)
    vectors = clustered(N, 1)
    np.save(root / "emb" / "img_emb" / "img_emb_0.npy", vectors)
    return root, vectors


def _build(root, model, refine: str):
    out = root / f"idx-{refine}"
    summary = run_build(BuildOptions(inputs=[root / "emb"], output=out, model=model.info.spec, device="cpu",
                                     progress=False, index_type="ivfpq", recall_target=0.95, refine=refine,
                                     shard_size=8192), model=model)
    return out, json.loads((summary.version_dir / "manifest.json").read_text())["indexes"]["image"]


@pytest.mark.slow
def test_refine_reaches_the_recall_target_that_codes_alone_miss(folder, tiny_model) -> None:
    root, vectors = folder
    _, plain = _build(root, tiny_model, "never")
    assert plain["refine"] is None and plain["recall_at_10"] < 0.95  # the codes' cap
    out, entry = _build(root, tiny_model, "auto")
    assert entry["refine"] == "image.refine.npy" and entry["search_params"]["refine"] >= 2
    assert entry["recall_at_10"] >= 0.95
    stored = np.load(next((out / "versions").iterdir()) / "image.refine.npy", mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (N, DIM)

    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False, index_dir=out)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    queries = held_out_queries(vectors, None)  # what the build tuned on
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    found = 0
    with live_server(app) as port:
        for query, t in zip(queries, truth, strict=True):
            r = httpx.post(f"http://127.0.0.1:{port}/search/vector", json={"vector": query.tolist(), "k": 10},
                           timeout=30)
            hits = r.json()["results"]
            rows = [int(h["id"]) - 1 for h in hits]
            found += len(set(rows) & set(t.tolist()))
            expected = np.asarray(stored[rows], np.float32) @ query
            np.testing.assert_allclose([h["score"] for h in hits], expected, rtol=1e-5, atol=1e-6)
            assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert found / truth.size == pytest.approx(entry["recall_at_10"], abs=1e-9)
