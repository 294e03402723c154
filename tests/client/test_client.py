"""The Python client against a real server: the vectors the model gives, search equal to a
brute-force top-k, typed results, chunking with positions counted over the whole input,
retries that honour Retry-After, API keys; and the README's client example, run as written."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from clipsearch.client import APIError, AsyncClient, Client, Hit, LabelScore, SearchResults
from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import image_bytes, live_server, make_image
from tests.service.test_api import index_dir  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[2]
KEY = "client-test-key-5e1"
TEXT = "picture number 3 with colour blue"


def query_text(model) -> np.ndarray:
    return model.encode_texts([TEXT])[0]


@pytest.fixture
def server(tiny_model, index_dir) -> Iterator[str]:  # noqa: F811
    path, _, _, _ = index_dir
    settings = Settings(model=tiny_model.info.spec, device="cpu", index_dir=path, warmup=False, api_keys=KEY)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app) as port:
        yield f"http://127.0.0.1:{port}"


def test_client_embeds_searches_and_classifies(server, tiny_model, index_dir, tmp_path) -> None:  # noqa: F811
    _, img_vecs, txt_vecs, captions = index_dir
    texts = [f"caption {i}" for i in range(70)]
    pictures = [make_image(i) for i in range(3)]
    png = image_bytes(pictures[0], "PNG")
    (tmp_path / "p.png").write_bytes(png)
    with Client(server, api_key=KEY, batch_size=32) as client:
        assert client.ready() and client.info()["service"] == "clipsearch"
        got = client.embed_texts(texts)  # three requests
        assert got.shape == (70, 64) and got.dtype == np.float32
        np.testing.assert_allclose(got, tiny_model.encode_texts(texts), atol=1e-6)
        same = client.embed_images([tmp_path / "p.png", str(tmp_path / "p.png"), png, pictures[0]])
        np.testing.assert_allclose(same, np.repeat(same[:1], 4, axis=0), atol=1e-6)  # one image in four forms
        np.testing.assert_allclose(same[0], tiny_model.encode_images([Image.open(io.BytesIO(png))])[0], atol=1e-6)

        results = client.search_text("picture number 3 with colour blue", k=5)
        assert isinstance(results, SearchResults) and all(isinstance(h, Hit) for h in results.hits)
        query = tiny_model.encode_texts(["picture number 3 with colour blue"])[0]
        assert [h.id for h in results.hits] == [f"img-{i}" for i in np.argsort(-(img_vecs @ query), kind="stable")[:5]]
        results = client.search_image(png, k=4)
        query = same[0]
        assert [h.text for h in results.hits] == [captions[i] for i in np.argsort(-(txt_vecs @ query),
                                                                                  kind="stable")[:4]]
        window = np.arange(10, 20)  # filters, paging, vectors out and in
        order = window[np.argsort(-(img_vecs[window] @ query_text(tiny_model)), kind="stable")]
        got_page = client.search_text(TEXT, k=3, offset=2, filter={"n": {"$gte": 10, "$lt": 20}}, return_vectors=True)
        assert [h.id for h in got_page.hits] == [f"img-{i}" for i in order[2:5]]
        np.testing.assert_allclose(got_page.hits[0].vector, img_vecs[order[2]], atol=1e-6)
        assert [h.id for h in client.search_vector(img_vecs[4], k=1).hits] == ["img-4"]
        assert "img-4" not in [h.id for h in client.search_similar("img-4", k=5).hits]
        filtered = client.search_image(png, k=3, target="image", filter={"n": {"$lt": 6}}, return_vectors=True)
        assert len(filtered.hits) == 3 and all(int(h.id[4:]) < 6 and h.vector is not None for h in filtered.hits)
        labels = client.classify(pictures[1], ["cat", "dog", "car"], template="a {}")
        assert [type(x) for x in labels] == [LabelScore] * 3 and abs(sum(x.probability for x in labels) - 1) < 1e-5
        sim = client.similarity([png, pictures[1]], ["a", "b", "c"])
        assert sim.cosine.shape == sim.probabilities.shape == (2, 3)

        bad = [png] * 40
        bad[35] = b"not an image"
        with pytest.raises(APIError) as err:
            Client(server, api_key=KEY, batch_size=16).embed_images(bad)
        assert err.value.status == 400 and err.value.field == "images[35]" and "images[35]" in err.value.message
    with pytest.raises(APIError) as err:
        Client(server, api_key="wrong").embed_texts(["x"])
    assert err.value.status == 401 and err.value.field == "authorization"


async def test_async_client_chunks_side_by_side(server, tiny_model) -> None:
    texts = [f"text number {i}" for i in range(50)]
    async with AsyncClient(server, api_key=KEY, batch_size=8, max_concurrency=3) as client:
        got = await client.embed_texts(texts)
        np.testing.assert_allclose(got, tiny_model.encode_texts(texts), atol=1e-6)
        images = await client.embed_images([make_image(i) for i in range(10)])
        assert images.shape == (10, 64)
        assert len((await client.search_text("x", k=3)).hits) == 3
        with pytest.raises(APIError) as err:
            await client.embed_texts(["ok"] * 20 + ["x" * 5000])
        assert err.value.field == "texts[20]"


class Busy(BaseHTTPRequestHandler):
    """429 with Retry-After: 1 for the first `busy` requests, then an answer."""

    busy: ClassVar[list[int]] = [0]
    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        Busy.seen.append(self.path)
        if Busy.busy[0] > 0:
            Busy.busy[0] -= 1
            body, status = b'{"error": {"type": "overloaded", "message": "queue full", "field": null}}', 429
        else:
            body, status = b'{"model": "m", "dim": 2, "texts": [[0.6, 0.8]], "images": []}', 200
        self.send_response(status)
        self.send_header("retry-after", "1")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_retries_wait_as_retry_after_says(monkeypatch: pytest.MonkeyPatch) -> None:
    import clipsearch_client.client as client_mod

    waits: list[float] = []
    monkeypatch.setattr(client_mod.time, "sleep", waits.append)  # the waits the client chose, not the clock
    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        Busy.busy[0], Busy.seen[:] = 2, []
        np.testing.assert_array_equal(Client(base, max_retries=3).embed_texts(["x"]), np.float32([[0.6, 0.8]]))
        assert len(Busy.seen) == 3 and waits == [1.0, 1.0]
        Busy.busy[0], Busy.seen[:] = 5, []
        with pytest.raises(APIError) as err:
            Client(base, max_retries=1).embed_texts(["x"])
        assert err.value.status == 429 and err.value.retry_after == 1 and len(Busy.seen) == 2
    finally:
        server.shutdown()


def test_the_readmes_client_example_runs(tiny_model, index_dir, tmp_path, monkeypatch, capsys) -> None:  # noqa: F811
    example = readme_client_example()
    (tmp_path / "demo-output").mkdir()
    Image.open(io.BytesIO(image_bytes(make_image(8, (300, 200)), "JPEG"))).save(tmp_path / "demo-output/photo.jpg")
    make_image(9).save(tmp_path / "demo-output/shape.png")
    path, _, _, _ = index_dir
    settings = Settings(model=tiny_model.info.spec, device="cpu", index_dir=path, warmup=False)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    monkeypatch.chdir(tmp_path)
    with live_server(app) as port:
        exec(compile(example.replace("localhost:8000", f"127.0.0.1:{port}"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 6 and printed[0].startswith("img-") and printed[-1] in ("circle", "square", "star")


def readme_client_example() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Python client", 1)[1].split("```python", 1)[1].split("```", 1)[0]


def test_the_client_imports_neither_torch_nor_fastapi() -> None:
    import subprocess
    import sys

    code = "import sys, clipsearch.client; print(sorted({'torch', 'fastapi', 'faiss'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
