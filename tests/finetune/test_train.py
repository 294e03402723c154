"""Training: loss goes down, recall goes up, checkpoints load everywhere, resume continues."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from PIL import Image

from clipsearch.finetune.evaluate import evaluate
from clipsearch.finetune.predict import load_features, predict
from clipsearch.finetune.synth import write_tsv
from clipsearch.finetune.train import TrainOptions, clip_loss, train
from clipsearch.inputs.pairs import PairFile
from clipsearch.model.clip import load_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    write_tsv(d / "train.tsv", 1200, seed=1)
    write_tsv(d / "valid.tsv", 150, seed=2)
    return d


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    result = train(TrainOptions(train=data / "train.tsv", valid=data / "valid.tsv", output=out, epochs=5,
                                batch_size=64, lr=2e-3, warmup_steps=10, logging_steps=5, progress=False, seed=3))
    return out, result


def read_log(out: Path) -> list[dict]:
    return [orjson.loads(line) for line in (out / "metrics.jsonl").read_bytes().splitlines()]


@pytest.mark.slow
def test_loss_falls_and_recall_beats_chance(trained, data) -> None:
    out, result = trained
    log = read_log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
    valid = [r["valid"] for r in log if "valid" in r]
    assert len(valid) == 5
    best = result["best"]
    n_images = best["counts"]["images"]
    chance_r5 = 100 * 5 / n_images
    assert best["t2i"]["r5"] > 5 * chance_r5, best  # far above chance
    assert best["mean_recall"] == max(v["mean_recall"] for v in valid)
    # evaluate on OUTPUT/best reports the same numbers as the trainer's validation
    again = evaluate(load_model(f"local-dir:{out / 'best'}", device="cpu"), PairFile(data / "valid.tsv"))
    for way in ("t2i", "i2t"):
        for k, v in best[way].items():
            assert abs(again[way][k] - v) < 1e-6
    assert json.loads((out / "best" / "metrics.json").read_text())["mean_recall"] == best["mean_recall"]


def test_evaluate_cli_json_matches(trained, data) -> None:
    out, result = trained
    r = subprocess.run([sys.executable, "-m", "clipsearch", "evaluate", "--data", str(data / "valid.tsv"),
                        "--model", f"local-dir:{out / 'best'}", "--device", "cpu", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert set(got) == {"t2i", "i2t", "mean_recall"}
    assert abs(got["mean_recall"] - result["best"]["mean_recall"]) < 1e-6


async def test_best_checkpoint_serves_the_trainers_vectors(trained, make_client) -> None:
    out, _ = trained
    from clipsearch.model.clip import load_for_training

    trainer_view = load_for_training(f"local-dir:{out / 'best'}", device="cpu").as_clip_model()
    served = load_model(f"local-dir:{out / 'best'}", device="cpu")
    texts = ["a red circle on the left, on a white background", "两个蓝色正方形"]
    async with make_client(served) as client:
        body = (await client.post("/embed", json={"texts": texts})).json()
    np.testing.assert_allclose(np.array(body["texts"]), trainer_view.encode_texts(texts), atol=1e-5)


def test_predict_rows_match_embed(trained, data, tmp_path) -> None:
    out, _ = trained
    model = load_model(f"local-dir:{out / 'best'}", device="cpu")
    lines = (data / "valid.tsv").read_text().splitlines()[:6]
    src = tmp_path / "in.tsv"
    src.write_text("".join(f"row{i}\t{line}\n" for i, line in enumerate(lines)) + "row6\tbad image\t@@@\n")
    summary = predict(model, src, tmp_path / "feat.tsv", schema="id,text,image")
    assert summary.rows == 7 and len(summary.bad) == 1
    ids, feats = load_features(tmp_path / "feat.tsv")
    assert ids == [f"row{i}" for i in range(7)]
    texts = [line.split("\t")[0] for line in lines]
    images = [Image.open(io.BytesIO(base64.urlsafe_b64decode(line.split("\t")[1] + "=="))) for line in lines]
    np.testing.assert_allclose(feats["text"][:6], model.encode_texts(texts), atol=1e-6)
    np.testing.assert_allclose(feats["image"][:6], model.encode_images(images), atol=1e-6)
    assert np.isnan(feats["image"][6]).all() and not np.isnan(feats["text"][6]).any()


@pytest.mark.slow
def test_resume_continues_from_saved_step(data, tmp_path, monkeypatch) -> None:
    import clipsearch.finetune.train as train_mod

    opts = {"train": data / "train.tsv", "valid": None, "batch_size": 64, "lr": 1e-3, "warmup_steps": 2,
            "progress": False, "seed": 5, "logging_steps": 1, "epochs": 2}
    straight = train(TrainOptions(output=tmp_path / "a", **opts))
    steps_per_epoch = straight["steps"] // 2
    # The same run, killed three steps into the second epoch, then rerun with --resume auto.
    real_write = train_mod.MetricsLog.write

    def dying_write(self, record):
        if record.get("step") == steps_per_epoch + 3:
            raise KeyboardInterrupt("killed")
        real_write(self, record)

    monkeypatch.setattr(train_mod.MetricsLog, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        train(TrainOptions(output=tmp_path / "b", **opts))
    monkeypatch.undo()
    ckpts = sorted((tmp_path / "b" / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in ckpts] == [f"step-{steps_per_epoch}.pt"]
    resumed = train(TrainOptions(output=tmp_path / "b", resume="auto", **opts))
    assert resumed["steps"] == straight["steps"]
    steps_logged = [r["step"] for r in read_log(tmp_path / "b") if "loss" in r]
    after_resume = steps_logged[steps_logged.index(steps_per_epoch + 2) + 1]
    assert after_resume == steps_per_epoch + 1  # continued from the saved step, not from 0
    a = load_model(f"local-dir:{tmp_path / 'a' / 'best'}", device="cpu").encode_texts(["a red circle"])
    b = load_model(f"local-dir:{tmp_path / 'b' / 'best'}", device="cpu").encode_texts(["a red circle"])
    np.testing.assert_allclose(a, b, atol=1e-5)  # same data order, same RNG: the same model


def test_freeze_vision_trains_text_only(data, tmp_path) -> None:
    from clipsearch.model.clip import load_for_training

    before = load_for_training("clipsearch-tiny", device="cpu", seed=9).model.state_dict()
    train(TrainOptions(train=data / "train.tsv", valid=None, output=tmp_path, epochs=1, batch_size=64,
                       freeze_vision=True, progress=False, seed=9))
    after = load_model(f"local-dir:{tmp_path / 'best'}", device="cpu").model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("transformer."))


def test_clip_loss_is_symmetric_cross_entropy() -> None:
    rng = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 4, generator=rng), torch.randn(6, 4, generator=rng)
    scale = torch.tensor(2.0)
    i, t = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
    logits = scale.exp() * i @ t.T
    expected = 0
    for m in (logits, logits.T):
        expected += -torch.log_softmax(m, dim=1).diagonal().mean() / 2
    assert torch.allclose(clip_loss(img, txt, scale), expected)


@pytest.mark.slow
def test_chinese_captions_train_and_search(tmp_path, make_client) -> None:
    import asyncio

    write_tsv(tmp_path / "zh.tsv", 800, seed=4, lang="zh")
    write_tsv(tmp_path / "zh_valid.tsv", 100, seed=5, lang="zh")
    result = train(TrainOptions(train=tmp_path / "zh.tsv", valid=tmp_path / "zh_valid.tsv", output=tmp_path / "o",
                                epochs=4, batch_size=64, lr=2e-3, warmup_steps=10, progress=False))
    assert result["best"]["t2i"]["r10"] > 2 * 100 * 10 / result["best"]["counts"]["images"]  # > 2x chance
    from clipsearch.builder.build import BuildOptions, run_build

    spec = f"local-dir:{tmp_path / 'o' / 'best'}"
    model = load_model(spec, device="cpu")
    run_build(BuildOptions(inputs=[tmp_path / "zh_valid.tsv"], output=tmp_path / "idx", model=spec, device="cpu",
                           progress=False), model=model)

    async def search() -> list[dict]:
        async with make_client(model, index_dir=tmp_path / "idx") as client:
            r = await client.post("/search/text", json={"text": "红色圆形", "k": 5})
            assert r.status_code == 200
            return r.json()["results"]

    hits = asyncio.run(search())
    gallery = {line.split("\t")[0] for line in (tmp_path / "zh_valid.tsv").read_text().splitlines()}
    assert len(hits) == 5 and all(h["text"] in gallery for h in hits)  # Chinese text intact end to end
    # and ranked exactly as brute force over the builder's vectors of the gallery captions
    qv = model.encode_texts(["红色圆形"])[0]
    caps = [line.split("\t")[0] for line in (tmp_path / "zh_valid.tsv").read_text().splitlines()]
    iv = model.encode_images([Image.open(io.BytesIO(base64.urlsafe_b64decode(line.split("\t")[1] + "==")))
                              for line in (tmp_path / "zh_valid.tsv").read_text().splitlines()])
    order = np.argsort(-(iv @ qv), kind="stable")[:5]
    assert [h["text"] for h in hits] == [caps[i] for i in order]


@pytest.mark.slow
def test_offline_classify_and_similarity_cli(trained, tmp_path) -> None:
    out, _ = trained
    from clipsearch.finetune.synth import Scene, render

    render(Scene("circle", "red", "large", "center", "white", 1), np.random.default_rng(0)).save(tmp_path / "r.png")
    spec = f"local-dir:{out / 'best'}"
    r = subprocess.run([sys.executable, "-m", "clipsearch", "classify", "--image", str(tmp_path / "r.png"),
                        "--labels", "red circle,blue square,green star", "--model", spec, "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    labels = json.loads(r.stdout)["labels"]
    assert abs(sum(x["probability"] for x in labels) - 1) < 1e-5
    model = load_model(spec, device="cpu")
    from clipsearch.model import zeroshot

    names = ["red circle", "blue square", "green star"]
    expected = zeroshot.classify(model.encode_images([Image.open(tmp_path / "r.png")])[0],
                                 model.encode_texts(zeroshot.prompts(names, "a photo of a {}")), names,
                                 model.logit_scale)
    assert [x["label"] for x in labels] == [x["label"] for x in expected]
    s = subprocess.run([sys.executable, "-m", "clipsearch", "similarity", "--text", "a red circle", "--text",
                        "a blue square", "--image", str(tmp_path / "r.png"), "--model", spec, "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    body = json.loads(s.stdout)
    assert np.array(body["cosine"]).shape == (1, 2) and abs(sum(body["probabilities"][0]) - 1) < 1e-4


@pytest.mark.slow
def test_useless_input_is_refused_and_writes_no_model(tmp_path, tiny_spec) -> None:
    """A TSV of bad images: train stops with a reason (no untrained `best/`), evaluate
    too (not a NaN recall), each as one line and a non-zero exit."""
    bad = tmp_path / "bad.tsv"
    bad.write_text("".join(f"caption {i}\t%%not an image%%\n" for i in range(8)))
    for cmd in (["train", "--train", str(bad), "--valid", str(bad), "--output", str(tmp_path / "run"), "--epochs",
                 "1", "--batch-size", "4", "--no-progress"],
                ["evaluate", "--data", str(bad)]):
        r = subprocess.run([sys.executable, "-m", "clipsearch", *cmd, "--model", tiny_spec, "--device", "cpu"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 1, (cmd[0], r.stdout, r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"clipsearch {cmd[0]}: ") and "bad.tsv" in last, r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "best").exists()
