"""What hostile thin images cost the service: time and server RSS for /classify and /embed
with PNGs of a few hundred bytes and extreme aspect ratios, and the latency of an ordinary
JPEG /embed while four of them are in flight. Loopback only.

    python bench/thin_images.py
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Server, free_port, jpeg_b64  # noqa: E402


def png_b64(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "clipsearch", "serve", "--port", str(port), "--host", "127.0.0.1",
            "--device", "cpu", "--log-level", "warning"]
    with Server(argv, {}, port) as server, httpx.Client(base_url=server.base, timeout=120) as client:
        pid = server.proc.pid
        print(f"server RSS at start: {rss_mb(pid):.0f} MB")
        print("| request | status | seconds | server RSS after, MB |")
        print("|---|---:|---:|---:|")
        for size in ((200_000, 1), (1, 200_000), (40_000, 1)):
            image = png_b64(size)
            for route, body in (("/classify", {"image": image, "labels": ["a", "b"]}), ("/embed", {"images": [image]})):
                t0 = time.perf_counter()
                r = client.post(route, json=body)
                took = time.perf_counter() - t0
                print(f"| {route} {size[0]}x{size[1]} PNG ({len(base64.b64decode(image))} B) | {r.status_code} | "
                      f"{took:.3f} | {rss_mb(pid):.0f} |")
        jpeg = jpeg_b64((640, 480))
        thin = png_b64((40_000, 1))
        t0 = time.perf_counter()
        client.post("/embed", json={"images": [jpeg]})
        alone = time.perf_counter() - t0
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            hostile = [pool.submit(client.post, "/embed", json={"images": [thin]}) for _ in range(4)]
            t0 = time.perf_counter()
            client.post("/embed", json={"images": [jpeg]})
            beside = time.perf_counter() - t0
            codes = sorted({f.result().status_code for f in hostile})
        print(f"\nJPEG /embed alone {alone:.3f} s; beside four 40000x1 PNGs (answered {codes}) {beside:.3f} s; "
              f"server RSS {rss_mb(pid):.0f} MB")


if __name__ == "__main__":
    main()
