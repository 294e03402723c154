"""Retrieval evaluation on the standard layouts: a Karpathy split JSON with image files (five
captions per image) and Chinese-CLIP/MUGE's texts JSONL + images TSV, scored against a
brute-force computation written here (an image is found when any of its captions ranks
within k, a caption when its image does)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from clipsearch.finetune.evaluate import evaluate_set
from clipsearch.inputs.retrieval import read_karpathy, read_muge
from tests.conftest import image_bytes, make_image

ROOT = Path(__file__).resolve().parents[2]
COLOURS = ["red", "green", "blue", "grey", "pink", "white"]


def _brute_force(model, images, captions_of) -> dict:
    image_vecs = model.encode_pixels(torch.stack([model.preprocess(im) for im in images]))
    texts = [c for caps in captions_of for c in caps]
    owner = [i for i, caps in enumerate(captions_of) for _ in caps]
    text_vecs = model.encode_tokens(model.tokenize(texts))
    sims = text_vecs @ image_vecs.T
    out = {}
    for k in (1, 5, 10):
        t2i = np.mean([owner[t] in np.argsort(-sims[t], kind="stable")[:k] for t in range(len(texts))])
        i2t = np.mean([any(owner[t] == i for t in np.argsort(-sims[:, i], kind="stable")[:k])
                       for i in range(len(images))])
        out[k] = (100 * t2i, 100 * i2t)
    return out


def test_karpathy_split(tiny_model, tmp_path) -> None:
    images = [make_image(700 + i) for i in range(12)]
    captions = [[f"a {COLOURS[(i + j) % 6]} picture number {i} take {j}" for j in range(5)] for i in range(12)]
    folder = tmp_path / "flickr30k-images"
    folder.mkdir()
    entries = []
    for i, (im, caps) in enumerate(zip(images, captions, strict=True)):
        im.save(folder / f"{i}.jpg", quality=95)
        entries.append({"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": c} for c in caps]})
    entries.append({"filename": "train.jpg", "split": "train", "sentences": [{"raw": "left out"}]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    data = read_karpathy(tmp_path / "dataset_flickr30k.json", folder)
    assert (len(data.images), len(data.texts), len(data.pairs)) == (12, 60, 60)
    res = evaluate_set(tiny_model, data)
    from PIL import Image

    reloaded = [Image.open(folder / f"{i}.jpg") for i in range(12)]  # what the files hold (JPEG)
    want = _brute_force(tiny_model, reloaded, captions)
    for k in (1, 5, 10):
        assert np.allclose((res["t2i"][f"r{k}"], res["i2t"][f"r{k}"]), want[k])
    r = subprocess.run([sys.executable, "-m", "clipsearch", "evaluate", "--karpathy",
                        str(tmp_path / "dataset_flickr30k.json"), "--images", str(folder), "--model",
                        tiny_model.info.spec, "--device", "cpu", "--json"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mean_recall"] == res["mean_recall"]


def test_chinese_clip_muge_files(tiny_model, tmp_path) -> None:
    images = [make_image(800 + i) for i in range(8)]
    with open(tmp_path / "test_imgs.tsv", "w") as f:
        for i, im in enumerate(images):
            f.write(f"{1000 + i}\t{base64.b64encode(image_bytes(im)).decode()}\n")
    captions = [[f"商品 {i} {COLOURS[i % 6]}", f"第二个 {i}"] for i in range(8)]
    with open(tmp_path / "test_texts.jsonl", "w") as f:
        n = 0
        for i, caps in enumerate(captions):
            for c in caps:
                f.write(json.dumps({"text_id": n, "text": c, "image_ids": [1000 + i]}, ensure_ascii=False) + "\n")
                n += 1
    data = read_muge(tmp_path / "test_texts.jsonl", tmp_path / "test_imgs.tsv")
    res = evaluate_set(tiny_model, data)
    from io import BytesIO

    from PIL import Image

    decoded = [Image.open(BytesIO(image_bytes(im))) for im in images]
    want = _brute_force(tiny_model, decoded, captions)
    for k in (1, 5, 10):
        assert np.allclose((res["t2i"][f"r{k}"], res["i2t"][f"r{k}"]), want[k])
