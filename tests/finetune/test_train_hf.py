"""Fine-tuning transformers checkpoints: Chinese-CLIP end to end in Chinese, CLIP and SigLIP
with their own losses; the best model is a transformers checkpoint every command loads."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch.finetune.evaluate import evaluate
from clipsearch.finetune.predict import load_features, predict
from clipsearch.finetune.synth import COLOURS, synth_rows, write_tsv
from clipsearch.finetune.train import TrainOptions, contrastive_loss, sigmoid_loss, train
from clipsearch.inputs.pairs import PairFile
from clipsearch.model.clip import load_model
from tests.model.test_hf_models import Direct


def _images(tsv: Path) -> tuple[list[str], list[Image.Image]]:
    rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()]
    return [t for t, _ in rows], [Image.open(io.BytesIO(base64.urlsafe_b64decode(b + "=="))) for _, b in rows]


@pytest.mark.slow
def test_chinese_clip_fine_tunes_indexes_and_finds_images_by_chinese_query(tmp_path: Path, make_client) -> None:
    import asyncio

    from clipsearch.builder.build import BuildOptions, run_build
    from tests.tiny import write_tiny_hf_model

    write_tsv(tmp_path / "train.tsv", 3000, seed=4, lang="zh")
    write_tsv(tmp_path / "valid.tsv", 100, seed=5, lang="zh")
    write_tsv(tmp_path / "gallery.tsv", 300, seed=9, lang="zh")
    vocab_texts = [r[0] for r in synth_rows(300, seed=11, lang="zh")]  # the tokenizer never saw the test rows
    start = write_tiny_hf_model(tmp_path / "start", "chinese_clip", vocab_texts, seed=0, image_size=64, width=64,
                                patch_size=16)
    result = train(TrainOptions(train=tmp_path / "train.tsv", valid=tmp_path / "valid.tsv", output=tmp_path / "o",
                                model=start, epochs=4, batch_size=64, lr=1e-3, warmup_steps=10, progress=False))
    best = result["best"]
    assert best["t2i"]["r10"] > 3 * 100 * 10 / best["counts"]["images"], best  # well above chance
    best_dir = tmp_path / "o" / "best"
    assert json.loads((best_dir / "config.json").read_text())["model_type"] == "chinese_clip"
    spec = f"local-dir:{best_dir}"
    model = load_model(spec, device="cpu")
    assert model.info.family == "chinese_clip"
    assert model.info.fingerprint != load_model(start, device="cpu").info.fingerprint
    again = evaluate(model, PairFile(tmp_path / "valid.tsv"))  # evaluate agrees with the trainer
    assert again["mean_recall"] == pytest.approx(best["mean_recall"], abs=1e-6)

    run_build(BuildOptions(inputs=[tmp_path / "gallery.tsv"], output=tmp_path / "idx", model=spec, device="cpu",
                           progress=False), model=model)
    queries = [zh for _, zh in COLOURS.values()]  # 红色, 绿色, 蓝色, ...

    async def search() -> list[list[dict]]:
        async with make_client(model, index_dir=tmp_path / "idx") as client:
            out = []
            for q in queries:
                r = await client.post("/search/text", json={"text": q, "k": 10})
                assert r.status_code == 200, r.text
                out.append(r.json()["results"])
            return out

    hits = asyncio.run(search())
    captions, images = _images(tmp_path / "gallery.tsv")
    ref = Direct(f"hf:{best_dir}")
    image_vectors = ref.images(images)
    for q, found in zip(queries, hits, strict=True):
        right = sum(q in h["text"] for h in found)  # the caption names the colour of the image
        assert right >= 8, (q, [h["text"] for h in found])  # chance is 1 in 6
        order = np.argsort(-(image_vectors @ ref.texts([q])[0]), kind="stable")[:10]
        assert [h["text"] for h in found] == [captions[i] for i in order]  # ranked as transformers ranks


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_clip_and_siglip_fine_tune_with_their_losses(family: str, hf_spec, tmp_path: Path) -> None:
    write_tsv(tmp_path / "train.tsv", 128, seed=1)
    start = load_model(hf_spec(family), device="cpu")
    result = train(TrainOptions(train=tmp_path / "train.tsv", valid=None, output=tmp_path / "o", model=hf_spec(family),
                                epochs=2, batch_size=32, lr=1e-3, warmup_steps=2, progress=False, freeze_vision=True))
    assert result["steps"] == 8
    tuned = load_model(f"local-dir:{tmp_path / 'o' / 'best'}", device="cpu")
    assert tuned.info.family == family and tuned.info.fingerprint != start.info.fingerprint
    texts, images = _images(tmp_path / "train.tsv")
    # text tower trained, image tower frozen (--freeze-vision): image vectors unchanged
    assert not np.allclose(tuned.encode_texts(texts[:8]), start.encode_texts(texts[:8]), atol=1e-4)
    np.testing.assert_allclose(tuned.encode_images(images[:8]), start.encode_images(images[:8]), atol=1e-5)
    assert (tuned.logit_bias is None) == (family == "clip")
    # predict writes the features the service would serve
    summary = predict(tuned, tmp_path / "train.tsv", tmp_path / "feat.tsv")
    _, feats = load_features(tmp_path / "feat.tsv")
    assert summary.rows == 128
    np.testing.assert_allclose(feats["text"][:8], tuned.encode_texts(texts[:8]), atol=1e-6)


def test_sigmoid_loss_is_siglips() -> None:
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    scale, bias = torch.tensor(2.0), torch.tensor(-3.0)
    i, t = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
    expected = 0.0
    for a in range(5):
        for b in range(5):
            z = scale.exp() * (i[a] @ t[b]) + bias
            expected += -torch.nn.functional.logsigmoid(z if a == b else -z)
    assert torch.allclose(sigmoid_loss(img, txt, scale, bias), expected / 5)

    class Biased(torch.nn.Module):  # a model with a logit bias trains with the sigmoid loss
        logit_scale, logit_bias = scale, bias

        def encode_image(self, x):
            return x

        def encode_text(self, x):
            return x

    assert torch.allclose(contrastive_loss(Biased(), img, txt), expected / 5)
