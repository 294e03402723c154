"""The HTTP API against exact references: open_clip itself and a brute-force top-k."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipsearch.core.errors import ClientGone
from clipsearch.index.format import ModelRef
from clipsearch.model.clip import ClipModel
from clipsearch.service.engine import SearchJob
from tests.conftest import encode_image, gate_model_call, image_bytes, make_image
from tests.tiny import write_index_from_vectors

TEXTS = ["a red circle", "a photo of a dog", "", "二只小猫", "x" * 300]


@pytest.fixture(scope="module")
def reference(tiny_spec: str):
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(tiny_spec)


def ref_text(reference, texts: list[str]) -> np.ndarray:
    model, _, tok = reference
    with torch.no_grad():
        x = model.encode_text(tok(texts))
    return (x / x.norm(dim=-1, keepdim=True)).numpy()


def ref_image(reference, data: bytes) -> np.ndarray:
    model, preprocess, _ = reference
    with torch.no_grad():
        x = model.encode_image(preprocess(Image.open(io.BytesIO(data))).unsqueeze(0))
    return (x / x.norm(dim=-1, keepdim=True)).numpy()[0]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.asarray(a) * np.asarray(b)).sum(axis=-1)


@pytest.fixture
def index_dir(tmp_path: Path, tiny_model: ClipModel) -> tuple[Path, np.ndarray, np.ndarray, list[str]]:
    """An index of 40 synthetic images and 40 captions, encoded by the served model."""
    images = [image_bytes(make_image(100 + i), "JPEG") for i in range(40)]
    captions = [f"picture number {i} with colour {c}" for i, c in enumerate(["red", "green", "blue", "gold"] * 10)]
    img_vecs = tiny_model.encode_images([Image.open(io.BytesIO(b)) for b in images])
    txt_vecs = tiny_model.encode_texts(captions)
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    write_index_from_vectors(
        tmp_path / "idx", model=ref,
        image=(img_vecs, [{"id": f"img-{i}", "metadata": {"n": i}} for i in range(40)]),
        text=(txt_vecs, [{"id": f"cap-{i}", "text": c, "metadata": {}} for i, c in enumerate(captions)]),
    )
    return tmp_path / "idx", img_vecs, txt_vecs, captions


async def test_embed_texts_equal_open_clip(make_client, tiny_model, reference) -> None:
    async with make_client(tiny_model) as client:
        r = await client.post("/embed", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 64 and body["model"] == tiny_model.info.spec and body["images"] == []
    got = np.array(body["texts"], np.float32)
    assert cosines(got, ref_text(reference, TEXTS)).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("mode", "fmt", "spelling"), [
    ("RGB", "JPEG", "std"), ("RGB", "PNG", "urlsafe"), ("L", "JPEG", "nopad"), ("RGBA", "PNG", "datauri"),
    ("L", "PNG", "urlsafe-nopad"),
])
async def test_embed_images_equal_open_clip(make_client, tiny_model, reference, mode, fmt, spelling) -> None:
    data = image_bytes(make_image(11, (150, 110), mode), fmt)
    encoded = (base64.urlsafe_b64encode if "urlsafe" in spelling else base64.b64encode)(data).decode()
    if "nopad" in spelling:
        encoded = encoded.rstrip("=")
    if spelling == "datauri":
        encoded = f"data:image/{fmt.lower()};base64,{encoded}"
    async with make_client(tiny_model) as client:
        r = await client.post("/embed", json={"images": [encoded]})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["images"][0], np.float32)
    assert cosines(got, ref_image(reference, data)) >= 0.9999


async def test_embed_mixed_keeps_order(make_client, tiny_model, reference) -> None:
    imgs = [image_bytes(make_image(s), "JPEG") for s in (1, 2, 3)]
    async with make_client(tiny_model) as client:
        r = await client.post("/embed", json={"texts": TEXTS[:2], "images": [base64.b64encode(b).decode()
                                                                             for b in imgs]})
    body = r.json()
    assert len(body["texts"]) == 2 and len(body["images"]) == 3
    assert cosines(body["texts"], ref_text(reference, TEXTS[:2])).min() >= 0.9999
    for got, data in zip(body["images"], imgs, strict=True):
        assert cosines(got, ref_image(reference, data)) >= 0.9999


async def test_concurrent_requests_batch_and_match_sequential(make_client, tiny_model, reference) -> None:
    texts = [f"query number {i}" for i in range(48)]
    images = [encode_image(make_image(200 + i)) for i in range(16)]
    async with make_client(tiny_model, max_batch_size=32) as client:
        state = client.state
        sequential = [np.array((await client.post("/embed", json={"texts": [t]})).json()["texts"][0]) for t in texts]
        calls_before = state.engine.text.stats.batches
        responses = await asyncio.gather(*[client.post("/embed", json={"texts": [t]}) for t in texts],
                                         *[client.post("/embed", json={"images": [im]}) for im in images])
        text_calls = state.engine.text.stats.batches - calls_before
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in responses)
    concurrent = [np.array(r.json()["texts"][0]) for r in responses[:48]]
    np.testing.assert_allclose(concurrent, sequential, atol=1e-5)
    assert cosines(concurrent, ref_text(reference, texts)).min() >= 0.9999
    assert text_calls < len(texts)  # merged into fewer model calls
    assert state.engine.text.stats.largest_batch > 1
    assert 'clipsearch_batch_size_count{modality="text"}' in metrics
    assert 'clipsearch_requests_total{method="POST",route="/embed",status="200"}' in metrics


# faiss-cpu: encode, then search (two batched steps); torch: the same index searched by torch
# on the model's device, so a query text is encoded and searched in one step there.
SEARCH_BACKENDS = ["faiss-cpu", "torch"]


@pytest.mark.parametrize("backend", SEARCH_BACKENDS)
async def test_search_text_equals_brute_force(make_client, tiny_model, reference, index_dir, backend) -> None:
    path, img_vecs, _, _ = index_dir
    queries = ["a red picture", "number 7", "blue"]
    async with make_client(tiny_model, index_dir=path, search_backend=backend) as client:
        assert (await client.get("/readyz")).status_code == 200
        for q, qv in zip(queries, ref_text(reference, queries), strict=True):
            r = await client.post("/search/text", json={"text": q, "k": 7})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            expected = np.argsort(-(img_vecs @ qv), kind="stable")[:7]
            assert [h["id"] for h in results] == [f"img-{i}" for i in expected]
            np.testing.assert_allclose([h["score"] for h in results], (img_vecs @ qv)[expected], atol=1e-4)
            assert results[0]["metadata"] == {"n": int(expected[0])}


@pytest.mark.parametrize("backend", SEARCH_BACKENDS)
async def test_search_image_equals_brute_force(make_client, tiny_model, reference, index_dir, backend) -> None:
    path, _, txt_vecs, captions = index_dir
    data = image_bytes(make_image(999), "PNG")
    qv = ref_image(reference, data)
    async with make_client(tiny_model, index_dir=path, search_backend=backend) as client:
        r = await client.post("/search/image", json={"image": base64.b64encode(data).decode(), "k": 5})
    assert r.status_code == 200, r.text
    expected = np.argsort(-(txt_vecs @ qv), kind="stable")[:5]
    results = r.json()["results"]
    assert [h["id"] for h in results] == [f"cap-{i}" for i in expected]
    assert [h["text"] for h in results] == [captions[i] for i in expected]


@pytest.mark.parametrize("backend", SEARCH_BACKENDS)
async def test_concurrent_searches_are_batched_and_equal_brute_force(make_client, tiny_model, reference,
                                                                      index_dir, backend) -> None:
    path, img_vecs, _, _ = index_dir
    queries = [f"picture {i} in {c}" for i, c in enumerate(["red", "blue", "gold", "green"] * 6)]
    ks = [1, 3, 10, 40, 7, 2] * 4  # different k in one batch: each gets its own top-k
    async with make_client(tiny_model, index_dir=path, search_backend=backend) as client:
        backend_ = client.state.indexes.current.get("image").backend
        search, calls = backend_.search, []
        backend_.search = lambda q, k, p: calls.append(len(q)) or search(q, k, p)
        responses = await asyncio.gather(*[
            client.post("/search/text", json={"text": q, "k": k}) for q, k in zip(queries, ks, strict=True)
        ])
    for r, qv, k in zip(responses, ref_text(reference, queries), ks, strict=True):
        assert r.status_code == 200, r.text
        expected = np.argsort(-(img_vecs @ qv), kind="stable")[:k]
        assert [h["id"] for h in r.json()["results"]] == [f"img-{i}" for i in expected]
    assert sum(calls) == len(queries) and len(calls) < len(queries)  # merged into fewer index calls


@pytest.mark.parametrize("backend", ["torch", "faiss-cpu"])
async def test_a_search_is_the_post_step_of_its_query_encode(make_client, tiny_model, reference, index_dir,
                                                            monkeypatch, backend) -> None:
    """A text search takes one batcher step: with a torch index on the model's device the query
    vector goes into the search as a tensor, in the model's thread; FAISS on the CPU gets a host
    array in its own thread."""
    import threading

    path, img_vecs, _, _ = index_dir
    seen: list[tuple[type, str]] = []
    async with make_client(tiny_model, index_dir=path, search_backend=backend) as client:
        engine, index = client.state.engine, client.state.indexes.current.get("image")
        search = index.backend.search

        def spy(queries, k, params):
            seen.append((type(queries), threading.current_thread().name.split("_")[0]))
            return search(queries, k, params)

        monkeypatch.setattr(index.backend, "search", spy)
        before = engine.text.stats.batches
        r = await client.post("/search/text", json={"text": "number 7", "k": 4})
        batches = engine.text.stats.batches - before
    assert r.status_code == 200, r.text
    qv = ref_text(reference, ["number 7"])[0]
    expected = np.argsort(-(img_vecs @ qv), kind="stable")[:4]
    assert [h["id"] for h in r.json()["results"]] == [f"img-{i}" for i in expected]
    assert batches == 1
    assert seen == ([(torch.Tensor, "clip-model")] if backend == "torch" else [(np.ndarray, "clip-search")])


@pytest.mark.gpu
async def test_text_search_on_the_gpu_equals_brute_force(make_client, tiny_spec, index_dir) -> None:
    """On a GPU (fp16, CUDA graphs, torch index in fp16): the one-step text search returns the
    brute-force top-k of the service's own query vector, within fp16 rounding."""
    from clipsearch.model.clip import load_model

    path, img_vecs, _, _ = index_dir
    model = load_model(tiny_spec, device="cuda", dtype="fp16")
    queries = [f"picture {i} in {c}" for i, c in enumerate(["red", "blue", "gold", "green"] * 4)]
    async with make_client(model, index_dir=path, search_backend="torch") as client:
        engine = client.state.engine
        assert client.state.model.graphed_towers == ["text", "image"]
        vectors = np.array((await client.post("/embed", json={"texts": queries})).json()["texts"])
        responses = await asyncio.gather(*[client.post("/search/text", json={"text": q, "k": 8}) for q in queries])
        assert engine.text.stats.batches > 0
    for r, qv in zip(responses, vectors, strict=True):
        assert r.status_code == 200, r.text
        scores = [h["score"] for h in r.json()["results"]]
        got = np.array([img_vecs[int(h["id"].removeprefix("img-"))] @ qv for h in r.json()["results"]])
        np.testing.assert_allclose(np.sort(got)[::-1], np.sort(img_vecs @ qv)[::-1][:8], atol=5e-3)
        np.testing.assert_allclose(scores, got, atol=5e-3)


