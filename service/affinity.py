"""Keeping a server process's threads on cores of its own (`CLIPSEARCH_WORKER_CPUS`).

One server process is bound by its own Python: the event loop, the batcher's stager thread
and the model thread hand work to each other under one GIL. Left to the OS, those threads
wake each other on different cores, often idle ones, and each hand-off pays a cross-core
wake-up and cold caches. Kept on one core, the same process answered ~1.3x the requests
in-process with the model stubbed (0.95-1.45x in six interleaved pairs, `bench/loop_cost.py
--stub-model`, bench/NOTES.md, session 9). On a GPU server,
where the model's math is on the GPU and its waits sleep (`service/cuda_wait.py`), a core or
two per worker process is all its Python can use anyway. On the CPU the model's own threads
get only these cores too, so it is off by default.

Each worker takes the first free block of cores by locking a file named after the block's
first core, in a directory per port; the lock lives as long as the process, so a worker that
uvicorn restarts takes the block its predecessor left. Linux only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_held: list[int] = []  # the lock files' descriptors, open (and locked) for the life of the process


def lock_dir_for(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"clipsearch-cpus-{port}"


def pin_process(per_process: int, lock_dir: Path) -> list[int] | None:
    """Move every thread of this process onto the first block of `per_process` allowed cores
    that no other process holds in `lock_dir`; threads started later inherit it. Returns the
    cores, or None (a warning is logged) when every block is taken or pinning is not possible."""
    if per_process <= 0:
        return None
    if not hasattr(os, "sched_setaffinity"):
        log.warning("worker_cpus: this platform cannot pin threads to cores; not pinned")
        return None
    import fcntl  # not on Windows, where there is no sched_setaffinity either

    allowed = sorted(os.sched_getaffinity(0))
    blocks = [allowed[i : i + per_process] for i in range(0, len(allowed) - per_process + 1, per_process)]
    if not blocks:
        log.warning("worker_cpus: %d is more than the %d cores this process may use; not pinned",
                    per_process, len(allowed))
        return None
    for block in blocks:
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_dir / f"cpu{block[0]}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:  # e.g. another user's directory of that name: serve, unpinned
            log.warning("worker_cpus: cannot use %s (%s); not pinned", lock_dir, exc)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _held.append(fd)
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(tid), block)
        log.info("pinned to cores %s", ",".join(map(str, block)))
        return block
    log.warning("worker_cpus: all %d blocks of %d cores are held by other workers; not pinned",
                len(blocks), per_process)
    return None
