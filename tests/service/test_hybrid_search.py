"""Lexical and hybrid text search: BM25 over the items' captions (checked against a BM25
computed here with FTS5's formula), a rare token that only words find, Chinese captions,
filters, and the hybrid ranking equal to reciprocal rank fusion computed by hand from the
brute-force vector ranking and the BM25 ranking."""

from __future__ import annotations

import math
import re

import httpx
import numpy as np
import pytest
from clipsearch_client import Client

from clipsearch.finetune.synth import synth_rows
from clipsearch.index.format import ModelRef
from clipsearch.index.lexical import terms
from tests.conftest import serve_index
from tests.tiny import write_index_from_vectors

RARE = "zq7x"  # a product code: no meaning to CLIP, one caption holds it
RARE_ROW = 37
CHINESE_ROW = 52


@pytest.fixture(scope="module")
def corpus(tiny_model, tmp_path_factory):
    captions = [c for c, _, _ in synth_rows(80, seed=21, image_size=32)]
    captions[RARE_ROW] = f"a small green triangle, part {RARE}"
    captions[CHINESE_ROW] = "红色的方块在左边"
    captions[CHINESE_ROW + 1] = "蓝色的圆形"
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((len(captions), 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [{"id": f"i{row}", "text": text, "metadata": {"half": row < 40}} for row, text in enumerate(captions)]
    directory = tmp_path_factory.mktemp("hybrid")
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    write_index_from_vectors(directory, model=ref, image=(vectors, items))
    return {"dir": directory, "vectors": vectors, "captions": captions}


@pytest.fixture(scope="module")
def server(tiny_model, corpus):
    with serve_index(tiny_model, corpus["dir"]) as url:
        yield url


def _search(server: str, **body) -> list[dict]:
    r = httpx.post(f"{server}/search/text", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def bm25(captions: list[str], query: str, k1: float = 1.2, b: float = 0.75) -> dict[int, float]:
    """FTS5's bm25() for ASCII texts: idf = ln((N - n + 0.5) / (n + 0.5)), 1e-6 when not
    positive; each query term's idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len / avglen))."""
    docs = [re.findall(r"\w+", terms(c).lower()) for c in captions]  # Chinese runs count as their bigrams
    n_docs, avg = len(docs), sum(map(len, docs)) / len(docs)
    out: dict[int, float] = {}
    for term in dict.fromkeys(re.findall(r"\w+", query.lower())):
        holding = [i for i, d in enumerate(docs) if term in d]
        idf = math.log((n_docs - len(holding) + 0.5) / (len(holding) + 0.5))
        idf = idf if idf > 0 else 1e-6
        for i in holding:
            f = docs[i].count(term)
            out[i] = out.get(i, 0.0) + idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(docs[i]) / avg))
    return out


def test_lexical_ranks_by_bm25(server, corpus) -> None:
    for query in ("red circle", "two blue squares on the left", "green"):
        expected = bm25(corpus["captions"], query)
        ranked = sorted(expected, key=lambda i: (-expected[i], i))
        got = _search(server, text=query, k=len(ranked), mode="lexical")
        assert [h["id"] for h in got] == [f"i{i}" for i in ranked]
        np.testing.assert_allclose([h["score"] for h in got], [expected[i] for i in ranked], rtol=1e-4)


def test_a_rare_token_is_found_by_words_not_by_the_vector(server, tiny_model) -> None:
    lexical = _search(server, text=RARE, k=5, mode="lexical")
    assert [h["id"] for h in lexical] == [f"i{RARE_ROW}"]
    assert f"i{RARE_ROW}" in [h["id"] for h in _search(server, text=RARE, k=5, mode="hybrid")]
    assert f"i{RARE_ROW}" not in [h["id"] for h in _search(server, text=RARE, k=5)]


def test_chinese_captions_match_by_character_bigrams(server) -> None:
    assert _search(server, text="红色方块", k=3, mode="lexical")[0]["id"] == f"i{CHINESE_ROW}"
    assert _search(server, text="蓝色", k=3, mode="lexical")[0]["id"] == f"i{CHINESE_ROW + 1}"


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_hybrid_is_reciprocal_rank_fusion(server, corpus, tiny_model, weight) -> None:
    query = "a red circle on the left"
    scores = corpus["vectors"] @ tiny_model.encode_texts([query])[0]
    vector_rank = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:100]
    words = bm25(corpus["captions"], query)
    word_rank = sorted(words, key=lambda i: (-words[i], i))[:100]
    fused: dict[int, float] = {}
    for rank, row in enumerate(vector_rank, 1):
        fused[row] = 1 / (60 + rank)
    for rank, row in enumerate(word_rank, 1):
        fused[row] = fused.get(row, 0.0) + weight / (60 + rank)
    expected = sorted(fused, key=lambda r: (-fused[r], r))[:20]
    got = _search(server, text=query, k=10, offset=10, mode="hybrid", lexical_weight=weight)
    assert [h["id"] for h in got] == [f"i{r}" for r in expected[10:20]]
    np.testing.assert_allclose([h["score"] for h in got], [fused[r] for r in expected[10:20]], rtol=1e-5)


def test_filters_client_and_refusals(server, corpus) -> None:
    got = _search(server, text="red", k=50, mode="lexical", filter={"half": True})
    assert got and all(int(h["id"][1:]) < 40 for h in got)
    expected = bm25(corpus["captions"][:40], "red")
    assert [h["id"] for h in got] == [f"i{i}" for i in sorted(expected, key=lambda i: (-expected[i], i))]
    with Client(server) as client:
        assert [h.id for h in client.search_text(RARE, k=3, mode="lexical").hits] == [f"i{RARE_ROW}"]
    r = httpx.post(f"{server}/search/text", json={"text": "red", "mode": "words"}, timeout=30)
    assert r.status_code == 422 and "mode" in r.text
    for weight in (False, "1", -1):  # a number, not a boolean or a string
        r = httpx.post(f"{server}/search/text", json={"text": "red", "mode": "hybrid", "lexical_weight": weight},
                       timeout=30)
        assert r.status_code == 422 and "lexical_weight" in r.text
    r = httpx.post(f"{server}/search/text", json={"text": "red", "mode": "hybrid", "dedup": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["field"] == "dedup"
    r = httpx.post(f"{server}/search/text", json={"text": "red", "mode": "lexical", "target": "text"}, timeout=30)
    assert r.status_code == 503  # this corpus has no text index
    assert _search(server, text="?! --", k=5, mode="lexical") == []  # no terms, no matches
