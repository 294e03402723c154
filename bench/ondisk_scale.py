"""An on-disk IVF-PQ index at scale: build cost, size, service memory, recall and latency.

    python bench/ondisk_scale.py --n 10000000 --dim 512 --work /data/bench-10m

1. Synthesizes `n` clustered unit vectors (a mixture of `--clusters` Gaussians in a
   48-dimensional latent space, mapped into `--dim` dimensions) straight into a
   memory-mapped file, and 1,000 held-out queries from the same distribution.
2. Builds the builder's `ivfpq-disk` index in a child process (so its peak RSS is its own):
   IVF trained on a sample, filled 1M vectors at a time, lists merged into one on-disk
   file, then published as an index version with one item per vector.
3. Loads the version the way the service does in a fresh child process and reports its
   RSS: the FAISS index alone, and with the items file; then, with the items, the cost of
   searches that return their items' metadata, of lookups by id and of a filter.
4. recall@10 against exact search (by blocks over the memory-mapped vectors) at several
   nprobe, and search latency p50 / p99 at 1 and 64 concurrent clients.
5. The same with the refine stage: the vectors as fp16 beside the index, memory-mapped,
   re-ranking 4-32 x k candidates: recall@10, latency and the file's size, side by side.

Prints one JSON object; nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _anon_mb() -> float:
    """Resident anonymous memory: what the process itself holds, without the pages of
    memory-mapped files (which the kernel can drop and read again)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _PeakAnon:
    """The highest `_anon_mb` seen, sampled every 50 ms in a thread."""

    def __init__(self) -> None:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _anon_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _anon_mb())


