"""Filters, paging, vectors out and vectors in over HTTP, against brute force over the
index's own vectors."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.conftest import image_bytes, make_image
from tests.service.test_api import index_dir  # noqa: F401  (a fixture)


def _order(vectors: np.ndarray, query: np.ndarray, rows: np.ndarray | None = None) -> list[int]:
    rows = np.arange(len(vectors)) if rows is None else rows
    return rows[np.argsort(-(vectors[rows] @ query), kind="stable")].tolist()


async def test_filters_paging_and_vectors(make_client, tiny_model, index_dir) -> None:  # noqa: F811
    path, img_vecs, _, _ = index_dir
    query = tiny_model.encode_texts(["picture number 3 with colour blue"])[0]
    text = "picture number 3 with colour blue"
    async with make_client(tiny_model, index_dir=path, max_k=30) as client:
        async def ids(**body) -> list[str]:
            r = await client.post("/search/text", json={"text": text, **body})
            assert r.status_code == 200, r.text
            return [h["id"] for h in r.json()["results"]]

        window = np.arange(10, 20)
        assert await ids(k=5, filter={"n": {"$gte": 10, "$lt": 20}}) == [f"img-{i}" for i in
                                                                           _order(img_vecs, query, window)[:5]]
        assert await ids(k=20, filter={"n": {"$in": [1, 2, 3]}}) == [f"img-{i}" for i in
                                                                       _order(img_vecs, query, np.array([1, 2, 3]))]
        assert await ids(k=5, filter={"n": {"$gt": 100}}) == []
        whole = await ids(k=15)
        pages = [await ids(k=5, offset=o) for o in (0, 5, 10)]
        assert pages[0] + pages[1] + pages[2] == whole == [f"img-{i}" for i in _order(img_vecs, query)[:15]]
        r = await client.post("/search/text", json={"text": text, "k": 3, "return_vectors": True})
        for hit in r.json()["results"]:
            np.testing.assert_allclose(hit["vector"], img_vecs[int(hit["id"].split("-")[1])], atol=1e-6)
        for bad, field, status in [({"offset": 28, "k": 5}, "offset", 400), ({"k": 31}, "k", 422),
                                   ({"filter": {"n": {"$gt": "5"}}}, "filter.n.$gt", 400),
                                   ({"filter": [1]}, "filter", 422), ({"return_vectors": 1}, "return_vectors", 422)]:
            r = await client.post("/search/text", json={"text": text, **bad})
            assert r.status_code == status and r.json()["error"]["field"] == field, (bad, r.text)


async def test_search_by_vector_and_similar_with_a_filter(make_client, tiny_model, index_dir) -> None:  # noqa: F811
    path, img_vecs, _, _ = index_dir
    async with make_client(tiny_model, index_dir=path) as client:
        given = (img_vecs[7] * 2.5).tolist()  # normalized by the service
        r = await client.post("/search/vector", json={"vector": given, "k": 6})
        assert [h["id"] for h in r.json()["results"]] == [f"img-{i}" for i in _order(img_vecs, img_vecs[7])[:6]]
        assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        r = await client.post("/search/vector", json={"vector": given, "k": 4, "filter": {"n": {"$lt": 5}}})
        assert [h["id"] for h in r.json()["results"]] == [f"img-{i}" for i in
                                                          _order(img_vecs, img_vecs[7], np.arange(5))[:4]]
        for vector in ([0.0] * 64, [1.0] * 63, ["0.5"] * 64):
            r = await client.post("/search/vector", json={"vector": vector})
            assert r.status_code in (400, 422) and r.json()["error"]["field"].startswith("vector"), r.text
        r = await client.post("/search/similar", json={"id": "img-7", "k": 3, "filter": {"n": {"$gte": 30}}})
        assert [h["id"] for h in r.json()["results"]] == [f"img-{i}" for i in
                                                          _order(img_vecs, img_vecs[7], np.arange(30, 40))[:3]]


async def test_filters_in_a_form(make_client, tiny_model, index_dir) -> None:  # noqa: F811
    path = index_dir[0]
    photo = image_bytes(make_image(5), "PNG")
    async with make_client(tiny_model, index_dir=path) as client:
        body = {"image": base64.b64encode(photo).decode(), "target": "image", "k": 4, "filter": {"n": {"$lt": 8}},
                "return_vectors": True}
        want = (await client.post("/search/image", json=body)).json()
        r = await client.post("/search/image", files={"image": ("p.png", photo, "image/png")},
                              data={"target": "image", "k": "4", "filter": '{"n": {"$lt": 8}}',
                                    "return_vectors": "true"})
        assert r.status_code == 200 and r.json() == want and len(want["results"]) == 4
        assert all(int(h["id"].split("-")[1]) < 8 and len(h["vector"]) == 64 for h in want["results"])
        r = await client.post("/search/image", files={"image": ("p.png", photo, "image/png")},
                              data={"filter": "{not json"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "filter"
