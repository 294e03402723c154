"""Service benchmark: batched vs batching off vs a naive per-request wrapper, in one run.

Starts each server on loopback, drives it with wrk (64 connections by default, bounded
in time), and prints throughput and p50/p95/p99 per configuration, plus the load
generator's own ceiling against /healthz and the bare model's encode rate measured
in this same run. Ratios are what to read; absolute numbers depend on the machine.

    python bench/serve_bench.py                      # CPU, tiny model
    python bench/serve_bench.py --model ViT-B-32 --device cuda --connections 256

Needs `wrk` (Debian/Ubuntu: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Server, add_model_args, bench_texts, decode_rate, free_port, jpeg_b64, rate, wrk  # noqa: E402


def bare_model_rate(model: str, pretrained: str | None, device: str, batch: int, image_b64: str,
                    seconds: float = 3.0) -> dict[str, float]:
    """Items/s of the model seam alone at the service's batch size: the ceiling to compare with."""
    import torch
    from PIL import Image

    from clipsearch.model.clip import load_model

    m = load_model(model, pretrained, device)
    tokens = m.tokenize([f"a photo of thing number {i}" for i in range(batch)])
    pil = Image.open(io.BytesIO(base64.b64decode(image_b64)))
    pixels = torch.stack([m.preprocess(pil) for _ in range(batch)])
    rates = {
        "text": rate(lambda: m.encode_tokens(tokens), batch, seconds),
        "image": rate(lambda: m.encode_pixels(pixels), batch, seconds),
        "image_decode_1core": decode_rate(m, image_b64, seconds / 2),
    }
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--image-size", default="640x480")
    ap.add_argument("--skip-images", action="store_true")
    ap.add_argument("--workers", type=int, default=1,
                    help="also run clipsearch with this many server processes (CLIPSEARCH_WORKERS), when > 1")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    w, h = (int(x) for x in args.image_size.split("x"))
    image = jpeg_b64((w, h))
    env = {"CLIPSEARCH_MODEL": args.model, "CLIPSEARCH_DEVICE": args.device, "CLIPSEARCH_LOG_LEVEL": "warning"}
    if args.pretrained:
        env["CLIPSEARCH_PRETRAINED"] = args.pretrained
    py = sys.executable
    load = {"connections": args.connections, "duration": args.duration, "threads": args.threads}
    payloads: dict[str, dict | list[dict]] = {"text": [{"texts": [t]} for t in bench_texts(4096)]}
    if not args.skip_images:
        payloads["image"] = {"images": [image]}

    results: list[dict] = []

    def record(config: str, path: str, res: dict) -> None:
        res.update(config=config, path=path)
        results.append(res)
        print(f"  {config:<28} {path:<6} {res['rps']:>9.1f} req/s  p50 {res['p50_ms']:>8.1f} ms  "
              f"p95 {res['p95_ms']:>8.1f} ms  p99 {res['p99_ms']:>8.1f} ms  non-2xx {res['non2xx']}", flush=True)

    servers = {
        "clipsearch (batched)": ([py, "-m", "clipsearch", "serve", "--host", "127.0.0.1"], {}),
        "clipsearch (batch size 1)": ([py, "-m", "clipsearch", "serve", "--host", "127.0.0.1"],
                                      {"CLIPSEARCH_MAX_BATCH_SIZE": "1"}),
        **({f"clipsearch ({args.workers} workers)": ([py, "-m", "clipsearch", "serve", "--host", "127.0.0.1"],
                                                     {"CLIPSEARCH_WORKERS": str(args.workers)})}
           if args.workers > 1 else {}),
        "naive per-request wrapper": ([py, "-m", "uvicorn", "bench.naive_app:app", "--host", "127.0.0.1",
                                       "--log-level", "warning"], {}),
    }
    print(f"clipsearch service benchmark: model={args.model} device={args.device} "
          f"connections={args.connections} duration={args.duration}s image={w}x{h} JPEG "
          f"cpus={os.cpu_count()} python={platform.python_version()}", flush=True)
    ceiling = None
    for config, (argv, extra) in servers.items():
        port = free_port()
        argv = [*argv, "--port", str(port)]
        with Server(argv, {**env, **extra}, port) as srv:
            srv.wait_workers(int(extra.get("CLIPSEARCH_WORKERS", "1")))
            if ceiling is None:
                ceiling = wrk(srv.base + "/healthz", None, **load)
                record("load generator ceiling", "GET /healthz", ceiling)
            for path, body in payloads.items():
                record(config, path, wrk(srv.base + "/embed", body, **load))
    batch = int(os.environ.get("CLIPSEARCH_MAX_BATCH_SIZE", "64"))
    bare = bare_model_rate(args.model, args.pretrained, args.device, batch, image)
    print("\nbare model (same process, same run): " + ", ".join(f"{k} {v:.0f}/s" for k, v in bare.items()))

    def get(config: str, path: str) -> dict:
        return next(r for r in results if r["config"] == config and r["path"] == path)

    print("\n| path | configuration | req/s | p50 ms | p95 ms | p99 ms | vs batch size 1 | vs naive | vs bare model |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in payloads:
        base1, naive = get("clipsearch (batch size 1)", path), get("naive per-request wrapper", path)
        for config in servers:
            r = get(config, path)
            print(f"| {path} | {config} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} "
                  f"| {r['rps'] / base1['rps']:.2f}x | {r['rps'] / naive['rps']:.2f}x | "
                  f"{r['rps'] / bare[path]:.2f} |")
    assert ceiling is not None
    print(f"\nload generator ceiling (wrk, GET /healthz, same connections): {ceiling['rps']:.0f} req/s")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "bare_model": bare}, indent=2))


if __name__ == "__main__":
    main()
