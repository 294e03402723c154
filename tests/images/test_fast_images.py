"""Faster image paths against the exact one (open_clip's own PIL preprocessing).

Tolerance, stated once: the vectors of a faster path (`draft`, `torch`) have cosine >= 0.999 to the exact
path's on the same image (measured: >= 0.9999 on ViT-B-32 at 224 px and on the tiny
model), and its model input differs from the exact one by a mean of <= 0.012 in
normalized units (~0.8 grey levels; measured 0.006-0.0075 here, while a draft scale that
does not cover the model's input gives 0.017-0.019). Non-JPEG inputs are untouched.
The `torch` path (libjpeg-turbo / nvJPEG decode, tensor resize) is tighter still: mean
<= 0.004 (measured <= 0.002) and no pixel more than 1.5 grey levels off (torch's and
PIL's antialiased bicubic round differently by one level at most).
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from tests.conftest import encode_image, make_image

TOLERANCE = 0.999
PIXEL_MAE = 0.012
TORCH_PIXEL_MAE = 0.004
TORCH_PIXEL_MAX = 1.5 / 255 / 0.2613  # 1.5 grey levels in normalized units (smallest CLIP std)
FAST = ["draft", "torch"]


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """Smooth shapes plus noise, upscaled: compresses and downsamples like a photo."""
    small = make_image(seed, (size[0] // 8, size[1] // 8))
    arr = np.asarray(small.resize(size, Image.BICUBIC)).astype(np.int16)
    rng = np.random.default_rng(seed)
    return Image.fromarray(np.clip(arr + rng.integers(-12, 12, arr.shape), 0, 255).astype(np.uint8))


JPEGS = [encode_image(photo(s, size)) for s, size in ((1, (640, 480)), (2, (1024, 768)), (3, (480, 640)))]
JPEGS.append(encode_image(photo(4, (800, 600)).convert("L")))  # grayscale JPEG


async def _embed(make_client, model, images: list[str], **settings) -> np.ndarray:
    async with make_client(model, **settings) as client:
        r = await client.post("/embed", json={"images": images})
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["images"], np.float32)


@pytest.mark.parametrize("decode", FAST)
async def test_fast_jpeg_decoding_is_faithful(make_client, tiny_model, decode: str) -> None:
    exact = await _embed(make_client, tiny_model, JPEGS)
    fast = await _embed(make_client, tiny_model, JPEGS, image_decode=decode)
    cos = (exact * fast).sum(1)
    assert cos.min() >= TOLERANCE, cos
    # ...and it really took the other path (otherwise this test proves nothing).
    assert not np.array_equal(exact, fast)


def test_draft_model_input_is_close_to_exact(tiny_model) -> None:
    from clipsearch.service.engine import Engine
    from clipsearch.service.settings import Settings

    exact = Engine(tiny_model, Settings(model="x")).prepare_images(JPEGS)
    draft = Engine(tiny_model, Settings(model="x", image_decode="draft")).prepare_images(JPEGS)
    mae = (exact - draft).abs().mean(dim=(1, 2, 3))
    assert float(mae.max()) <= PIXEL_MAE, mae
    assert float(mae.min()) > 0


def test_draft_decodes_at_reduced_scale_covering_the_model_input() -> None:
    from clipsearch.images.codec import decode_image

    kw = {"field": "image", "max_bytes": 10**8, "max_pixels": 10**8}
    full = decode_image(JPEGS[1], **kw)
    small = decode_image(JPEGS[1], draft=(64, 64), **kw)
    assert full.size == (1024, 768)
    assert small.size == (128, 96)  # 1/8 scale: the smallest that still covers 64 x 64
    covering = decode_image(JPEGS[1], draft=(224, 224), **kw)
    assert min(covering.size) >= 224 and covering.size[0] < 1024


@pytest.mark.parametrize("decode", FAST)
async def test_fast_paths_leave_other_formats_exact(make_client, tiny_model, decode: str) -> None:
    pngs = [encode_image(photo(5, (640, 480)), "PNG"), encode_image(make_image(6, mode="RGBA"), "PNG")]
    exact = await _embed(make_client, tiny_model, pngs)
    fast = await _embed(make_client, tiny_model, pngs, image_decode=decode)
    np.testing.assert_array_equal(exact, fast)


HALF_JPEG = base64.b64encode(base64.b64decode(JPEGS[0])[: len(base64.b64decode(JPEGS[0])) // 2]).decode()


@pytest.mark.parametrize("decode", FAST)
@pytest.mark.parametrize("bad", ["not base64!", base64.b64encode(b"\xff\xd8\xff\xe0 truncated jpeg").decode(),
                                 HALF_JPEG])
async def test_fast_paths_keep_bad_input_a_400(make_client, tiny_model, bad: str, decode: str) -> None:
    async with make_client(tiny_model, image_decode=decode) as client:
        r = await client.post("/embed", json={"images": [JPEGS[0], bad]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "images[1]"


def test_torch_model_input_is_within_a_grey_level_of_exact(tiny_model) -> None:
    from clipsearch.service.engine import Engine
    from clipsearch.service.settings import Settings

    # Mixed in one request: JPEGs take the torch path, the PNG keeps PIL, order is kept.
    images = [*JPEGS[:2], encode_image(photo(7, (300, 500)), "PNG"), *JPEGS[2:]]
    exact = Engine(tiny_model, Settings(model="x")).prepare_images(images)
    fast = Engine(tiny_model, Settings(model="x", image_decode="torch")).prepare_images(images)
    diff = (exact - fast).abs()
    assert float(diff.mean(dim=(1, 2, 3)).max()) <= TORCH_PIXEL_MAE, diff.mean(dim=(1, 2, 3))
    assert float(diff.max()) <= TORCH_PIXEL_MAX, float(diff.max())
    assert float(diff[2].max()) == 0.0  # the PNG went through open_clip's own transform
    assert float(diff.max()) > 0  # the JPEGs did not


def test_torch_preprocess_only_mirrors_the_standard_transform(tiny_model) -> None:
    from torchvision.transforms import Compose, InterpolationMode, Resize

    from clipsearch.images.torch_path import TorchPreprocess

    tp = TorchPreprocess.from_transform(tiny_model.preprocess_transform)
    assert tp is not None and tp.size == 64 and tp.crop == (64, 64)
    rest = tiny_model.preprocess_transform.transforms[1:]
    bilinear = Resize(64, interpolation=InterpolationMode.BILINEAR)
    assert TorchPreprocess.from_transform(Compose([bilinear, *rest])) is None
    assert TorchPreprocess.from_transform(Compose(rest)) is None


def test_same_sized_images_resized_as_one_batch_equal_one_at_a_time(tiny_model) -> None:
    """What a GPU does (images of one size resized together, then put back in input order)
    gives exactly the one-at-a-time result, here on the CPU with sizes interleaved."""
    import torch

    from clipsearch.images.torch_path import TorchPreprocess

    tp = TorchPreprocess.from_transform(tiny_model.preprocess_transform)
    assert tp is not None
    gen = torch.Generator().manual_seed(3)
    sizes = [(120, 90), (50, 80), (120, 90), (64, 64), (50, 80), (120, 90)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for w, h in sizes]
    one_by_one = tp.pixels(images, batched=False)
    assert torch.equal(tp.pixels(images, batched=True), one_by_one)
    assert torch.equal(tp.pixels(images), one_by_one)  # the CPU's choice
    assert torch.equal(one_by_one[2], tp.pixels([images[2]])[0])  # each row is its own image's


@pytest.mark.gpu
def test_torch_preprocess_on_cuda_is_faithful(tiny_model) -> None:
    """nvJPEG + tensor resize on the GPU against open_clip's PIL path on the CPU, for a batch
    of JPEGs as they reach it (still in base64), one request with a bad image failing alone."""

    from clipsearch.images.decoder import ImageDecoder
    from clipsearch.service.engine import Engine
    from clipsearch.service.settings import Settings

    exact = Engine(tiny_model, Settings(model="x")).prepare_images(JPEGS)
    decoder = ImageDecoder.create(tiny_model.preprocess_transform, "torch", tiny_model.image_size, 10**9,
                                  device="cuda")
    assert decoder.jpegs_per_batch and decoder.prepares_cheaply(JPEGS)
    raws = [base64.b64decode(j) for j in JPEGS]
    requests = [decoder.prepare(raws[:2], ["images[0]", "images[1]"]),
                decoder.prepare([raws[0][:300]], ["images[0]"]),
                decoder.prepare(raws[2:], ["images[0]", "images[1]"])]
    pixels, failed = decoder.collate(requests)
    assert pixels.device.type == "cuda" and list(failed) == [1] and failed[1].field == "images[0]"
    mae = (exact - pixels[[0, 1, 3, 4]].cpu()).abs().mean(dim=(1, 2, 3))
    assert float(mae.max()) <= PIXEL_MAE, mae  # nvJPEG rounds unlike libjpeg-turbo: the looser bound


async def test_torch_mode_without_a_torch_decoder_serves_exact(make_client, tiny_model, monkeypatch) -> None:
    import clipsearch.images.torch_path as tp

    monkeypatch.setattr(tp, "HAVE_TORCH_DECODE", False)
    exact = await _embed(make_client, tiny_model, JPEGS)
    fallback = await _embed(make_client, tiny_model, JPEGS, image_decode="torch")
    np.testing.assert_array_equal(exact, fallback)


def test_torch_path_on_unusual_jpegs_matches_exact_or_its_error(tiny_model) -> None:
    """CMYK, progressive, grayscale, 4:4:4 and 1-pixel JPEGs stay within a grey level of
    exact; truncated ones get the exact path's own 400, naming the item."""
    import io

    from clipsearch.core.errors import InvalidImage
    from clipsearch.service.engine import Engine
    from clipsearch.service.settings import Settings

    def jpeg(image: Image.Image, **kw) -> str:
        buf = io.BytesIO()
        image.save(buf, "JPEG", **kw)
        return base64.b64encode(buf.getvalue()).decode()

    rgb = photo(8, (160, 120))
    good = [jpeg(rgb.convert("CMYK")), jpeg(rgb, progressive=True), jpeg(rgb.convert("L")), jpeg(rgb, subsampling=0),
            jpeg(Image.new("RGB", (1, 1), (200, 10, 10)))]
    exact = Engine(tiny_model, Settings(model="x"))
    fast = Engine(tiny_model, Settings(model="x", image_decode="torch"))
    diff = (exact.prepare_images(good) - fast.prepare_images(good)).abs()
    assert float(diff.max()) <= TORCH_PIXEL_MAX, diff.amax(dim=(1, 2, 3))
    truncated = base64.b64encode(base64.b64decode(jpeg(rgb))[:400]).decode()
    messages = []
    for engine in (exact, fast):
        with pytest.raises(InvalidImage) as err:
            engine.prepare_images([good[0], truncated])
        messages.append((err.value.field, err.value.message))
    assert messages[0] == messages[1] and messages[0][0] == "images[1]"


