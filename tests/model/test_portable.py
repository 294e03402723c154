"""The torch-free tokenizer and image processor of transformers-family exports
(`clipsearch.model.portable`) against transformers' own: token ids equal on arbitrary unicode,
long texts and special-token strings; pixels equal to the PIL-backend processor's bit for bit
on sizes, image modes and an EXIF-rotated picture, for each processor configuration the
families use; `text_of_ids` answers as with transformers; an option the torch-free form does
not reproduce falls back to transformers' files, and the export says so."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipsearch.model import hf, portable
from clipsearch.model.export import export
from clipsearch.model.load import load_model
from tests.conftest import HF_FAMILIES, make_image
from tests.model.test_pil_transform import MODES, SIZES, _exif_rotated

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

PROCESSORS = {
    "clip shortest-edge + crop": lambda: transformers.CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
    "clip non-square crop, bilinear": lambda: transformers.CLIPImageProcessor(
        size={"shortest_edge": 48}, crop_size={"height": 40, "width": 56}, resample=2),
    "chinese_clip": lambda: transformers.ChineseCLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
    "siglip squash": lambda: transformers.SiglipImageProcessor(size={"height": 64, "width": 48}),
    "no rescale": lambda: transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, do_rescale=False,
                                                            image_mean=[100.0, 110.0, 120.0],
                                                            image_std=[50.0, 60.0, 70.0]),
}


def _images() -> list[Image.Image]:
    images = [make_image(i, size) for i, size in enumerate(SIZES)]
    return images + [make_image(9, (70, 90)).convert(mode) for mode in MODES] + [_exif_rotated()]


@pytest.mark.parametrize("name", PROCESSORS)
def test_pixels_equal_transformers_pil_processor(name, tmp_path) -> None:
    PROCESSORS[name]().save_pretrained(tmp_path)
    reference = hf.ImageTransform(transformers.AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil"))
    cfg = portable.describe_processor(reference.processor)
    assert cfg is not None
    mine = portable.ProcessorTransform(json.loads(json.dumps(cfg)))  # as read back from the manifest
    for image in _images():
        want = np.asarray(reference(image))
        got = mine(image)
        assert got.dtype == np.float32 and got.shape == want.shape, (image.size, image.mode)
        np.testing.assert_array_equal(got, want, err_msg=f"{name}: {image.size} {image.mode}")


def test_an_option_it_does_not_reproduce_is_refused() -> None:
    assert portable.describe_processor(transformers.CLIPImageProcessor(size={"shortest_edge": 64}, do_pad=True)) \
        is None
    assert portable.describe_processor(transformers.CLIPImageProcessor(size={"longest_edge": 64},
                                                                       do_center_crop=False)) is None


@pytest.fixture(scope="module")
def exports(hf_spec, tmp_path_factory) -> dict[str, tuple]:
    out = {}
    for family in HF_FAMILIES:
        directory = export(hf_spec(family), tmp_path_factory.mktemp("portable") / family)
        out[family] = (load_model(hf_spec(family), device="cpu"), load_model(f"onnx:{directory}", device="cpu"),
                       json.loads((directory / "export.json").read_text()))
    return out


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_families_export_the_torch_free_forms(family, exports) -> None:
    source, exported, manifest = exports[family]
    assert manifest["tokenizer"] == "tokenizers" and manifest["preprocess"]["kind"] == "transformers"
    assert isinstance(exported.tokenizer, portable.PortableTokenizer)
    assert isinstance(exported.preprocess_transform, portable.ProcessorTransform)
    texts = ["a red circle", "", "一只猫坐在垫子上", "Ünïcödé &amp; <b>tags</b>", "circle " * 100]
    np.testing.assert_array_equal(exported.tokenize(texts), np.asarray(source.tokenize(texts)))
    assert exported.count_tokens(texts) == source.count_tokens(texts)
    for text in ("a red circle", "一只猫", "two squares"):
        ids = [int(i) for i in np.asarray(source.tokenize([text]))[0] if i >= 0]
        assert exported.text_of_ids(ids) == source.text_of_ids(ids)
    assert exported.text_of_ids([10**9]) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=60), min_size=1, max_size=4))
def test_token_ids_equal_on_any_text(exports, texts) -> None:
    for source, exported, _ in exports.values():
        np.testing.assert_array_equal(exported.tokenize(texts), np.asarray(source.tokenize(texts)))


def test_a_tokenizer_without_a_tokenizers_form_keeps_transformers(hf_spec, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(portable, "describe_tokenizer", lambda *a, **k: None)
    monkeypatch.setattr(portable, "describe_processor", lambda *a, **k: None)
    with caplog.at_level(logging.WARNING):
        directory = export(hf_spec("clip"), tmp_path / "e")
    manifest = json.loads((directory / "export.json").read_text())
    assert manifest["tokenizer"] == "hf" and manifest["preprocess"] == {}
    assert "serving the export needs transformers" in caplog.text
    model = load_model(f"onnx:{directory}", device="cpu")
    assert isinstance(model.tokenizer, hf.TextTokenizer) and isinstance(model.preprocess_transform, hf.ImageTransform)
