"""The search page in a real browser: headless Chromium from the OS packages, driven by
Playwright, against a live server on the demo's synthetic data. A text query, "more like
this" and an image upload each show the API's own top results, with thumbnails that really
rendered; the page fits a phone, works from the keyboard, and logs no console error. A
screenshot is kept in test-artifacts/."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import image_bytes, live_server, make_image
from tests.service.test_ui import built  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CLIPSEARCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("CLIPSEARCH_TEST_ARTIFACTS", ROOT / "test-artifacts"))
K = 24

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium from the OS packages (.ci/run installs it)")


def _captions(hits: list[dict]) -> list[str]:
    return [h["text"] or h["id"] for h in hits]


def test_search_page_in_chromium(tiny_model, built, tmp_path) -> None:  # noqa: F811
    settings = Settings(model=tiny_model.info.spec, device="cpu", index_dir=built, warmup=False)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    photo = tmp_path / "query.png"
    photo.write_bytes(image_bytes(make_image(21, (200, 160)), "PNG"))
    with live_server(app) as port, sync_api.sync_playwright() as pw:
        base = f"http://127.0.0.1:{port}"
        api = httpx.Client(base_url=base, timeout=30)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"{r.url}: {r.failure}"))

        def shown_captions() -> list[str]:
            return page.locator("#images .caption").all_text_contents()

        def wait_for_thumbnails() -> None:
            page.wait_for_function("""() => {
                const imgs = [...document.querySelectorAll('#images img')];
                return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
            }""", timeout=20_000)

        page.goto(f"{base}/", wait_until="networkidle")  # a browser at / lands on the page
        assert page.url.endswith("/ui")
        page.wait_for_function("() => document.getElementById('about').textContent.includes('images')")

        # a text query, typed and submitted with the keyboard
        page.locator("#query").fill("a red circle")
        page.keyboard.press("Enter")
        page.wait_for_selector("#images li")
        wait_for_thumbnails()
        want = api.post("/search/text", json={"text": "a red circle", "k": K}).json()["results"]
        assert shown_captions() == _captions(want)
        assert page.locator("#images img").count() == len(want)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "search-page.png"))

        # a metadata filter (here on ids): the same query, only the items it selects
        chosen = [h["id"] for h in want[3:6]]
        page.locator("#filter-box summary").click()
        page.locator("#filter").fill(json.dumps({"id": {"$in": chosen}}))
        page.locator("#query").press("Enter")
        page.wait_for_function("() => document.querySelectorAll('#images li').length === 3")
        assert page.locator("#images button").evaluate_all("bs => bs.map(b => b.dataset.id)") == chosen
        page.locator("#filter").fill("")
        page.locator("#query").press("Enter")
        page.wait_for_function(f"() => document.querySelectorAll('#images li').length === {len(want)}")
        wait_for_thumbnails()

        # near-duplicates folded: the page asks for dedup and shows what the API answers
        page.locator("#dedup").check()
        page.locator("#query").press("Enter")
        distinct = api.post("/search/text", json={"text": "a red circle", "k": K, "dedup": True}).json()["results"]
        page.wait_for_function(f"() => document.querySelectorAll('#images li').length === {len(distinct)}")
        assert page.locator("#images button").evaluate_all("bs => bs.map(b => b.dataset.id)") == \
            [h["id"] for h in distinct]
        folded = len(distinct[0]["duplicates"])
        if folded:
            assert f"{folded} near-duplicate" in page.locator("#images .meta").first.text_content()
        page.locator("#dedup").uncheck()
        page.locator("#query").press("Enter")
        page.wait_for_function(f"() => document.querySelectorAll('#images li').length === {len(want)}")
        wait_for_thumbnails()

        # words in the captions: the page asks for lexical matches
        word = want[0]["text"].split()[-1]
        page.locator("#mode").select_option("lexical")
        page.locator("#query").fill(word)
        page.locator("#query").press("Enter")
        lexical = api.post("/search/text", json={"text": word, "k": K, "mode": "lexical"}).json()["results"]
        page.wait_for_function("() => document.getElementById('status').textContent === "
                               f"'{len(lexical)} results for “{word}”'")
        assert page.locator("#images button").evaluate_all("bs => bs.map(b => b.dataset.id)") == \
            [h["id"] for h in lexical]
        page.locator("#mode").select_option("vector")
        page.locator("#query").fill("a red circle")
        page.locator("#query").press("Enter")
        page.wait_for_function(f"() => document.querySelectorAll('#images li').length === {len(want)}")
        wait_for_thumbnails()

        # more like this: the first result, from the keyboard
        first = want[0]
        page.locator("#images button").first.focus()
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.getElementById('status').textContent.includes('more like')"
                               " && !document.getElementById('status').textContent.startsWith('Searching')")
        wait_for_thumbnails()
        similar = api.post("/search/similar", json={"id": first["id"], "k": K}).json()["results"]
        assert shown_captions() == _captions(similar) and first["id"] not in [h["id"] for h in similar]

        # an image upload: similar images and matching texts
        page.locator("#file").set_input_files(str(photo))
        page.wait_for_selector("#texts li")
        wait_for_thumbnails()
        files = {"image": ("query.png", photo.read_bytes(), "image/png")}
        images = api.post("/search/image", files=files, data={"k": str(K), "target": "image"}).json()["results"]
        texts = api.post("/search/image", files=files, data={"k": str(K), "target": "text"}).json()["results"]
        assert shown_captions() == _captions(images)
        assert page.locator("#texts .text").all_text_contents() == [h["text"] for h in texts]
        assert page.locator("#query-image").is_visible()

        # a phone-width screen: no sideways scrolling, results still in a grid
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(ARTIFACTS / "search-page-phone.png"))

        # the API docs render offline too
        page.goto(f"{base}/docs", wait_until="networkidle")
        page.wait_for_selector(".opblock", timeout=20_000)
        browser.close()
    assert not problems, problems
