"""Worker processes take blocks of cores of their own (`CLIPSEARCH_WORKER_CPUS`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs Linux and two cores to give")

# A process that pins itself, starts a thread, reports both threads' cores, then holds its
# block until its stdin closes.
_CHILD = """
import os, sys, threading
from pathlib import Path
from service.affinity import pin_process
block = pin_process(1, Path(sys.argv[1]))
seen = []
t = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))
t.start(); t.join()
print(block, sorted(os.sched_getaffinity(0)), seen[0], flush=True)
sys.stdin.read()
"""


def _spawn(lock_dir: Path, children: list[subprocess.Popen[str]]) -> str:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(lock_dir)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    children.append(child)
    assert child.stdout is not None
    return child.stdout.readline().strip()


def test_each_process_takes_a_free_core_and_a_finished_ones_core_is_taken_again(tmp_path: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    held = [f"[{c}] [{c}] [{c}]" for c in allowed]  # the block, the process's cores, a new thread's cores
    children: list[subprocess.Popen[str]] = []
    try:
        assert [_spawn(tmp_path, children) for _ in allowed] == held  # one core each, in order
        assert _spawn(tmp_path, children) == f"None {allowed} {allowed}"  # none left: not pinned
        first = children[0]
        assert first.stdin is not None
        first.stdin.close()  # it exits, and its lock goes with it
        first.wait(timeout=30)
        assert _spawn(tmp_path, children) == held[0]
    finally:
        for child in children:
            if child.poll() is None:
                assert child.stdin is not None
                child.stdin.close()
                child.wait(timeout=30)


def test_what_cannot_be_pinned_is_served_unpinned(tmp_path: Path, caplog) -> None:
    """More cores than there are, or a lock directory that cannot be made: a warning, no pin,
    and the process's cores unchanged (the test process itself: nothing here pins it)."""
    from service.affinity import pin_process

    before = os.sched_getaffinity(0)
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the directory would go
    assert pin_process(len(before) + 1, tmp_path / "locks") is None
    assert pin_process(1, blocked / "locks") is None
    assert pin_process(0, tmp_path / "locks") is None
    assert os.sched_getaffinity(0) == before
    assert "more than the" in caplog.text and "cannot use" in caplog.text
