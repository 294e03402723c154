"""The search page's server side: thumbnails built by the index builder and served immutable
per version, "more like this" equal to a brute-force search by the stored vector, image
search in either index, the page and /docs served with no network, and indexes without
thumbnails still served."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.builder.build import BuildOptions, run_build
from clipsearch.finetune.synth import write_tsv
from clipsearch.index.format import ModelRef, current_version_dir, read_manifest
from tests.conftest import image_bytes, make_image
from tests.tiny import write_index_from_vectors


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model) -> Path:
    """An index built by the builder from the demo's synthetic captioned images."""
    work = tmp_path_factory.mktemp("ui-index")
    write_tsv(work / "gallery.tsv", 120, seed=3, lang="en")
    with open(work / "gallery.tsv", "a") as f:
        f.write("a broken picture\tbm90IGFuIGltYWdl\n")  # base64 of "not an image": skipped, no thumbnail
    run_build(BuildOptions(inputs=[work / "gallery.tsv"], output=work / "index", model=tiny_model.info.spec,
                           progress=False, index_type="flat", hash_inputs=False), model=tiny_model)
    return work / "index"


def test_the_builder_stores_a_thumbnail_per_image(built) -> None:
    version = current_version_dir(built)
    entry = read_manifest(version).indexes["image"]
    assert entry.thumbnails == "image.thumbs" and entry.thumbnail_count == entry.count == 120


async def test_thumbnails_are_served_immutable_per_version(make_client, tiny_model, built) -> None:
    async with make_client(tiny_model, index_dir=built) as client:
        r = await client.post("/search/text", json={"text": "a red circle", "k": 5})
        hits, version = r.json()["results"], r.json()["index_version"]
        assert all(h["thumbnail"].startswith(f"/thumbnails/{version}/") for h in hits)
        r = await client.get(hits[0]["thumbnail"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert "immutable" in r.headers["cache-control"] and r.headers["etag"]
        thumb = Image.open(io.BytesIO(r.content))
        assert thumb.format == "JPEG" and max(thumb.size) <= 256 and thumb.size[0] > 16
        again = await client.get(hits[0]["thumbnail"], headers={"if-none-match": r.headers["etag"]})
        assert again.status_code == 304 and not again.content
        for url in (f"/thumbnails/{version}/99999", f"/thumbnails/{version}/-1", "/thumbnails/old-version/0",
                    f"/thumbnails/{version}/x"):
            assert (await client.get(url)).status_code in (404, 422), url


async def test_more_like_this_equals_brute_force_by_the_stored_vector(make_client, tiny_model, built) -> None:
    from clipsearch.index.search import load_index_set

    served = load_index_set(current_version_dir(built), fingerprint=tiny_model.info.fingerprint, dim=tiny_model.dim)
    index = served.get("image")
    vectors = np.stack([index.vector(i)[0] for i in range(index.count)])
    async with make_client(tiny_model, index_dir=built) as client:
        for row in (0, 17, 119):
            item = index.items[row]["id"]
            r = await client.post("/search/similar", json={"id": item, "k": 6})
            assert r.status_code == 200, r.text
            order = [i for i in np.argsort(-(vectors @ vectors[row]), kind="stable") if i != row][:6]
            assert [h["id"] for h in r.json()["results"]] == [index.items[i]["id"] for i in order]
        r = await client.post("/search/similar", json={"id": "no-such-item", "k": 3})
        assert r.status_code == 404 and r.json()["error"]["field"] == "id"
        r = await client.post("/search/similar", json={"id": item, "modality": "text", "k": 3})
        assert r.status_code in (200, 404)


async def test_image_search_in_either_index(make_client, tiny_model, built) -> None:
    photo = image_bytes(make_image(3), "PNG")
    query = tiny_model.encode_images([Image.open(io.BytesIO(photo))])[0]
    from clipsearch.index.search import load_index_set

    served = load_index_set(current_version_dir(built), fingerprint=tiny_model.info.fingerprint, dim=tiny_model.dim)
    async with make_client(tiny_model, index_dir=built) as client:
        for target in ("image", "text"):
            index = served.get(target)
            vectors = np.stack([index.vector(i)[0] for i in range(index.count)])
            r = await client.post("/search/image", files={"image": ("q.png", photo, "image/png")},
                                  data={"k": "5", "target": target})
            want = [index.items[i]["id"] for i in np.argsort(-(vectors @ query), kind="stable")[:5]]
            assert [h["id"] for h in r.json()["results"]] == want, target


async def test_an_index_without_thumbnails_still_serves(make_client, tiny_model, tmp_path) -> None:
    vectors = tiny_model.encode_texts([f"thing {i}" for i in range(10)])
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    write_index_from_vectors(tmp_path / "idx", model=ref, image=(vectors, [{"id": f"i{i}"} for i in range(10)]))
    async with make_client(tiny_model, index_dir=tmp_path / "idx") as client:
        r = await client.post("/search/text", json={"text": "thing", "k": 3})
        assert r.status_code == 200 and [h["thumbnail"] for h in r.json()["results"]] == [None] * 3
        assert (await client.get(f"/thumbnails/{r.json()['index_version']}/0")).status_code == 404


async def test_page_and_docs_are_served_from_the_package(make_client, tiny_model) -> None:
    async with make_client(tiny_model) as client:
        page = await client.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "http" not in page.text.replace("http-equiv", "")  # no asset from elsewhere
        for name in ("app.js", "app.css"):
            assert (await client.get(f"/ui/{name}")).status_code == 200
        assert (await client.get("/ui/secrets.txt")).status_code == 404
        r = await client.get("/", headers={"accept": "text/html,application/xhtml+xml"})
        assert r.status_code == 307 and r.headers["location"] == "/ui"
        assert (await client.get("/", headers={"accept": "application/json"})).json()["service"] == "clipsearch"
        docs = await client.get("/docs")
        assets = [part.split('"')[0] for part in docs.text.split('="')[1:] if part.startswith("/")]
        assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
        assert "cdn" not in docs.text and "https://" not in docs.text
        for asset in assets:
            assert (await client.get(asset)).status_code == 200, asset


async def test_thumbnails_under_api_keys_are_private_to_caches(make_client, tiny_model, built) -> None:
    for keys, cache in ((None, "public"), ("k1", "private")):
        headers = {"authorization": "Bearer k1"} if keys else {}
        async with make_client(tiny_model, index_dir=built, api_keys=keys) as client:
            r = await client.post("/search/text", json={"text": "a red circle", "k": 1}, headers=headers)
            url = r.json()["results"][0]["thumbnail"]
            got = await client.get(url, headers=headers)
            assert got.status_code == 200 and got.headers["cache-control"].startswith(f"{cache}, "), got.headers
            assert ("authorization" in got.headers.get("vary", "").lower()) == bool(keys)
            assert (await client.get(url)).status_code == (401 if keys else 200)


async def test_thumbnail_rows_are_digits_only(make_client, tiny_model, built) -> None:
    async with make_client(tiny_model, index_dir=built) as client:
        version = (await client.get("/readyz")).json()["index_version"]
        assert (await client.get(f"/thumbnails/{version}/5")).status_code == 200
        for row in ("+5", "5.0", " 5", "05e0", "1" * 13):
            assert (await client.get(f"/thumbnails/{version}/{row}")).status_code == 422, row
