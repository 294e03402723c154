"""Where the torch image path spends its time: each stage of base64 JPEG -> model input,
timed alone at a few batch sizes on one device, in one run.

Stages: base64 decode; bytes -> tensors; the JPEG decode (one batched call, and one call
per image); resize + crop + normalize (images of one size resized as one batch, as the
service does, and one image at a time, as it did before); and the whole
`ImageDecoder.decode_jpegs` the service and the index builder call. Each is synchronized
with the device and timed as the median of `--repeats` runs.

    python bench/decode_probe.py                            # CPU (libjpeg-turbo)
    python bench/decode_probe.py --device cuda --batches 64,256
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import jpeg_b64  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="64,256", help="comma-separated batch sizes")
    ap.add_argument("--image-size", default="640x480")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import open_clip
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from clipsearch.images.codec import decode_base64
    from clipsearch.images.decoder import ImageDecoder, Jpeg, TorchPreprocess

    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    _, _, transform = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, device="cpu")
    tp = TorchPreprocess.from_transform(transform)
    assert tp is not None
    decoder = ImageDecoder.create(transform, "torch", (224, 224), 10**9)
    w, h = (int(x) for x in args.image_size.split("x"))
    b64 = jpeg_b64((w, h))
    raw = base64.b64decode(b64)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        fn()
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print(f"decode probe: device={device} image={w}x{h} JPEG ({len(raw)} bytes) torch={torch.__version__}")
    print("| stage | " + " | ".join(f"batch {b}: ms / images/s" for b in args.batches.split(",")) + " |")
    print("|---|" + "---:|" * len(args.batches.split(",")))
    rows: dict[str, list[str]] = {}
    def stages_for(b: int) -> tuple[dict, list]:
        b64s = [b64] * b
        raws = [raw] * b
        tensors = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raws]
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        return {
            "base64 decode, standard library": lambda: [base64.b64decode(s) for s in b64s],
            "base64 decode, the service's (pybase64)": lambda: [decode_base64(s, field="i", max_bytes=1 << 30)
                                                                for s in b64s],
            "bytes -> tensors": lambda: [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raws],
            "JPEG decode, one batched call": lambda: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device),
            "JPEG decode, a call per image": lambda: [decode_jpeg(t, mode=ImageReadMode.RGB, device=device)
                                                      for t in tensors],
            "resize+crop+normalize (the service's)": lambda: tp.pixels(decoded),
            "resize+crop+normalize, one image at a time (before)": lambda: tp.pixels(decoded, batched=False),
            "decode_jpegs (all of it)": lambda: decoder.decode_jpegs([Jpeg("image", r) for r in raws], device),
        }, decoded

    for b in (int(x) for x in args.batches.split(",")):
        stages, decoded = stages_for(b)
        for name, fn in stages.items():
            t = timed(fn)
            rows.setdefault(name, []).append(f"{t * 1e3:.2f} / {b / t:,.0f}")
        same = (tp.pixels(decoded, batched=True) - tp.pixels(decoded, batched=False)).abs().max().item()
        rows.setdefault("max |batched - per image| (normalized units)", []).append(f"{same:.2e}")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
