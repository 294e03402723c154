"""clipsearch against infinity-emb on the same transformers CLIP checkpoint, on this machine's CPU.

A random-init transformers `CLIPModel` (ViT 224/32, 6 layers of 384 wide; text 6 layers of
256 wide with CLIP's 49,408-token BPE: 28M parameters) is saved with `save_pretrained` and
served by:

- clipsearch on torch (`--model hf:DIR`),
- clipsearch on ONNX Runtime, fp32 and int8 (`clipsearch export` of the same checkpoint), and
  int8 in 2 worker processes of 1 model thread each,
- infinity-emb (`infinity_emb v2 --engine torch --device cpu`), from its own venv.

Each serves one text or one 640x480 JPEG per request to wrk at 1, 16 and 64 connections,
one server at a time, in `--rounds` alternating rounds (the best round is kept). Printed:
requests/s, p50/p99, CPU-ms per request (the server process and its children, from /proc),
and each clipsearch row's ratio to infinity.

    python -m venv /tmp/inf && /tmp/inf/bin/pip install 'infinity-emb[all]' aiohttp
    python bench/infinity_side_by_side.py --infinity /tmp/inf/bin/infinity_emb [--seconds 8] [--rounds 2]
        [--threads N]

`--threads` sets clipsearch's model threads (CLIPSEARCH_TORCH_THREADS); by default the
service's own default. Without `--infinity` the clipsearch rows are printed alone; `--only
int8,infinity` runs the servers whose name holds one of the words.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Server, bench_texts, free_port, jpeg_b64, wrk  # noqa: E402

CONNECTIONS = (1, 16, 64)


def write_checkpoint(directory: Path) -> int:
    """The transformers CLIP checkpoint; returns its parameter count."""
    import torch
    import transformers

    from tests.tiny import tiny_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tok = tiny_tokenizer("clip", [], Path(scratch))
    text = {"vocab_size": len(tok), "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6,
            "num_attention_heads": 4, "max_position_embeddings": 77, "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    vision = {"image_size": 224, "patch_size": 32, "hidden_size": 384, "intermediate_size": 1536,
              "num_hidden_layers": 6, "num_attention_heads": 6}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=256)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    transformers.CLIPImageProcessor(size={"shortest_edge": 224},
                                    crop_size={"height": 224, "width": 224}).save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def servers(checkpoint: Path, work: Path, infinity: str | None, threads: int | None) -> dict[str, tuple]:
    """name -> (argv builder(port), env, the request bodies' builder)."""
    from clipsearch.model.export import export

    fp32 = export(f"hf:{checkpoint}", work / "fp32")
    int8 = export(f"hf:{checkpoint}", work / "int8", quantize="int8")
    env = {"CLIPSEARCH_TORCH_THREADS": str(threads)} if threads else {}

    def clipsearch(spec: str):
        return lambda port: [sys.executable, "-m", "clipsearch", "serve", "--port", str(port), "--host",
                             "127.0.0.1", "--device", "cpu", "--log-level", "warning", "--model", spec]

    two = {"CLIPSEARCH_WORKERS": "2", "CLIPSEARCH_TORCH_THREADS": "1"}
    out = {"clipsearch torch": (clipsearch(f"hf:{checkpoint}"), env, "clipsearch"),
           "clipsearch onnxruntime fp32": (clipsearch(f"onnx:{fp32}"), env, "clipsearch"),
           "clipsearch onnxruntime int8": (clipsearch(f"onnx:{int8}"), env, "clipsearch"),
           "clipsearch onnxruntime int8, 2 workers": (clipsearch(f"onnx:{int8}"), two, "clipsearch")}
    if infinity:
        out["infinity-emb (torch)"] = (
            lambda port: [infinity, "v2", "--model-id", str(checkpoint), "--served-model-name", "clip", "--engine",
                          "torch", "--device", "cpu", "--port", str(port), "--host", "127.0.0.1", "--no-model-warmup",
                          "--log-level", "warning"],
            {"INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}, "infinity")
    return out


def bodies(api: str) -> dict[str, list[dict]]:
    image = jpeg_b64((640, 480))
    texts = bench_texts(256)
    if api == "infinity":
        return {"text": [{"model": "clip", "input": [t]} for t in texts],
                "image": [{"model": "clip", "input": [f"data:image/jpeg;base64,{image}"], "modality": "image"}]}
    return {"text": [{"texts": [t]} for t in texts], "image": [{"images": [image]}]}


def measure(name: str, spec: tuple, seconds: int) -> dict[tuple[str, int], dict]:
    argv, env, api = spec
    port = free_port()
    url = f"http://127.0.0.1:{port}" + ("/embeddings" if api == "infinity" else "/embed")
    server = Server(argv(port), env, port)
    try:
        server.wait_ready("/health" if api == "infinity" else "/readyz", timeout=300)
        server.wait_workers(int(env.get("CLIPSEARCH_WORKERS", "1")))
        out = {}
        for kind, body in bodies(api).items():
            for c in CONNECTIONS:
                res = wrk(url, body, connections=c, duration=seconds, threads=min(c, 2), cpu_pid=server.proc.pid)
                if res["non2xx"] or res["errors"]:
                    print(f"  {name} {kind} at {c}: {res['non2xx']} non-2xx, {res['errors']} socket errors",
                          flush=True)
                out[(kind, c)] = res
        return out
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--infinity", default=None, help="the infinity_emb executable (its own venv)")
    ap.add_argument("--seconds", type=int, default=8, help="per wrk run")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="clipsearch's model threads")
    ap.add_argument("--only", default=None, help="comma-separated words: run the servers whose name has one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = write_checkpoint(work / "clip")
        specs = servers(work / "clip", work, args.infinity, args.threads)
        if args.only:
            words = [w.strip() for w in args.only.split(",") if w.strip()]
            specs = {name: spec for name, spec in specs.items() if any(w in name for w in words)}
        print(f"transformers CLIPModel, {params / 1e6:.0f}M parameters, random weights; {os.cpu_count()} cores; "
              f"{args.rounds} round(s) of {args.seconds} s per cell, servers one at a time", flush=True)
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name, spec in specs.items():
                for key, res in measure(name, spec, args.seconds).items():
                    if key not in best.setdefault(name, {}) or res["rps"] > best[name][key]["rps"]:
                        best[name][key] = res
    ref = next((n for n in best if n.startswith("infinity")), None)
    for kind in ("text", "image"):
        print(f"\n**One {kind} per request** (req/s; p50/p99 ms; CPU-ms per request; × infinity)\n")
        print("| server | " + " | ".join(f"{c} conn" for c in CONNECTIONS) + " |")
        print("|---|" + "---:|" * len(CONNECTIONS))
        for name, cells in best.items():
            row = []
            for c in CONNECTIONS:
                res = cells[(kind, c)]
                cpu = 1000 * res["cpu_s"] / max(res["requests"], 1)
                ratio = f"; **{res['rps'] / best[ref][(kind, c)]['rps']:.2f}×**" if ref and name != ref else ""
                row.append(f"{res['rps']:.0f}; {res['p50_ms']:.0f}/{res['p99_ms']:.0f}; {cpu:.1f}{ratio}")
            print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