def synthesize(work: Path, n: int, dim: int, clusters: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    path = work / "vectors.npy"
    # Clustered, with the low intrinsic dimension of real embeddings: a mixture of `clusters`
    # Gaussians in a 48-dimensional latent space, mapped linearly into `dim` dimensions, with
    # a little isotropic noise on top.
    rng = np.random.default_rng(seed)
    latent = 48
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    mixing = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)

    def draw(count: int) -> np.ndarray:
        z = centres[rng.integers(0, clusters, count)] + rng.standard_normal((count, latent)).astype(np.float32)
        x = z @ mixing + rng.standard_normal((count, dim)).astype(np.float32) * (0.1 / np.sqrt(dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    if not path.is_file():
        out = np.lib.format.open_memmap(work / "vectors.tmp.npy", mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, 500_000):
            out[start : start + 500_000] = draw(min(500_000, n - start))
        out.flush()
        del out
        os.replace(work / "vectors.tmp.npy", path)
    return path, draw(1000)


def _build(vectors_path: str, index_dir: str, nlist: int, out: dict) -> None:
    from clipsearch.builder.indexing import IndexPlan, _pq_m, build
    from clipsearch.index.format import ModelRef, new_version_name, publish_version, staging_dir, write_version

    vectors = np.load(vectors_path, mmap_mode="r")
    n, dim = vectors.shape
    sampler = _PeakAnon()
    t0 = time.perf_counter()
    factory = f"IVF{nlist},PQ{_pq_m(dim)}x8"
    index = build(vectors, IndexPlan("ivfpq-disk", factory), train_size=max(100_000, 39 * nlist),
                  scratch=Path(index_dir) / "scratch")
    t_index = time.perf_counter() - t0
    staged, name = staging_dir(Path(index_dir)), new_version_name()
    def items():
        return ({"id": f"v{i}", "text": f"a caption for item {i}", "metadata": {"shard": i // 100_000, "url":
                 f"https://example.com/{i}.jpg", "width": 256 + i % 1024}} for i in range(n))

    write_version(staged, model=ModelRef(spec="bench", fingerprint="bench"), dim=dim, version=name,
                  indexes={"image": (index, _Sized(items, n), {"index_type": "ivfpq-disk", "factory": factory})})
    version = publish_version(Path(index_dir), staged, name, keep=1)
    out.update(build_s=round(time.perf_counter() - t0, 1), index_s=round(t_index, 1),
               build_peak_anon_mb=round(sampler.stop()), build_peak_rss_mb=round(_peak_mb()),
               version=str(version), factory=factory)


class _Sized:
    """Items made on the fly, with a length, and iterable more than once (the items writer
    reads them twice) without holding them in a list."""

    def __init__(self, make, n: int) -> None:
        self.make, self.n = make, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.make())


def _load(version: str, with_items: bool, out: dict) -> None:
    from clipsearch.index.format import read_faiss_index, read_manifest

    before = _rss_mb()
    t0 = time.perf_counter()
    if with_items:
        from clipsearch.index.search import load_index_set

        loaded = load_index_set(Path(version), fingerprint="bench", dim=read_manifest(Path(version)).dim)
    else:
        loaded = read_faiss_index(Path(version) / "image.faiss", ondisk=True)
    out.update(rss_mb=round(_rss_mb()), rss_added_mb=round(_rss_mb() - before), anon_mb=round(_anon_mb()),
               load_s=round(time.perf_counter() - t0, 1))
    if with_items:  # what a search reads of the items: the k results' rows, an id, a filter's columns
        from clipsearch.index.filters import compile_filter
        from clipsearch.index.search import SearchParams

        index = loaded.get("image")
        queries = np.random.default_rng(1).standard_normal((300, loaded.manifest.dim))
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        params = SearchParams(nprobe=8)
        for label, search in (("search_cold", index.search), ("search_warm", index.search),
                              ("search_without_items", index.raw_search)):
            times = []
            for q in queries:
                t = time.perf_counter()
                search(q[None], 10, params)
                times.append(time.perf_counter() - t)
            ms = np.array(times) * 1000
            out[label + "_ms"] = {"p50": round(float(np.percentile(ms, 50)), 2),
                                  "p99": round(float(np.percentile(ms, 99)), 2)}
        t0 = time.perf_counter()
        rows = [index.row_of(f"v{i}") for i in range(0, index.count, max(1, index.count // 1000))]
        out["row_of_us"] = round((time.perf_counter() - t0) / len(rows) * 1e6, 1)
        out["after_searches_anon_mb"] = round(_anon_mb())
        t0 = time.perf_counter()
        selected = index.select(compile_filter({"shard": {"$in": [3, 42]}, "width": {"$gte": 1000}})).count
        out.update(filter_first_s=round(time.perf_counter() - t0, 2), filter_selected=int(selected),
                   after_filter_anon_mb=round(_anon_mb()), after_filter_rss_mb=round(_rss_mb()))
    del loaded  # measured while held


def _in_child(fn, *args) -> dict:
    with multiprocessing.Manager() as manager:
        out = manager.dict()
        proc = multiprocessing.get_context("spawn").Process(target=fn, args=(*args, out))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"{fn.__name__} failed with exit code {proc.exitcode}")
        return dict(out)


def _latency(index, queries: np.ndarray, nprobe: int, clients: int, per_client: int) -> dict:
    import faiss

    params = faiss.SearchParametersIVF(nprobe=nprobe)
    times: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        mine = []
        for i in range(per_client):
            q = queries[(c * per_client + i) % len(queries)][None]
            t = time.perf_counter()
            index.search(q, 10, params=params)
            mine.append(time.perf_counter() - t)
        with lock:
            times.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "qps": round(len(ms) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=4096, help="IVF lists (the builder's auto picks ~4 sqrt(n))")
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (n x dim x 4 bytes and more)")
    ap.add_argument("--reuse", action="store_true",
                    help="measure the version already published in --work (and its cached exact results) again")
    args = ap.parse_args()
    import faiss

    from clipsearch.builder.indexing import exact_top_k
    from clipsearch.index.format import read_faiss_index

    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"n": args.n, "dim": args.dim, "cpus": os.cpu_count(), "faiss": faiss.__version__}
    t0 = time.perf_counter()
    vectors_path, queries = synthesize(args.work, args.n, args.dim, args.clusters)
    report["synthesize_s"] = round(time.perf_counter() - t0, 1)
    report["vectors_gb"] = round(args.n * args.dim * 4 / 1e9, 2)
    from clipsearch.index.format import current_version_dir

    published = current_version_dir(args.work / "index") if (args.work / "index").is_dir() else None
    if args.reuse and published is not None:
        version = published
    else:
        report["build"] = _in_child(_build, str(vectors_path), str(args.work / "index"), args.nlist)
        version = Path(report["build"]["version"])
    report["disk_mb"] = {p.name: round(p.stat().st_size / 1e6, 1) for p in version.iterdir()}
    report["service_index_only"] = _in_child(_load, str(version), False)
    report["service_with_items"] = _in_child(_load, str(version), True)
    vectors = np.load(vectors_path, mmap_mode="r")
    cached = args.work / "truth.npz"
    if args.reuse and cached.is_file():
        with np.load(cached) as z:
            queries, truth = z["queries"], z["truth"]
    else:
        t0 = time.perf_counter()
        truth = exact_top_k(vectors, queries, 10)
        report["exact_1000_queries_s"] = round(time.perf_counter() - t0, 1)
        np.savez(cached, queries=queries, truth=truth)
    index = read_faiss_index(version / "image.faiss", ondisk=True)
    recall = {}
    for nprobe in (8, 16, 32, 64, 128):
        _, ids = index.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=nprobe))
        recall[nprobe] = round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])),
                               4)
    report["recall_at_10"] = recall
    # the smallest nprobe within half a point of the best recall (PQ caps recall, not nprobe)
    nprobe = next(p for p, r in recall.items() if r >= max(recall.values()) - 0.005)
    index.search(queries[:200], 10, params=faiss.SearchParametersIVF(nprobe=nprobe))  # warm the touched pages
    report["latency"] = {"nprobe": nprobe, "1_client": _latency(index, queries, nprobe, 1, 300),
                         "64_clients": _latency(index, queries, nprobe, 64, 20)}
    report["refine"] = _refine(args, version, vectors, index, queries, truth, nprobe)
    print(json.dumps(report, indent=2))


