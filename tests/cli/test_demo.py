"""The newcomer's path: the README's first command (shortened), a rerun that reuses its
work, the `serve` line it prints, and every curl line and the client example of the README,
run as written against the demo's own output (the client from a venv without torch)."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.test_client import readme_client_example
from tests.service.test_uploads import _readme_curl_lines

ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "clipsearch", "demo", "--n-train", "200", "--epochs", "1", "--no-serve"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The demo, run once in a fresh directory as a user runs it (its output in ./demo-output)."""
    cwd = tmp_path_factory.mktemp("user")
    r = subprocess.run(DEMO, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, r.stdout


def _serve_line(stdout: str) -> str:
    (line,) = [x.strip() for x in stdout.splitlines() if x.strip().startswith("clipsearch serve ")]
    return line


@pytest.mark.slow
def test_demo_runs_end_to_end(demo) -> None:
    cwd, out = demo
    for stage in ("[1/5] synthesizing", "[2/5] training", "[3/5]", "[4/5] building", "[5/5]", "t2i R@1",
                  "curl -s", "/search/text", "/ui in a browser"):
        assert stage in out, stage
    for name in ("train-output/best/open_clip_config.json", "index/CURRENT", "photo.jpg", "shape.png"):
        assert (cwd / "demo-output" / name).is_file(), name
    readme = (ROOT / "README.md").read_text()
    assert f".venv/bin/{_serve_line(out)}" in readme  # the README shows the line the demo prints


@pytest.mark.slow
def test_a_rerun_reuses_the_model_and_the_index(demo) -> None:
    cwd, _ = demo
    current = (cwd / "demo-output/index/CURRENT").read_text()
    weights = sorted((cwd / "demo-output/train-output/best").iterdir())
    r = subprocess.run(DEMO, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[2/5] reusing the model" in r.stdout and "[4/5] reusing the indexes" in r.stdout
    assert "training" not in r.stdout
    assert (cwd / "demo-output/index/CURRENT").read_text() == current
    assert sorted((cwd / "demo-output/train-output/best").iterdir()) == weights


@pytest.fixture(scope="module")
def served_demo(demo) -> Iterator[tuple[Path, int]]:
    """The demo's printed `clipsearch serve` line, run as printed with `--port 0` added."""
    cwd, out = demo
    argv = [sys.executable, "-m", *shlex.split(_serve_line(out)), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # ends if the server exits
            seen.append(line)
            if m := re.search(r"serving .* on http://[^ ]+:(\d+) ", line):
                port = int(m.group(1))
                break
        else:
            raise AssertionError("".join(seen)[-3000:])
        _wait_ready(port)
        yield cwd, port
    finally:
        proc.terminate()
        proc.wait(30)


def _wait_ready(port: int) -> None:
    import httpx

    for _ in range(600):  # a hang guard, not a time limit
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the served demo never became ready")


@pytest.mark.slow
def test_every_readme_curl_line_runs_against_the_demo(served_demo) -> None:
    cwd, port = served_demo
    lines = _readme_curl_lines()
    assert any("/v1/embeddings" in line for line in lines) and any("/search/similar" in line for line in lines)
    for line in lines:
        argv = [arg.replace("localhost:8000", f"127.0.0.1:{port}") for arg in shlex.split(line)]
        r = subprocess.run([*argv, "-w", "\n%{http_code}"], cwd=cwd, capture_output=True, text=True, timeout=120)
        body, _, status = r.stdout.rpartition("\n")
        assert status == "200" and len(body) > 2, (line, r.stdout[-500:], r.stderr)


@pytest.mark.slow
def test_the_client_installs_without_torch_and_runs_the_readme_example(served_demo, tmp_path) -> None:
    cwd, port = served_demo
    env_dir = tmp_path / "client-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT / "client")], capture_output=True,
                         text=True, env=clean, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    probe = ("import importlib.util as u; "
             "print([m for m in ('torch', 'fastapi', 'faiss', 'clipsearch') if u.find_spec(m)])")
    r = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=clean, cwd=tmp_path,
                       timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    example = readme_client_example().replace("localhost:8000", f"127.0.0.1:{port}")
    r = subprocess.run([str(python), "-c", example], capture_output=True, text=True, env=clean, cwd=cwd, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout.splitlines()
    assert len(printed) == 6 and printed[-1] in ("circle", "square", "star"), printed


def _busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_a_busy_port_stops_the_demo_before_it_trains(tmp_path) -> None:
    sock, port = _busy_port()
    with sock:
        r = subprocess.run([*DEMO[:-1], "--port", str(port)], capture_output=True, text=True, cwd=tmp_path, env=ENV,
                           timeout=120)
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "demo-output").exists()  # nothing was synthesized or trained


def test_serve_checks_the_port_and_the_index_before_loading_the_model(tmp_path) -> None:
    missing_model = f"local-dir:{tmp_path / 'no-model'}"  # loading it would fail with another message
    sock, port = _busy_port()
    with sock:
        r = subprocess.run([sys.executable, "-m", "clipsearch", "serve", "--model", missing_model, "--port", str(port)],
                           capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and f"port {port} on 0.0.0.0 is in use" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "clipsearch", "serve", "--model", missing_model, "--port", "0",
                        "--index-dir", str(tmp_path / "no-index")], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 2 and "index directory" in r.stderr and "does not exist" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
