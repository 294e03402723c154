"""Serving an export without torch: a fresh venv with `clipsearch[onnx]` (which pulls neither torch
nor transformers) builds an index and serves an export made with torch, of an open_clip model
and of each transformers family, and its /embed answers the torch model's vectors (cosine >=
0.9999, as the export tests require)."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from clipsearch.finetune.synth import write_tsv
from clipsearch.model.load import load_model
from tests.conftest import HF_FAMILIES, free_port, make_image, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime")


@pytest.mark.slow
def test_onnx_extra_serves_an_export_without_torch(tmp_path, tiny_spec, tiny_model, hf_spec) -> None:
    from clipsearch.model.export import export

    exported = export(tiny_spec, tmp_path / "export")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, cli = venv / "bin/python", venv / "bin/clipsearch"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT / "client"),
                          f"{ROOT}[onnx]"], capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr[-3000:]
    installed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                               env=env, check=True).stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert not names & {"torch", "torchvision", "open-clip-torch", "triton"}, names
    assert not any(n.startswith("nvidia-") for n in names), names
    assert {"onnxruntime", "faiss-cpu", "clipsearch"} <= names

    write_tsv(tmp_path / "corpus.tsv", 30, seed=3, image_size=64)
    build = subprocess.run([str(cli), "index", "build", "--input", str(tmp_path / "corpus.tsv"), "--output",
                            str(tmp_path / "idx"), "--model", f"onnx:{exported}", "--no-progress"],
                           capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    # a torch model gets one line that says what to install
    torch_spec = subprocess.run([str(cli), "serve", "--model", tiny_spec], capture_output=True, text=True,
                                timeout=120, env=env, cwd=tmp_path)
    assert torch_spec.returncode == 2 and "runs on torch, which is not installed" in torch_spec.stderr

    texts = ["a red circle", "two blue squares on a grey background"]
    images = [make_image(i) for i in range(3)]
    with _served(cli, f"onnx:{exported}", env, tmp_path, index_dir=tmp_path / "idx") as base:
        got_t, got_i = _embed(base, texts, images)
        want_t, want_i = tiny_model.encode_texts(texts), tiny_model.encode_images(images)
        assert (got_t * want_t).sum(1).min() >= 0.9999
        assert (got_i * want_i).sum(1).min() >= 0.9999
        hits = httpx.post(f"{base}/search/text", json={"text": "a red circle", "k": 5}, timeout=60).json()["results"]
        assert len(hits) == 5

    # the transformers families: their tokenizer and image processor run without transformers too
    assert "transformers" not in names
    for family in HF_FAMILIES:
        source = load_model(hf_spec(family), device="cpu")
        family_export = export(hf_spec(family), tmp_path / f"export-{family}")
        with _served(cli, f"onnx:{family_export}", env, tmp_path) as base:
            got_t, got_i = _embed(base, texts, images)
        want_t, want_i = source.encode_texts(texts), source.encode_images(images)
        assert (got_t * want_t).sum(1).min() >= 0.9999, family
        assert (got_i * want_i).sum(1).min() >= 0.9999, family


@contextlib.contextmanager
def _served(cli: Path, spec: str, env: dict[str, str], cwd: Path, index_dir: Path | None = None) -> Iterator[str]:
    port = free_port()
    argv = [str(cli), "serve", "--model", spec, "--port", str(port)]
    if index_dir is not None:
        argv += ["--index-dir", str(index_dir)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        base = f"http://127.0.0.1:{port}"
        if not wait_until_up(f"{base}/readyz", process=server, seconds=60) and server.poll() is None:
            raise AssertionError(f"the torch-free service did not become ready with {spec}")
        assert server.poll() is None, server.stdout.read().decode()[-3000:] if server.stdout else ""
        yield base
    finally:
        server.terminate()
        server.wait(30)


def _embed(base: str, texts: list[str], images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    payload = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        payload.append(base64.b64encode(buf.getvalue()).decode())
    r = httpx.post(f"{base}/embed", json={"texts": texts, "images": payload}, timeout=60)
    assert r.status_code == 200, r.text
    return np.array(r.json()["texts"]), np.array(r.json()["images"])
