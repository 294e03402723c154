"""Near-duplicate collapse of a ranked list of hits, as clip-retrieval's back end does it
(clip_retrieval/clip_back.py, `KnnService.connected_components_dedup`): hits whose vectors
have a cosine of at least `threshold` are linked, and of each connected group only the
highest-ranked hit stays."""

from __future__ import annotations

import numpy as np

CLIP_RETRIEVAL_THRESHOLD = 0.94  # clip_back's `get_non_uniques` default


def duplicates(vectors: np.ndarray, threshold: float = CLIP_RETRIEVAL_THRESHOLD) -> np.ndarray:
    """For each row of `vectors` (L2-normalized, in rank order), the row it folds into: itself
    when it is the first (best-ranked) of its group, else the group's first row."""
    n = len(vectors)
    parent = np.arange(n)
    if n < 2:
        return parent

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    linked = np.argwhere(np.triu(unit @ unit.T >= threshold, k=1))
    for a, b in linked:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the lower row (better rank) is the group's root
    return np.asarray([root(i) for i in range(n)])


def keep_first(vectors: np.ndarray, threshold: float = CLIP_RETRIEVAL_THRESHOLD) -> np.ndarray:
    """The rows that stay after near-duplicates fold into their group's best-ranked row."""
    groups = duplicates(vectors, threshold)
    return np.flatnonzero(groups == np.arange(len(groups)))


SEARCH_THRESHOLD = 0.94  # the native API's default: clip-retrieval's


def fold(vectors: np.ndarray, threshold: float = SEARCH_THRESHOLD) -> np.ndarray:
    """For each row of `vectors` (L2-normalized, in rank order), the row it folds into: itself
    when no higher-ranked kept row has a cosine of at least `threshold` with it, else the
    best-ranked kept row that has. A row's fate depends only on the rows above it, so the kept
    rows of a longer ranking begin with those of a shorter one: pages of a search stay
    consistent however deep it was run (unlike connected components, where a hit further down
    can join two groups above it)."""
    n = len(vectors)
    into = np.arange(n)
    if n < 2:
        return into
    similar = vectors @ vectors.T >= threshold
    kept: list[int] = []
    for i in range(n):
        if kept:
            close = np.flatnonzero(similar[i, kept])
            if len(close):
                into[i] = kept[int(close[0])]
                continue
        kept.append(i)
    return into
