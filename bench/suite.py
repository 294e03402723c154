"""The benchmark suite: every serving path at 1, 16 and 256 clients, against the bare model
and a naive per-request wrapper, in one run. One command, one table.

For each path (text /embed, image /embed of a base64 JPEG, text->image /search/text over
an index of `--index-size` vectors; optionally `text-multi` / `image-multi`, /embed with
`--per-request` items in each request, the way a bulk caller sends them) and each client count, it prints the service's
throughput and p50/p99, the naive wrapper's (bench/naive_app.py: one encode call per
request, the way hand-written wrappers do it), the bare model's items/s at a batch size
equal to the client count (the best batch the service could form; measured in this same
run, in this process), and the ratios. Load comes from wrk on loopback, bounded in time;
the load generator's own ceiling against /healthz is measured first, at each client count.

    python bench/suite.py                                   # CPU, tiny model, 1M-vector index
    python bench/suite.py --model ViT-B-32 --device cuda    # GPU, random weights
    python bench/suite.py --model ViT-B-32 --device cuda --image-decode torch --max-batch-size 256
    python bench/suite.py --index-size 100000 --duration 3  # quicker
    python bench/suite.py --paths image,image-multi --per-request 16  # images/s of bulk callers

On a GPU the service and the bare model both replay CUDA graphs (`--no-cuda-graphs`: both
eager), and with `--image-decode torch` the line under the table gives the ceiling the
image path is held to: base64 + batched nvJPEG decode + tensor preprocessing, in this run.

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
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    Server,
    add_model_args,
    bench_texts,
    build_index,
    decode_rate,
    free_port,
    jpeg_b64,
    rate,
    torch_decode_rate,
    wrk,
)


def bare_rates(model, index_dir: Path | None, batches: list[int], image_b64: str,
               seconds: float) -> dict[str, dict[int, float]]:
    """Items/s of the model seam (and the index) alone, per batch size: what the service is compared with."""
    import torch
    from PIL import Image

    from clipsearch.index.format import current_version_dir
    from clipsearch.index.search import SearchParams, choose_backend, load_index_set

    version = current_version_dir(index_dir) if index_dir is not None else None
    # The backend the service picks by default (torch on a GPU without faiss-gpu).
    index = None if version is None else load_index_set(
        version, fingerprint=model.info.fingerprint, dim=model.dim,
        backend=choose_backend("auto", model.info.device), device=model.info.device).get("image")
    texts = bench_texts(max(batches))
    pixel = model.preprocess(Image.open(io.BytesIO(base64.b64decode(image_b64))))
    out: dict[str, dict[int, float]] = {"text": {}, "image": {}, "search": {}, "decode": {}}
    for b in batches:
        tokens = model.tokenize(texts[:b])
        pixels = pixel.unsqueeze(0).repeat(b, 1, 1, 1)
        out["text"][b] = rate(lambda t=tokens: model.encode_tokens(t), b, seconds)
        out["image"][b] = rate(lambda p=pixels: model.encode_pixels(p), b, seconds)
        if index is not None:
            queries = model.encode_tokens(tokens)
            out["search"][b] = rate(lambda q=queries, i=index: i.search(q, 10, SearchParams()), b, seconds)
        del pixels
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    out["decode"] = dict.fromkeys(batches, decode_rate(model, image_b64, seconds))
    out["torch_decode"] = {64: torch_decode_rate(model, image_b64, 64, seconds) or float("nan")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--clients", default="1,16,256", help="comma-separated concurrent client counts")
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured wrk run")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (at most the client count)")
    ap.add_argument("--index-size", type=int, default=1_000_000)
    ap.add_argument("--image-size", default="640x480", help="JPEG sent to image /embed")
    ap.add_argument("--paths", default="text,image,search",
                    help="comma-separated: text, image, search, text-multi, image-multi")
    ap.add_argument("--per-request", type=int, default=16, help="items in each request of the *-multi paths")
    ap.add_argument("--image-decode", default="exact", choices=["exact", "draft", "torch"])
    ap.add_argument("--max-batch-size", type=int, default=64, help="the service's CLIPSEARCH_MAX_BATCH_SIZE")
    ap.add_argument("--workers", type=int, default=1, help="the service's CLIPSEARCH_WORKERS (server processes)")
    ap.add_argument("--no-cuda-graphs", action="store_true",
                    help="on a GPU, serve and measure the bare model without CUDA graphs")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")

    from clipsearch.model.clip import load_model

    clients = [int(c) for c in args.clients.split(",")]
    paths = args.paths.split(",")
    per = args.per_request
    items = {p: per if p.endswith("-multi") else 1 for p in paths}  # per request
    w, h = (int(x) for x in args.image_size.split("x"))
    image = jpeg_b64((w, h))
    texts = bench_texts(4096)
    model = load_model(args.model, args.pretrained, args.device)
    graphs = model.device.type == "cuda" and not args.no_cuda_graphs
    if graphs:  # the bare model gets what the service gets
        from clipsearch.service.state import GRAPH_MAX_BATCH

        model.capture_graphs(min(args.max_batch_size, GRAPH_MAX_BATCH))
    print(f"clipsearch benchmark suite: model={args.model} device={model.info.device} dtype={model.info.dtype} "
          f"dim={model.dim} index={args.index_size:,} flat vectors image={w}x{h} JPEG decode={args.image_decode} "
          f"max_batch={args.max_batch_size} cuda_graphs={graphs} workers={args.workers} "
          f"duration={args.duration}s/run cpus={os.cpu_count()} python={platform.python_version()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="clipsearch-suite-"))
    try:
        index_dir = work / "index"
        if "search" in paths:
            took = build_index(index_dir, model, args.index_size)
            print(f"building a {args.index_size:,}-vector index: {took:.1f} s", flush=True)
        bodies = {
            "text": ("/embed", [{"texts": [t]} for t in texts]),
            "image": ("/embed", [{"images": [image]}]),
            "search": ("/search/text", [{"text": t, "k": 10} for t in texts]),
            "text-multi": ("/embed", [{"texts": texts[i : i + per]} for i in range(0, len(texts) - per + 1, per)]),
            "image-multi": ("/embed", [{"images": [image] * per}]),
        }
        queue = max(4096, 2 * max(clients) * max(items.values()))
        env = {"CLIPSEARCH_MODEL": args.model, "CLIPSEARCH_DEVICE": args.device, "CLIPSEARCH_LOG_LEVEL": "warning",
               "CLIPSEARCH_IMAGE_DECODE": args.image_decode, "CLIPSEARCH_MAX_QUEUE": str(queue),
               "CLIPSEARCH_MAX_ITEMS_PER_REQUEST": str(max(64, per)),
               "CLIPSEARCH_MAX_BATCH_SIZE": str(args.max_batch_size), "CLIPSEARCH_CUDA_GRAPHS": str(graphs).lower(),
               "CLIPSEARCH_WORKERS": str(args.workers)}
        if args.pretrained:
            env["CLIPSEARCH_PRETRAINED"] = args.pretrained
        if "search" in paths:
            env["CLIPSEARCH_INDEX_DIR"] = str(index_dir)
        py = sys.executable
        servers = {"clipsearch": [py, "-m", "clipsearch", "serve", "--host", "127.0.0.1"]}
        if not args.skip_naive:
            servers["naive"] = [py, "-m", "uvicorn", "bench.naive_app:app", "--host", "127.0.0.1", "--log-level",
                                "warning"]
        results: dict[tuple[str, str, int], dict] = {}
        naive_paths = [p for p in paths if not p.endswith("-multi")]  # one item per request is what it serves
        ceiling: dict[int, dict] = {}
        for name, argv in servers.items():
            port = free_port()
            with Server([*argv, "--port", str(port)], env, port) as srv:
                srv.wait_ready("/readyz" if name == "clipsearch" else "/healthz", timeout=600)
                if name == "clipsearch" and args.workers > 1:
                    srv.wait_workers(args.workers)
                for c in clients:
                    load = {"connections": c, "duration": args.duration, "threads": min(args.threads, c)}
                    if name == "clipsearch":
                        ceiling[c] = wrk(srv.base + "/healthz", None, **load)
                    for path in paths if name == "clipsearch" else naive_paths:
                        route, body = bodies[path]
                        try:
                            r = wrk(srv.base + route, body, **load)
                        except RuntimeError as exc:  # the naive wrapper has fallen over under load (seen on a GPU)
                            print(f"  {name:<10} {path:<6} {c:>4} clients: no result ({str(exc).strip()[:120]})")
                            r = {"requests": 0, "rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "non2xx": 0, "errors": -1}
                        results[(name, path, c)] = r
                        print(f"  {name:<10} {path:<6} {c:>4} clients {r['rps']:>9.1f} req/s  "
                              f"p50 {r['p50_ms']:>8.1f} ms  p99 {r['p99_ms']:>8.1f} ms  non-2xx {r['non2xx']}  "
                              f"errors {r['errors']}", flush=True)
        batches = sorted({min(c * n, args.max_batch_size) if n > 1 else c for c in clients for n in items.values()})
        bare = bare_rates(model, index_dir if "search" in paths else None, batches, image, seconds=2.0)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\n| path | clients | clipsearch req/s | items/s | p50 ms | p99 ms | naive req/s | naive p99 ms "
          "| vs naive | bare model items/s at batch = clients x items | vs bare | load generator ceiling req/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for path in paths:
        n_items = items[path]
        for c in clients:
            r = results[("clipsearch", path, c)]
            n = results.get(("naive", path, c))
            batch = min(c * n_items, args.max_batch_size) if n_items > 1 else c
            b = bare[path.removesuffix("-multi")].get(batch, float("nan"))
            if n is None:
                naive = "- | - | -"
            elif n["requests"] == 0:  # nothing finished within the run: every request took longer
                naive = f"0 | > {args.duration * 1000} | -"
            else:
                naive = f"{n['rps']:.0f} | {n['p99_ms']:.1f} | {r['rps'] / n['rps']:.2f}x"
            print(f"| {path} | {c} | {r['rps']:.0f} | {r['rps'] * n_items:.0f} | {r['p50_ms']:.1f} "
                  f"| {r['p99_ms']:.1f} | {naive} | {b:.0f} | {r['rps'] * n_items / b:.2f} | {ceiling[c]['rps']:.0f} |")
    if "image" in paths or "image-multi" in paths:
        pil_rate = next(iter(bare["decode"].values()))
        print(f"\nimage decode + preprocess on one core (PIL, exact): {pil_rate:.0f} images/s")
        where = "nvJPEG" if model.device.type == "cuda" else "libjpeg-turbo, one core"
        print(f"image decode + preprocess, torch path, batches of 64 on {model.device.type} ({where}): "
              f"{bare['torch_decode'][64]:.0f} images/s")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()},
            "results": [{"server": k[0], "path": k[1], "clients": k[2], **v} for k, v in results.items()],
            "ceiling": {str(c): v for c, v in ceiling.items()},
            "bare": {p: {str(b): v for b, v in d.items()} for p, d in bare.items()},
        }, indent=2))


if __name__ == "__main__":
    main()