@pytest.fixture
def jpegs_per_batch(monkeypatch):
    """The torch path decoding JPEGs a batch at a time, as it does on a GPU, here on the CPU."""
    import dataclasses

    from clipsearch.images.decoder import ImageDecoder

    create = ImageDecoder.create

    def per_batch(*args, **kw):
        decoder = create(*args, **kw)
        return dataclasses.replace(decoder, jpegs_per_batch=decoder.torch_path is not None)

    monkeypatch.setattr(ImageDecoder, "create", per_batch)
    return create  # the unpatched one


async def test_batch_decode_takes_jpegs_of_several_requests_in_one_call(make_client, tiny_model, monkeypatch,
                                                                        jpegs_per_batch) -> None:
    """JPEGs decoded a batch at a time (a GPU's way, for nvJPEG): the JPEGs of concurrent
    requests decode in one call; vectors equal the per-request decode's; a truncated JPEG,
    bad base64, a broken header and an oversize image (all of which start as a JPEG's base64
    does, so they reach the batch still in base64) each fail only their own request, with
    the same answer as per request."""
    import asyncio
    import threading

    from clipsearch.images.decoder import ImageDecoder

    calls: list[list[str]] = []
    decode_jpegs = ImageDecoder.decode_jpegs

    def spy(self, jpegs, device):
        calls.append([j.name for j in jpegs])
        return decode_jpegs(self, jpegs, device)

    monkeypatch.setattr(ImageDecoder, "decode_jpegs", spy)
    png = encode_image(photo(9, (200, 150)), "PNG")
    bodies = [[JPEGS[0], JPEGS[1]], [png, JPEGS[2]], [JPEGS[3]]]
    want = [await _embed(make_client, tiny_model, b, image_decode="torch") for b in bodies]
    calls.clear()
    async with make_client(tiny_model, image_decode="torch", max_wait_ms=300) as client:
        assert client.state.engine.decoder.jpegs_per_batch
        replies = await asyncio.gather(*[client.post("/embed", json={"images": b})
                                         for b in [*bodies, [JPEGS[0], HALF_JPEG]]])
    assert [r.status_code for r in replies] == [200, 200, 200, 400], [r.text for r in replies]
    assert replies[3].json()["error"]["field"] == "images[1]"
    for reply, expected in zip(replies, want, strict=False):
        np.testing.assert_allclose(np.asarray(reply.json()["images"], np.float32), expected, atol=1e-5)
    # One call for all six JPEGs of the four requests (then, as that batch held a bad one, one each).
    assert sorted(calls[0]) == sorted(["images[0]", "images[1]", "images[1]", "images[0]", "images[0]",
                                       "images[1]"]), calls
    assert all(len(c) == 1 for c in calls[1:]), calls

    # JPEGs in base64 or as data: URIs are prepared in the batcher's thread, not the prepare
    # pool's, on this path; a PNG takes the pool. The same vectors.
    from clipsearch.service.engine import Engine

    threads: list[str] = []
    prepare = Engine._prepare_images

    def spy_prepare(self, images, field, start):
        threads.append(threading.current_thread().name.split("_")[0])
        return prepare(self, images, field, start)

    with monkeypatch.context() as patched:
        patched.setattr(Engine, "_prepare_images", spy_prepare)
        async with make_client(tiny_model, image_decode="torch") as client:
            r = await client.post("/embed", json={"images": [JPEGS[0], f"data:image/jpeg;base64,{JPEGS[1]}"]})
            r2 = await client.post("/embed", json={"images": [png]})
    assert r.status_code == 200 and r2.status_code == 200, r.text
    assert threads == ["batcher-image", "clip-prep"], threads
    np.testing.assert_allclose(np.asarray(r.json()["images"], np.float32), want[0], atol=1e-5)

    broken_header = base64.b64encode(b"\xff\xd8\xff\xe0" + bytes(40)).decode()
    oversize = base64.b64encode(base64.b64decode(JPEGS[1]) + bytes(300_000)).decode()
    failing = [[JPEGS[0], "/9j/4AAQ!!!!"], [broken_header], [JPEGS[2], oversize]]
    assert all(image.startswith("/9j/") for b in failing for image in b)
    answers = {}
    for scope in ("request", "batch"):
        with monkeypatch.context() as patched:
            if scope == "request":
                patched.setattr(ImageDecoder, "create", jpegs_per_batch)
            async with make_client(tiny_model, image_decode="torch", max_wait_ms=300,
                                   max_image_bytes=300_000) as client:
                assert client.state.engine.decoder.jpegs_per_batch is (scope == "batch")
                replies = await asyncio.gather(*[client.post("/embed", json={"images": b})
                                                 for b in [*failing, [JPEGS[3]]]])
        answers[scope] = [(r.status_code, r.json().get("error")) for r in replies]
        np.testing.assert_allclose(np.asarray(replies[-1].json()["images"], np.float32), want[2], atol=1e-5)
    assert answers["batch"] == answers["request"]
    assert [(code, err["field"]) for code, err in answers["batch"][:3]] == [
        (400, "images[1]"), (400, "images[0]"), (413, "images[1]")], answers


