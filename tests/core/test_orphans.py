"""A pool worker watches its parent before it imports anything heavy, so a SIGKILL of the
parent while the worker is still importing ends the worker then, not after the import."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.builder.test_orphans import _alive, _children

ROOT = Path(__file__).resolve().parents[2]

PARENT = """
import multiprocessing, sys, time
from concurrent.futures import ProcessPoolExecutor
from clipsearch.core.orphans import init_after_watch, watched

if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=init_after_watch,
                               initargs=watched("tests.core.slow_import:init", "anything"))
    pool.submit(int, 1)
    print("submitted", flush=True)
    time.sleep(300)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_worker_still_importing_exits_with_its_killed_parent(tmp_path) -> None:
    script, mark = tmp_path / "parent.py", tmp_path / "importing"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLOW_IMPORT_MARK": str(mark)}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "submitted"
        for _ in range(1200):  # a hang guard while the worker starts
            if mark.exists() and mark.read_text():
                break
            time.sleep(0.1)
        worker = int(mark.read_text())  # it is importing the slow module now
        assert worker in _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for _ in range(300):  # the import would hold the worker for 60 s more
            if not _alive(worker):
                break
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
