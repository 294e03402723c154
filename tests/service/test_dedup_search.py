"""Near-duplicate collapse on search (`dedup`): against a brute-force reference on a corpus with
planted near-duplicates (resized and re-encoded copies of some pictures), over HTTP and through
the client: the distinct hits in rank order, the copies folded into the hit they copy, pages
that stay consistent, "more like this" leaving out the item and its copies, and filters."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from clipsearch_client import Client
from PIL import Image

from clipsearch.index.format import ModelRef
from tests.conftest import serve_index
from tests.tiny import write_index_from_vectors

THRESHOLD = 0.94
ORIGINALS = 60
COPIED = list(range(0, ORIGINALS, 4))  # 15 pictures, each with two copies


def _picture(seed: int) -> Image.Image:
    """A 96x80 picture of an 8x8 pattern of grey blocks, with pixel noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (8, 8)).astype(np.float32)
    pixels = np.kron(blocks, np.ones((10, 12), np.float32)) + rng.normal(0, 8, (80, 96))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L").convert("RGB")


def _copy(image: Image.Image, scale: float, fmt: str) -> Image.Image:
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 60} if fmt == "JPEG" else {}))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _descriptor(image: Image.Image) -> np.ndarray:
    """A picture as 64 numbers that resizing and re-encoding barely move: its 8x8 grey thumbnail,
    centred and L2-normalized (the vectors the index holds; the tiny test model's own are too
    alike across pictures to tell copies from others)."""
    grey = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), np.float32).ravel()
    grey -= grey.mean()
    return grey / np.linalg.norm(grey)


@pytest.fixture(scope="module")
def corpus(tiny_model, tmp_path_factory):
    originals = [_picture(i) for i in range(ORIGINALS)]
    copies = [_copy(originals[i], 0.6, "JPEG") for i in COPIED] + [_copy(originals[i], 1.4, "PNG") for i in COPIED]
    of = list(range(ORIGINALS)) + COPIED + COPIED  # which original each row pictures
    vectors = np.stack([_descriptor(im) for im in originals + copies])
    items = [{"id": f"p{row}", "metadata": {"even": of[row] % 2 == 0}} for row in range(len(vectors))]
    directory = tmp_path_factory.mktemp("dedup")
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    write_index_from_vectors(directory, model=ref, image=(vectors, items))
    return {"dir": directory, "vectors": vectors, "of": of}


@pytest.fixture(scope="module")
def server(tiny_model, corpus):
    with serve_index(tiny_model, corpus["dir"]) as url:
        yield url


def reference(vectors: np.ndarray, query: np.ndarray, rows: np.ndarray | None = None, leave_out: int | None = None
              ) -> list[tuple[int, list[int]]]:
    """Brute force: every row ranked by cosine (ties by row); walking down the ranking, a row
    whose cosine with a kept row above it is >= THRESHOLD folds into the first such row."""
    rows = np.arange(len(vectors)) if rows is None else rows
    scores = vectors[rows] @ query
    ranked = [int(rows[i]) for i in sorted(range(len(rows)), key=lambda i: (-scores[i], rows[i]))]
    kept: list[int] = []
    folded: dict[int, list[int]] = {}
    for row in ranked:
        into = next((k for k in kept if vectors[row] @ vectors[k] >= THRESHOLD), None)
        if into is None:
            kept.append(row)
        else:
            folded.setdefault(into, []).append(row)
    return [(k, folded.get(k, [])) for k in kept if k != leave_out]


def _check(results: list[dict], expected: list[tuple[int, list[int]]], ranked_above: set[int]) -> None:
    assert [r["id"] for r in results] == [f"p{k}" for k, _ in expected]
    for r, (_, folded) in zip(results, expected, strict=True):
        # the copies a hit folds in, among the hits ranked above the page's last one, are exactly
        # the reference's (deeper copies may or may not have been looked at)
        got = {int(d[1:]) for d in r["duplicates"]}
        assert got & ranked_above == set(folded) & ranked_above
        assert got <= set(folded)


def _above(vectors: np.ndarray, query: np.ndarray, last: int) -> set[int]:
    """The rows ranked at or above row `last` (ties broken by row, as the reference ranks)."""
    scores = vectors @ query
    tie = (scores == scores[last]) & (np.arange(len(scores)) <= last)
    return {int(r) for r in np.flatnonzero((scores > scores[last]) | tie)}


