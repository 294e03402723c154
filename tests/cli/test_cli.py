"""`clipsearch serve` as a user runs it: a real uvicorn process on a loopback port."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import open_clip
import pytest
import torch

from tests.conftest import encode_image, make_image

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipsearch", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


COMMANDS = [(), ("serve",), ("index",), ("index", "build"), ("index", "info"), ("index", "verify"),
            ("index", "upgrade"), ("train",), ("evaluate",), ("predict",), ("classify",), ("similarity",), ("data",),
            ("data", "synth"), ("demo",)]


def _click_command(path: tuple[str, ...]):
    import typer.main

    from clipsearch.cli import app

    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


def test_every_command_has_help_that_explains_it() -> None:
    for cmd in COMMANDS:
        r = run_cli(*cmd, "--help", env={"COLUMNS": "300", "TERM": "dumb"})
        assert r.returncode == 0 and "Usage" in r.stdout, (cmd, r.stderr)
        summary = (_click_command(cmd).help or "").strip().splitlines()[0]
        words = " ".join(r.stdout.split()).replace("- ", "-")  # click wraps at hyphens
        assert summary and " ".join(summary.split()) in words, (cmd, summary)


def test_serve_has_a_flag_for_every_setting_but_secrets() -> None:
    from clipsearch.service.settings import CLI_ONLY_ENV, Settings

    r = run_cli("serve", "--help", env={"COLUMNS": "300", "TERM": "dumb"})
    for name in Settings.model_fields:
        flag = re.compile("--" + name.replace("_", "-") + r"(?![\w-])")  # --api-keys, not --api-keys-file
        assert bool(flag.search(r.stdout)) == (name not in CLI_ONLY_ENV), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model", "no-such-model"), "unknown open_clip model"),
        (("--model", "local-dir:/nonexistent"), "not found"),
        (("--index-dir", "/nonexistent/index"), "does not exist"),
        (("--max-batch-size", "0"), "invalid settings"),
        (("--workers", "2", "--model", "no-such-model"), "unknown open_clip model"),  # checked before any worker
        (("--workers", "2", "--index-dir", "/tmp", "--index-poll-s", "0"), "index_poll_s must be above 0"),
    ],
)
def test_serve_fails_fast_with_a_clear_message(args, message) -> None:
    r = run_cli("serve", *args, "--port", str(free_port()))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_served_vectors_equal_open_clip(tiny_spec: str) -> None:
    """Done-when: for a local-dir model made outside the project, /embed equals open_clip."""
    port = free_port()
    env = {**os.environ, "CLIPSEARCH_MODEL": tiny_spec, "CLIPSEARCH_PORT": str(port),
           "CLIPSEARCH_HOST": "127.0.0.1", "CLIPSEARCH_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "clipsearch", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "service did not become ready"
            time.sleep(0.3)
        image = make_image(42)
        body = {"texts": ["a red circle", "猫"], "images": [encode_image(image)]}
        r = httpx.post(f"{base}/embed", json=body, timeout=30)
        assert r.status_code == 200, r.text
        model, _, preprocess = open_clip.create_model_and_transforms(tiny_spec)
        tokenizer = open_clip.get_tokenizer(tiny_spec)
        import base64
        import io

        from PIL import Image

        decoded = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
        with torch.no_grad():
            t = model.eval().encode_text(tokenizer(body["texts"]))
            i = model.encode_image(preprocess(decoded).unsqueeze(0))
        t = (t / t.norm(dim=-1, keepdim=True)).numpy()
        i = (i / i.norm(dim=-1, keepdim=True)).numpy()
        got = r.json()
        assert (np.array(got["texts"]) * t).sum(axis=1).min() >= 0.9999
        assert (np.array(got["images"]) * i).sum() >= 0.9999
        assert "clipsearch_batch_size" in httpx.get(f"{base}/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_workers_share_the_port_and_report_metrics_together(tiny_spec: str, tiny_model, tmp_path: Path) -> None:
    """--workers 2: two processes with their own model answer on one port with the same
    vectors as open_clip, /metrics (whichever worker answers) counts every request, and a
    newly published index reaches every worker."""
    from clipsearch.index.format import ModelRef
    from tests.tiny import write_index_from_vectors

    ref = ModelRef(spec=tiny_spec, fingerprint=tiny_model.info.fingerprint)
    rng = np.random.default_rng(0)

    def publish(tag: str) -> str:
        vectors = rng.normal(size=(20, tiny_model.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        version_dir = write_index_from_vectors(tmp_path / "index", model=ref,
                                               image=(vectors, [{"id": f"{tag}-{i}"} for i in range(20)]))
        return version_dir.name

    first = publish("a")
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    env = {**os.environ, "CLIPSEARCH_MODEL": tiny_spec, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "clipsearch", "serve", "--workers", "2", "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu", "--log-level", "warning",
                             "--index-dir", str(tmp_path / "index"), "--index-poll-s", "0.5"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:  # both workers up: each writes its metrics files, named by its pid
            pids = {p.stem.rsplit("_", 1)[-1] for p in metrics_dir.glob("*.db")}
            try:
                ready = httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready and len(pids) == 2:
                break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, f"workers did not come up (pids {pids})"
            time.sleep(0.5)
        time.sleep(2)  # the second worker finishes its start-up

        def post(path: str, body: dict) -> dict:
            with httpx.Client(timeout=60) as client:  # a new connection each: the workers share them out
                r = client.post(f"{base}{path}", json=body)
                assert r.status_code == 200, r.text
                return r.json()

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            vectors = np.array([r["texts"][0] for r in pool.map(
                lambda _: post("/embed", {"texts": ["a red circle"]}), range(40))], np.float32)
            model = open_clip.create_model_and_transforms(tiny_spec)[0].eval()
            with torch.no_grad():
                want = model.encode_text(open_clip.get_tokenizer(tiny_spec)(["a red circle"]))
            want = (want / want.norm(dim=-1, keepdim=True)).numpy()[0]
            assert (vectors @ want).min() >= 0.9999
            text = httpx.get(f"{base}/metrics", timeout=10).text
            counted = [line for line in text.splitlines()
                       if line.startswith("clipsearch_requests_total{") and 'route="/embed"' in line]
            assert len(counted) == 1 and float(counted[0].rsplit(" ", 1)[1]) == 40.0, counted
            assert "clipsearch_model_info{" in text and 'spec="local-dir:' in text

            def versions() -> set[str]:
                return {r["index_version"] for r in pool.map(
                    lambda _: post("/search/text", {"text": "x", "k": 1}), range(16))}

            assert versions() == {first}
            second = publish("b")
            deadline = time.monotonic() + 30
            while (seen := versions()) != {second}:  # every worker polls and swaps on its own
                assert time.monotonic() < deadline, seen
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_offline_commands_fail_in_one_line_naming_the_cause(tmp_path, tiny_spec) -> None:
    """A missing or non-image file, FAISS missing, a checkpoint directory without `local-dir:`:
    a one-line reason and a non-zero exit, never a traceback."""
    (tmp_path / "notes.txt").write_text("not an image")
    no_faiss = tmp_path / "no_faiss"
    no_faiss.mkdir()
    (no_faiss / "faiss.py").write_text("raise ImportError('No module named faiss')\n")
    corpus = tmp_path / "c.tsv"
    corpus.write_text(f"a caption\t{encode_image(make_image(1))}\n")
    model_dir = tiny_spec.removeprefix("local-dir:")
    cases = [
        (["classify", "--image", str(tmp_path / "missing.jpg"), "--labels", "a,b", "--model", tiny_spec],
         {}, "missing.jpg: No such file"),
        (["classify", "--image", str(tmp_path / "notes.txt"), "--labels", "a,b", "--model", tiny_spec],
         {}, "notes.txt: bytes are not a recognised image format"),
        (["similarity", "--text", "a", "--image", str(tmp_path / "notes.txt"), "--model", tiny_spec],
         {}, "notes.txt: bytes are not a recognised image format"),
        (["index", "build", "--input", str(corpus), "--output", str(tmp_path / "i"), "--model", tiny_spec],
         {"PYTHONPATH": str(no_faiss)}, "FAISS is not installed: pip install 'clipsearch[cpu]'"),
        (["evaluate", "--data", str(corpus), "--model", model_dir], {}, f"write local-dir:{model_dir}"),
    ]
    for args, env, message in cases:
        r = run_cli(*args, "--device", "cpu", env=env)
        assert r.returncode in (1, 2), (args, r.stdout, r.stderr)
        assert message in r.stderr.strip().splitlines()[-1], (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
