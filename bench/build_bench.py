"""Index builder benchmark: end-to-end items/s against the bare model's encode rate, same run.

Writes a synthetic EasyNLP TSV (caption + base64 JPEG per line), runs the builder on
it, then times the bare model seam on already-preprocessed tensors at the same batch
size. The ratio shows how much of the model's speed the whole job (read, decode,
preprocess, encode, index, publish) keeps.

    python bench/build_bench.py                                  # CPU, tiny model
    python bench/build_bench.py --model ViT-B-32 --device cuda --n 20000 --workers 14
    python bench/build_bench.py --model ViT-B-32 --device cuda --n 20000 --workers 14 --image-decode torch
    python bench/build_bench.py --model ViT-B-32 --device cuda --n 20000 --processes 8 --image-decode torch
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_model_args


def write_corpus(path: Path, n: int, size: tuple[int, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], axis=-1)
    # A few distinct JPEGs, reused: the corpus is large, writing it stays cheap.
    jpegs = []
    for i in range(16):
        arr = np.clip(base + rng.integers(-30, 30, base.shape) + i * 7, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        jpegs.append(base64.urlsafe_b64encode(buf.getvalue()).decode())
    with open(path, "w") as f:
        for i in range(n):
            f.write(f"a synthetic photo number {i}\t{jpegs[i % 16]}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--n", type=int, default=3000, help="TSV lines (each: one text + one image)")
    ap.add_argument("--image-size", default="640x480")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--processes", type=int, default=1,
                    help="encoder processes, as `index build --processes` (each decodes in threads)")
    ap.add_argument("--shard-size", type=int, default=512, help="lines per shard, the unit of work of a process")
    ap.add_argument("--image-decode", default="exact", choices=["exact", "draft", "torch"],
                    help="as `index build --image-decode` (torch on a GPU: a batch of JPEGs per nvJPEG call)")
    ap.add_argument("--thumbnails", action=argparse.BooleanOptionalAction, default=True,
                    help="as `index build --thumbnails` (on by default there too)")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from clipsearch.builder.build import BuildOptions, run_build
    from clipsearch.model.clip import load_model

    w, h = (int(x) for x in args.image_size.split("x"))
    model = load_model(args.model, args.pretrained, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.tsv"
        write_corpus(corpus, args.n, (w, h))
        opts = BuildOptions(inputs=[corpus], output=Path(tmp) / "index", model=args.model, pretrained=args.pretrained,
                            device=args.device, batch_size=args.batch_size, workers=args.workers, progress=False,
                            processes=args.processes, shard_size=args.shard_size,
                            index_type="flat", image_decode=args.image_decode, thumbnails=args.thumbnails)
        t0 = time.perf_counter()
        summary = run_build(opts, model=model)
        wall = time.perf_counter() - t0
        # At once: the bare-model timings below take seconds more, and a run under a time limit
        # (bench/gpu/run.sh) that is cut there still leaves the builder's own number.
        print(f"built {args.n} pairs in {wall:.1f} s: {summary.encoded['image'] / wall:.0f} images/s, "
              f"{args.n / wall:.0f} pairs/s end to end (processes={args.processes})", flush=True)
        first = corpus.read_text().split("\n", 1)[0].split("\t")[1]
    images = summary.encoded["image"] / wall
    texts = summary.encoded["text"] / wall
    pil = Image.open(io.BytesIO(base64.urlsafe_b64decode(first + "=" * (-len(first) % 4))))
    pixels = torch.stack([model.preprocess(pil)] * args.batch_size)
    tokens = model.tokenize([f"a synthetic photo number {i}" for i in range(args.batch_size)])
    bare = {}
    for name, fn in (("image", lambda: model.encode_pixels(pixels)), ("text", lambda: model.encode_tokens(tokens))):
        fn()
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 3:
            fn()
            n += args.batch_size
        bare[name] = n / (time.perf_counter() - t)
    raw = base64.urlsafe_b64decode(first + "=" * (-len(first) % 4))
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < 2:
        model.preprocess(Image.open(io.BytesIO(raw)))
        n += 1
    decode_1core = n / (time.perf_counter() - t)
    # What the model spends per pair, combined: the ceiling for pairs/s through the model alone.
    bare_pairs = 1 / (1 / bare["image"] + 1 / bare["text"])
    decoders = args.workers if args.processes == 1 else min(os.cpu_count() or 1, 2 * args.processes)
    pairs = args.n / wall
    print(f"index builder benchmark: model={args.model} device={args.device} n={args.n} pairs "
          f"image={w}x{h} JPEG decode={args.image_decode} workers={args.workers} "
          f"processes={args.processes} shard={args.shard_size} batch={args.batch_size} thumbnails={args.thumbnails} "
          f"cpus={os.cpu_count()}")
    print("| quantity | builder end to end | bare model | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| images/s | {images:.0f} | {bare['image']:.0f} | {images / bare['image']:.2f} |")
    print(f"| texts/s | {texts:.0f} | {bare['text']:.0f} | {texts / bare['text']:.2f} |")
    print(f"| pairs/s (both encoders) | {pairs:.0f} | {bare_pairs:.0f} | {pairs / bare_pairs:.2f} |")
    print(f"| images/s vs decode+preprocess ceiling ({decode_1core:.0f}/s per core x {decoders} decoders) | "
          f"{images:.0f} | {decode_1core * decoders:.0f} | {images / (decode_1core * decoders):.2f} |")
    print(f"wall {wall:.1f} s for {args.n} pairs; builder's own summary: {summary.items_per_second:.0f} items/s")


if __name__ == "__main__":
    main()
