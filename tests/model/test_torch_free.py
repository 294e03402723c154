"""Serving an export without torch: a fresh venv with `clipsearch[onnx]` (which pulls no torch)
builds an index and serves an export made with torch, and its /embed answers the torch
model's vectors (cosine >= 0.9999, as the export tests require)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from clipsearch.finetune.synth import write_tsv
from tests.conftest import free_port, make_image, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime")


@pytest.mark.slow
def test_onnx_extra_serves_an_export_without_torch(tmp_path, tiny_spec, tiny_model) -> None:
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

    port = free_port()
    server = subprocess.Popen([str(cli), "serve", "--model", f"onnx:{exported}", "--index-dir", str(tmp_path / "idx"),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                              cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        if not wait_until_up(f"{base}/readyz", process=server, seconds=60) and server.poll() is None:
            raise AssertionError("the torch-free service did not become ready")
        assert server.poll() is None, server.stdout.read().decode()[-3000:] if server.stdout else ""
        texts = ["a red circle", "two blue squares on a grey background"]
        images = [make_image(i) for i in range(3)]
        payload = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, "PNG")
            payload.append(base64.b64encode(buf.getvalue()).decode())
        r = httpx.post(f"{base}/embed", json={"texts": texts, "images": payload}, timeout=60)
        assert r.status_code == 200, r.text
        got_t, got_i = np.array(r.json()["texts"]), np.array(r.json()["images"])
        want_t, want_i = tiny_model.encode_texts(texts), tiny_model.encode_images(images)
        assert (got_t * want_t).sum(1).min() >= 0.9999
        assert (got_i * want_i).sum(1).min() >= 0.9999
        hits = httpx.post(f"{base}/search/text", json={"text": "a red circle", "k": 5}, timeout=60).json()["results"]
        assert len(hits) == 5
    finally:
        server.terminate()
        server.wait(30)