def _refine(args: argparse.Namespace, version: Path, vectors: np.ndarray, index, queries: np.ndarray,
            truth: np.ndarray, nprobe: int) -> dict:
    """The same index with the refine stage the builder adds when codes miss the recall
    target: the vectors as fp16 in a memory-mapped file beside the lists, and refine x 10
    candidates re-ranked by them, as the service's LoadedIndex does (index.search._rerank)."""
    import faiss

    from clipsearch.index.format import write_refine
    from clipsearch.index.search import _rerank

    path = args.work / "image.refine.npy"
    t0 = time.perf_counter()
    if not (args.reuse and path.is_file()):
        write_refine(path, vectors)
    out: dict = {"write_s": round(time.perf_counter() - t0, 1), "disk_mb": round(path.stat().st_size / 1e6, 1)}
    refine = np.load(path, mmap_mode="r")

    def search(q: np.ndarray, factor: int, probes: int) -> np.ndarray:
        _, cand = index.search(q, 10 * factor, params=faiss.SearchParametersIVF(nprobe=probes))
        return _rerank(refine, q, cand, 10)[1]

    for factor in (4, 8, 16, 32):
        for probes in sorted({nprobe, 2 * nprobe}):
            ids = search(queries, factor, probes)
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)]))
            row: dict = {"recall_at_10": round(recall, 4)}
            for clients, per in ((1, 300), (64, 20)):
                times: list[float] = []
                lock = threading.Lock()

                def client(c: int, per: int = per, factor: int = factor, probes: int = probes,
                           times: list[float] = times, lock: threading.Lock = lock) -> None:
                    mine = []
                    for i in range(per):
                        t = time.perf_counter()
                        search(queries[(c * per + i) % len(queries)][None], factor, probes)
                        mine.append(time.perf_counter() - t)
                    with lock:
                        times.extend(mine)

                threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                ms = np.array(times) * 1000
                row[f"{clients}_clients"] = {"p50_ms": round(float(np.percentile(ms, 50)), 2),
                                             "p99_ms": round(float(np.percentile(ms, 99)), 2)}
            out[f"refine {factor}, nprobe {probes}"] = row
    out["anon_mb_after"] = round(_anon_mb())
    return out


if __name__ == "__main__":
    main()