def test_jpegs_decode_per_batch_only_on_a_gpu_with_the_torch_path(tiny_model) -> None:
    from clipsearch.images.decoder import ImageDecoder

    def per_batch(mode: str, device: str) -> bool:
        return ImageDecoder.create(tiny_model.preprocess_transform, mode, tiny_model.image_size, 10**9,
                                   device=device).jpegs_per_batch

    assert per_batch("torch", "cuda")
    assert not per_batch("torch", "cpu") and not per_batch("exact", "cuda") and not per_batch("draft", "cuda")


def test_gathered_rows_keep_their_order() -> None:
    import torch

    from clipsearch.images.torch_path import gather_rows

    rows = [torch.randn(3, 4, 4) for _ in range(5)]
    assert torch.equal(gather_rows(rows, torch.device("cpu")), torch.stack(rows))


@pytest.mark.gpu
async def test_pixels_decoded_on_the_cpu_reach_a_gpu_model_pinned(make_client, tiny_model) -> None:
    """On a GPU the batch's CPU-decoded pixels are gathered into page-locked memory in the
    collate step; a batch mixing CPU-decoded (PNG) and GPU-decoded (JPEG, nvJPEG per batch)
    images is gathered on the GPU. Vectors stay those of the CPU model, within fp16."""
    import asyncio

    import torch

    from clipsearch.images.torch_path import gather_rows
    from clipsearch.model.clip import load_model

    cuda = torch.device("cuda")
    parts = [torch.randn(3, 4, 4), torch.randn(3, 4, 4)]
    pinned = gather_rows(parts, cuda)
    assert pinned.is_pinned() and torch.equal(pinned, torch.stack(parts))
    mixed = gather_rows([parts[0], parts[1].to(cuda)], cuda)
    assert mixed.device.type == "cuda" and torch.equal(mixed.cpu(), torch.stack(parts))

    model = load_model(tiny_model.info.spec, device="cuda", dtype="fp16")
    png = encode_image(photo(7, (320, 240)), "PNG")
    images = [*JPEGS, png]
    exact = await _embed(make_client, tiny_model, images)
    for settings in ({}, {"image_decode": "torch"}):
        async with make_client(model, **settings) as client:
            replies = await asyncio.gather(*[client.post("/embed", json={"images": [im]}) for im in images])
        got = np.array([r.json()["images"][0] for r in replies], np.float32)
        assert (got * exact).sum(1).min() >= 0.99, settings

