"""Worker processes of the index builder die with it, also when it is killed with SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import encode_image, make_image

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    """The multiprocessing workers whose parent is `pid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("flag", ["--workers", "--processes"])
def test_workers_exit_when_the_builder_is_killed(tmp_path, tiny_spec, flag) -> None:
    image = encode_image(make_image(3, (320, 240)))
    corpus = tmp_path / "c.tsv"
    corpus.write_text("".join(f"photo {i}\t{image}\n" for i in range(3000)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipsearch", "index", "build", "--input", str(corpus), "--output",
         str(tmp_path / "index"), "--model", tiny_spec, "--index-type", "flat", flag, "2", "--no-progress",
         "--shard-size", "256"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        children: list[int] = []
        while len(children) < 2 and proc.poll() is None and time.monotonic() < deadline:
            children = _children(proc.pid)
            time.sleep(0.05)
        assert len(children) == 2, f"the build started {children} workers (exit code {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 60
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [c for c in children if _alive(c)], "workers outlived the killed builder"
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the build's process group
            os.killpg(proc.pid, signal.SIGKILL)
