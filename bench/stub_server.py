"""The service over real HTTP with its model stubbed: one process's own ceiling, end to end.

On a GPU the model's work is not what bounds one server process: its Python is (HTTP, the
framework, the batcher, tokenizing, base64; bench/NOTES.md). This serves the app with the
model calls and the JPEG decoder replaced by constants (`bench.common.stub_model`), so wrk
against it measures that bound on a machine without a GPU. `--root` serves the code of
another checkout, for before/after comparisons of a change end to end:

    git worktree add /tmp/before HEAD~1
    taskset -c 1 python bench/stub_server.py --port 8790 --root /tmp/before &   # the server on core 1
    taskset -c 0 wrk -t 1 -c 64 -d 6s -s bench/wrk.lua http://127.0.0.1:8790/embed  # the load on core 0

(`WRK_BODY_FILE`: one JSON body a line, see bench/wrk.lua.) Settings come from CLIPSEARCH_*
variables as usual (the model defaults to the tiny one, on the CPU; for the GPU's image path,
`CLIPSEARCH_IMAGE_DECODE=torch`, whose batched decode is stubbed too). Runs until killed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--root", type=Path, default=HERE, help="the checkout whose service to serve [this one]")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from bench.common import stub_model  # this checkout's benchmark code ...

    sys.path.insert(0, str(args.root.resolve()))  # ... serving the service of --root
    import uvicorn

    from clipsearch.service.http.app import create_app
    from clipsearch.service.settings import Settings
    from clipsearch.service.state import ServiceState

    os.environ.setdefault("CLIPSEARCH_MODEL", "clipsearch-tiny")
    os.environ.setdefault("CLIPSEARCH_DEVICE", "cpu")
    settings = Settings()
    state = ServiceState.build(settings)
    stub_model(state)
    print(f"serving {sys.modules['service'].__path__[0]} with the model stubbed on port {args.port}", flush=True)
    uvicorn.run(create_app(settings, state=state), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
