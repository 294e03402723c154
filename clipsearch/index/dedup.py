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