async def test_text_searches_of_two_index_versions_share_a_batch(make_client, tiny_model, reference,
                                                                  index_dir) -> None:
    """A hot reload while text searches are batched: each query is searched in the index it
    was given (one backend call per index)."""
    from clipsearch.index.format import current_version_dir
    from clipsearch.index.search import SearchParams, load_index_set

    path, img_vecs, _, _ = index_dir
    other_vecs = img_vecs[::-1].copy()
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    write_index_from_vectors(path.parent / "other", model=ref,
                             image=(other_vecs, [{"id": f"other-{i}"} for i in range(40)]))
    async with make_client(tiny_model, index_dir=path, search_backend="torch") as client:
        engine = client.state.engine
        served = client.state.indexes.current.get("image")
        other = load_index_set(current_version_dir(path.parent / "other"), fingerprint=tiny_model.info.fingerprint,
                               dim=tiny_model.dim, backend="torch", device="cpu").get("image")
        queries = [f"picture {i}" for i in range(12)]
        before = engine.text.stats.batches
        results = await asyncio.gather(*[
            engine.search_text(SearchJob(served if i % 2 else other, 5, SearchParams()), q)
            for i, q in enumerate(queries)
        ])
        assert engine.text.stats.batches - before < len(queries)
    for i, (hits, qv) in enumerate(zip(results, ref_text(reference, queries), strict=True)):
        vecs, prefix = (img_vecs, "img") if i % 2 else (other_vecs, "other")
        expected = np.argsort(-(vecs @ qv), kind="stable")[:5]
        assert [h.id for h in hits] == [f"{prefix}-{j}" for j in expected]
        np.testing.assert_allclose([h.score for h in hits], (vecs @ qv)[expected], atol=1e-4)


