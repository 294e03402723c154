"""The model seam: vectors equal a direct open_clip call on the same checkpoint."""

from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipsearch.core.errors import ModelLoadError
from clipsearch.model.clip import ClipModel, load_model, model_fingerprint
from tests.conftest import image_bytes, make_image
from tests.tiny import write_tiny_model

TEXTS = ["a red circle", "two blue squares on white", "", "一只猫", "x" * 500]


@pytest.fixture(scope="module")
def reference(tiny_spec: str):
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(tiny_spec)


def _normalize(x: torch.Tensor) -> np.ndarray:
    return (x / x.norm(dim=-1, keepdim=True)).numpy()


def test_text_vectors_equal_open_clip(tiny_model: ClipModel, reference) -> None:
    model, _, tokenizer = reference
    with torch.no_grad():
        expected = _normalize(model.encode_text(tokenizer(TEXTS)))
    got = tiny_model.encode_texts(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), tiny_model.dim)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("mode", "fmt"), [("RGB", "JPEG"), ("RGB", "PNG"), ("L", "JPEG"), ("RGBA", "PNG"),
                                           ("P", "GIF")])
def test_image_vectors_equal_open_clip(tiny_model: ClipModel, reference, mode: str, fmt: str) -> None:
    model, preprocess, _ = reference
    data = image_bytes(make_image(7, (120, 90), mode), fmt)
    with torch.no_grad():
        expected = _normalize(model.encode_image(preprocess(Image.open(io.BytesIO(data))).unsqueeze(0)))
    got = tiny_model.encode_images([Image.open(io.BytesIO(data))])
    cos = float((got * expected).sum())
    assert cos >= 0.9999, cos
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_dim_and_info(tiny_model: ClipModel) -> None:
    assert tiny_model.dim == 64
    assert tiny_model.info.fingerprint.startswith("sha256:")
    assert tiny_model.info.dtype == "float32" and tiny_model.info.device == "cpu"


def test_random_builtin_is_deterministic() -> None:
    a = load_model("clipsearch-tiny", "none", device="cpu")
    b = load_model("clipsearch-tiny", None, device="cpu")
    np.testing.assert_array_equal(a.encode_texts(["hello"]), b.encode_texts(["hello"]))
    assert a.info.fingerprint == b.info.fingerprint == "random:clipsearch-tiny:seed0"


def test_pretrained_checkpoint_path(tmp_path, tiny_model: ClipModel) -> None:
    """A built-in name with --pretrained pointing at a checkpoint file."""
    torch.save(tiny_model.model.state_dict(), tmp_path / "ckpt.pt")
    m = load_model("clipsearch-tiny", str(tmp_path / "ckpt.pt"), device="cpu")
    np.testing.assert_allclose(m.encode_texts(TEXTS), tiny_model.encode_texts(TEXTS), atol=1e-6)
    assert m.info.fingerprint == model_fingerprint("clipsearch-tiny", str(tmp_path / "ckpt.pt"))


def test_fingerprint_follows_weights_not_path(tmp_path) -> None:
    a = write_tiny_model(tmp_path / "a", seed=1)
    b = write_tiny_model(tmp_path / "b", seed=1)
    c = write_tiny_model(tmp_path / "c", seed=2)
    assert model_fingerprint(a, None) == model_fingerprint(b, None) != model_fingerprint(c, None)


@pytest.mark.parametrize(
    ("spec", "pretrained", "message"),
    [
        ("no-such-model", None, "unknown open_clip model"),
        ("", None, "empty"),
        ("local-dir:/does/not/exist", None, "not found"),
        ("clipsearch-tiny", "/no/such/checkpoint.pt", "cannot load model"),
    ],
)
def test_bad_specs_fail_clearly(spec: str, pretrained: str | None, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec, pretrained, device="cpu")


def test_local_dir_without_weights(tmp_path) -> None:
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(f"local-dir:{tmp_path}", device="cpu")


def test_cuda_without_gpu_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model("clipsearch-tiny", device="cuda")


@pytest.mark.gpu
def test_gpu_half_precision_close_to_fp32(tiny_spec: str, tiny_model: ClipModel) -> None:
    gpu = load_model(tiny_spec, device="cuda", dtype="fp16")
    got = gpu.encode_texts(TEXTS)
    ref = tiny_model.encode_texts(TEXTS)
    assert (got * ref).sum(axis=1).min() > 0.999


def test_trimmed_padding_equals_full_context(tiny_model: ClipModel) -> None:
    """Short batches run at their longest text's length; vectors equal the full 77-token ones."""
    assert tiny_model.trims_padding
    texts = ["a", "a red circle on a blue square", "", "x " * 100, "猫"]
    for batch in (texts, texts[:1], texts[:3]):
        tokens = tiny_model.tokenize(batch)
        with torch.no_grad():
            full = tiny_model.model.encode_text(tokens)
        full = (full / full.norm(dim=-1, keepdim=True)).numpy()
        np.testing.assert_allclose(tiny_model.encode_tokens(tokens), full, atol=2e-6)
    from clipsearch.model.clip import trim_padding

    assert trim_padding(tiny_model.tokenize(["a"])).shape[1] == 3  # <sot> a <eot>


@pytest.mark.parametrize(("warmup", "expected"), [(True, [("text", 1), ("image", 1), ("text", 8), ("image", 8)]),
                                                  (False, [])])
def test_warm_up_runs_both_towers_before_serving(tiny_model, warmup: bool, expected: list) -> None:
    """The service runs the model once per warm-up batch size at start (8 rows on CPU), and
    not at all with warmup off; the vectors it then serves are unchanged by it."""
    from clipsearch.service.settings import Settings
    from clipsearch.service.state import ServiceState

    calls: list[tuple[str, int]] = []
    tokens = tiny_model.tokenize(["a red circle"])
    before = tiny_model.encode_tokens(tokens)
    encode_tokens, encode_pixels = tiny_model.encode_tokens, tiny_model.encode_pixels
    tiny_model.encode_tokens = lambda t: calls.append(("text", len(t))) or encode_tokens(t)
    tiny_model.encode_pixels = lambda p: calls.append(("image", len(p))) or encode_pixels(p)
    try:
        state = ServiceState.build(Settings(model="x", warmup=warmup, max_batch_size=32), model=tiny_model)
    finally:
        del tiny_model.encode_tokens, tiny_model.encode_pixels
    assert calls == expected
    # (not bit-equal: build() also sets torch's thread count, which reorders float sums)
    np.testing.assert_allclose(tiny_model.encode_tokens(tokens), before, atol=1e-5)
    state.engine._model_executor.shutdown()
    state.engine._prepare_executor.shutdown()


def test_warm_up_failure_stops_start_up_with_the_reason(tiny_model, monkeypatch) -> None:
    from clipsearch.service.settings import Settings
    from clipsearch.service.state import ServiceState

    def broken(tokens):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(tiny_model, "encode_tokens", broken)
    with pytest.raises(ModelLoadError, match=r"warm-up batch .*out of memory"):
        ServiceState.build(Settings(model="x"), model=tiny_model)
