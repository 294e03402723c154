"""Overload as an operator would test it before launch: goodput at twice the service's
capacity, with clients that retry at once on 429. Loopback only, bounded in time.

The queue holds `--max-queue` items per modality; with `--per-request` texts a request,
max_queue / per_request connections keep it exactly full. That many connections measure the
capacity (items/s answered 2xx); then `--factor` times as many (wrk is a closed loop: each
connection sends its next request the moment a 429 comes back) measure the goodput. It prints
the status tally, goodput, goodput / capacity, p50 / p99 of all answers, and the server's RSS
before and after. `--b` serves the same runs under other settings, interleaved (A, B, A, B):

    python bench/overload.py                                   # text /embed, 64 texts a request
    python bench/overload.py --connections 16 --storm 160      # capacity at 16, a storm 10x that
    python bench/overload.py --b CLIPSEARCH_OVERLOAD_WAIT_MS=0  # against rejecting at once

Needs `wrk` (Debian/Ubuntu: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Server, add_model_args, bench_texts, free_port  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_wrk(url: str, bodies_file: str, connections: int, duration: int, threads: int) -> dict:
    # No per-response Lua hook (WRK_COUNT_STATUSES): it slows wrk itself, and a slower client
    # makes a gentler storm than real clients do. Answers are told apart by wrk's own count
    # of non-2xx responses.
    env = {**os.environ, "WRK_BODY_FILE": bodies_file}
    script = str(ROOT / "bench/wrk.lua")
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--timeout", "30s",
                          "-s", script, url], env=env, capture_output=True, text=True, timeout=duration + 60,
                         check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    res = json.loads(line[len("WRKJSON "):])
    res["seconds"] = res["duration_us"] / 1e6
    res["ok"] = res["requests"] - res["non2xx"]
    return res


def measure(settings: dict[str, str], args: argparse.Namespace, bodies_file: str) -> dict:
    port = free_port()
    env = {"CLIPSEARCH_MODEL": args.model, "CLIPSEARCH_DEVICE": args.device, "CLIPSEARCH_LOG_LEVEL": "warning",
           "CLIPSEARCH_MAX_QUEUE": str(args.max_queue), **settings}
    argv = [sys.executable, "-m", "clipsearch", "serve", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/embed"
    capacity_conns = args.connections or max(1, args.max_queue // args.per_request)
    storm_conns = args.storm or capacity_conns * args.factor
    out: dict = {}
    with Server(argv, env, port) as srv:
        run_wrk(url, bodies_file, capacity_conns, 2, args.threads)  # warm-up
        out["rss_before_mb"] = rss_mb(srv.proc.pid)
        for name, conns in (("capacity", capacity_conns), ("overload", storm_conns)):
            res = run_wrk(url, bodies_file, conns, args.duration, args.threads)
            ok = res["ok"]
            res["connections"] = conns
            res["goodput_items_s"] = ok * args.per_request / res["seconds"]
            out[name] = res
        out["rss_after_mb"] = rss_mb(srv.proc.pid)
    out["goodput_ratio"] = out["overload"]["goodput_items_s"] / max(out["capacity"]["goodput_items_s"], 1e-9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--per-request", type=int, default=64, help="texts in each /embed request")
    ap.add_argument("--max-queue", type=int, default=2048, help="the service's CLIPSEARCH_MAX_QUEUE")
    ap.add_argument("--factor", type=int, default=2, help="overload connections = factor x capacity connections")
    ap.add_argument("--connections", type=int, default=0,
                    help="connections that measure capacity (default: max_queue / per_request, a full queue)")
    ap.add_argument("--storm", type=int, default=0, help="connections of the storm (default: factor x capacity)")
    ap.add_argument("--duration", type=int, default=6, help="seconds per measured run")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--rounds", type=int, default=1, help="A/B rounds (with --b)")
    ap.add_argument("--b", nargs="*", default=None, help="NAME=VALUE settings of a second configuration")
    args = ap.parse_args()
    texts = bench_texts(args.per_request * 64)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for i in range(0, len(texts), args.per_request):
            f.write(json.dumps({"texts": texts[i : i + args.per_request]}) + "\n")
    configs = {"A (defaults)": {}}
    if args.b is not None:
        configs["B " + " ".join(args.b)] = dict(kv.split("=", 1) for kv in args.b)
    capacity = args.connections or args.max_queue // args.per_request
    print(f"overload: {args.per_request} texts a request, max_queue {args.max_queue}, capacity at "
          f"{capacity} connections, storm at {args.storm or capacity * args.factor}, {args.duration} s runs, "
          f"cpus={os.cpu_count()}", flush=True)
    print("| configuration | connections | statuses | goodput items/s | vs capacity | p50 ms | p99 ms "
          "| RSS MB before → after |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    try:
        for _ in range(args.rounds):
            for name, settings in configs.items():
                r = measure(settings, args, f.name)
                for phase in ("capacity", "overload"):
                    p = r[phase]
                    ratio = "1.00" if phase == "capacity" else f"{r['goodput_ratio']:.2f}"
                    rss = f"{r['rss_before_mb']:.0f} → {r['rss_after_mb']:.0f}" if phase == "overload" else ""
                    statuses = f"{p['ok']} ok, {p['non2xx']} non-2xx, {p['errors']} errors"
                    print(f"| {name} | {p['connections']} | {statuses} | {p['goodput_items_s']:,.0f} | {ratio} "
                          f"| {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {rss} |", flush=True)
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    main()