async def test_text_search_whose_client_left_is_dropped_from_its_batch(make_client, tiny_model, reference,
                                                                      index_dir, monkeypatch) -> None:
    """A text search that ends while its batch waits for the model: its row is cut from the
    collated batch (tokens and search jobs together), its batch-mate gets exactly its hits."""
    from clipsearch.index.search import SearchParams

    path, img_vecs, _, _ = index_dir
    gate, rows = gate_model_call(monkeypatch, tiny_model, "text_vectors")
    async with make_client(tiny_model, index_dir=path, search_backend="torch", warmup=False) as client:
        engine, index = client.state.engine, client.state.indexes.current.get("image")
        left = asyncio.Event()
        blocker = asyncio.ensure_future(engine.search_text(SearchJob(index, 3, SearchParams()), "blocker"))
        await asyncio.sleep(0.2)
        leaver = asyncio.ensure_future(engine.search_text(SearchJob(index, 3, SearchParams()), "leaver",
                                                          disconnected=left.wait))
        stayer = asyncio.ensure_future(engine.search_text(SearchJob(index, 3, SearchParams()), "number 7"))
        await asyncio.sleep(0.2)  # both are collated into one batch, waiting for the blocker
        left.set()
        await asyncio.sleep(0.1)
        gate.set()
        await blocker
        hits = await stayer
        with pytest.raises(ClientGone):
            await leaver
    assert rows == [1, 1]
    qv = ref_text(reference, ["number 7"])[0]
    assert [h.id for h in hits] == [f"img-{i}" for i in np.argsort(-(img_vecs @ qv), kind="stable")[:3]]


