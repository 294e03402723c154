"""Retrieval recall, EasyNLP-style but duplicate-aware.

Rows pair a text with an image. The same image (or text) may occur on several rows
(Flickr30k has five captions per image): each distinct image and text is scored once,
and any of its true partners counts as a hit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clipsearch.images.decoder import stack_rows
from clipsearch.inputs.pairs import PairFile, decode_offline_image, image_key
from clipsearch.inputs.readers import InputError
from clipsearch.inputs.retrieval import RetrievalSet
from clipsearch.model.base import Model

KS = (1, 5, 10)


def recall_at_k(
    image_vectors: np.ndarray, text_vectors: np.ndarray, pairs: Sequence[tuple[int, int]], ks: Sequence[int] = KS
) -> dict[str, Any]:
    """R@k both ways. `pairs` are (image index, text index) of true pairs (one per row).

    Returns ``{"t2i": {"r1", "r5", "r10"}, "i2t": {...}, "mean_recall"}`` in percent.
    """
    sims = text_vectors @ image_vectors.T  # (texts, images)
    text_partners: dict[int, set[int]] = {}
    image_partners: dict[int, set[int]] = {}
    for i, t in pairs:
        text_partners.setdefault(t, set()).add(i)
        image_partners.setdefault(i, set()).add(t)

    def ranks(scores: np.ndarray, partners: dict[int, set[int]]) -> np.ndarray:
        out = []
        for q, truth in sorted(partners.items()):
            order = np.argsort(-scores[q], kind="stable")
            hit = np.isin(order, list(truth))
            out.append(int(np.argmax(hit)))
        return np.array(out)

    t2i = ranks(sims, text_partners)
    i2t = ranks(sims.T, image_partners)
    res: dict[str, Any] = {
        "t2i": {f"r{k}": float(np.mean(t2i < k) * 100) for k in ks},
        "i2t": {f"r{k}": float(np.mean(i2t < k) * 100) for k in ks},
    }
    res["mean_recall"] = float(np.mean([*res["t2i"].values(), *res["i2t"].values()]))
    return res


def encode_pairs(model: Model, pairs: PairFile, batch_size: int = 256
                 ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]], int]:
    """Encode each distinct image and text of a pair file once. Returns (images, texts, pairs, skipped)."""
    image_index: dict[str, int] = {}
    text_index: dict[str, int] = {}
    images: list[Any] = []
    texts: list[str] = []
    true_pairs: list[tuple[int, int]] = []
    skipped = 0
    for i in range(len(pairs)):
        row = pairs.row(i)
        if not row.text.strip():
            skipped += 1
            continue
        key = image_key(row.image_b64)
        if key not in image_index:
            try:
                pil = decode_offline_image(row.image_b64)
            except Exception:  # a bad image is skipped, as in training
                skipped += 1
                continue
            image_index[key] = len(images)
            images.append(model.preprocess(pil))
        if row.text not in text_index:
            text_index[row.text] = len(texts)
            texts.append(row.text)
        true_pairs.append((image_index[key], text_index[row.text]))
    image_vecs = np.concatenate([model.encode_pixels(stack_rows(images[i : i + batch_size], model.device))
                                 for i in range(0, len(images), batch_size)]) if images else np.zeros((0, model.dim))
    text_vecs = model.encode_texts(texts, batch_size=batch_size)
    return image_vecs, text_vecs, true_pairs, skipped


def evaluate(model: Model, pairs: PairFile, batch_size: int = 256) -> dict[str, Any]:
    image_vecs, text_vecs, true_pairs, skipped = encode_pairs(model, pairs, batch_size)
    if not true_pairs:
        raise InputError(f"{pairs.path}: none of its {len(pairs)} rows is a usable pair (bad images or empty "
                         "texts): nothing to evaluate")
    res = recall_at_k(image_vecs, text_vecs, true_pairs)
    res["counts"] = {"rows": len(pairs), "images": len(image_vecs), "texts": len(text_vecs), "skipped": skipped}
    return res


def evaluate_set(model: Model, data: RetrievalSet, batch_size: int = 256) -> dict[str, Any]:
    """R@1/5/10 both ways on a standard test set (Karpathy's JSON, Chinese-CLIP's files): an
    image is found when any of its captions ranks within k, a caption when its image does."""
    if not data.pairs:
        raise InputError("the test set has no image-caption pair")
    parts = []
    for start in range(0, len(data.images), batch_size):
        pixels = stack_rows([model.preprocess(data.image(i)) for i in range(start, min(start + batch_size,
                                                                                           len(data.images)))],
                            model.device)
        parts.append(model.encode_pixels(pixels))
    res = recall_at_k(np.concatenate(parts), model.encode_texts(data.texts, batch_size=batch_size), data.pairs)
    res["counts"] = {"images": len(data.images), "texts": len(data.texts), "pairs": len(data.pairs)}
    return res
