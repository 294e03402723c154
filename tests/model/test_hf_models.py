"""transformers CLIP, Chinese-CLIP and SigLIP behind the model seam, against direct transformers calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from clipsearch.core.errors import ModelLoadError
from clipsearch.model import hf
from clipsearch.model.clip import load_model
from tests.conftest import HF_FAMILIES, make_image

TEXTS = ["a red circle", "三个小的蓝色正方形", "", "two large green stars on the left, on a grey background",
         "白色背景左边有一个红色圆形", "a photo of a dog " * 30]  # the last one is cut at the context length


class Direct:
    """The reference: the checkpoint through transformers' own classes, as its model card shows."""

    def __init__(self, spec: str) -> None:
        self.dir = spec.removeprefix("hf:")
        self.model = transformers.AutoModel.from_pretrained(self.dir).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.dir)
        self.processor = transformers.AutoImageProcessor.from_pretrained(self.dir)
        self.family = self.model.config.model_type

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        ctx = self.model.config.text_config.max_position_embeddings
        if self.family == "siglip":  # SigLIP's documented use: full-length padding, no mask
            enc = self.tokenizer(texts, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt")
            out = self.model.get_text_features(input_ids=enc["input_ids"])
        else:
            enc = self.tokenizer(texts, padding=True, max_length=ctx, truncation=True, return_tensors="pt")
            out = self.model.get_text_features(**enc)
        return _unit(out)

    @torch.no_grad()
    def images(self, images: list) -> np.ndarray:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return _unit(self.model.get_image_features(pixel_values=pixels))


def _unit(out) -> np.ndarray:
    t = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(t.float(), dim=-1).numpy()


def _images() -> list:
    return [make_image(i, size) for i, size in enumerate([(96, 80), (40, 120), (33, 33), (300, 200)])]


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_vectors_equal_a_direct_transformers_call(family: str, hf_spec) -> None:
    spec = hf_spec(family)
    model, ref = load_model(spec, device="cpu"), Direct(spec)
    assert model.info.family == family and model.info.spec == spec
    got, want = model.encode_texts(TEXTS, batch_size=4), ref.texts(TEXTS)
    assert (got * want).sum(1).min() >= 0.9999, (got * want).sum(1)
    images = _images()
    got, want = model.encode_images(images, batch_size=3), ref.images(images)
    assert (got * want).sum(1).min() >= 0.9999
    # padding trimmed where the mask makes it exact, never for SigLIP
    assert model.trims_padding == (family != "siglip")
    assert model.graphed_towers == [] and model.capture_graphs(4) == []


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_preprocessing_is_the_familys_processor(family: str, hf_spec) -> None:
    model, ref = load_model(hf_spec(family), device="cpu"), Direct(hf_spec(family))
    for image in [*_images(), make_image(9, (64, 64), mode="L")]:
        want = ref.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert torch.equal(model.preprocess(image), want)
    assert tuple(model.preprocess(_images()[0]).shape[1:]) == model.image_size


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_token_count_is_the_attention_mask(family: str, hf_spec) -> None:
    model, ref = load_model(hf_spec(family), device="cpu"), Direct(hf_spec(family))
    enc = ref.tokenizer(TEXTS, truncation=True, max_length=model.context_length)
    assert model.count_tokens(TEXTS) == sum(sum(m) for m in enc["attention_mask"])


def test_logit_scale_and_bias_are_the_models(hf_spec) -> None:
    for family in HF_FAMILIES:
        model, ref = load_model(hf_spec(family), device="cpu"), Direct(hf_spec(family))
        assert model.logit_scale == pytest.approx(float(ref.model.logit_scale.detach().exp()))
        if family == "siglip":
            assert model.logit_bias == pytest.approx(float(ref.model.logit_bias.detach()))
        else:
            assert model.logit_bias is None


def test_local_dir_spec_and_fingerprints(hf_spec, hf_texts, tmp_path: Path) -> None:
    from tests.tiny import write_tiny_hf_model

    spec = hf_spec("chinese_clip")
    directory = spec.removeprefix("hf:")
    a, b = load_model(spec, device="cpu"), load_model(f"local-dir:{directory}", device="cpu")
    assert a.info.fingerprint == b.info.fingerprint and a.info.fingerprint.startswith("sha256:")
    assert b.info.spec == f"local-dir:{directory}" and b.info.family == "chinese_clip"
    np.testing.assert_array_equal(a.encode_texts(TEXTS), b.encode_texts(TEXTS))
    other = load_model(write_tiny_hf_model(tmp_path / "other", "chinese_clip", hf_texts, seed=8), device="cpu")
    assert other.info.fingerprint != a.info.fingerprint


def test_bad_specs_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="hf:"):
        load_model("hf:", device="cpu")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="not one of clip, chinese_clip, siglip"):
        load_model(f"hf:{tmp_path}", device="cpu")
    with pytest.raises(ModelLoadError, match="cannot read its config"):
        load_model(f"hf:{tmp_path / 'missing'}", device="cpu")
    assert not hf.is_transformers_dir(tmp_path)


def test_pretrained_tag_with_a_transformers_spec_is_refused(hf_spec) -> None:
    with pytest.raises(ModelLoadError, match="--pretrained is for open_clip names"):
        load_model(hf_spec("clip"), pretrained="laion2b_s34b_b79k", device="cpu")
