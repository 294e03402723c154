"""The torch-free preprocessing (PIL + numpy) against open_clip's own inference transform, built
from the same config: equal for every resize mode, interpolation, size (square or not) and
image mode, on pictures smaller and larger than the model's input, thin ones and EXIF-rotated
ones (open_clip ignores EXIF; so does this)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from clipsearch.model.pil_transform import PilTransform
from tests.conftest import make_image

SIZES = [(96, 80), (224, 224), (30, 300), (2, 2), (513, 7), (640, 480), (50, 40)]
MODES = ["RGB", "RGBA", "L", "P", "LA", "CMYK", "I;16", "1"]


def _exif_rotated() -> Image.Image:
    image = make_image(3, (120, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("cfg", [
    {"size": 64, "resize_mode": "shortest", "interpolation": "bicubic"},
    {"size": 224, "resize_mode": "shortest", "interpolation": "bilinear"},
    {"size": (48, 64), "resize_mode": "shortest", "interpolation": "bicubic"},
    {"size": 64, "resize_mode": "squash", "interpolation": "bicubic"},
    {"size": (64, 40), "resize_mode": "squash", "interpolation": "bilinear"},
    {"size": 64, "resize_mode": "longest", "interpolation": "bicubic", "fill_color": 127},
    {"size": (40, 64), "resize_mode": "longest", "interpolation": "bicubic", "fill_color": 0},
])
def test_equal_to_open_clips_transform(cfg) -> None:
    full = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711), **cfg}
    reference = image_transform_v2(PreprocessCfg(**full), is_train=False)
    mine = PilTransform.from_config(full)
    images = [make_image(i, size) for i, size in enumerate(SIZES)]
    images += [make_image(9, (70, 90)).convert(mode) for mode in MODES] + [_exif_rotated()]
    for image in images:
        want = reference(image).numpy()
        got = mine(image)
        assert got.dtype == np.float32 and got.shape == want.shape, (image.size, image.mode)
        np.testing.assert_array_equal(got, want, err_msg=f"{image.size} {image.mode}")


def test_the_models_own_config(tiny_model) -> None:
    cfg = tiny_model.model.visual.preprocess_cfg
    mine = PilTransform.from_config(cfg)
    for image in (make_image(1, (200, 100)), make_image(2, (33, 90)).convert("P")):
        assert torch.equal(torch.from_numpy(mine(image)), tiny_model.preprocess(image))
