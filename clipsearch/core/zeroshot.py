"""Zero-shot classification and the text-image similarity matrix (the two uses of the CLIP primer).

Pure math on L2-normalized vectors; the service feeds it through the batcher, the CLI
through the model seam directly, so both give the same numbers.
"""

from __future__ import annotations

import numpy as np

DEFAULT_TEMPLATE = "a photo of a {}"


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def prompts(labels: list[str], template: str) -> list[str]:
    """`template` with `{}` replaced by each label (a template without `{}` gets the label appended)."""
    if "{}" in template:
        return [template.replace("{}", label) for label in labels]
    return [f"{template} {label}".strip() for label in labels]


def classify(image_vector: np.ndarray, label_vectors: np.ndarray, labels: list[str], logit_scale: float
             ) -> list[dict[str, float | str]]:
    """Labels sorted by probability: softmax over labels of logit_scale x cosine."""
    cos = label_vectors @ image_vector
    probs = softmax(logit_scale * cos)
    order = np.argsort(-probs, kind="stable")
    return [{"label": labels[i], "probability": float(probs[i]), "score": float(cos[i])} for i in order]


def similarity(image_vectors: np.ndarray, text_vectors: np.ndarray, logit_scale: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """(cosine matrix images x texts, per-image softmax over texts of logit_scale x cosine)."""
    cos = image_vectors @ text_vectors.T
    return cos, softmax(logit_scale * cos, axis=1)
