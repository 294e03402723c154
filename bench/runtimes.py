"""The model's runtimes side by side, in one run on this machine: torch eager, ONNX Runtime
fp32 and int8, and OpenVINO (each from `clipsearch export` of the same checkpoint).

1. Bare towers: images/s and texts/s at batch 1, 8 and 32 (the ratio to torch eager beside).
2. The service: `/embed` of one text or one JPEG per request at 1, 16 and 64 connections
   (wrk), one server per runtime, alternated.
3. With `--demo DIR` (the output of `clipsearch demo --no-serve`): the demo model's held-out
   retrieval R@1/5/10 both ways with each runtime, int8 beside fp32.

    python bench/runtimes.py [--model ViT-B-32] [--pretrained none] [--seconds 3] [--wrk-seconds 8]
        [--skip-service] [--threads N] [--demo demo-output]

ViT-B-32 with random weights needs no download: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Server, bench_texts, free_port, jpeg_b64, rate, wrk  # noqa: E402
from clipsearch.model.export import export  # noqa: E402
from clipsearch.model.load import load_model  # noqa: E402


def runtimes(spec: str, pretrained: str | None, workdir: Path) -> dict[str, tuple[str, str | None]]:
    """runtime name -> (spec, pretrained) to load it."""
    out = {"torch eager": (spec, pretrained)}
    fp32 = export(spec, workdir / "fp32", pretrained=pretrained)
    int8 = export(spec, workdir / "int8", pretrained=pretrained, quantize="int8")
    out["onnxruntime fp32"] = (f"onnx:{fp32}", None)
    out["onnxruntime int8"] = (f"onnx:{int8}", None)
    try:
        import openvino  # noqa: F401

        out["openvino fp32"] = (f"openvino:{fp32}", None)
    except ImportError:
        print("openvino not installed: its rows are left out")
    return out


def towers(loaded: dict[str, tuple[str, str | None]], seconds: float, rounds: int = 3) -> None:
    """Every runtime loaded at once, measured in `rounds` alternating turns of seconds/rounds
    each per cell, so that a slow minute of the machine falls on all of them alike."""
    texts = bench_texts(32)
    models = {name: load_model(spec, pretrained, device="cpu") for name, (spec, pretrained) in loaded.items()}
    print("\n| runtime | tower | batch 1 /s | batch 8 /s | batch 32 /s | × torch at 1 | × torch at 32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for tower in ("image", "text"):
        work: dict[str, list] = {}
        for name, model in models.items():
            calls = []
            for batch in (1, 8, 32):
                if tower == "image":
                    pixels = model.preprocess(Image.new("RGB", model.image_size))
                    pixels = torch.stack([pixels] * batch) if isinstance(pixels, torch.Tensor) else \
                        np.stack([pixels] * batch)
                    calls.append(lambda p=pixels, m=model: m.encode_pixels(p))
                else:
                    tokens = model.tokenize(texts[:batch])
                    calls.append(lambda t=tokens, m=model: m.encode_tokens(t))
            work[name] = calls
        done = {name: [0.0, 0.0, 0.0] for name in models}  # items/s summed over the rounds
        for _ in range(rounds):
            for name, calls in work.items():
                for i, (call, batch) in enumerate(zip(calls, (1, 8, 32), strict=True)):
                    done[name][i] += rate(call, batch, seconds / rounds) / rounds
        base = done[next(iter(done))]
        for name, rates in done.items():
            print(f"| {name} | {tower} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[2]:.1f} | "
                  f"{rates[0] / base[0]:.2f} | {rates[2] / base[2]:.2f} |")


def service(loaded: dict[str, tuple[str, str | None]], seconds: int) -> None:
    image = jpeg_b64((640, 480))
    bodies = {"texts": [{"texts": [t]} for t in bench_texts(256)], "images": {"images": [image]}}
    print("\n| runtime | request | 1 conn req/s (CPU-ms/req) | 16 conn | 64 conn |")
    print("|---|---|---:|---:|---:|")
    for name, (spec, pretrained) in loaded.items():
        port = free_port()
        argv = [sys.executable, "-m", "clipsearch", "serve", "--port", str(port), "--host", "127.0.0.1",
                "--device", "cpu", "--log-level", "warning", "--model", spec, "--image-decode", "draft"]
        if pretrained:
            argv += ["--pretrained", pretrained]
        with Server(argv, dict(os.environ), port) as server:
            for kind, body in bodies.items():
                cells = []
                for c in (1, 16, 64):
                    res = wrk(f"{server.base}/embed", body, connections=c, duration=seconds, threads=min(c, 2),
                              cpu_pid=server.proc.pid)
                    cells.append(f"{res['rps']:.0f} ({1000 * res['cpu_s'] / max(res['requests'], 1):.1f})")
                print(f"| {name} | one {kind[:-1]} | " + " | ".join(cells) + " |", flush=True)


def demo_recall(demo: Path, workdir: Path) -> None:
    from clipsearch.finetune.evaluate import evaluate
    from clipsearch.inputs.pairs import PairFile

    spec = f"local-dir:{demo / 'train-output' / 'best'}"
    pairs = PairFile(demo / "data" / "valid.tsv")
    specs = {"torch eager": spec, "onnxruntime fp32": f"onnx:{export(spec, workdir / 'demo-fp32')}",
             "onnxruntime int8": f"onnx:{export(spec, workdir / 'demo-int8', quantize='int8')}"}
    print("\n| runtime | text→image R@1 / R@5 / R@10 | image→text R@1 / R@5 / R@10 |")
    print("|---|---|---|")
    for name, model_spec in specs.items():
        res = evaluate(load_model(model_spec, device="cpu"), pairs)
        rows = [" / ".join(f"{res[side][f'r{k}']:.1f}" for k in (1, 5, 10)) for side in ("t2i", "i2t")]
        print(f"| {name} | {rows[0]} | {rows[1]} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--seconds", type=float, default=3.0, help="per bare-tower measurement")
    ap.add_argument("--wrk-seconds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="model threads (torch and the exports alike)")
    ap.add_argument("--skip-service", action="store_true")
    ap.add_argument("--demo", type=Path, default=None, help="the demo's output directory: held-out recall by runtime")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"model {args.model} (pretrained={args.pretrained}), {torch.get_num_threads()} model threads, "
          f"{os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        loaded = runtimes(args.model, args.pretrained, Path(tmp))
        towers(loaded, args.seconds)
        if not args.skip_service:
            service(loaded, args.wrk_seconds)
        if args.demo is not None:
            demo_recall(args.demo, Path(tmp))


if __name__ == "__main__":
    main()
