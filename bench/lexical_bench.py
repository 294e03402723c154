"""The BM25 table's costs on this machine: build time and disk for N captions, and query
latency (p50/p99) for lexical matching, one query at a time.

    python bench/lexical_bench.py [--n 1000000]

Captions are made of a 5,000-word vocabulary (Zipf-distributed, 6-14 words each) with a
product code in one caption of 1,000; queries are 2-4 words, or a code.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clipsearch.index.lexical import LexicalIndex, write_lexical


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=500)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    zipf = 1 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()

    def caption(i: int) -> str:
        words = rng.choice(vocab, size=int(rng.integers(6, 15)), p=zipf)
        code = f" sku{i}x" if i % 1000 == 0 else ""
        return " ".join(words) + code

    captions = [caption(i) for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.lexical.sqlite"
        t0 = time.perf_counter()
        write_lexical(path, captions)
        build = time.perf_counter() - t0
        index = LexicalIndex(path)
        queries = [" ".join(rng.choice(vocab[:2000], size=int(rng.integers(2, 5)))) for _ in range(args.queries)]
        queries += [f"sku{1000 * int(i)}x" for i in rng.integers(0, args.n // 1000, args.queries // 5)]
        times = []
        for q in queries:
            t = time.perf_counter()
            index.search(q, 100)
            times.append(time.perf_counter() - t)
        words = np.asarray(times[: args.queries]) * 1e3
        codes = np.asarray(times[args.queries :]) * 1e3
        print(f"captions: {args.n:,}   build: {build:.1f} s ({args.n / build:,.0f}/s)   "
              f"disk: {path.stat().st_size / 2**20:.0f} MiB")
        for name, ms in (("2-4 word queries", words), ("code queries", codes)):
            print(f"{name}, top 100: p50 {np.percentile(ms, 50):.2f} ms   p99 {np.percentile(ms, 99):.2f} ms")


if __name__ == "__main__":
    main()
