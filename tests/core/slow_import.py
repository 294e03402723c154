"""A module that takes a minute to import, standing in for torch on a busy machine: the test
of `init_after_watch` kills the parent while a worker imports it. It says when it has begun
by writing its pid to the file named by SLOW_IMPORT_MARK."""

import os
import time
from pathlib import Path

Path(os.environ["SLOW_IMPORT_MARK"]).write_text(str(os.getpid()))
time.sleep(60)


def init(*args: object) -> None:
    pass
