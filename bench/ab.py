"""A/B benchmark: the same service under two settings, on one path, in one run.

The before/after ratio of one change, measured the way bench/NOTES.md asks: both
configurations run on this machine in the same run, in interleaved rounds (A, B, A, B ...)
so that drift on a shared machine hits both, each round on a fresh server. wrk drives each
path on loopback, bounded in time; the load generator's ceiling against /healthz is
measured in the same run. Prints every round, then per client count the medians and the
ratios B/A (throughput; p50 and p99 latency).

    # one server process vs two
    python bench/ab.py --path text --a CLIPSEARCH_WORKERS=1 --b CLIPSEARCH_WORKERS=2
    # exact vs torch image decoding
    python bench/ab.py --path image --a CLIPSEARCH_IMAGE_DECODE=exact --b CLIPSEARCH_IMAGE_DECODE=torch

With several workers (Linux) each round also prints how wrk's connections were spread over
the worker processes, counted halfway through the run.

Needs `wrk` (Debian/Ubuntu: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Server, add_model_args, bench_texts, build_index, free_port, jpeg_b64, wrk  # noqa: E402


def connections_per_worker(port: int, server_pid: int) -> list[int]:
    """Established connections on the service's port held by each of its worker processes,
    fewest first (the server's own process holds none)."""
    from clipsearch.listen import port_sockets

    counts = Counter(pid for pids in port_sockets(port, "ESTABLISHED").values() for pid in pids - {server_pid})
    return sorted(counts.values())


def _assignments(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name.startswith("CLIPSEARCH_"):
            sys.exit(f"expected CLIPSEARCH_NAME=value, got {v!r}")
        out[name] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--path", choices=["text", "image", "search"], default="search",
                    help="text /embed, image /embed (one base64 JPEG), or /search/text")
    ap.add_argument("--a", nargs="+", default=[], metavar="CLIPSEARCH_X=v", help="settings of configuration A")
    ap.add_argument("--b", nargs="+", default=[], metavar="CLIPSEARCH_X=v", help="settings of configuration B")
    ap.add_argument("--set", nargs="+", default=[], metavar="CLIPSEARCH_X=v", help="settings of both")
    ap.add_argument("--clients", default="1,64", help="comma-separated concurrent client counts")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds, interleaved")
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured wrk run")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (at most the client count)")
    ap.add_argument("--index-size", type=int, default=100_000, help="vectors in the image index (--path search)")
    ap.add_argument("--image-size", default="640x480", help="JPEG sent to image /embed")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    configs = {"A": _assignments(args.a), "B": _assignments(args.b)}
    common = {"CLIPSEARCH_MODEL": args.model, "CLIPSEARCH_DEVICE": args.device, "CLIPSEARCH_LOG_LEVEL": "warning",
              "CLIPSEARCH_MAX_QUEUE": "4096", **_assignments(args.set)}
    if args.pretrained:
        common["CLIPSEARCH_PRETRAINED"] = args.pretrained
    clients = [int(c) for c in args.clients.split(",")]
    w, h = (int(x) for x in args.image_size.split("x"))
    route, body = {
        "text": ("/embed", [{"texts": [t]} for t in bench_texts(4096)]),
        "image": ("/embed", [{"images": [jpeg_b64((w, h))]}]),
        "search": ("/search/text", [{"text": t, "k": 10} for t in bench_texts(4096)]),
    }[args.path]
    print(f"A/B on {args.path}: A={configs['A']} B={configs['B']} both={common} clients={clients} "
          f"rounds={args.rounds} duration={args.duration}s cpus={os.cpu_count()} "
          f"python={platform.python_version()}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="clipsearch-ab-"))
    runs: dict[tuple[str, int], list[dict]] = {}
    ceiling: dict[int, list[float]] = {}
    try:
        if args.path == "search":
            from clipsearch.model.clip import load_model

            took = build_index(work / "index", load_model(args.model, args.pretrained, "cpu"), args.index_size)
            print(f"built a {args.index_size:,}-vector index in {took:.1f} s", flush=True)
            common["CLIPSEARCH_INDEX_DIR"] = str(work / "index")
        argv = [sys.executable, "-m", "clipsearch", "serve", "--host", "127.0.0.1"]
        for rnd in range(args.rounds):
            for name, settings in configs.items():
                port = free_port()
                with Server([*argv, "--port", str(port)], {**common, **settings}, port) as srv:
                    srv.wait_ready("/readyz", timeout=600)
                    workers = int({**common, **settings}.get("CLIPSEARCH_WORKERS", "1"))
                    srv.wait_workers(workers)
                    for c in clients:
                        load = {"connections": c, "duration": args.duration, "threads": min(args.threads, c)}
                        if name == "A":
                            ceiling.setdefault(c, []).append(wrk(srv.base + "/healthz", None, **load)["rps"])
                        spread: list[int] = []
                        if workers > 1 and sys.platform.startswith("linux"):
                            count = functools.partial(connections_per_worker, port, srv.proc.pid)
                            threading.Timer(args.duration / 2, lambda into=spread, f=count: into.extend(f())).start()
                        r = wrk(srv.base + route, body, **load)
                        runs.setdefault((name, c), []).append(r)
                        print(f"  round {rnd + 1} {name} {c:>4} clients {r['rps']:>9.1f} req/s  "
                              f"p50 {r['p50_ms']:>7.2f} ms  p99 {r['p99_ms']:>7.2f} ms  non-2xx {r['non2xx']}  "
                              f"errors {r['errors']}" + (f"  connections per worker {spread}" if spread else ""),
                              flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(name: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(name, c)])

    print(f"\nmedians of {args.rounds} rounds; ratios B/A (throughput: higher is better, latency: lower is better)")
    print("| clients | A req/s | B req/s | B/A req/s | A p50 ms | B p50 ms | B/A p50 | A p99 ms | B p99 ms | B/A p99 "
          "| load generator ceiling req/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in clients:
        cells = []
        for key in ("rps", "p50_ms", "p99_ms"):
            a, b = med("A", c, key), med("B", c, key)
            cells.append(f"{a:.1f} | {b:.1f} | {b / a:.2f}")
        print(f"| {c} | {' | '.join(cells)} | {statistics.median(ceiling[c]):.0f} |")


if __name__ == "__main__":
    main()