def test_planted_copies_are_close_and_others_are_not(corpus) -> None:
    v, of = corpus["vectors"], corpus["of"]
    same = np.asarray(of)[:, None] == np.asarray(of)[None, :]
    cos = v @ v.T
    assert cos[same].min() >= 0.97  # a copy and its original fold
    assert cos[~same].max() < THRESHOLD  # distinct pictures do not


def test_vector_search_pages_of_distinct_hits(server, corpus) -> None:
    v = corpus["vectors"]
    rng = np.random.default_rng(1)
    for target in (0, 8, 13):
        query = v[target] + 0.8 * rng.standard_normal(64).astype(np.float32)
        query /= np.linalg.norm(query)
        expected = reference(v, query)
        pages = []
        for offset in (0, 5, 10):
            r = httpx.post(f"{server}/search/vector", json={"vector": query.tolist(), "k": 5, "offset": offset,
                                                            "dedup": True}, timeout=30)
            assert r.status_code == 200, r.text
            pages += r.json()["results"]
        _check(pages, expected[:15], _above(v, query, expected[14][0]))
        # without dedup the copies are there
        plain = httpx.post(f"{server}/search/vector", json={"vector": query.tolist(), "k": 15}, timeout=30).json()
        ranked = np.argsort(-(v @ query), kind="stable")[:15]
        assert [h["id"] for h in plain["results"]] == [f"p{i}" for i in ranked]
        assert all("duplicates" not in h for h in plain["results"])


def test_text_search_folds_with_a_filter(server, corpus, tiny_model) -> None:
    v, of = corpus["vectors"], corpus["of"]
    query = tiny_model.encode_texts(["a red square"])[0]  # any query vector of dim 64 ranks the rows
    even = np.asarray([row for row in range(len(v)) if of[row] % 2 == 0])
    expected = reference(v, query, rows=even)
    r = httpx.post(f"{server}/search/text", json={"text": "a red square", "k": 12, "dedup": True,
                                                  "filter": {"even": True}}, timeout=30)
    assert r.status_code == 200, r.text
    scores = v @ query
    last = expected[11][0]
    above = {int(x) for x in even if scores[x] > scores[last] or (scores[x] == scores[last] and x <= last)}
    _check(r.json()["results"], expected[:12], above)


def test_more_like_this_leaves_out_the_item_and_its_copies(server, corpus) -> None:
    v = corpus["vectors"]
    for item in (4, 20):  # originals with copies
        expected = reference(v, v[item], leave_out=item)
        r = httpx.post(f"{server}/search/similar", json={"id": f"p{item}", "k": 6, "dedup": True}, timeout=30)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        copies = {row for row, o in enumerate(corpus["of"]) if o == item}
        assert not {int(h["id"][1:]) for h in results} & copies
        _check(results, expected[:6], _above(v, v[item], expected[5][0]))


def test_client_and_bad_thresholds(server, corpus) -> None:
    v = corpus["vectors"]
    with Client(server) as client:
        hits = client.search_vector(v[8].tolist(), k=4, dedup=True).hits
    expected = reference(v, v[8])
    assert [h.id for h in hits] == [f"p{k}" for k, _ in expected[:4]]
    assert set(hits[0].duplicates) == {f"p{r}" for r in expected[0][1]} and len(hits[0].duplicates) == 2
    for bad in (0, 1.5, "x", True):
        r = httpx.post(f"{server}/search/vector", json={"vector": v[0].tolist(), "dedup": True,
                                                        "dedup_threshold": bad}, timeout=30)
        assert r.status_code == 422 and "dedup_threshold" in r.text


def test_image_search_form_takes_dedup(server, corpus, tiny_model) -> None:
    buf = io.BytesIO()
    _picture(3).save(buf, "PNG")
    r = httpx.post(f"{server}/search/image", files={"image": ("q.png", buf.getvalue(), "image/png")},
                   data={"target": "image", "k": "5", "dedup": "true", "dedup_threshold": "0.94"}, timeout=30)
    assert r.status_code == 200, r.text
    query = tiny_model.encode_images([_picture(3)])[0]
    expected = reference(corpus["vectors"], query)
    assert [h["id"] for h in r.json()["results"]] == [f"p{k}" for k, _ in expected[:5]]
