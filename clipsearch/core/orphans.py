"""Worker processes that die with the process that started them, from their first moment.

A spawned worker unpickles its pool's initializer and arguments before it runs any of it,
and that means importing their modules (torch, the model seam): seconds in which a worker
whose parent was killed outright (SIGKILL leaves it no chance to stop its children) would
live on. `init_after_watch` is a light initializer: it starts watching the parent first,
then imports and calls the real one.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import threading
from typing import Any


def exit_with_parent() -> None:
    """In a worker process: exit as soon as the process that started it is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's end of the spawn pipe closes
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def watched(target: str, *args: Any) -> tuple[str, bytes]:
    """initargs for `init_after_watch`: the initializer `module:function` and its arguments,
    pickled here so that the worker imports their modules only once it watches its parent."""
    return target, pickle.dumps(args)


def init_after_watch(target: str, payload: bytes) -> None:
    """A process pool initializer: watch the parent, then import `target` and call it."""
    exit_with_parent()
    module, _, name = target.partition(":")
    getattr(importlib.import_module(module), name)(*pickle.loads(payload))
