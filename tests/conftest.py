"""Shared fixtures: a tiny random open_clip checkpoint, synthetic images, a running app."""

from __future__ import annotations

import base64
import io
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch.model.clip import ClipModel, load_model
from tests.tiny import write_tiny_model

# The tests' models are tiny: one thread runs them faster than two (the service's default on a
# 2-core machine), whose hand-offs cost more than their matrices. Servers the tests start
# inherit this; a test that sets the thread count itself is unaffected.
os.environ.setdefault("CLIPSEARCH_TORCH_THREADS", "1")

torch.set_num_threads(2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random tiny model written as a local-dir: checkpoint, as fine-tuning would."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=1234)


@pytest.fixture(scope="session")
def tiny_model(tiny_spec: str) -> ClipModel:
    return load_model(tiny_spec, device="cpu")


def make_image(seed: int, size: tuple[int, int] = (96, 80), mode: str = "RGB") -> Image.Image:
    """A deterministic synthetic picture: a coloured background with a random block."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = rng.integers(0, 256, 3)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0 : y0 + h // 2, x0 : x0 + w // 2] = rng.integers(0, 256, 3)
    arr = np.clip(arr.astype(np.int16) + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        image = image.convert("RGBA")
        image.putalpha(alpha)
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def encode_image(image: Image.Image, fmt: str = "JPEG", urlsafe: bool = False) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    data = buf.getvalue()
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()


def image_bytes(image: Image.Image, fmt: str = "JPEG", **save: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def make_photo_folder(root: Path, count: int, seed: int) -> Path:
    """`root/photos/sub/p00.jpg ...` (`count` images) and one corrupt JPEG; returns `root/photos`."""
    folder = root / "photos" / "sub"
    folder.mkdir(parents=True)
    for i in range(count):
        make_image(seed + i).save(folder / f"p{i:02d}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return root / "photos"


@pytest.fixture
def make_client() -> Callable[..., Any]:
    """Returns an async context manager: a client on an app with its lifespan running."""
    from contextlib import asynccontextmanager

    from clipsearch.service.http.app import create_app
    from clipsearch.service.settings import Settings
    from clipsearch.service.state import ServiceState

    @asynccontextmanager
    async def factory(model: ClipModel, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
        cfg = Settings(model=model.info.spec, device="cpu", **settings)
        state = ServiceState.build(cfg, model=model)
        app = create_app(cfg, state=state)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                client.app = app  # type: ignore[attr-defined]
                client.state = state  # type: ignore[attr-defined]
                yield client

    return factory


@contextmanager
def live_server(app: Any, **config: Any) -> Iterator[int]:
    """`app` served by a real uvicorn on a free loopback port (in a thread) until the block ends."""
    import socket
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, *, process: Any = None, seconds: float = 60) -> bool:
    """Poll `url` until it answers 200: True then; False when `process` (a Popen) exits first
    or `seconds` pass."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if process is not None and process.poll() is not None:
            return False
        time.sleep(0.1)
    return False


@contextmanager
def serve_index(model: ClipModel, index_dir: Path) -> Iterator[str]:
    """A live service of `model` over the index in `index_dir`, on a real uvicorn: its base URL."""
    from clipsearch.service.http.app import create_app
    from clipsearch.service.settings import Settings
    from clipsearch.service.state import ServiceState

    settings = Settings(model=model.info.spec, device="cpu", warmup=False, index_dir=index_dir)
    app = create_app(settings, state=ServiceState.build(settings, model=model))
    with live_server(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(__file__).parent / "data"


def gate_model_call(monkeypatch: pytest.MonkeyPatch, model: ClipModel, method: str
                    ) -> tuple[threading.Event, list[int]]:
    """Make `model.<method>` wait until the returned event is set (10 s at most), recording
    the rows of each call: a model call held in flight while a test queues more requests."""
    gate, rows = threading.Event(), []
    original = getattr(model, method)

    def held(batch: Any) -> Any:
        gate.wait(10)
        rows.append(len(batch))
        return original(batch)

    monkeypatch.setattr(model, method, held)
    return gate, rows


HF_FAMILIES = ("clip", "chinese_clip", "siglip")


@pytest.fixture(scope="session")
def hf_texts() -> list[str]:
    """What the tiny transformers tokenizers are trained on: synthetic captions, English and Chinese."""
    from clipsearch.finetune.synth import synth_rows

    return [r[0] for r in synth_rows(150, seed=11, lang="en")] + [r[0] for r in synth_rows(150, seed=12, lang="zh")]


@pytest.fixture(scope="session")
def hf_spec(tmp_path_factory: pytest.TempPathFactory, hf_texts: list[str]) -> Callable[[str], str]:
    """family -> the `hf:` spec of a random tiny transformers checkpoint of that family (made once)."""
    from tests.tiny import write_tiny_hf_model

    made: dict[str, str] = {}

    def spec(family: str) -> str:
        if family not in made:
            made[family] = write_tiny_hf_model(tmp_path_factory.mktemp("hf") / family, family, hf_texts, seed=7)
        return made[family]

    return spec
