"""Zero-shot classification evaluation: the class vectors equal clip_benchmark's own
`zero_shot_classifier` on the same model (the reference tool), the accuracies and per-class
recalls equal a hand computation, and the CLIP paper's template sets come from clip_benchmark's
files; folders and label TSVs read alike."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipsearch.finetune.zeroshot_eval import class_vectors, evaluate_zeroshot, load_templates
from clipsearch.inputs.labelled import read_labelled
from tests.conftest import image_bytes, make_image

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["circle", "square", "star", "triangle", "cross", "heart", "moon"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "a blurry photo of the {c}."]


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "shapes"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(3):
            make_image(100 * c + j).save(root / name / f"{j}.png")
    return root


def test_class_vectors_equal_clip_benchmarks(tiny_model) -> None:
    zs = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    want = zs.zero_shot_classifier(tiny_model.model, tiny_model.tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
    np.testing.assert_allclose(class_vectors(tiny_model, CLASSES, TEMPLATES), want.T.numpy(), atol=1e-6)


def test_accuracies_equal_a_hand_computation(tiny_model, folder) -> None:
    data = read_labelled(folder)
    assert data.classes == sorted(CLASSES) and len(data.images) == 21
    res = evaluate_zeroshot(tiny_model, data, TEMPLATES)
    weights = []
    for name in data.classes:
        v = tiny_model.encode_tokens(tiny_model.tokenize([t.replace("{c}", name) for t in TEMPLATES]))
        m = v.mean(axis=0)
        weights.append(m / np.linalg.norm(m))
    pixels = torch.stack([tiny_model.preprocess(data.image(i)) for i in range(21)])
    logits = tiny_model.encode_pixels(pixels) @ np.stack(weights).T
    labels = np.asarray(data.labels)
    top1 = np.argmax(logits, axis=1)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert res["top1"] == pytest.approx(100 * np.mean(top1 == labels))
    assert res["top5"] == pytest.approx(100 * np.mean([labels[i] in top5[i] for i in range(21)]))
    per_class = [100 * np.mean(top1[labels == c] == c) for c in range(len(CLASSES))]
    assert [p["recall"] for p in res["per_class"]] == pytest.approx(per_class)
    assert res["mean_per_class_recall"] == pytest.approx(np.mean(per_class))


def test_template_sets_files_and_the_cli(tiny_model, folder, tmp_path) -> None:
    pytest.importorskip("clip_benchmark")
    import clip_benchmark

    shipped = json.loads((Path(clip_benchmark.__file__).parent / "datasets" /
                          "en_zeroshot_classification_templates.json").read_text())
    assert load_templates("cifar100") == shipped["cifar100"] and len(load_templates("imagenet1k")) == 80
    (tmp_path / "t.txt").write_text("a {c}\nthe {c}\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a {c}", "the {c}"]
    assert load_templates("itap of a {}.") == ["itap of a {}."]
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("".join(f"{name}\t{base64.b64encode(image_bytes(make_image(100 * c + j), 'PNG')).decode()}\n"
                           for c, name in enumerate(CLASSES) for j in range(3)))
    a = evaluate_zeroshot(tiny_model, read_labelled(tsv), TEMPLATES)
    b = evaluate_zeroshot(tiny_model, read_labelled(folder), TEMPLATES)
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])  # the same pictures, as a TSV or in folders
    r = subprocess.run([sys.executable, "-m", "clipsearch", "evaluate-zeroshot", "--images", str(folder),
                        "--model", tiny_model.info.spec, "--device", "cpu", "--templates", "cifar10", "--json",
                        "--report", str(tmp_path / "report.json")], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["templates"] == len(shipped["cifar10"])
    assert report == json.loads((tmp_path / "report.json").read_text())
