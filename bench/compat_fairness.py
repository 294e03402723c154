"""Do 2,048-input OpenAI calls starve other clients? Single-text /embed requests from 8
clients, alone and while 2 clients send 2,048-input /v1/embeddings calls back to back; prints
the singles' p50/p99 and rate in each phase, their ratio, and the big calls' texts/s.

    python bench/compat_fairness.py [--seconds 20] [--model clipsearch-tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Server, bench_texts, free_port  # noqa: E402


async def singles(base: str, clients: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def one(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            n = 0
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.post("/embed", json={"texts": [f"a short query {i} {n}"]})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                n += 1

    await asyncio.gather(*(one(i) for i in range(clients)))
    return latencies


async def big_calls(base: str, name: str, clients: int, stop: asyncio.Event, texts: list[str]) -> int:
    done = 0

    async def one() -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=base, timeout=300) as client:
            while not stop.is_set():
                r = await client.post("/v1/embeddings", json={"model": name, "input": texts})
                r.raise_for_status()
                done += len(texts)

    await asyncio.gather(*(one() for _ in range(clients)))
    return done


def summary(latencies: list[float], seconds: float) -> tuple[float, float, float]:
    q = statistics.quantiles(latencies, n=100)
    return q[49] * 1000, q[98] * 1000, len(latencies) / seconds


async def run(base: str, name: str, seconds: float) -> None:
    texts = bench_texts(2048)
    alone = summary(await singles(base, 8, seconds), seconds)
    stop = asyncio.Event()
    t0 = time.perf_counter()
    background = asyncio.create_task(big_calls(base, name, 2, stop, texts))
    await asyncio.sleep(1)  # the big calls are under way
    mixed = summary(await singles(base, 8, seconds), seconds)
    stop.set()
    embedded = await background
    big_rate = embedded / (time.perf_counter() - t0)
    print("| phase | singles p50 ms | singles p99 ms | singles/s |")
    print("|---|---:|---:|---:|")
    print(f"| 8 single-text clients alone | {alone[0]:.1f} | {alone[1]:.1f} | {alone[2]:.0f} |")
    print(f"| ... while 2 clients send 2,048-input calls | {mixed[0]:.1f} | {mixed[1]:.1f} | {mixed[2]:.0f} |")
    print(f"\nsingles' p99 with the big calls / alone: {mixed[1] / alone[1]:.2f}; "
          f"singles/s: {mixed[2] / alone[2]:.2f} of alone; the big calls embedded {big_rate:.0f} texts/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--model", default="clipsearch-tiny")
    args = ap.parse_args()
    port = free_port()
    name = "bench-model"
    argv = [sys.executable, "-m", "clipsearch", "serve", "--port", str(port), "--host", "127.0.0.1",
            "--device", "cpu", "--log-level", "warning", "--model", args.model, "--served-model-name", name]
    with Server(argv, {}, port) as server:
        asyncio.run(run(server.base, name, args.seconds))


if __name__ == "__main__":
    main()
