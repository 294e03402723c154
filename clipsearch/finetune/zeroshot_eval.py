"""Zero-shot classification accuracy, as the CLIP paper measures it and LAION's clip_benchmark
computes it (clip_benchmark/metrics/zeroshot_classification.py): each class's prompts (its name
in every template) are embedded, L2-normalized, averaged and normalized again into the class's
vector; an image's class is its most similar class vector. Reported: top-1 and top-5 accuracy,
mean per-class recall (balanced accuracy), and each class's recall.

Templates: one template (`"a photo of a {c}."`; `{}` works too), a file (a JSON list, or one
template per line), or the name of a dataset whose CLIP-paper templates clip_benchmark ships
(`cifar100`, `food101`, `pets`, `eurosat`, `imagenet1k`, ...; `--lang cn` for its Chinese ones).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipsearch.inputs.labelled import LabelledSet
from clipsearch.inputs.readers import InputError
from clipsearch.model.base import Model

LANGS = ("en", "cn", "jp", "it", "ar")


def load_templates(spec: str, lang: str = "en") -> list[str]:
    """Templates from one template, a file, or a clip_benchmark dataset name (see module docstring)."""
    if "{" in spec:
        return [spec]
    path = Path(spec)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        try:
            loaded = json.loads(text)
        except ValueError:
            loaded = [line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(loaded, list) or not loaded or not all(isinstance(t, str) for t in loaded):
            raise InputError(f"{path}: expected a JSON list of templates, or one template per line")
        return loaded
    if lang not in LANGS:
        raise InputError(f"--lang {lang}: clip_benchmark has templates in {', '.join(LANGS)}")
    try:
        data = resources.files("clip_benchmark.datasets").joinpath(f"{lang}_zeroshot_classification_templates.json")
        sets = json.loads(data.read_text(encoding="utf-8"))
    except ModuleNotFoundError:
        raise InputError(f"--templates {spec}: the CLIP paper's template sets come from clip_benchmark: pip install "
                         "clip-benchmark (or give one template, or a file of them)") from None
    if spec not in sets:
        raise InputError(f"--templates {spec}: neither a template (with {{c}}), a file, nor one of clip_benchmark's "
                         f"sets ({', '.join(sorted(sets))})")
    return list(sets[spec])


def prompts(template: str, classname: str) -> str:
    return template.replace("{c}", classname).replace("{}", classname)


def class_vectors(model: Model, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(classes, dim): each class's prompts embedded, normalized, averaged, normalized."""
    out = []
    for name in classnames:
        vectors = model.encode_texts([prompts(t, name) for t in templates])  # L2-normalized rows
        mean = vectors.mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
    return np.stack(out).astype(np.float32)


def evaluate_zeroshot(model: Model, data: LabelledSet, templates: Sequence[str],
                      batch_size: int = 128) -> dict[str, Any]:
    if not data.images:
        raise InputError("no labelled image to classify")
    weights = class_vectors(model, data.classes, templates)
    parts = []
    for start in range(0, len(data.images), batch_size):
        stop = min(start + batch_size, len(data.images))
        parts.append(model.encode_pixels(torch.stack([model.preprocess(data.image(i)) for i in range(start, stop)])))
    logits = np.concatenate(parts) @ weights.T
    labels = np.asarray(data.labels)
    order = np.argsort(-logits, axis=1, kind="stable")
    top = {k: float(np.mean([labels[i] in order[i, :k] for i in range(len(labels))]) * 100) for k in (1, 5)}
    per_class: list[dict[str, Any]] = []
    recalls: list[float] = []
    for c, name in enumerate(data.classes):
        rows = labels == c
        recall = float(np.mean(order[rows, 0] == c) * 100) if rows.any() else None
        per_class.append({"class": name, "images": int(rows.sum()), "recall": recall})
        if recall is not None:
            recalls.append(recall)
    return {"top1": top[1], "top5": top[5], "mean_per_class_recall": float(np.mean(recalls)),
            "images": len(labels), "classes": len(data.classes), "templates": len(templates),
            "per_class": per_class}
