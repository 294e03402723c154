"""Recall@k against a brute-force computation, duplicates included."""

from __future__ import annotations

import itertools

import numpy as np

from clipsearch.finetune.evaluate import recall_at_k


def brute_force(img: np.ndarray, txt: np.ndarray, pairs: list[tuple[int, int]], k: int) -> tuple[float, float]:
    """Literal definition: a query hits if any true partner is among its k most similar items."""
    t2i_hits, i2t_hits = [], []
    for t in range(len(txt)):
        truth = {i for i, tt in pairs if tt == t}
        if not truth:
            continue
        scores = [(float(img[i] @ txt[t]), -i, i) for i in range(len(img))]
        top = [i for _, _, i in sorted(scores, reverse=True)[:k]]
        t2i_hits.append(bool(truth & set(top)))
    for i in range(len(img)):
        truth = {t for ii, t in pairs if ii == i}
        if not truth:
            continue
        scores = [(float(img[i] @ txt[t]), -t, t) for t in range(len(txt))]
        top = [t for _, _, t in sorted(scores, reverse=True)[:k]]
        i2t_hits.append(bool(truth & set(top)))
    return 100 * float(np.mean(t2i_hits)), 100 * float(np.mean(i2t_hits))


def test_recall_matches_brute_force_with_duplicates() -> None:
    rng = np.random.default_rng(0)
    img = rng.standard_normal((12, 8)).astype(np.float32)
    txt = rng.standard_normal((20, 8)).astype(np.float32)
    # Five captions for some images (Flickr30k style) and one caption shared by two images.
    pairs = [(i, t) for i, t in zip(itertools.cycle(range(12)), range(20), strict=False)] + [(3, 0), (7, 0)]
    res = recall_at_k(img, txt, pairs)
    for k in (1, 5, 10):
        t2i, i2t = brute_force(img, txt, pairs, k)
        assert abs(res["t2i"][f"r{k}"] - t2i) < 1e-9, k
        assert abs(res["i2t"][f"r{k}"] - i2t) < 1e-9, k
    assert abs(res["mean_recall"] - np.mean([*res["t2i"].values(), *res["i2t"].values()])) < 1e-9


def test_perfect_and_duplicate_aware() -> None:
    v = np.eye(4, dtype=np.float32)
    # Text 0 describes images 0 and 1 equally; scoring image 1 first is still a hit at R@1.
    img = np.stack([v[1] + 0.5 * v[2], v[0], v[2], v[3]])
    txt = np.stack([v[0], v[2], v[3]])
    res = recall_at_k(img, txt, [(0, 0), (1, 0), (2, 1), (3, 2)])
    assert res["t2i"]["r1"] == 100.0
    assert res["i2t"]["r1"] == 75.0  # image 0 leans to text 1, not its partner text 0
    assert res["i2t"]["r5"] == 100.0
