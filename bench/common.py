"""What the benchmarks share: loopback servers, wrk runs, and the payloads they send."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_WORDS = (  # noqa: SIM905 - a word list reads better as one string
    "a an the photo picture image of with and on in under near beside above small large tiny big old new red "
    "blue green yellow black white orange purple brown grey dog cat bird horse car bicycle boat plane train "
    "tree flower house street beach mountain river city park kitchen table chair window door man woman child "
    "people group two three four sitting standing running walking playing holding looking wearing shirt hat "
    "sunny cloudy night evening morning winter summer snow rain water grass field road bridge building tower"
).split()


def bench_texts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct caption-like queries of 4-16 words (varied lengths, a realistic vocabulary).

    Distinct texts keep caches honest: only the per-word caches a real query stream also
    hits can help.
    """
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(4, 17)))) + f" {i}" for i in range(n)]


def rate(fn, items: int, seconds: float) -> float:
    """Items/s of calling `fn` (which handles `items` items) repeatedly for `seconds`, after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += items
    return n / (time.perf_counter() - t0)


def add_model_args(ap) -> None:
    """The model options every benchmark takes: an open_clip spec, its weights, the device."""
    ap.add_argument("--model", default="clipsearch-tiny", help="open_clip spec, as for `clipsearch serve`")
    ap.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint (default: random weights)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")


def decode_rate(model, image_b64: str, seconds: float) -> float:
    """Images/s of base64 + JPEG decode + the model's preprocessing on one core: the CPU
    work per image that the service and the builder must also do."""
    from PIL import Image

    from clipsearch.images.codec import decode_base64

    return rate(lambda: model.preprocess(Image.open(io.BytesIO(decode_base64(image_b64, field="image",
                                                                             max_bytes=1 << 30)))), 1, seconds)


def torch_decode_rate(model, image_b64: str, batch: int, seconds: float) -> float | None:
    """Images/s of base64 + the torch path's batched JPEG decode + tensor preprocessing on the
    model's device (nvJPEG on a GPU: the ceiling the image path is held to), or None when
    the model's transform has no torch equivalent."""
    import torch

    from clipsearch.images.codec import decode_base64
    from clipsearch.images.decoder import ImageDecoder, Jpeg

    decoder = ImageDecoder.create(model.preprocess_transform, "torch", model.image_size, 10**9)
    if decoder.torch_path is None:
        return None

    def run() -> None:
        jpegs = [Jpeg("image", decode_base64(image_b64, field="image", max_bytes=1 << 30)) for _ in range(batch)]
        pixels = decoder.decode_jpegs(jpegs, model.device)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        del pixels

    return rate(run, batch, seconds)


def build_index(index_dir: Path, model, n: int, seed: int = 0) -> float:
    """A flat image index of `n` random unit vectors (search cost does not depend on content)."""
    from clipsearch.index.format import ModelRef
    from tests.tiny import write_index_from_vectors

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    vectors = np.empty((n, model.dim), np.float32)
    for lo in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - lo), model.dim), dtype=np.float32)
        vectors[lo : lo + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    items = [{"id": f"img{i}"} for i in range(n)]
    ref = ModelRef(spec=model.info.spec, pretrained=model.info.pretrained, fingerprint=model.info.fingerprint,
               family=model.info.family)
    write_index_from_vectors(index_dir, model=ref, image=(vectors, items))
    return time.perf_counter() - t0


def stub_model(state) -> None:
    """Replace a built service state's model calls with constant vectors, and its JPEG decoder
    with blank pixels: what remains is the service's own Python (HTTP, the framework, the
    batcher, tokenizing, base64), the bound of one server process in front of a GPU. With
    `image_decode=torch` the decoder takes JPEGs a batch at a time, as it does on a GPU."""
    import dataclasses

    import torch

    dim, size = state.engine.dim, state.model.image_size
    state.model.text_vectors = lambda tokens: torch.full((tokens.shape[0], dim), dim ** -0.5)
    state.model.image_vectors = lambda pixels: torch.full((pixels.shape[0], dim), dim ** -0.5)
    state.model.encode_tokens = lambda tokens: np.full((tokens.shape[0], dim), dim ** -0.5, np.float32)
    state.model.encode_pixels = lambda pixels: np.full((pixels.shape[0], dim), dim ** -0.5, np.float32)
    decoder = state.engine.decoder
    if decoder.torch_path is not None:
        decoder = dataclasses.replace(decoder, jpegs_per_batch=True)
        object.__setattr__(decoder, "decode_jpegs",  # a frozen dataclass
                           lambda jpegs, device: [torch.zeros(3, *size) for _ in jpegs])
        state.engine.decoder = decoder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg_b64(size: tuple[int, int], seed: int = 0) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    # Smooth gradients plus noise compress like a photo, unlike pure noise.
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], axis=-1)
    arr = np.clip(arr + rng.integers(-25, 25, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


class Server:
    def __init__(self, argv: list[str], env: dict[str, str], port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server process
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, path: str = "/healthz", timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited:\n{self.log.read().decode()[-3000:]}")
            try:
                if httpx.get(self.base + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not become ready")

    def wait_workers(self, workers: int, timeout: float = 180) -> None:
        """With several server processes, wait until each has answered (GET / over fresh
        connections gives the answering worker's pid): a worker still loading when wrk opens
        its connections would get none of them for the whole run. Past `timeout` it says how
        many answered and goes on (a shared socket might keep favouring some workers)."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while workers > 1 and len(seen) < workers:
            if time.monotonic() > deadline:
                print(f"  only {len(seen)} of {workers} workers answered in {timeout:.0f} s; measuring anyway",
                      flush=True)
                return
            try:
                seen.add(httpx.get(self.base + "/", timeout=5).json()["runtime"]["pid"])
            except httpx.HTTPError:
                time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> Server:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process `pid` and its descendants so far, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    family, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in family:
                family.add(child)
                frontier.append(child)
    return sum(times.get(p, 0.0) for p in family)


def wrk(url: str, body: dict | list[dict] | None, *, connections: int, duration: int, threads: int,
        cpu_pid: int | None = None) -> dict:
    """Drive `url` with wrk for `duration` s; POST `body` (a list: each connection cycles through them).
    With `cpu_pid`, `cpu_s` is the CPU time that process (and its children) used in the measured run."""
    env = dict(os.environ)
    bodies = body if isinstance(body, list) else [body] if body is not None else []
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for b in bodies:
            f.write(json.dumps(b) + "\n")
    env["WRK_BODY_FILE"] = f.name if bodies else ""
    # Warm-up pass (not measured): JIT paths, thread pools, connection set-up.
    subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", "2s", "-s", str(ROOT / "bench/wrk.lua"),
                    url], env=env, capture_output=True, timeout=60, check=False)
    cpu_before = cpu_seconds(cpu_pid) if cpu_pid else 0.0
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--timeout", "30s",
                          "-s", str(ROOT / "bench/wrk.lua"), url], env=env, capture_output=True, text=True,
                         timeout=duration + 60, check=False)
    cpu_used = cpu_seconds(cpu_pid) - cpu_before if cpu_pid else None
    os.unlink(f.name)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    res = json.loads(line[len("WRKJSON "):])
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["cpu_s"] = cpu_used
    return res
