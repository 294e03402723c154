"""Browsers on other origins, in Chromium (from the OS packages, driven by Playwright):

- clip-retrieval's own web front (the clip-front build in its PyPI package), served from
  another origin with its config.json pointed at clipsearch, searches a clipsearch index and
  shows what /knn-service answers;
- a page on an allowed origin calls the API with its key (a preflighted request) and reads
  a 401 without one; a page on an origin not listed cannot read anything.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from clipsearch.index.format import ModelRef
from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import image_bytes, live_server, make_image
from tests.service.test_browser import CHROMIUM
from tests.service.test_compat_peers import clip_retrieval_root
from tests.tiny import write_index_from_vectors

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium from the OS packages (.ci/run installs it)")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def static_site(directory: Path) -> Iterator[str]:
    """`directory` served over HTTP on a free loopback port: another origin."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def clipsearch_server(tiny_model, **settings) -> Iterator[str]:
    cfg = Settings(model=tiny_model.info.spec, device="cpu", warmup=False, **settings)
    with live_server(create_app(cfg, state=ServiceState.build(cfg, model=tiny_model))) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_clip_front_on_another_origin_searches_clipsearch(tiny_model, tmp_path) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((24, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pictures = [image_bytes(make_image(i, (40, 40)), "PNG") for i in range(24)]
    import base64

    urls = [f"data:image/png;base64,{base64.b64encode(p).decode()}" for p in pictures]
    items = [{"id": f"p{i}", "text": f"picture {i}", "metadata": {"url": u}} for i, u in enumerate(urls)]
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    write_index_from_vectors(tmp_path / "index", model=ref, image=(vectors, items))
    front = tmp_path / "front"
    shutil.copytree(clip_retrieval_root() / "front" / "build", front)
    with static_site(front) as origin, \
            clipsearch_server(tiny_model, index_dir=tmp_path / "index", cors_origins=[origin]) as backend, \
            sync_api.sync_playwright() as pw:
        (front / "config.json").write_text(json.dumps({"defaultBackend": backend, "defaultIndex": ""}))
        # what clip-front asks for a text search (its defaults: 40 images, 3000 ids, dedup, safe mode)
        want = httpx.post(f"{backend}/knn-service", content=json.dumps({
            "text": "a red circle", "modality": "image", "num_images": 40, "num_result_ids": 3000,
            "indice_name": "clipsearch", "use_mclip": False, "deduplicate": True, "use_safety_model": True,
            "use_violence_detector": True, "aesthetic_score": "", "aesthetic_weight": "0.5"})).json()
        assert len(want) > 5
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(f"{origin}/index.html", wait_until="networkidle")
        page.locator("#searchBar").fill("a red circle")
        page.locator("#searchBar").press("Enter")
        page.wait_for_function("""(n) => {
            const root = document.querySelector('clip-front').shadowRoot;
            const pics = [...root.querySelectorAll('img.pic')];
            return pics.length >= n && pics.every(i => i.complete && i.naturalWidth > 0);
        }""", arg=len(want), timeout=20_000)
        shown = page.locator("img.pic").evaluate_all("(imgs) => imgs.map(i => i.getAttribute('src'))")
        browser.close()
    assert shown == [hit["url"] for hit in want]
    assert not problems


def test_allowed_origins_with_keys_and_a_refused_origin_in_chromium(tiny_model, tmp_path) -> None:
    allowed, refused = tmp_path / "allowed", tmp_path / "refused"
    for site in (allowed, refused):
        site.mkdir()
        (site / "index.html").write_text("<!doctype html><title>blank</title>")
    script = """async ([base, key]) => {
        const call = async (headers) => {
            try {
                const r = await fetch(base + '/v1/embeddings', {method: 'POST', headers: {
                    'content-type': 'application/json', ...headers},
                    body: JSON.stringify({model: 'clip-tiny', input: ['a red circle'], encoding_format: 'float'})});
                const body = await r.json();
                return [r.status, r.ok ? body.data[0].embedding.length : body.error.message];
            } catch (e) { return ['blocked', String(e)]; }
        };
        return [await call({authorization: 'Bearer ' + key}), await call({})];
    }"""
    with static_site(allowed) as good, static_site(refused) as bad, \
            clipsearch_server(tiny_model, api_keys="k-7f3a", cors_origins=[good], served_model_name="clip-tiny") \
            as backend, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{good}/index.html")
        with_key, without = page.evaluate(script, [backend, "k-7f3a"])
        assert with_key == [200, 64]
        assert without[0] == 401 and "missing API key" in without[1]
        page.goto(f"{bad}/index.html")
        assert [r[0] for r in page.evaluate(script, [backend, "k-7f3a"])] == ["blocked", "blocked"]
        browser.close()
        preflight = {"origin": good, "access-control-request-method": "POST",
                     "access-control-request-headers": "authorization, content-type"}
        r = httpx.options(f"{backend}/v1/embeddings", headers=preflight)  # no key: a preflight carries none
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == good
        r = httpx.options(f"{backend}/v1/embeddings", headers={**preflight, "origin": bad})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