async def test_cpu_search_whose_client_left_while_queued_for_faiss_is_not_searched(make_client, tiny_model,
                                                                                   reference, index_dir) -> None:
    """A query already encoded and waiting for the FAISS thread is withdrawn when its client
    leaves (a load generator that stops leaves hundreds of such queries behind)."""
    from clipsearch.index.search import SearchParams

    path, img_vecs, _, _ = index_dir
    async with make_client(tiny_model, index_dir=path, search_backend="faiss-cpu", warmup=False) as client:
        engine, index = client.state.engine, client.state.indexes.current.get("image")
        search, searched, started, release = index.backend.search, [], threading.Event(), threading.Event()

        def held(queries, k, params):
            searched.append(len(queries))
            started.set()
            release.wait(10)
            return search(queries, k, params)

        index.backend.search = held
        left = asyncio.Event()
        blocker = asyncio.ensure_future(engine.search_text(SearchJob(index, 3, SearchParams()), "blocker"))
        assert await asyncio.to_thread(started.wait, 10)
        leaver = asyncio.ensure_future(engine.search_text(SearchJob(index, 3, SearchParams()), "leaver",
                                                          disconnected=left.wait))
        await asyncio.sleep(0.4)  # encoded, queued for the FAISS thread, watched for a disconnect
        left.set()
        with pytest.raises(ClientGone):
            await leaver
        stayer = asyncio.ensure_future(engine.search_text(SearchJob(index, 3, SearchParams()), "number 7"))
        await asyncio.sleep(0.2)
        release.set()
        await blocker
        hits = await stayer
    assert searched == [1, 1]  # the blocker, then the stayer: the leaver's query never reached FAISS
    qv = ref_text(reference, ["number 7"])[0]
    assert [h.id for h in hits] == [f"img-{i}" for i in np.argsort(-(img_vecs @ qv), kind="stable")[:3]]


