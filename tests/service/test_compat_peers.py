"""The peers' APIs against a live server, with exact references:

- clip-retrieval: its real `ClipClient` (clip_retrieval/clip_client.py from the PyPI package,
  installed without its heavy dependencies), hits equal to a brute-force top-k, near-duplicates
  folded as clip_back folds them, `/metadata` and `/indices-list` in its shapes;
- Weaviate multi2vec-clip: the requests of the module's own smoke_test.py (texts and base64
  images to /vectorize, /meta, /.well-known/live|ready) and its error shape (app.py);
- immich machine learning: the form immich's server sends (entries JSON + text or an image
  file, immich_ml/main.py) and the vector as a JSON string (models/transforms.py
  serialize_np_array), with `imageHeight`/`imageWidth` for images.
"""

from __future__ import annotations

import base64
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import orjson
import pytest

from clipsearch.index.format import ModelRef
from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import encode_image, image_bytes, live_server, make_image
from tests.tiny import write_index_from_vectors

NAME = "clip-tiny"
CLIP_RETRIEVAL = "clip-retrieval==2.45.0"
N_IMAGES = 30


def clip_retrieval_root() -> Path:
    """Where the clip-retrieval package lies: installed in this environment, or installed once
    without its dependencies (faiss, torch, flask... which ClipClient and the front do not use)
    next to the environment."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is not None and spec.origin:
        return Path(spec.origin).parents[1]
    target = Path(sys.prefix) / "clip-retrieval-nodeps"
    if not (target / "clip_retrieval" / "clip_client.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        CLIP_RETRIEVAL], check=True, timeout=300)
    return target


def clip_client_module() -> ModuleType:
    """clip_retrieval/clip_client.py as it is, without the package's __init__ (which imports
    the back end's dependencies)."""
    path = clip_retrieval_root() / "clip_retrieval" / "clip_client.py"
    spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tiny_model):
    """Image items (the last two near-copies of the first: a re-encoded, slightly shifted
    picture) with data: URLs as their `url`, and text items with captions."""
    images = [make_image(i) for i in range(N_IMAGES - 2)]
    images += [make_image(0).resize((97, 81)), make_image(0).rotate(1)]
    raws = [image_bytes(im) for im in images]
    from clipsearch.images.decoder import ImageDecoder

    decoder = ImageDecoder.create(tiny_model.preprocess_transform, "exact", tiny_model.image_size, 10**8)
    pixels = decoder.pixels(raws, [f"i{i}" for i in range(len(raws))], tiny_model.device)
    image_vectors = tiny_model.encode_pixels(pixels)
    captions = [f"a {('red', 'green', 'blue')[i % 3]} shape number {i}" for i in range(20)]
    text_vectors = tiny_model.encode_tokens(tiny_model.tokenize(captions))
    urls = [f"data:image/jpeg;base64,{base64.b64encode(r).decode()}" for r in raws]
    return {"images": raws, "image_vectors": image_vectors, "urls": urls, "captions": captions,
            "text_vectors": text_vectors}


@pytest.fixture(scope="module")
def server(tiny_model, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("compat-index")
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    image_items = [{"id": f"img{i}", "text": f"picture {i}", "metadata": {"url": u, "NSFW": "UNLIKELY"}}
                   for i, u in enumerate(corpus["urls"])]
    text_items = [{"id": f"cap{i}", "text": c} for i, c in enumerate(corpus["captions"])]
    write_index_from_vectors(root, model=ref, image=(corpus["image_vectors"], image_items),
                             text=(corpus["text_vectors"], text_items))
    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False, served_model_name=NAME,
                        index_dir=root, immich_model_names=["ViT-B-32__openai"])
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app) as port:
        yield f"http://127.0.0.1:{port}"


