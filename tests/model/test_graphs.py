"""CUDA graphs at bucketed shapes: the bucketing, padding and copying run on the CPU through
`capture_emulated` (a graph's semantics in plain torch); the real capture is a GPU test."""

from __future__ import annotations

import logging

import numpy as np
import open_clip
import pytest
import torch

from clipsearch.model.clip import ClipModel, load_model
from clipsearch.model.graphs import BucketedGraphs, Captured, batch_buckets, capture_emulated, length_buckets
from tests.conftest import make_image

TEXTS = ["a", "a red circle on a blue square", "", "x " * 100, "猫", "two green stars", "a dog", "a cat", "sky"]


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).sum(dim=1, keepdim=True)


def test_buckets() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]
    assert length_buckets(77) == [8, 16, 32, 77]
    assert length_buckets(16) == [8, 16]


def test_padding_is_zeroed_and_outputs_are_copies() -> None:
    """A function that sees every element (a row sum) tells stale padding from zeros, and an
    earlier result must survive the next replay of the same graph."""
    graphs = BucketedGraphs(_row_sums, [(4, 8), (8, 8)], dtype=torch.float32, device=torch.device("cpu"),
                            capture=capture_emulated)
    big = torch.ones(4, 8)
    first = graphs(big)
    small = torch.full((3, 5), 2.0)
    second = graphs(small)  # same (4, 8) graph: the old ones must not leak into the sum
    assert graphs.bucket(small.shape) == (4, 8)
    torch.testing.assert_close(second, torch.full((3, 1), 10.0))
    torch.testing.assert_close(first, torch.full((4, 1), 8.0))  # not overwritten by the second replay
    torch.testing.assert_close(graphs(torch.ones(6, 2)), torch.full((6, 1), 2.0))  # the (8, 8) graph


def test_inputs_beyond_every_bucket_run_eagerly() -> None:
    replays: list[tuple[int, ...]] = []

    def counting(fn, static_in) -> Captured:
        captured = capture_emulated(fn, static_in)

        def replay() -> None:
            replays.append(tuple(static_in.shape))
            captured.replay()

        return Captured(captured.static_in, captured.static_out, replay)

    graphs = BucketedGraphs(_row_sums, [(2, 4)], dtype=torch.float32, device=torch.device("cpu"), capture=counting)
    torch.testing.assert_close(graphs(torch.ones(2, 3)), torch.full((2, 1), 3.0))
    assert replays == [(2, 4)]
    torch.testing.assert_close(graphs(torch.ones(3, 4)), torch.full((3, 1), 4.0))  # 3 rows > 2: eager
    torch.testing.assert_close(graphs(torch.ones(1, 5)), torch.full((1, 1), 5.0))  # 5 columns > 4: eager
    assert replays == [(2, 4)]


@pytest.fixture(scope="module")
def graphed(tiny_spec: str) -> ClipModel:
    model = load_model(tiny_spec, device="cpu")
    assert model.capture_graphs(4, capture=capture_emulated) == ["text", "image"]
    return model


@pytest.fixture(scope="module")
def reference(tiny_spec: str):
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(tiny_spec)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9])
def test_graphed_text_equals_open_clip(graphed: ClipModel, reference, n: int) -> None:
    """Batches padded to a (rows, tokens) bucket, and the 5 and 9 beyond the largest bucket (4),
    give open_clip's own full-context vectors."""
    model, _, tokenizer = reference
    texts = TEXTS[:n]
    with torch.no_grad():
        want = model.encode_text(tokenizer(texts))
    want = (want / want.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(graphed.encode_texts(texts), want, atol=2e-6)


@pytest.mark.parametrize("n", [1, 3, 4, 6])
def test_graphed_images_equal_open_clip(graphed: ClipModel, reference, n: int) -> None:
    model, preprocess, _ = reference
    images = [make_image(i, (70 + 9 * i, 60)) for i in range(n)]
    with torch.no_grad():
        want = model.encode_image(torch.stack([preprocess(im) for im in images]))
    want = (want / want.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(graphed.encode_images(images), want, atol=2e-6)


async def test_service_on_a_graphed_model_serves_open_clips_vectors(graphed: ClipModel, reference,
                                                                   make_client) -> None:
    """End to end through the batcher: concurrent /embed requests merge into batches that
    replay the (emulated) graphs, and every answer equals open_clip's own vectors."""
    import asyncio

    model, _, tokenizer = reference
    async with make_client(graphed, warmup=False) as client:
        info = (await client.get("/")).json()
        assert info["runtime"]["cuda_graphs"] == ["text", "image"]
        replies = await asyncio.gather(*[client.post("/embed", json={"texts": TEXTS[: 1 + i % 5]}) for i in range(12)])
    for i, reply in enumerate(replies):
        with torch.no_grad():
            want = model.encode_text(tokenizer(TEXTS[: 1 + i % 5]))
        want = (want / want.norm(dim=-1, keepdim=True)).numpy()
        np.testing.assert_allclose(np.asarray(reply.json()["texts"], np.float32), want, atol=2e-6)


def test_a_tower_whose_graphs_differ_stays_eager(tiny_spec: str, reference, caplog) -> None:
    """A capture whose replay does nothing (output stuck at the capture-time zeros input) is
    caught by the start-up check; that tower keeps eager vectors, the other is graphed."""

    def stale_images(fn, static_in) -> Captured:
        captured = capture_emulated(fn, static_in)
        if static_in.dim() == 4:
            return Captured(captured.static_in, captured.static_out, lambda: None)
        return captured

    model = load_model(tiny_spec, device="cpu")
    with caplog.at_level(logging.WARNING, logger="clipsearch.model.clip"):
        assert model.capture_graphs(4, capture=stale_images) == ["text"]
    assert "image tower stays eager" in caplog.text and "replay differs from eager" in caplog.text
    ref, preprocess, _ = reference
    image = make_image(3)
    with torch.no_grad():
        want = ref.encode_image(preprocess(image)[None])
    np.testing.assert_allclose(model.encode_images([image]), (want / want.norm()).numpy(), atol=2e-6)


def test_a_failing_capture_leaves_the_model_eager(tiny_spec: str, tiny_model: ClipModel, caplog) -> None:
    def failing(fn, static_in) -> Captured:
        raise RuntimeError("operation not permitted when stream is capturing")

    model = load_model(tiny_spec, device="cpu")
    with caplog.at_level(logging.WARNING, logger="clipsearch.model.clip"):
        assert model.capture_graphs(8, capture=failing) == []
    assert caplog.text.count("stays eager") == 2
    np.testing.assert_allclose(model.encode_texts(TEXTS), tiny_model.encode_texts(TEXTS), atol=1e-6)


@pytest.mark.gpu
def test_cuda_graphs_equal_eager_on_the_gpu(tiny_spec: str) -> None:
    eager = load_model(tiny_spec, device="cuda", dtype="fp16")
    model = load_model(tiny_spec, device="cuda", dtype="fp16")
    assert model.capture_graphs(8) == ["text", "image"]
    for n in (1, 3, 8, 11):
        texts = (TEXTS * 2)[:n]
        assert (model.encode_texts(texts) * eager.encode_texts(texts)).sum(axis=1).min() >= 0.999
        images = [make_image(i) for i in range(n)]
        assert (model.encode_images(images) * eager.encode_images(images)).sum(axis=1).min() >= 0.999