async def test_k_above_index_size_returns_all(make_client, tiny_model, index_dir) -> None:
    async with make_client(tiny_model, index_dir=index_dir[0]) as client:
        r = await client.post("/search/text", json={"text": "x", "k": 500})
    assert r.status_code == 200 and len(r.json()["results"]) == 40


async def test_model_failure_fails_every_waiter_and_service_recovers(make_client, tiny_model, monkeypatch) -> None:
    original = tiny_model.text_vectors
    broken = threading.Event()
    broken.set()

    def flaky(tokens):
        if broken.is_set():
            raise RuntimeError("CUDA error: device-side assert (secret internals)")
        return original(tokens)

    monkeypatch.setattr(tiny_model, "text_vectors", flaky)
    async with make_client(tiny_model, warmup=False) as client:  # it fails while serving, not at start
        responses = await asyncio.wait_for(
            asyncio.gather(*[client.post("/embed", json={"texts": [f"t{i}"]}) for i in range(20)]), 30)
        assert {r.status_code for r in responses} == {500}
        assert all(r.json()["error"]["type"] == "inference_error" for r in responses)
        assert "secret" not in responses[0].text
        broken.clear()
        assert (await client.post("/embed", json={"texts": ["ok"]})).status_code == 200
        assert (await client.get("/readyz")).status_code == 200


async def test_overload_gets_429_with_retry_after(make_client, tiny_model, monkeypatch) -> None:
    gate, _ = gate_model_call(monkeypatch, tiny_model, "text_vectors")
    async with make_client(tiny_model, max_queue=8, max_items_per_request=8, max_batch_size=4,
                           warmup=False) as client:
        first = asyncio.ensure_future(client.post("/embed", json={"texts": ["a"] * 4}))
        await asyncio.sleep(0.2)
        queued = asyncio.ensure_future(client.post("/embed", json={"texts": ["b"] * 8}))
        await asyncio.sleep(0.2)
        r = await client.post("/embed", json={"texts": ["c"]})
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "overloaded"
        gate.set()
        assert (await first).status_code == 200 and (await queued).status_code == 200


async def test_timeout_gets_504(make_client, tiny_model, monkeypatch) -> None:
    gate = threading.Event()
    original = tiny_model.text_vectors
    monkeypatch.setattr(tiny_model, "text_vectors", lambda t: (gate.wait(5), original(t))[1])
    async with make_client(tiny_model, request_timeout_s=0.3, warmup=False) as client:
        r = await client.post("/embed", json={"texts": ["slow"]})
        gate.set()
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


