"""Features to TSV (EasyNLP's `predict` mode).

Output: a header line, then one row per input row, tab-separated:
``id<TAB>text_feature<TAB>image_feature`` where each feature is the L2-normalized
vector as comma-joined floats (a column is omitted for a modality not asked for, and
left empty for a row whose item was bad). `load_features` reads it back:

    ids, feats = load_features("out.tsv")          # feats["text"], feats["image"]: (n, dim) arrays
    # or with pandas: df = pd.read_csv("out.tsv", sep="\\t", dtype=str, keep_default_na=False)
    #                 np.stack(df.image_feature.str.split(",").map(lambda v: np.array(v, "float32")))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipsearch.core.errors import ClipsearchError
from clipsearch.core.fsutil import atomic_file
from clipsearch.inputs.pairs import decode_offline_image
from clipsearch.inputs.readers import read_inputs
from clipsearch.model.base import Model

MODALITIES = ("auto", "text", "image", "both")


@dataclass
class PredictSummary:
    rows: int
    bad: list[tuple[str, str]]
    columns: list[str]


def _fmt(vec: np.ndarray | None) -> str:
    return "" if vec is None else ",".join(f"{x:.7g}" for x in vec)


def predict(model: Model, input_path: Path, output_path: Path, modality: str = "auto",
            schema: str | None = None, batch_size: int = 256) -> PredictSummary:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}")
    records = list(read_inputs([input_path], "tsv", schema))
    has_text = any(r.text is not None for r in records)
    has_image = any(r.image_b64 is not None for r in records)
    wanted = {"text": has_text, "image": has_image} if modality in ("auto", "both") else \
        {"text": modality == "text", "image": modality == "image"}
    columns = [m for m in ("text", "image") if wanted[m]]
    bad: list[tuple[str, str]] = []
    text_vecs: list[np.ndarray | None] = [None] * len(records)
    image_vecs: list[np.ndarray | None] = [None] * len(records)
    if "text" in columns:
        idx = [i for i, r in enumerate(records) if r.error is None and r.text is not None]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            for i, v in zip(chunk, model.encode_texts([records[i].text or "" for i in chunk]), strict=True):
                text_vecs[i] = v
    if "image" in columns:
        pixels: list[torch.Tensor] = []
        owners: list[int] = []
        for i, r in enumerate(records):
            if r.error is not None or r.image_b64 is None:
                bad.append((r.source, r.error or "no image"))
                continue
            try:
                pixels.append(model.preprocess(decode_offline_image(r.image_b64)))
                owners.append(i)
            except ClipsearchError as exc:
                bad.append((r.source, exc.message))
        for start in range(0, len(pixels), batch_size):
            vecs = model.encode_pixels(torch.stack(pixels[start : start + batch_size]))
            for i, v in zip(owners[start : start + batch_size], vecs, strict=True):
                image_vecs[i] = v
    with atomic_file(output_path, "w", encoding="utf-8") as f:
        f.write("\t".join(["id", *(f"{m}_feature" for m in columns)]) + "\n")
        for i, r in enumerate(records):
            cols = [r.id]
            if "text" in columns:
                cols.append(_fmt(text_vecs[i]))
            if "image" in columns:
                cols.append(_fmt(image_vecs[i]))
            f.write("\t".join(cols) + "\n")
    return PredictSummary(rows=len(records), bad=bad, columns=columns)


def load_features(path: str | os.PathLike[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Read a `predict` output back: ids and one (n, dim) float32 array per feature column,
    keyed "text" / "image" (rows with an empty field get NaNs)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = [line.rstrip("\n").split("\t") for line in f]
    ids = [r[0] for r in rows]
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(header[1:], start=1):
        vals = [r[j] for r in rows]
        dim = next((len(v.split(",")) for v in vals if v), 0)
        out[name.removesuffix("_feature")] = np.array(
            [np.array(v.split(","), np.float32) if v else np.full(dim, np.nan, np.float32) for v in vals]
        ).reshape(len(vals), dim)
    return ids, out
