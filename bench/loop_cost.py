"""Event-loop cost per POST /embed request, measured in-process: no HTTP, no wrk noise.

The service's text path is bound by Python on the event loop (one GIL), so the number that
matters is microseconds of loop time per request. This calls the ASGI app directly from
`--clients` concurrent callers (distinct texts), with the real batcher, and prints
requests/s and µs of wall time per request; with `--stub-model` the model returns
constant vectors, which leaves the HTTP-framework + batcher + tokenizer cost alone.
Every answer must be a 200. Compare runs of this script taken on the same machine,
interleaved, and pinned to one core for A/B (`taskset -c 1 python bench/loop_cost.py ...`):
on the 2-core CI machine unpinned runs spread ±20 %, pinned ones ±8 % (bench/NOTES.md).

    python bench/loop_cost.py                    # real tiny model, batched
    python bench/loop_cost.py --stub-model       # framework + batcher only
    python bench/loop_cost.py --max-batch-size 1 # batching off
    python bench/loop_cost.py --profile          # cProfile of the event loop in the measured run
    python bench/loop_cost.py --path image --stub-model  # one 640x480 JPEG a request, the GPU's
                                                 # per-batch JPEG path with decoding stubbed
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import bench_texts, jpeg_b64, stub_model  # noqa: E402


def _scope(body: bytes) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/embed", "raw_path": b"/embed", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {},
    }


async def _client(app, bodies: list[bytes], offset: int, n: int, statuses: list[int]) -> None:
    for j in range(n):
        body = bodies[(offset + j) % len(bodies)]
        sent = False
        done = asyncio.Event()

        async def receive(body: bytes = body, done: asyncio.Event = done) -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()  # the client stays until the response is complete
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(_scope(body), receive, send)
        done.set()


async def _run(args: argparse.Namespace, profiler: cProfile.Profile | None = None) -> None:
    from clipsearch.service.http.app import create_app
    from clipsearch.service.settings import Settings
    from clipsearch.service.state import ServiceState

    image = args.path == "image"
    # Images: the path a GPU takes (prepare threads check base64 and JPEG headers, the batch
    # decodes in one call), so the event loop's share is what a GPU server pays per request.
    settings = Settings(model=args.model, device="cpu", max_batch_size=args.max_batch_size,
                        **({"image_decode": "torch"} if image else {}))
    state = ServiceState.build(settings)
    if args.stub_model:
        stub_model(state)
    app = create_app(settings, state=state)
    app.state.service = state
    if image:
        bodies = [orjson.dumps({"images": [jpeg_b64((640, 480))]})]
    else:
        bodies = [orjson.dumps({"texts": [t]}) for t in bench_texts(4096)]
    await state.engine.start()
    gc.collect()
    gc.freeze()
    try:
        for n in (max(1, args.requests // 10), args.requests):  # warm-up, then the measured run
            if profiler is not None and n == args.requests:
                profiler.enable()  # the measured run only: no imports or start-up in the profile
            statuses: list[int] = []
            start, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(_client(app, bodies, i * 997, n, statuses) for i in range(args.clients)))
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            if profiler is not None:
                profiler.disable()
            if set(statuses) != {200}:
                sys.exit(f"non-200 answers: {sorted(set(statuses))}")
        stats = (state.engine.image if image else state.engine.text).stats
        print(f"path={args.path} clients={args.clients} max_batch_size={args.max_batch_size} "
              f"stub_model={args.stub_model}: "
              f"{len(statuses) / wall:.0f} req/s, {wall / len(statuses) * 1e6:.1f} us per request, "
              f"{cpu / wall:.2f} cores busy, mean batch {stats.rows / max(stats.batches, 1):.1f}")
    finally:
        await state.engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="clipsearch-tiny")
    ap.add_argument("--path", default="text", choices=["text", "image"])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=200, help="requests per client in the measured phase")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--stub-model", action="store_true", help="constant vectors instead of the model")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the run")
    args = ap.parse_args()
    import uvloop

    if not args.profile:
        uvloop.run(_run(args))
        return
    profiler = cProfile.Profile()
    uvloop.run(_run(args, profiler))
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
