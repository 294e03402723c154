"""The service and the index builder on transformers models: /embed, /classify, /similarity and
search against direct transformers calls, and manifests that keep families apart."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.builder.build import BuildOptions, run_build
from clipsearch.core.errors import IndexMismatch
from clipsearch.finetune.synth import write_tsv
from clipsearch.index.search import load_index_set
from clipsearch.model.clip import load_model
from tests.conftest import HF_FAMILIES, image_bytes, make_image
from tests.model.test_hf_models import Direct

TEXTS = ["a small red circle", "白色背景有两个绿色星形", "three blue squares on the left"]


@pytest.mark.parametrize("family", HF_FAMILIES)
async def test_embed_equals_transformers(family: str, hf_spec, make_client) -> None:
    spec = hf_spec(family)
    model, ref = load_model(spec, device="cpu"), Direct(spec)
    jpegs = [image_bytes(make_image(i, (120, 90 + 20 * i))) for i in range(3)]
    async with make_client(model) as client:
        r = await client.post("/embed", json={"texts": TEXTS, "images": [base64.b64encode(j).decode() for j in jpegs]})
        upload = await client.post("/embed", files=[("images", ("a.jpg", jpegs[0], "image/jpeg"))])
        info = (await client.get("/")).json()
    assert r.status_code == 200 and upload.status_code == 200, (r.text, upload.text)
    body = r.json()
    assert body["model"] == spec and body["dim"] == model.dim
    want_images = ref.images([Image.open(io.BytesIO(j)) for j in jpegs])
    assert (np.array(body["texts"]) * ref.texts(TEXTS)).sum(1).min() >= 0.9999
    assert (np.array(body["images"]) * want_images).sum(1).min() >= 0.9999
    assert float(np.dot(upload.json()["images"][0], want_images[0])) >= 0.9999
    assert info["model"]["family"] == family


@pytest.mark.parametrize("family", ["clip", "siglip"])
async def test_classify_and_similarity_use_the_familys_probabilities(family: str, hf_spec, make_client) -> None:
    spec = hf_spec(family)
    model, ref = load_model(spec, device="cpu"), Direct(spec)
    jpeg = image_bytes(make_image(3, (64, 64)))
    labels = ["red circle", "blue square", "green star"]
    async with make_client(model) as client:
        c = await client.post("/classify", files={"image": ("x.jpg", jpeg, "image/jpeg")},
                              data={"labels": labels, "template": "{}"})
        s = await client.post("/similarity", json={"images": [base64.b64encode(jpeg).decode()], "texts": labels})
    assert c.status_code == 200 and s.status_code == 200, (c.text, s.text)
    cos = ref.texts(labels) @ ref.images([Image.open(io.BytesIO(jpeg))])[0]
    scale = float(ref.model.logit_scale.detach().exp())
    if family == "siglip":
        bias = float(ref.model.logit_bias.detach())
        want = 1 / (1 + np.exp(-(scale * cos + bias)))  # each pair on its own: need not sum to 1
        assert s.json()["logit_bias"] == pytest.approx(bias)
    else:
        e = np.exp(scale * cos - (scale * cos).max())
        want = e / e.sum()
        assert s.json()["logit_bias"] is None
    got = {x["label"]: x["probability"] for x in c.json()["labels"]}
    np.testing.assert_allclose([got[label] for label in labels], want, atol=1e-4)
    np.testing.assert_allclose(s.json()["probabilities"][0], want, atol=1e-4)
    assert s.json()["logit_scale"] == pytest.approx(scale)


async def test_index_of_a_transformers_model_searches_as_brute_force(hf_spec, make_client, tmp_path: Path,
                                                                     tiny_model) -> None:
    spec = hf_spec("chinese_clip")
    model, ref = load_model(spec, device="cpu"), Direct(spec)
    write_tsv(tmp_path / "zh.tsv", 60, seed=21, lang="zh")
    summary = run_build(BuildOptions(inputs=[tmp_path / "zh.tsv"], output=tmp_path / "idx", model=spec,
                                     device="cpu", progress=False), model=model)
    rows = [line.split("\t") for line in (tmp_path / "zh.tsv").read_text().splitlines()]
    images = [Image.open(io.BytesIO(base64.urlsafe_b64decode(b + "=="))) for _, b in rows]
    served = load_index_set(summary.version_dir, fingerprint=model.info.fingerprint, dim=model.dim)
    assert served.manifest.model.family == "chinese_clip"
    stored = served.get("image").vectors_of(np.arange(len(rows)))
    assert (stored * ref.images(images)).sum(1).min() >= 0.9999  # the builder's vectors are transformers'
    query = "红色圆形"
    async with make_client(model, index_dir=tmp_path / "idx") as client:
        r = await client.post("/search/text", json={"text": query, "k": 8})
    assert r.status_code == 200, r.text
    order = np.argsort(-(ref.images(images) @ ref.texts([query])[0]), kind="stable")[:8]
    assert [h["text"] for h in r.json()["results"]] == [rows[i][0] for i in order]
    # another family's (or open_clip's) service refuses this index, naming the family it was built with
    for other in (load_model(hf_spec("clip"), device="cpu"), tiny_model):
        with pytest.raises(IndexMismatch, match=r"\(chinese_clip, sha256:"):
            load_index_set(summary.version_dir, fingerprint=other.info.fingerprint, dim=model.dim)
