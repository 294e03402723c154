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


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def probabilities(logits: np.ndarray, logit_bias: float | None, axis: int = -1) -> np.ndarray:
    """Softmax over the candidates, or, for a SigLIP model (which has a bias), each pair's own
    sigmoid: SigLIP scores every pair as match / no match, so its numbers need not sum to 1."""
    if logit_bias is None:
        return softmax(logits, axis=axis)
    return sigmoid(logits + logit_bias)


def prompts(labels: list[str], template: str) -> list[str]:
    """`template` with `{}` replaced by each label (a template without `{}` gets the label appended)."""
    if "{}" in template:
        return [template.replace("{}", label) for label in labels]
    return [f"{template} {label}".strip() for label in labels]


def classify(image_vector: np.ndarray, label_vectors: np.ndarray, labels: list[str], logit_scale: float,
             logit_bias: float | None = None) -> list[dict[str, float | str]]:
    """Labels sorted by probability: softmax over labels of logit_scale x cosine (or the sigmoid
    of logit_scale x cosine + logit_bias for SigLIP)."""
    cos = label_vectors @ image_vector
    probs = probabilities(logit_scale * cos, logit_bias)
    order = np.argsort(-probs, kind="stable")
    return [{"label": labels[i], "probability": float(probs[i]), "score": float(cos[i])} for i in order]


def similarity(image_vectors: np.ndarray, text_vectors: np.ndarray, logit_scale: float,
               logit_bias: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cosine matrix images x texts, per-image softmax over texts of logit_scale x cosine;
    for SigLIP, each pair's sigmoid)."""
    cos = image_vectors @ text_vectors.T
    return cos, probabilities(logit_scale * cos, logit_bias, axis=1)