def _top(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    scores = vectors @ query
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return order.tolist(), scores[order]


def test_clip_retrieval_client_finds_the_brute_force_top_k(server, tiny_model, corpus) -> None:
    module = clip_client_module()
    query = tiny_model.encode_tokens(tiny_model.tokenize(["a red shape"]))[0]
    # deduplicate off: exactly the brute-force order over the image index
    client = module.ClipClient(url=f"{server}/knn-service", indice_name="laion5B-L-14", num_images=10,
                               deduplicate=False)
    hits = client.query(text="a red shape")
    want, scores = _top(corpus["image_vectors"], query, 10)
    assert [h["id"] for h in hits] == want
    np.testing.assert_allclose([h["similarity"] for h in hits], scores, atol=1e-5)
    assert hits[0]["url"] == corpus["urls"][want[0]] and hits[0]["caption"] == f"picture {want[0]}"
    assert hits[0]["NSFW"] == "UNLIKELY"
    # an image file, and text search of the text index (ids after the image index's)
    photo = Path(pytest.importorskip("tempfile").mkdtemp()) / "q.jpg"
    photo.write_bytes(corpus["images"][5])
    client = module.ClipClient(url=f"{server}/knn-service", indice_name="x", num_images=3, deduplicate=False)
    assert client.query(image=str(photo))[0]["id"] == 5
    texts = module.ClipClient(url=f"{server}/knn-service", indice_name="x", modality=module.Modality.TEXT,
                              num_images=5, deduplicate=False).query(text="blue shape number 2")
    want, _ = _top(corpus["text_vectors"], tiny_model.encode_tokens(tiny_model.tokenize(["blue shape number 2"]))[0], 5)
    assert [h["id"] - N_IMAGES for h in texts] == want and texts[0]["caption"] == corpus["captions"][want[0]]


def _clip_back_dedup(vectors: np.ndarray, threshold: float = 0.94) -> list[int]:
    """The positions clip_back keeps (clip_back.py, connected_components_dedup): a breadth-first
    walk of the graph of pairs at cosine >= threshold; each group keeps its first position."""
    n, seen, kept = len(vectors), set(), []
    close = vectors @ vectors.T >= threshold
    for start in range(n):
        if start in seen:
            continue
        kept.append(start)
        todo = [start]
        while todo:
            node = todo.pop()
            seen.add(node)
            todo += [j for j in np.flatnonzero(close[node]) if j not in seen]
    return sorted(kept)


def test_clip_retrieval_client_defaults_fold_near_duplicates(tiny_model, tmp_path) -> None:
    rng = np.random.default_rng(5)
    base = rng.standard_normal((40, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    copies = base[[0, 0, 3, 7, 7, 7]] + 0.03 * rng.standard_normal((6, 64)).astype(np.float32)  # cosine ~0.97
    vectors = np.concatenate([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    write_index_from_vectors(tmp_path, model=ref, image=(vectors, [{"id": f"v{i}"} for i in range(len(vectors))]))
    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False, index_dir=tmp_path)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    module = clip_client_module()
    with live_server(app) as port:
        # the client's defaults: deduplicate, safety model, violence detector, aesthetic score 9 and weight 0.5
        client = module.ClipClient(url=f"http://127.0.0.1:{port}/knn-service", indice_name="laion5B-L-14",
                                   num_images=len(vectors))
        for q in (0, 7, 12):
            query = vectors[q] + 0.2 * rng.standard_normal(64).astype(np.float32)
            hits = client.query(embedding_input=query.tolist())
            ranked, _ = _top(vectors, query / np.linalg.norm(query), len(vectors))
            kept = _clip_back_dedup(vectors[ranked])
            assert [h["id"] for h in hits] == [ranked[i] for i in kept]
            assert len(hits) < len(vectors)  # the planted copies folded


def test_clip_retrieval_metadata_indices_and_refusals(server, corpus) -> None:
    assert httpx.get(f"{server}/indices-list").json() == ["clipsearch"]
    r = httpx.post(f"{server}/metadata", content=orjson.dumps({"ids": [3, N_IMAGES + 1], "indice_name": "x"}))
    assert r.json() == [{"id": 3, "metadata": {"url": corpus["urls"][3], "NSFW": "UNLIKELY", "caption": "picture 3"}},
                        {"id": N_IMAGES + 1, "metadata": {"caption": corpus["captions"][1]}}]
    r = httpx.post(f"{server}/metadata", json={"ids": [10_000]})
    assert r.status_code == 404 and "ids[0]" in r.json()["error"]
    r = httpx.post(f"{server}/knn-service", json={"text": "x", "modality": "image", "num_images": 3, "use_mclip": True})
    assert r.status_code == 400 and "use_mclip" in r.json()["error"]
    r = httpx.post(f"{server}/knn-service", json={"modality": "image", "num_images": 3})
    assert r.status_code == 400 and "text" in r.json()["error"]
    # clip-front sends num_result_ids 3000 and "" for an unset aesthetic score: capped and ignored
    r = httpx.post(f"{server}/knn-service", content=orjson.dumps({
        "text": "red", "modality": "image", "num_images": 40, "num_result_ids": 3000, "indice_name": "",
        "aesthetic_score": "", "aesthetic_weight": "0.5", "use_safety_model": True, "deduplicate": False}))
    assert r.status_code == 200 and len(r.json()) == N_IMAGES


def test_weaviate_module_requests(server, tiny_model, corpus) -> None:
    assert httpx.get(f"{server}/.well-known/live").status_code == 204
    assert httpx.get(f"{server}/.well-known/ready").status_code == 204
    meta = httpx.get(f"{server}/meta").json()
    assert isinstance(meta, dict) and meta["dim"] == 64
    body = {"texts": ["This is plane", "Boeing 737", "Blue plane"],
            "images": [base64.b64encode(corpus["images"][i]).decode() for i in (1, 2)]}
    r = httpx.post(f"{server}/vectorize", json=body, timeout=30)
    assert r.status_code == 200
    out = r.json()
    np.testing.assert_allclose(out["textVectors"], tiny_model.encode_tokens(tiny_model.tokenize(body["texts"])),
                               atol=2e-6)
    np.testing.assert_allclose(out["imageVectors"], corpus["image_vectors"][[1, 2]], atol=2e-6)
    assert httpx.post(f"{server}/vectorize", json={"texts": ["only text"]}).json()["imageVectors"] == []
    r = httpx.post(f"{server}/vectorize", json={"texts": [], "images": ["bm90IGFuIGltYWdl"]})
    assert r.status_code == 400 and set(r.json()) == {"error"} and "images[0]" in r.json()["error"]


def test_immich_predict_textual_and_visual(server, tiny_model, corpus) -> None:
    assert httpx.get(f"{server}/ping").text == "pong"
    entries = orjson.dumps({"clip": {"textual": {"modelName": NAME, "options": {"language": "en"}}}}).decode()
    r = httpx.post(f"{server}/predict", data={"entries": entries, "text": "a red shape"})
    vector = np.asarray(orjson.loads(r.json()["clip"]))  # a JSON array in a string, as immich's models answer
    np.testing.assert_allclose(vector, tiny_model.encode_tokens(tiny_model.tokenize(["a red shape"]))[0], atol=2e-6)
    entries = orjson.dumps({"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}).decode()  # a mapped name
    r = httpx.post(f"{server}/predict", data={"entries": entries},
                   files={"image": ("blob", corpus["images"][4], "application/octet-stream")})
    out = r.json()
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(orjson.loads(out["clip"]), corpus["image_vectors"][4], atol=2e-6)
    assert (out["imageWidth"], out["imageHeight"]) == (96, 80)
    for entries, field in ((orjson.dumps({"facial-recognition": {"detection": {"modelName": "buffalo_l"}}}),
                            "facial-recognition"),
                           (orjson.dumps({"clip": {"textual": {"modelName": "ViT-L-14__openai"}}}),
                            "CLIPSEARCH_IMMICH_MODEL_NAMES"),
                           (b"{not json", "entries")):
        r = httpx.post(f"{server}/predict", data={"entries": entries.decode(), "text": "x"})
        assert r.status_code == 400 and field in r.json()["detail"], r.text
    visual = orjson.dumps({"clip": {"visual": {"modelName": NAME}}}).decode()
    r = httpx.post(f"{server}/predict", data={"entries": visual})
    assert r.status_code == 400 and r.json()["detail"].startswith("image:")


async def test_each_api_is_switched_by_its_setting(make_client, tiny_model) -> None:
    off = {"openai_api": False, "infinity_api": False, "clip_retrieval_api": False, "weaviate_api": False,
           "immich_api": False}
    async with make_client(tiny_model, **off) as client:
        for method, path in (("POST", "/v1/embeddings"), ("POST", "/embeddings"), ("POST", "/rerank"),
                             ("POST", "/knn-service"), ("POST", "/vectorize"), ("GET", "/meta"),
                             ("POST", "/predict"), ("GET", "/ping")):
            assert (await client.request(method, path, json={})).status_code == 404, path
        assert (await client.post("/embed", json={"texts": ["a"]})).status_code == 200
    async with make_client(tiny_model, served_model_name=NAME) as client:
        r = await client.post("/vectorize", json={"images": [encode_image(make_image(1))]})
        assert r.status_code == 200
