"""The offline demo behind the README's first command.

It checks the port first (a busy one is a one-line error before any training), reuses the
data, model and index of an earlier run with the same parameters (`--retrain` starts
afresh), writes the example files the README's curl lines and client example use, and
ends by printing the `clipsearch serve` line that serves what it built.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

DEMO_MODEL = "clipsearch-demo"  # clipsearch/model/model_configs/clipsearch-demo.json
SERVED_NAME = "clipsearch-demo"  # the model name on the OpenAI-compatible route, as the README uses it
STAMP = "demo.json"  # what the trained model was made from; a rerun with the same values reuses it
QUERIES = {"en": ["a red circle", "two blue squares", "a large yellow star on a black background"],
           "zh": ["红色圆形", "两个蓝色正方形", "黑色背景上的黄色星形"]}
EXAMPLES = {"photo.jpg": "JPEG", "shape.png": "PNG"}  # the README's example files, in the work dir


def _shown(path: Path) -> str:
    """`path` as the user would type it: relative to the current directory when inside it."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def _write_examples(tsv: Path, folder: Path) -> dict[str, Path]:
    """The first validation images as files (JPEG and PNG), for the curl lines to upload."""
    from clipsearch.images.codec import decode_base64, open_image

    rows = tsv.read_text(encoding="utf-8").split("\n", len(EXAMPLES))[: len(EXAMPLES)]
    written = {}
    for (name, fmt), row in zip(EXAMPLES.items(), rows, strict=True):
        data = decode_base64(row.split("\t")[-1], field="image", max_bytes=1 << 26)
        path = folder / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        open_image(data, field="image", max_pixels=1 << 24).convert("RGB").save(tmp, format=fmt)
        os.replace(tmp, path)
        written[name] = path
    return written


def _reusable(stamp_path: Path, stamp: dict[str, Any], best: Path) -> bool:
    try:
        return json.loads(stamp_path.read_text()) == stamp and (best / "open_clip_config.json").is_file()
    except (OSError, ValueError):
        return False


def run_demo(*, workdir: Path, port: int, host: str, n_train: int, epochs: int, lang: str, serve: bool,
             retrain: bool = False, say: Callable[[str], None] = typer.echo) -> dict[str, Any]:
    from clipsearch.builder.build import BuildOptions, run_build
    from clipsearch.core.fsutil import atomic_write_text
    from clipsearch.finetune.evaluate import evaluate
    from clipsearch.finetune.synth import write_tsv
    from clipsearch.finetune.train import TrainOptions, train
    from clipsearch.index.format import current_version_dir, read_manifest
    from clipsearch.index.search import load_index_set
    from clipsearch.inputs.pairs import PairFile
    from clipsearch.model.load import load_model
    from clipsearch.service.server import bind

    sock: socket.socket | None = bind(host, port) if serve else None  # a busy port fails now, not after training
    t0 = time.perf_counter()
    workdir = workdir.resolve()
    data, out, index = workdir / "data", workdir / "train-output", workdir / "index"
    best = out / "best"
    stamp = {"model": DEMO_MODEL, "n_train": n_train, "epochs": epochs, "lang": lang, "layout": 1}
    reuse = not retrain and _reusable(out / STAMP, stamp, best)
    if reuse:
        say(f"[1/5] reusing the data in {data}")
        say(f"[2/5] reusing the model trained earlier in {best} (--retrain trains it again)")
    else:
        shutil.rmtree(out, ignore_errors=True)
        say(f"[1/5] synthesizing {n_train} training, 300 validation and 1000 gallery images ({lang}) in {data}")
        write_tsv(data / "train.tsv", n_train, seed=1, lang=lang)
        write_tsv(data / "valid.tsv", 300, seed=2, lang=lang)
        write_tsv(data / "gallery.tsv", 1000, seed=3, lang=lang)
        say(f"[2/5] training {DEMO_MODEL} (a small ResNet + transformer CLIP) from random weights, {epochs} epochs")
        train(TrainOptions(train=data / "train.tsv", valid=data / "valid.tsv", output=out, model=DEMO_MODEL,
                           epochs=epochs, batch_size=128, lr=2e-3, warmup_steps=20, progress=True))
        atomic_write_text(out / STAMP, json.dumps(stamp))
    spec = f"local-dir:{best}"
    model = load_model(spec)
    say("[3/5] evaluating the best checkpoint on the held-out validation set")
    res = evaluate(model, PairFile(data / "valid.tsv"))
    chance = 100 * 5 / max(1, res["counts"]["images"])
    say("      t2i " + "  ".join(f"R@{k[1:]} {v:.1f}" for k, v in res["t2i"].items())
        + "   i2t " + "  ".join(f"R@{k[1:]} {v:.1f}" for k, v in res["i2t"].items())
        + f"   (chance R@5 = {chance:.1f})")
    published = current_version_dir(index) if index.is_dir() else None
    if reuse and published is not None and read_manifest(published).model.fingerprint == model.info.fingerprint:
        say(f"[4/5] reusing the indexes in {index}, built by this model")
        version_dir, build_text = published, f"reused {published.name}"
    else:
        say(f"[4/5] building the image and text indexes from {data / 'gallery.tsv'}")
        summary = run_build(BuildOptions(inputs=[data / "gallery.tsv"], output=index, model=spec, progress=False,
                                         index_type="flat", keep=2), model=model)
        version_dir, build_text = summary.version_dir, summary.render()
    served = load_index_set(version_dir, fingerprint=model.info.fingerprint, dim=model.dim)
    say("      what the service will answer:")
    image_index = served.get("image")
    for q in QUERIES[lang][:2]:
        if image_index is not None:
            hits = image_index.search(model.encode_texts([q]), 3)[0]
            say(f"      {q!r} -> " + " | ".join(h.text or h.id for h in hits))
    examples = _write_examples(data / "valid.tsv", workdir)
    elapsed = time.perf_counter() - t0
    shown_port = sock.getsockname()[1] if sock is not None else port
    base = f"http://{host}:{shown_port}"
    q = QUERIES[lang][0]
    photo, shape = (shlex.quote(_shown(examples[name])) for name in EXAMPLES)
    serve_line = (f"clipsearch serve --model {shlex.quote('local-dir:' + _shown(best))} "
                  f"--index-dir {shlex.quote(_shown(index))} --served-model-name {SERVED_NAME}")
    say(f"[5/5] done in {elapsed:.0f} s. Try it:")
    say(f"""
  Open {base}/ui in a browser to search by text or by image, or:

  curl -s {base}/search/text -H 'content-type: application/json' -d '{{"text": "{q}", "k": 3}}'
  curl -s {base}/embed -F texts='{q}' -F images=@{photo} -F images=@{shape}
  curl -s {base}/search/image -F image=@{photo} -F k=3
  curl -s {base}/classify -F image=@{photo} -F labels=circle -F labels=square -F labels=triangle -F labels=star
  curl -s {base}/readyz

  To serve it again later (from this directory):
  {serve_line}
""")
    info = {"recall": res, "build": build_text, "model": spec, "index": str(index), "seconds": elapsed,
            "serve": serve_line, "reused": reuse}
    if sock is not None:
        from clipsearch.service import server
        from clipsearch.service.settings import Settings

        settings = Settings(model=spec, index_dir=index, host=host, port=shown_port, log_level="warning",
                            served_model_name=SERVED_NAME)
        say(f"serving on {base}: the search page is {base}/ui (Ctrl-C to stop)")
        server.run(settings, {}, say=lambda _: None, sock=sock, model=model)
    return info