async def test_readiness_follows_index_state(make_client, tiny_model, tmp_path, index_dir) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    async with make_client(tiny_model) as client:  # no index configured: ready, search 503
        assert (await client.get("/readyz")).status_code == 200
        r = await client.post("/search/text", json={"text": "x"})
        assert r.status_code == 503 and "no index configured" in r.json()["error"]["message"]
    async with make_client(tiny_model, index_dir=empty) as client:  # nothing published yet
        r = await client.get("/readyz")
        assert r.status_code == 503 and "no index version published" in r.json()["reason"]
        assert (await client.post("/embed", json={"texts": ["still works"]})).status_code == 200
    # An index built by another model: refused, not ready, /embed still serves.
    other = tmp_path / "other"
    write_index_from_vectors(other, model=ModelRef(spec="ViT-B-32", fingerprint="ViT-B-32:openai"),
                             image=(index_dir[1], [{"id": str(i)} for i in range(40)]))
    async with make_client(tiny_model, index_dir=other) as client:
        r = await client.get("/readyz")
        assert r.status_code == 503 and "built with model 'ViT-B-32'" in r.json()["reason"]
        s = await client.post("/search/text", json={"text": "x"})
        assert s.status_code == 503 and s.json()["error"]["type"] == "not_ready"
        assert (await client.post("/embed", json={"texts": ["x"]})).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert "clipsearch_index_load_failures_total 1.0" in metrics


async def test_index_with_only_images_answers_503_for_image_search(make_client, tiny_model, tmp_path) -> None:
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    vecs = tiny_model.encode_texts(["a", "b"])
    write_index_from_vectors(tmp_path, model=ref, image=(vecs, [{"id": "a"}, {"id": "b"}]))
    async with make_client(tiny_model, index_dir=tmp_path) as client:
        assert (await client.post("/search/text", json={"text": "a", "k": 1})).json()["results"][0]["id"] == "a"
        r = await client.post("/search/image", json={"image": encode_image(make_image(1))})
        assert r.status_code == 503 and "no text index" in r.json()["error"]["message"]


GOOD = encode_image(make_image(1))
NOT_IMAGE = base64.b64encode(b"%PDF-1.4 not an image at all").decode()
TRUNCATED = base64.b64encode(image_bytes(make_image(2, (300, 300)))[:500]).decode()
BIG_PIXELS = base64.b64encode(image_bytes(Image.new("L", (3000, 3000)), "PNG")).decode()

BAD_REQUESTS = [
    # (method, path, body or raw bytes, status, error type, field)
    ("POST", "/embed", {}, 400, "invalid_input", "texts"),
    ("POST", "/embed", {"texts": [], "images": []}, 400, "invalid_input", "texts"),
    ("POST", "/embed", {"texts": "not a list"}, 422, "validation_error", "texts"),
    ("POST", "/embed", {"texts": [1, 2]}, 422, "validation_error", "texts[0]"),
    ("POST", "/embed", {"text": ["typo"]}, 422, "validation_error", "text"),
    ("POST", "/embed", {"images": [GOOD, "!!!not base64!!!"]}, 400, "invalid_base64", "images[1]"),
    ("POST", "/embed", {"images": [NOT_IMAGE]}, 400, "invalid_image", "images[0]"),
    ("POST", "/embed", {"images": [GOOD, GOOD, TRUNCATED]}, 400, "invalid_image", "images[2]"),
    ("POST", "/embed", {"images": [BIG_PIXELS]}, 413, "payload_too_large", "images[0]"),
    ("POST", "/embed", {"texts": ["ok", "y" * 5000]}, 413, "payload_too_large", "texts[1]"),
    ("POST", "/embed", {"texts": ["t"] * 65}, 413, "payload_too_large", None),
    ("POST", "/embed", b"{not json", 422, "validation_error", None),
    ("POST", "/embed", b"", 422, "validation_error", None),
    ("POST", "/embed", b"[1,2,3]", 422, "validation_error", None),
    ("POST", "/embed", b"\xff\xfe garbage bytes", 422, "validation_error", None),
    ("POST", "/search/text", {"text": "x", "k": 0}, 422, "validation_error", "k"),
    ("POST", "/search/text", {"text": "x", "k": 5000}, 422, "validation_error", "k"),
    ("POST", "/search/text", {"k": 3}, 422, "validation_error", "text"),
    ("POST", "/search/text", {"text": None}, 422, "validation_error", "text"),
    ("POST", "/search/text", {"text": "y" * 2001}, 413, "payload_too_large", "text"),
    ("POST", "/search/image", {"image": "aGVsbG8"}, 400, "invalid_image", "image"),
    ("POST", "/search/image", {"image": ""}, 422, "validation_error", "image"),  # the schema says minLength 1
    ("POST", "/search/image", {"image": GOOD, "nprobe": -1}, 422, "validation_error", "nprobe"),
    ("GET", "/embed", None, 405, "method_not_allowed", None),
    ("GET", "/nope", None, 404, "not_found", None),
]


