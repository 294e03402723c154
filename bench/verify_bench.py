"""What checking a version's checksums costs a reload: the time to load a published version
of N random vectors with `index_verify` off, auto (whole files up to 1 GiB, larger ones by
sample) and full, in one run, with the page cache warm (the file was just written) and,
where the machine allows dropping it (root), cold.

    python bench/verify_bench.py                       # 1M vectors of dim 512 (a 2 GB index file)
    python bench/verify_bench.py --n 1000000 --dim 64  # a 256 MB index file: auto checks it whole
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipsearch.index.format import ModelRef, current_version_dir, read_manifest  # noqa: E402
from clipsearch.index.search import load_index_set  # noqa: E402
from tests.tiny import write_index_from_vectors  # noqa: E402


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model = ModelRef(spec="bench", fingerprint="random:bench")
    with tempfile.TemporaryDirectory(prefix="verify-bench-") as tmp:
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((args.n, args.dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        t0 = time.perf_counter()
        write_index_from_vectors(tmp, model=model, image=(vectors, [{"id": str(i)} for i in range(args.n)]))
        published = time.perf_counter() - t0
        del vectors
        version = current_version_dir(tmp)
        assert version is not None
        files = read_manifest(version).files
        sizes = ", ".join(f"{name} {f.size / 2**20:.0f} MiB{' (sampled)' if f.sampled else ''}"
                          for name, f in files.items())
        print(f"{args.n:,} vectors of dim {args.dim}; files: {sizes}; publish (checksums included) {published:.1f} s")
        print(f"cpus={os.cpu_count()}")
        print(f"| verify | cache | load s (best of {args.repeat}) |")
        print("|---|---|---:|")
        for cache in ("warm", "cold"):
            for mode in ("off", "auto", "full"):
                times = []
                for _ in range(args.repeat):
                    if cache == "cold" and not drop_caches():
                        break
                    t0 = time.perf_counter()
                    loaded = load_index_set(version, fingerprint=model.fingerprint, dim=args.dim, verify=mode)
                    times.append(time.perf_counter() - t0)
                    del loaded
                if times:
                    print(f"| {mode} | {cache} | {min(times):.2f} |")


if __name__ == "__main__":
    main()
