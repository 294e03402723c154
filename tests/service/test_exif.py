"""EXIF orientation (`CLIPSEARCH_EXIF_ORIENTATION`): every decode path turns an image the way
PIL's `ImageOps.exif_transpose` does; off, images stay as stored (open_clip's behaviour)."""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps

from clipsearch.images.codec import _PIL_ORIENT
from clipsearch.images.torch_path import upright
from clipsearch.service.engine import Engine
from clipsearch.service.settings import Settings

TORCH_PIXEL_MAE = 0.004  # as tests/service/test_fast_images.py
DRAFT_PIXEL_MAE = 0.012


def sideways_jpeg(orientation: int) -> bytes:
    """A 160x96 picture nothing maps onto itself by a turn or a mirror (a horizontal
    gradient, a block in one corner), stored with the given EXIF orientation."""
    arr = np.zeros((96, 160, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, 160, dtype=np.uint8)[None, :]
    arr[..., 2] = np.linspace(255, 0, 96, dtype=np.uint8)[:, None]
    arr[8:40, 8:60] = (250, 250, 40)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_tensor_turns_equal_pil_for_every_orientation() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        image = Image.fromarray(arr)
        want = np.asarray(image if orientation == 1 else image.transpose(_PIL_ORIENT[orientation]))
        got = upright(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_decode_path_turns_images_upright(tiny_model, orientation: int) -> None:
    data = sideways_jpeg(orientation)
    b64 = [base64.b64encode(data).decode()]
    transform = tiny_model.preprocess_transform
    upright_ref = transform(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    as_stored = transform(Image.open(io.BytesIO(data)))

    def prepared(per_batch: bool = False, **kw) -> torch.Tensor:
        engine = Engine(tiny_model, Settings(model="x", **kw))
        if per_batch:  # JPEGs decoded a batch at a time, as on a GPU
            engine.decoder = dataclasses.replace(engine.decoder, jpegs_per_batch=True)
        return engine.prepare_images(b64)[0]

    def mae(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().mean())

    assert mae(as_stored, upright_ref) > 0.2  # turning matters for this picture
    assert torch.equal(prepared(), as_stored)  # off by default: open_clip's own input
    assert torch.equal(prepared(exif_orientation=True), upright_ref)
    assert mae(prepared(exif_orientation=True, image_decode="draft"), upright_ref) <= DRAFT_PIXEL_MAE
    assert mae(prepared(exif_orientation=True, image_decode="torch"), upright_ref) <= TORCH_PIXEL_MAE
    per_batch = prepared(True, exif_orientation=True, image_decode="torch")
    assert mae(per_batch, upright_ref) <= TORCH_PIXEL_MAE


def test_a_broken_exif_block_leaves_the_image_as_stored(tiny_model) -> None:
    data = sideways_jpeg(6)
    start = data.index(b"Exif\x00\x00")
    broken = data[: start + 6] + b"\xff" * 8 + data[start + 14 :]  # the TIFF header after "Exif" is garbage
    b64 = [base64.b64encode(broken).decode()]
    as_stored = tiny_model.preprocess_transform(Image.open(io.BytesIO(broken)))
    for decode in ("exact", "torch"):
        got = Engine(tiny_model, Settings(model="x", exif_orientation=True, image_decode=decode)).prepare_images(b64)[0]
        assert float((got - as_stored).abs().mean()) <= TORCH_PIXEL_MAE, decode