@pytest.mark.parametrize("backend", SEARCH_BACKENDS)
async def test_bad_input_gets_documented_4xx_and_service_stays_ready(make_client, tiny_model, index_dir,
                                                                     backend) -> None:
    async with make_client(tiny_model, index_dir=index_dir[0], max_image_pixels=4_000_000,
                           search_backend=backend) as client:
        for method, path, body, status, kind, field in BAD_REQUESTS:
            if isinstance(body, bytes):
                r = await client.request(method, path, content=body, headers={"content-type": "application/json"})
            else:
                r = await client.request(method, path, json=body)
            assert r.status_code == status, (path, body if not isinstance(body, dict) else list(body), r.text)
            err = r.json()["error"]
            assert err["type"] == kind, (path, r.text)
            if field is not None:
                assert err["field"] == field, (path, r.text)
            assert err["message"]
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/embed", json={"texts": ["fine"]})).status_code == 200


async def test_oversize_body_rejected_before_parsing(make_client, tiny_model) -> None:
    async with make_client(tiny_model, max_items_per_request=1, max_image_bytes=1000, max_text_chars=10) as client:
        r = await client.post("/embed", content=b'{"texts": ["' + b"a" * 200_000 + b'"]}',
                              headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"

        async def chunks():  # no Content-Length: counted while streaming
            for _ in range(50):
                yield b"a" * 10_000

        r = await client.post("/embed", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


async def test_healthz_and_info(make_client, tiny_model) -> None:
    async with make_client(tiny_model) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        info = (await client.get("/")).json()
        assert info["model"]["dim"] == 64 and info["index"] is None
        assert info["runtime"]["cuda_graphs"] == [] and info["runtime"]["workers"] == 1  # CPU: no graphs
        schema = (await client.get("/openapi.json")).json()
        assert {"/embed", "/search/text", "/search/image"} <= set(schema["paths"])
        bodies = {path: schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
                  for path in ("/embed", "/search/text", "/search/image", "/classify")}
        assert set(bodies["/embed"]["properties"]) == {"texts", "images"}
        assert set(bodies["/search/text"]["properties"]) == {"text", "k", "nprobe", "ef_search", "target", "offset",
                                                          "filter", "return_vectors", "dedup", "dedup_threshold",
                                                          "mode", "lexical_weight"}
        assert "image" in bodies["/search/image"]["properties"]
        assert {"image", "labels"} <= set(bodies["/classify"]["properties"])
    async with make_client(tiny_model, expose_internals=False) as client:
        info = (await client.get("/")).json()
        assert info == {"service": "clipsearch", "model": tiny_model.info.spec, "family": "open_clip", "dim": 64,
                    "index": None}


async def test_local_dir_written_without_clipsearch_serves_open_clips_vectors(tmp_path, make_client) -> None:
    """Done-when: a random local-dir model made outside the project (plain open_clip + safetensors)."""
    import json

    from safetensors.torch import save_file

    from clipsearch.model.clip import load_model

    cfg = {"embed_dim": 48, "vision_cfg": {"image_size": 48, "layers": 1, "width": 48, "patch_size": 12,
                                           "head_width": 24},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 1}}
    torch.manual_seed(77)
    model = open_clip.CLIP(**cfg).eval()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    spec = f"local-dir:{tmp_path}"
    ref = (model, open_clip.create_model_and_transforms(spec)[2], open_clip.get_tokenizer(spec))
    data = image_bytes(make_image(5, (200, 120)), "JPEG")
    async with make_client(load_model(spec, device="cpu")) as client:
        body = (await client.post("/embed", json={"texts": TEXTS, "images": [base64.b64encode(data).decode()]})).json()
    assert body["dim"] == 48
    assert cosines(body["texts"], ref_text(ref, TEXTS)).min() >= 0.9999
    assert cosines(body["images"][0], ref_image(ref, data)) >= 0.9999


def test_cpu_searches_waiting_together_are_one_index_call() -> None:
    """Queries handed to the search thread by several model batches while it is busy are
    merged into one call (up to its row limit), and each gets its own rows back."""
    from clipsearch.index.search import SearchParams
    from clipsearch.service.engine import SearchJob, SearchThread

    started, release, calls = threading.Event(), threading.Event(), []

    class Index:
        def raw_search(self, queries, k, params, selection=None):
            calls.append(len(queries))
            started.set()
            release.wait(10)
            ids = np.asarray(queries)[:, :1].astype(np.int64).repeat(k, 1)
            return np.zeros(ids.shape, np.float32), ids

    job = SearchJob(Index(), 2, SearchParams())
    thread = SearchThread(max_rows=4)
    first = thread.submit([(job, np.array([[0.0]]))])
    assert started.wait(10)
    later = [f for q in range(1, 7) for f in thread.submit([(job, np.array([[float(q)]]))])]
    release.set()
    rows = [f.result(10) for f in (*first, *later)]
    thread.close()
    assert calls == [1, 4, 2]
    assert [int(r["id"][0, 0]) for r in rows] == list(range(7))


async def test_requests_of_huge_images_cannot_hold_the_decoders(make_client, tiny_model) -> None:
    """Two requests of 8 flat 3000x3000 PNGs each (small files, many pixels) do not keep a
    one-image request waiting until they are decoded: requests take turns image by image."""
    huge = base64.b64encode(image_bytes(Image.new("RGB", (3000, 3000), "white"), "PNG")).decode()
    small = encode_image(make_image(5))
    async with make_client(tiny_model, preprocess_workers=1, warmup=False) as client:
        heavy = [asyncio.ensure_future(client.post("/embed", json={"images": [huge] * 8})) for _ in range(2)]
        await asyncio.sleep(0.3)
        r = await client.post("/embed", json={"images": [small]})
        assert r.status_code == 200 and not any(h.done() for h in heavy)
        assert [h.status_code for h in await asyncio.gather(*heavy)] == [200, 200]


def test_the_model_gets_every_core_shared_by_the_workers(tiny_model, monkeypatch) -> None:
    import os

    from clipsearch.service.settings import Settings
    from clipsearch.service.state import ServiceState, default_model_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert [default_model_threads(w) for w in (1, 2, 4, 8)] == [6, 3, 1, 1]
    given: list[int] = []
    monkeypatch.setattr(tiny_model, "set_threads", given.append)
    ServiceState.build(Settings(warmup=False, torch_threads=None), model=tiny_model)
    ServiceState.build(Settings(warmup=False, torch_threads=2), model=tiny_model)
    assert given == [6, 2]
