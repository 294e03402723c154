"""/classify and /similarity against direct open_clip math on the same checkpoint."""

from __future__ import annotations

import base64
import io

import numpy as np
import open_clip
import torch
from PIL import Image

from tests.conftest import encode_image, make_image


def _reference(spec: str):
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec)


def _img_feats(model, preprocess, b64s: list[str]) -> torch.Tensor:
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(base64.b64decode(b)))) for b in b64s])
    return torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)


async def test_classify_matches_open_clip(tiny_spec, tiny_model, make_client) -> None:
    model, preprocess, tok = _reference(tiny_spec)
    image = encode_image(make_image(21))
    labels = ["cat", "dog", "red circle", "两只猫"]
    with torch.no_grad():
        i = _img_feats(model, preprocess, [image])
        t = torch.nn.functional.normalize(model.encode_text(tok([f"a photo of a {x}" for x in labels])), dim=-1)
        probs = (model.logit_scale.exp() * i @ t.T).softmax(dim=-1)[0].numpy()
    async with make_client(tiny_model) as client:
        r = await client.post("/classify", json={"image": image, "labels": labels})
    assert r.status_code == 200, r.text
    got = r.json()["labels"]
    assert [g["label"] for g in got] == [labels[j] for j in np.argsort(-probs, kind="stable")]
    for g in got:
        assert abs(g["probability"] - probs[labels.index(g["label"])]) < 1e-4
    assert abs(sum(g["probability"] for g in got) - 1) < 1e-5


async def test_similarity_matches_open_clip(tiny_spec, tiny_model, make_client) -> None:
    model, preprocess, tok = _reference(tiny_spec)
    images = [encode_image(make_image(s)) for s in (1, 2, 3)]
    texts = ["a red circle", "a blue square"]
    with torch.no_grad():
        i = _img_feats(model, preprocess, images)
        t = torch.nn.functional.normalize(model.encode_text(tok(texts)), dim=-1)
        cos = (i @ t.T).numpy()
        probs = (model.logit_scale.exp() * i @ t.T).softmax(dim=-1).numpy()
    async with make_client(tiny_model) as client:
        r = await client.post("/similarity", json={"texts": texts, "images": images})
    body = r.json()
    np.testing.assert_allclose(body["cosine"], cos, atol=1e-4)
    np.testing.assert_allclose(body["probabilities"], probs, atol=1e-4)
    assert abs(body["logit_scale"] - float(model.logit_scale.exp().detach())) < 1e-3


async def test_zeroshot_bad_input(tiny_model, make_client) -> None:
    async with make_client(tiny_model) as client:
        assert (await client.post("/classify", json={"image": encode_image(make_image(1)), "labels": []})
                ).status_code == 422
        r = await client.post("/classify", json={"image": "@@", "labels": ["a"]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "image"
        r = await client.post("/similarity", json={"texts": ["a"], "images": [encode_image(make_image(1)), "x"]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "images[1]"
        r = await client.post("/classify", json={"image": encode_image(make_image(1)), "labels": ["x"] * 100})
        assert r.status_code == 413
